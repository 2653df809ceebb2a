"""The model zoo: a registered model and its params, from a checkpoint or a params file, in one call."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

import converters
from converters.checkpoint import NotACheckpointError
from kv3d_jax import models, params_io
from kv3d_jax.models import c3d, i3d, motionnet, torchvision_video, vqvae
from kv3d_jax.models.base import Params, VideoModel

# Each registered model's random init, whose shapes a params file must have.
_INIT = {
    "c3d": c3d.init_params,
    "i3d_r50": i3d.init_params,
    "motionnet": motionnet.init_params,
    **{name: functools.partial(torchvision_video.init_params, name) for name in torchvision_video.NAMES},
    "videogpt_vqvae": vqvae.init_params,
}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_params(name: str, params: Params) -> Params:
    """Returns ``params`` if they have exactly the variables of model ``name``; else raises
    a ValueError naming every missing, unexpected and misshaped one."""
    expected = _shapes(jax.eval_shape(_INIT[name], jax.random.key(0)))
    found = _shapes(params)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k} {found[k]} (expected {expected[k]})" for k in expected
                 if k in found and found[k] != expected[k]]
    if missing or unexpected or misshaped:
        parts = [f"{what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", misshaped)) if keys]
        raise ValueError(f"these are not {name} params; " + "; ".join(parts)
                         + f". Convert {name}'s checkpoint with `kv3d convert {name} CHECKPOINT -o PARAMS`")
    return params


def load(name: str, weights) -> tuple[VideoModel, Params]:
    """Model ``name`` and its params.

    Args:
      name: a registered model name (``kv3d_jax.models.names()``).
      weights: path of a checkpoint the model's converter reads (PyTorch zip, legacy
        ``torch.save`` or Caffe2 pickle, told apart by its bytes) or of a params file
        written by ``kv3d convert``.

    Returns:
      ``(model, params)``, params as Flax variables of numpy arrays.
    """
    model = models.get(name)
    path = Path(weights)
    try:
        converters.checkpoint_format(path)
    except NotACheckpointError:
        return model, check_params(name, params_io.load(path))
    return model, converters.convert(name, path)
