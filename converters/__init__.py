"""Checkpoint converters: a PyTorch or Caffe2 checkpoint file to the params of a kv3d model.

Each converter module exposes ``CHECKPOINT`` (what file it reads) and
``convert(checkpoint) -> params`` over the object :func:`read_checkpoint` returns.
"""

from __future__ import annotations

from converters import c3d, i3d, motionnet, torchvision_video, vqvae
from converters.checkpoint import CheckpointError, checkpoint_format, read_checkpoint
from converters.common import CheckpointMismatchError

_CONVERTERS = {
    "c3d": c3d, "i3d_r50": i3d, "motionnet": motionnet, **torchvision_video.CONVERTERS,
    "videogpt_vqvae": vqvae,
}


def names() -> tuple[str, ...]:
    """The model names a checkpoint can be converted for."""
    return tuple(sorted(_CONVERTERS))


def formats() -> dict[str, str]:
    """For each model name, the checkpoint its converter reads."""
    return {name: _CONVERTERS[name].CHECKPOINT for name in names()}


def convert(model_name: str, path) -> dict:
    """The params of model ``model_name`` read from checkpoint file ``path`` (format auto-detected)."""
    if model_name not in _CONVERTERS:
        raise ValueError(
            f"no converter for model {model_name!r}; valid models are: {', '.join(names())}"
        )
    checkpoint = read_checkpoint(path)
    try:
        return _CONVERTERS[model_name].convert(checkpoint)
    except CheckpointError as err:
        raise type(err)(f"{path}: {err}") from None


__all__ = [
    "CheckpointError", "CheckpointMismatchError", "checkpoint_format", "convert", "formats",
    "names", "read_checkpoint",
]
