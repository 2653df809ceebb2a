"""VideoGPT VQ-VAE: a Lightning ``.ckpt`` to the params of :mod:`kv3d_jax.models.vqvae` (the encoder).

The checkpoint's ``state_dict`` holds the whole ``VQVAE``; the ``encoder.*`` tensors must
be exactly those of the ``ucf101_stride4x4x4`` encoder (240 hidden channels, 4 residual
blocks, downsampling 4x4x4). The decoder, ``pre_vq_conv``, ``post_vq_conv`` and the
codebook are not part of the encoder and are dropped; any other tensor is an error.
"""

from __future__ import annotations

import re
from typing import Any

from converters.common import CheckpointMismatchError, find_state_dict
from converters.torch_layout import convert_state, template_of
from kv3d_jax.models import vqvae

CHECKPOINT = "VideoGPT VQ-VAE Lightning checkpoint (.ckpt) with 'state_dict' (e.g. ucf101_stride4x4x4)"

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


def convert(checkpoint: Any) -> dict:
    """Flax variables of :class:`kv3d_jax.models.vqvae.VQVAEEncoder` from a VideoGPT checkpoint."""
    state = find_state_dict(checkpoint)
    stray = [k for k in state if not k.startswith(("encoder.",) + _NOT_ENCODER)]
    if stray:
        raise CheckpointMismatchError(
            f"the checkpoint holds {len(stray)} tensors outside VideoGPT's VQVAE "
            f"(encoder, decoder, pre_vq_conv, post_vq_conv, codebook), e.g. {stray[0]!r}; "
            "is it a VideoGPT VQ-VAE checkpoint?")
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    return convert_state(encoder, template_of(vqvae.init_params), torch_path, "videogpt_vqvae")
