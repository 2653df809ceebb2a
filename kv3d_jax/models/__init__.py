"""Registry of the video models kv3d_jax knows by name."""

from __future__ import annotations

import functools
from typing import Callable

from kv3d_jax.models.base import UnknownLayerError, VideoModel
from kv3d_jax.models import c3d, i3d, motionnet, torchvision_video, vqvae

_REGISTRY: dict[str, Callable[[], VideoModel]] = {
    "c3d": c3d.model,
    "i3d_r50": i3d.model,
    "motionnet": motionnet.model,
    **{name: functools.partial(torchvision_video.model, name) for name in torchvision_video.NAMES},
    "videogpt_vqvae": vqvae.model,
}


def names() -> tuple[str, ...]:
    """The registered model names."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> VideoModel:
    """The :class:`VideoModel` registered as ``name``; a clear error lists the valid names."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models are: {', '.join(names())}") from None


__all__ = ["UnknownLayerError", "VideoModel", "get", "names"]
