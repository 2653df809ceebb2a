"""The encoder of VideoGPT's 3D VQ-VAE (Yan et al. 2021, ``videogpt/vqvae.py``), channels-last, in Flax.

``Encoder``: ``log2(max downsample)`` strided ``4x4x4`` "same"-padded convs, each but the
last followed by a ReLU (the functional ``F.relu``, so a tap on ``encoder_convs_0_conv``
is before it); a ``3x3x3`` ``conv_last``; a residual stack of ``AttentionResidualBlock``
(BN, ReLU, ``3x3x3`` conv to half width, BN, ReLU, ``1x1x1`` conv back, BN, ReLU, and an
``AxialBlock``: the sum of three 2-head self-attentions along W, H and T); BN and ReLU.

Layer names are the module paths inside VideoGPT's ``VQVAE`` (``encoder.convs.0.conv``
-> ``encoder_convs_0_conv``); the residual blocks' outputs are tappable as
``encoder_res_stack_0`` ... and the encoder's output as ``encoder``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kv3d_jax.models.base import VideoModel
from kv3d_jax.models.layers import Taps, batch_norm, run_until, same_pad_conv3d

# The UCF-101 checkpoint ``ucf101_stride4x4x4``: VideoGPT's defaults.
N_HIDDENS = 240
N_RES_LAYERS = 4
DOWNSAMPLE = (4, 4, 4)
_N_HEAD = 2


def layer_names(n_res_layers: int = N_RES_LAYERS, downsample=DOWNSAMPLE) -> tuple[str, ...]:
    """Tappable layers of the encoder, in forward order."""
    n_down = max(int(math.log2(d)) for d in downsample)
    names = [f"encoder_convs_{i}_conv" for i in range(n_down)] + ["encoder_conv_last_conv"]
    for i in range(n_res_layers):
        names += [f"encoder_res_stack_{i}_block_2_conv", f"encoder_res_stack_{i}_block_5_conv",
                  f"encoder_res_stack_{i}"]
    return tuple(names) + ("encoder",)


def _axial_attention(name: str, x: jax.Array, axis: int, n_head: int) -> jax.Array:
    """VideoGPT's ``MultiHeadAttention`` with ``attn_type='axial'`` on ``x`` ``(N, T, H, W, C)``:
    softmax attention among the positions along ``axis`` only, ``n_head`` heads."""
    c = x.shape[-1]
    d = c // n_head

    def heads(proj: str) -> jax.Array:
        h = nn.Dense(c, use_bias=False, name=f"{name}_{proj}")(x)
        return jnp.moveaxis(h.reshape(*x.shape[:-1], n_head, d), axis, -2)  # (..., n_head, L, d)

    q, k, v = heads("w_qs"), heads("w_ks"), heads("w_vs")
    weights = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(d), axis=-1)
    out = jnp.moveaxis(weights @ v, -2, axis).reshape(x.shape)
    return nn.Dense(c, name=f"{name}_fc")(out)


def _residual_block(prefix: str, x: jax.Array, n_hiddens: int) -> Taps:
    """``AttentionResidualBlock``: ``x + block(x)``; yields its two convs and its output."""
    b = f"{prefix}_block"
    h = nn.relu(batch_norm(f"{b}_0")(x))
    h = same_pad_conv3d(f"{b}_2_conv", n_hiddens // 2, 3, bias=False)(h)
    yield f"{b}_2_conv", h
    h = nn.relu(batch_norm(f"{b}_3")(h))
    h = same_pad_conv3d(f"{b}_5_conv", n_hiddens, 1, bias=False)(h)
    yield f"{b}_5_conv", h
    h = nn.relu(batch_norm(f"{b}_6")(h))
    # AxialBlock: attn_w, attn_h, attn_t attend along W, H, T of (N, T, H, W, C).
    h = sum(_axial_attention(f"{b}_8_attn_{a}", h, axis, _N_HEAD)
            for a, axis in (("w", 3), ("h", 2), ("t", 1)))
    x = x + h
    yield prefix, x
    return x


def _forward(x: jax.Array, n_hiddens: int, n_res_layers: int, downsample) -> Taps:
    n_times = [int(math.log2(d)) for d in downsample]
    for i in range(max(n_times)):
        stride = tuple(2 if n > 0 else 1 for n in n_times)
        x = same_pad_conv3d(f"encoder_convs_{i}_conv", n_hiddens, 4, stride)(x)
        yield f"encoder_convs_{i}_conv", x
        x = nn.relu(x)
        n_times = [n - 1 for n in n_times]
    x = same_pad_conv3d("encoder_conv_last_conv", n_hiddens, 3)(x)
    yield "encoder_conv_last_conv", x
    for i in range(n_res_layers):
        x = yield from _residual_block(f"encoder_res_stack_{i}", x, n_hiddens)
    yield "encoder", nn.relu(batch_norm(f"encoder_res_stack_{n_res_layers}")(x))


class VQVAEEncoder(nn.Module):
    """VideoGPT's VQ-VAE encoder; ``__call__(x, upto)`` on ``x`` ``(N, T, H, W, 3)`` whose
    T, H, W are divisible by ``downsample``."""

    n_hiddens: int = N_HIDDENS
    n_res_layers: int = N_RES_LAYERS
    downsample: tuple[int, int, int] = DOWNSAMPLE

    @nn.compact
    def __call__(self, x: jax.Array, upto):
        taps = _forward(x, self.n_hiddens, self.n_res_layers, self.downsample)
        return run_until(taps, upto, layer_names(self.n_res_layers, self.downsample))


def model() -> VideoModel:
    """VideoGPT's VQ-VAE ``ucf101_stride4x4x4`` encoder: 16x128x128 clips, inputs ``x - 0.5``."""
    module = VQVAEEncoder()
    return VideoModel(
        name="videogpt_vqvae",
        apply=lambda params, video, upto: module.apply(params, video, upto),
        layers=layer_names(),
        input_shape=(16, 128, 128),
        mean=(0.5, 0.5, 0.5),
        std=(1.0, 1.0, 1.0),
        linear_layers=frozenset({"encoder_convs_0_conv"}),
    )


def init_params(key: jax.Array) -> dict:
    """Random encoder variables (Flax default init, unit BN statistics)."""
    return VQVAEEncoder().init(key, jnp.zeros((1, 4, 8, 8, 3)), "encoder")
