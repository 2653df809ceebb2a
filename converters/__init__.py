"""Checkpoint converters: a PyTorch or Caffe2 checkpoint file to the params of a kv3d model.

Which converter reads which model's checkpoints is registered with the model, in
:mod:`kv3d_jax.models` (``Entry.converter``). A converter exposes ``CHECKPOINT`` (what file
it reads), ``convert(checkpoint) -> params`` over the object :func:`read_checkpoint`
returns and, for a model with hyper-parameters, ``config(checkpoint) -> dict``: the
architecture the checkpoint describes, as keywords of the model's ``build``.
"""

from __future__ import annotations

import importlib
from typing import Any

from converters.checkpoint import CheckpointError, checkpoint_format, read_checkpoint
from converters.common import CheckpointMismatchError, check_weights
from kv3d_jax import models


def converter(model_name: str) -> Any:
    """The converter registered for model ``model_name``; a ValueError lists the valid names."""
    module, _, attribute = models.entry(model_name).converter.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attribute) if attribute else found


def names() -> tuple[str, ...]:
    """The model names a checkpoint can be converted for."""
    return models.names()


def formats() -> dict[str, str]:
    """For each model name, the checkpoint its converter reads."""
    return {name: converter(name).CHECKPOINT for name in names()}


def convert(model_name: str, path, config: dict | None = None) -> tuple[dict, dict]:
    """``(params, config)`` of model ``model_name`` read from checkpoint file ``path`` (format
    auto-detected): Flax variables of numpy arrays, and the architecture the checkpoint describes
    as keywords of ``kv3d_jax.models.get(model_name, config)`` (empty for one-architecture models).

    ``config``: hyper-parameters the file does not record, e.g. inception_i3d's ``bn_eps`` for FVD's
    copy; they override the converter's and must be ones the model is built with (else a ValueError).
    The params pass :func:`converters.common.check_weights` (real, finite in float32, variances >= 0).
    """
    found = converter(model_name)
    checkpoint = read_checkpoint(path)
    try:
        described = found.config(checkpoint) if hasattr(found, "config") else {}
        params = found.convert(checkpoint)
        check_weights(params, model_name)
    except CheckpointError as err:
        raise type(err)(f"{path}: {err}") from None
    if config:
        described = {**described, **config}
        described = dict(models.get(model_name, described).config)
    return params, described


__all__ = [
    "CheckpointError", "CheckpointMismatchError", "checkpoint_format", "convert", "converter", "formats",
    "names", "read_checkpoint",
]
