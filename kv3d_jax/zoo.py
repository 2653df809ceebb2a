"""Loading a registered model and its params in one call: ``load(name, weights)``.

The one loader the command line, the sweep (:mod:`kv3d_jax.pipeline`) and the Python API
use. ``weights`` is a checkpoint (converted on the fly by the converter registered in
:mod:`kv3d_jax.models`), a params file written by :func:`kv3d_jax.params_io.save`, or None
for a model whose checkpoint ships with the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

import converters
from converters.checkpoint import NotACheckpointError
from converters.common import check_weights
from kv3d_jax import models, params_io
from kv3d_jax.models.base import Params, VideoModel
from kv3d_jax.untrusted import escape, quote


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_params(name: str, params: Params, config: Mapping[str, Any] | None = None) -> Params:
    """Returns ``params`` if they have exactly the variables of model ``name`` built with ``config``
    and values the model can use; else raises a ValueError naming the missing, unexpected and
    misshaped ones (the first few of each), or the tensors that are not real floats, are not finite
    in float32 or are negative BatchNorm variances (:func:`converters.common.check_weights`)."""
    expected = _shapes(jax.eval_shape(lambda key: models.init_params(name, key, config), jax.random.key(0)))
    found = {escape(k, 100): v for k, v in _shapes(params).items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k} {found[k]} (expected {expected[k]})" for k in expected
                 if k in found and found[k] != expected[k]]
    if missing or unexpected or misshaped:
        parts = [f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", misshaped)) if keys]
        raise ValueError(f"these are not {name} params; " + "; ".join(parts)
                         + f". Give {name}'s checkpoint, or a params file converted from it")
    check_weights(params, name)
    return params


def load(name: str, weights=None, config: Mapping[str, Any] | None = None) -> tuple[VideoModel, Params]:
    """Model ``name`` and its params.

    Args:
      name: a registered model name (``kv3d_jax.models.names()``).
      weights: path of a checkpoint the model's converter reads (PyTorch zip, legacy
        ``torch.save`` or Caffe2 pickle, told apart by its bytes), or of a params file
        written by :func:`kv3d_jax.params_io.save`; None for the checkpoint that ships with
        the package (only models registered with ``embedded`` weights have one).
      config: hyper-parameters a checkpoint does not record (inception_i3d's ``bn_eps`` 1e-5 for
        FVD's copy of piergiaj's weights); a params file records its own, so none may be given with one.

    Returns:
      ``(model, params)``: the model built with the config the weights describe, its params
      as Flax variables of numpy arrays.
    """
    entry = models.entry(name)
    if weights is None:
        if entry.embedded is None:
            raise ValueError(f"{name}'s weights do not ship with kv3d: give its checkpoint "
                             f"({converters.converter(name).CHECKPOINT}) or a params file converted from it")
        weights = entry.embedded()
    path = Path(weights)
    try:
        converters.checkpoint_format(path)
    except NotACheckpointError:
        stored = params_io.read(path)
        if config:
            raise ValueError(f"{path} is a params file, which records its model's config "
                             f"{stored.config}; convert the checkpoint again to change it")
        if stored.model is not None and stored.model != name:
            other = stored.model if stored.model in models.names() else quote(stored.model)
            raise ValueError(f"{path} holds params of {other}, not {name}") from None
        params, config = check_params(name, stored.params, stored.config), stored.config
    else:
        params, config = converters.convert(name, path, dict(config or {}))
    return models.get(name, config), params
