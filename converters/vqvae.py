"""VideoGPT VQ-VAE: a Lightning ``.ckpt`` to the params of :mod:`kv3d_jax.models.vqvae` (the encoder).

The checkpoint's ``hyper_parameters`` hold VideoGPT's ``args`` (an ``argparse.Namespace``);
its ``n_hiddens``, ``n_res_layers`` and ``downsample`` describe the encoder, and its
``sequence_length`` and ``resolution`` the clips it was trained on. They are read, not
guessed from the tensors: encoders with ``downsample`` (4, 4, 4), (2, 4, 4) and (4, 2, 2)
have the same tensor shapes but different strides. The ``state_dict`` holds the whole
``VQVAE``; its ``encoder.*`` tensors must be exactly those of the encoder the
hyper-parameters describe. The decoder, ``pre_vq_conv``, ``post_vq_conv`` and the codebook
are not part of the encoder and are dropped; any other tensor is an error.
"""

from __future__ import annotations

import re
from typing import Any

from converters.common import CheckpointMismatchError, find_state_dict
from converters.torch_layout import convert_state, template_of
from kv3d_jax.models import vqvae
from kv3d_jax.untrusted import quote

CHECKPOINT = ("VideoGPT VQ-VAE Lightning checkpoint (.ckpt) with 'state_dict' and 'hyper_parameters' "
              "(e.g. ucf101_stride4x4x4, kinetics_stride2x4x4, bair_stride4x2x2)")
# VideoGPT's args that describe the encoder, and the clip size it was trained on.
_ENCODER_ARGS = ("n_hiddens", "n_res_layers", "downsample")

_NOT_ENCODER = ("decoder.", "pre_vq_conv.", "post_vq_conv.", "codebook.")
# Module names of VideoGPT that contain "_" (every other "_" of a Flax name was a ".").
_COMPOUND = ("conv_last", "res_stack", "attn_w", "attn_h", "attn_t", "w_qs", "w_ks", "w_vs")


def torch_path(name: str) -> str:
    """Flax module name -> VideoGPT module path (``encoder_res_stack_0_block_8_attn_w_w_qs`` ->
    ``encoder.res_stack.0.block.8.attn_w.w_qs``)."""
    path = name.replace("_", ".")
    for token in _COMPOUND:
        path = re.sub(rf"(?<![^.]){re.escape(token.replace('_', '.'))}(?![^.])", token, path)
    return path


def config(checkpoint: Any) -> dict:
    """The encoder's config (keywords of :func:`kv3d_jax.models.vqvae.model`) from the checkpoint's
    ``hyper_parameters`` → ``args``; a :class:`CheckpointMismatchError` says what is missing or
    which setting kv3d cannot build."""
    hyper = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    args = hyper.get("args", hyper) if isinstance(hyper, dict) else None
    if not isinstance(args, dict):
        raise CheckpointMismatchError(
            "the checkpoint records no hyper-parameters ('hyper_parameters' -> 'args', as VideoGPT's "
            "Lightning checkpoints do), so kv3d cannot tell which encoder it holds: downsample (4, 4, 4), "
            "(2, 4, 4) and (4, 2, 2) have the same tensor shapes")
    missing = [name for name in _ENCODER_ARGS if name not in args]
    if missing:
        raise CheckpointMismatchError(f"the checkpoint's hyper-parameters lack {', '.join(missing)}, "
                                      "which describe VideoGPT's encoder")
    found = {name: args[name] for name in _ENCODER_ARGS}
    if "sequence_length" in args and "resolution" in args:
        found["input_shape"] = (args["sequence_length"], args["resolution"], args["resolution"])
    try:
        return vqvae.check_config(**found)
    except ValueError as err:
        raise CheckpointMismatchError(f"its hyper-parameters describe an encoder kv3d cannot build: {err}") from None


def convert(checkpoint: Any) -> dict:
    """Flax variables of the :class:`kv3d_jax.models.vqvae.VQVAEEncoder` the checkpoint's
    hyper-parameters describe (:func:`config`)."""
    settings = config(checkpoint)
    state = find_state_dict(checkpoint)
    stray = [k for k in state if not k.startswith(("encoder.",) + _NOT_ENCODER)]
    if stray:
        raise CheckpointMismatchError(
            f"the checkpoint holds {len(stray)} tensors outside VideoGPT's VQVAE "
            f"(encoder, decoder, pre_vq_conv, post_vq_conv, codebook), e.g. {quote(stray[0])}; "
            "is it a VideoGPT VQ-VAE checkpoint?")
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    return convert_state(encoder, template_of(lambda key: vqvae.init_params(key, **settings)), torch_path,
                         "videogpt_vqvae")
