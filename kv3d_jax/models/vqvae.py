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
from kv3d_jax.untrusted import quote

# The UCF-101 checkpoint ``ucf101_stride4x4x4``: VideoGPT's defaults.
N_HIDDENS = 240
N_RES_LAYERS = 4
DOWNSAMPLE = (4, 4, 4)
INPUT_SHAPE = (16, 128, 128)  # (T, H, W): VideoGPT's sequence_length and resolution
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


def _is_int(value) -> bool:
    return type(value) is int


# The largest encoder kv3d builds: beyond every published VideoGPT VQ-VAE (n_hiddens 240, 4 residual
# layers, downsample at most 4, clips of 16 frames of at most 128x128), bounded so that a
# checkpoint or params file cannot make kv3d build an encoder or clip it has no memory for.
MAX_N_HIDDENS = 1024
MAX_N_RES_LAYERS = 16
MAX_DOWNSAMPLE = 16
MAX_SEQUENCE_LENGTH = 64
MAX_RESOLUTION = 256

# Every layer name an encoder kv3d builds can have (the most residual layers and strided convs).
ALL_LAYERS = layer_names(MAX_N_RES_LAYERS, (MAX_DOWNSAMPLE,) * 3)


def check_config(n_hiddens: int = N_HIDDENS, n_res_layers: int = N_RES_LAYERS, downsample=DOWNSAMPLE,
                 input_shape=INPUT_SHAPE) -> dict:
    """The encoder's hyper-parameters as a config dict of ints and int lists, if kv3d can build that
    encoder; else a ValueError naming the one it cannot build and why.

    ``downsample`` ``(t, h, w)``: each a power of two of at most :data:`MAX_DOWNSAMPLE`, the largest
    at least 4 (VideoGPT's encoder with one strided conv or none does not run: its ``conv_last``
    then expects 3 input channels); ``n_hiddens``: even, at most :data:`MAX_N_HIDDENS` (the
    residual blocks halve it and the attention has 2 heads); ``n_res_layers``: 0 to
    :data:`MAX_N_RES_LAYERS`; ``input_shape`` ``(T, H, W)``: the clip size, divisible by
    ``downsample``, T at most :data:`MAX_SEQUENCE_LENGTH` and H, W at most :data:`MAX_RESOLUTION`.
    Every value is checked to be a bounded integer before any arithmetic on it.
    """
    downsample, input_shape = (tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in (downsample, input_shape))
    if not (_is_int(n_hiddens) and 2 <= n_hiddens <= MAX_N_HIDDENS and n_hiddens % 2 == 0):
        raise ValueError(f"VideoGPT encoder with n_hiddens={quote(n_hiddens)}: kv3d builds an even number from 2 to "
                         f"{MAX_N_HIDDENS} (the residual blocks halve it, the attention splits it over 2 heads)")
    if not (_is_int(n_res_layers) and 0 <= n_res_layers <= MAX_N_RES_LAYERS):
        raise ValueError(f"VideoGPT encoder with n_res_layers={quote(n_res_layers)}: must be an integer from 0 to "
                         f"{MAX_N_RES_LAYERS}")
    if not (len(downsample) == 3 and all(_is_int(d) and 1 <= d <= MAX_DOWNSAMPLE and d & (d - 1) == 0
                                         for d in downsample)):
        raise ValueError(f"VideoGPT encoder with downsample={quote(downsample)}: kv3d builds three powers of two "
                         f"(time, height, width) of at most {MAX_DOWNSAMPLE}")
    if max(downsample) < 4:
        raise ValueError(f"VideoGPT encoder with downsample={downsample!r}: VideoGPT's encoder needs a factor "
                         "of at least 4 on some axis (with fewer strided convs its conv_last expects 3 input "
                         "channels and it does not run)")
    limits = (MAX_SEQUENCE_LENGTH, MAX_RESOLUTION, MAX_RESOLUTION)
    if not (len(input_shape) == 3 and all(_is_int(n) and 1 <= n <= limit and n % d == 0
                                          for n, d, limit in zip(input_shape, downsample, limits))):
        raise ValueError(f"VideoGPT encoder with clips of {quote(input_shape)} frames x pixels: each must be a "
                         f"positive multiple of downsample {downsample}, with at most {MAX_SEQUENCE_LENGTH} frames "
                         f"(sequence_length) of at most {MAX_RESOLUTION}x{MAX_RESOLUTION} pixels (resolution)")
    return {"n_hiddens": n_hiddens, "n_res_layers": n_res_layers, "downsample": list(downsample),
            "input_shape": list(input_shape)}


def model(**config) -> VideoModel:
    """VideoGPT's VQ-VAE encoder described by ``config`` (:func:`check_config`'s keywords; none: the
    ``ucf101_stride4x4x4`` encoder on 16x128x128 clips); inputs ``x - 0.5``."""
    config = check_config(**config)
    module = VQVAEEncoder(config["n_hiddens"], config["n_res_layers"], tuple(config["downsample"]))
    return VideoModel(
        name="videogpt_vqvae",
        apply=lambda params, video, upto: module.apply(params, video, upto),
        layers=layer_names(config["n_res_layers"], config["downsample"]),
        input_shape=tuple(config["input_shape"]),
        mean=(0.5, 0.5, 0.5),
        std=(1.0, 1.0, 1.0),
        linear_layers=frozenset({"encoder_convs_0_conv"}),
        config=tuple((name, tuple(value) if isinstance(value, list) else value) for name, value in config.items()),
    )


def init_params(key: jax.Array, **config) -> dict:
    """Random variables (Flax default init, unit BN statistics) of the encoder ``config`` describes."""
    config = check_config(**config)
    module = VQVAEEncoder(config["n_hiddens"], config["n_res_layers"], tuple(config["downsample"]))
    return module.init(key, jnp.zeros((1, *config["downsample"], 3)), "encoder")
