"""The registry of the video models kv3d_jax knows by name: each registered once, here.

An :class:`Entry` holds everything kv3d needs about a model: how to build its
:class:`VideoModel` and its random variables from a config, which converter module reads
its checkpoints, and the checkpoint shipped with the package, if any. The converters
(top-level package ``converters``) import the model modules; this module only names its
converter, so nothing here imports ``converters``. :mod:`kv3d_jax.zoo` joins the two
into ``load(name, weights)``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Mapping

from kv3d_jax.models.base import Params, UnknownLayerError, VideoModel
from kv3d_jax.models import c3d, i3d, inception_i3d, motionnet, torchvision_video, vqvae
from kv3d_jax.untrusted import escape, quote


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered model.

    Attributes:
      build: ``build(**config) -> VideoModel``; no keywords builds the default architecture.
      init: ``init(key, **config) -> params``, random Flax variables of that architecture.
      converter: ``"module"`` or ``"module:attribute"`` naming the converter of its checkpoints
        (an object with ``CHECKPOINT``, a description of the file it reads, and
        ``convert(checkpoint) -> params``; optionally ``config(checkpoint) -> dict``, the
        keywords of ``build`` the checkpoint describes).
      embedded: ``embedded() -> Path`` of the checkpoint that ships with the package, used when
        no weights are given; None for models whose weights the user must supply.
      layers: every layer name any config of the model can have, for a model whose layers depend
        on its config; None: the default architecture's layers are all there are.
    """

    build: Callable[..., VideoModel]
    init: Callable[..., Params]
    converter: str
    embedded: Callable[[], Path] | None = None
    layers: tuple[str, ...] | None = None


_REGISTRY: dict[str, Entry] = {
    "c3d": Entry(c3d.model, c3d.init_params, "converters.c3d"),
    "i3d_r50": Entry(i3d.model, i3d.init_params, "converters.i3d"),
    "inception_i3d": Entry(inception_i3d.model, inception_i3d.init_params, "converters.inception_i3d",
                           inception_i3d.checkpoint_path),
    "motionnet": Entry(motionnet.model, motionnet.init_params, "converters.motionnet", motionnet.checkpoint_path),
    **{name: Entry(functools.partial(torchvision_video.model, name),
                   functools.partial(torchvision_video.init_params, name),
                   f"converters.torchvision_video:{name.upper()}")
       for name in torchvision_video.NAMES},
    "videogpt_vqvae": Entry(vqvae.model, vqvae.init_params, "converters.vqvae", layers=vqvae.ALL_LAYERS),
}


def _quote_config(config) -> str:
    """``config`` (maybe read from a file) for a message: its first few settings, each value quoted short."""
    items = list(dict(config or {}).items())
    shown = ", ".join(f"{quote(k, 30)}: {quote(v, 40)}" for k, v in items[:6])
    return "{" + shown + (", ..." if len(items) > 6 else "") + "}"


def names() -> tuple[str, ...]:
    """The registered model names."""
    return tuple(sorted(_REGISTRY))


def entry(name: str) -> Entry:
    """The :class:`Entry` registered as ``name``; a ValueError lists the valid names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {quote(name)}; valid models are: {', '.join(names())}") from None


def get(name: str, config: Mapping[str, Any] | None = None) -> VideoModel:
    """The :class:`VideoModel` registered as ``name``, built with ``config`` (its hyper-parameters,
    e.g. VideoGPT's ``downsample``; None or empty: the default architecture).

    A config the model cannot be built with raises a ValueError naming the setting.
    """
    build = entry(name).build
    try:
        return build(**dict(config or {}))
    except TypeError as err:
        raise ValueError(f"{name} cannot be built with config {_quote_config(config)}: {escape(str(err), 200)}") from None


def layer_names(name: str) -> frozenset[str]:
    """Every layer name model ``name`` has in any architecture kv3d builds for it: the vocabulary a
    layer name read from a file (e.g. a stage-1 ``.npz``) must come from before it names a file."""
    found = entry(name)
    return frozenset(found.layers if found.layers is not None else get(name).layers)


def init_params(name: str, key, config: Mapping[str, Any] | None = None) -> Params:
    """Random variables of model ``name`` built with ``config`` (as :func:`get`)."""
    init = entry(name).init
    try:
        return init(key, **dict(config or {}))
    except TypeError as err:
        raise ValueError(f"{name} cannot be built with config {_quote_config(config)}: {escape(str(err), 200)}") from None


__all__ = ["Entry", "UnknownLayerError", "VideoModel", "entry", "get", "init_params", "layer_names", "names"]
