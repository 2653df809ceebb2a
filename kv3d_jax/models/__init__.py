"""Registry of the video models kv3d_jax knows by name."""

from __future__ import annotations

from typing import Callable

from kv3d_jax.models.base import UnknownLayerError, VideoModel
from kv3d_jax.models import c3d

_REGISTRY: dict[str, Callable[[], VideoModel]] = {
    "c3d": c3d.model,
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
