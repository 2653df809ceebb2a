"""Flax building blocks with PyTorch semantics, and the tap protocol the zoo models share.

A zoo model's forward pass is written as a generator of ``(layer name, activation)``
pairs, one per tappable module, in the order PyTorch runs them. :func:`run_until`
consumes it and stops at the requested layer, so nothing past that layer is computed.
Submodules are created while the generator runs inside the model's ``@nn.compact``
``__call__``, so Flax names them by the ``name=`` given here: the PyTorch module path
with ``.`` replaced by ``_``.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Taps = Iterator[tuple[str, jax.Array]]


def run_until(taps: Taps, upto: str | Sequence[str], valid: Sequence[str]):
    """Runs ``taps`` up to layer ``upto``.

    Args:
      taps: the model's forward generator.
      upto: one layer name, or several.
      valid: the model's tappable layers, for the error message.

    Returns:
      The activation of ``upto`` if it is a string; else a dict from each requested
      name to its activation, computed in one pass that stops at the last of them.
    """
    wanted = {upto} if isinstance(upto, str) else set(upto)
    found = {}
    for name, x in taps:
        if name in wanted:
            found[name] = x
            if len(found) == len(wanted):
                return found[upto] if isinstance(upto, str) else found
    missing = sorted(wanted - set(found))
    raise ValueError(f"no layer named {', '.join(map(repr, missing))}; valid layers are: {', '.join(valid)}")


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v,) * 3 if isinstance(v, int) else tuple(v)


Padding = int | Sequence[int] | Sequence[tuple[int, int]]

# Below this many input channels (times temporal taps), a channel is too short a vector to
# contract on its own: on CPU the temporal taps are folded into the input channels of one 2D
# convolution (C3D's conv1: 3 x 3 = 9), and a one-output kernel runs as a fused multiply-add
# over channel planes. Above it, one 2D convolution per temporal tap is faster and needs no
# copy of the input per tap, and a one-output kernel contracts the channels first.
_FEW_CHANNELS = 32


def _pad_pairs(padding: Padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, int):
        return ((padding, padding),) * 3
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _frames(x: jax.Array, start: int, count: int, stride: int) -> jax.Array:
    """Frames ``start, start + stride, …`` (``count`` of them) of ``x`` ``(N, T, H, W, C)``."""
    return jax.lax.slice_in_dim(x, start, start + (count - 1) * stride + 1, stride, axis=1)


def _single_output(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int]) -> jax.Array:
    """The correlation of ``x`` ``(N, T, H, W, C)`` (already padded) with a one-output ``kernel``
    ``(kt, kh, kw, C, 1)``: ``(N, T', H', W', 1)``, as sums of shifted maps, which stay cheap
    when vmapped over kernels (a batched convolution would become a grouped one)."""
    kt, kh, kw, c, _ = kernel.shape
    n, t, h, w, _ = x.shape
    st, sh, sw = strides
    out = ((t - kt) // st + 1, (h - kh) // sh + 1, (w - kw) // sw + 1)
    taps = [(a, b, d) for a in range(kt) for b in range(kh) for d in range(kw)]

    def shifted(maps: jax.Array, a: int, b: int, d: int) -> jax.Array:
        """``maps`` ``(N, T, H, W)`` read at output positions times strides, plus tap ``(a, b, d)``."""
        return jax.lax.slice(maps, (0, a, b, d), (n, a + (out[0] - 1) * st + 1, b + (out[1] - 1) * sh + 1,
                                                  d + (out[2] - 1) * sw + 1), (1, st, sh, sw))

    if c < _FEW_CHANNELS:
        # Few channels: one fused multiply-add over every (channel, tap) of the channel planes.
        planes = jnp.moveaxis(x, -1, 0)
        y = sum(shifted(planes[i], *tap) * kernel[(*tap, i, 0)] for i in range(c) for tap in taps)
    else:
        # Many channels: contract them first, one matrix product (positions x C) @ (C x taps),
        # then add up the shifted single-channel maps.
        maps = jnp.moveaxis(x @ kernel.reshape(len(taps), c).T, -1, 0)
        y = sum(shifted(maps[i], *tap) for i, tap in enumerate(taps))
    return y[..., None]


def convolve3d(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = 1, padding: Padding = 0,
               groups: int = 1) -> jax.Array:
    """The 3D cross-correlation of ``x`` ``(N, T, H, W, Cin)`` with ``kernel`` ``(kt, kh, kw, Cin/groups, Cout)``
    (DHWIO), zero padding ``padding`` (an int, one per axis, or ``(before, after)`` pairs) and
    ``strides``: ``(N, T', H', W', Cout)``, equal to ``lax.conv_general_dilated`` in 3D up to float rounding.

    XLA's CPU backend runs 3D convolutions several times slower than 2D ones, so the temporal
    axis is taken apart: the output is a sum over temporal taps of 2D convolutions with time
    folded into the batch. With few input channels (C3D's conv1) the temporal taps are instead
    stacked as input channels of a single 2D convolution. Other platforms use XLA's 3D
    convolution. A kernel with one output channel (a projected tap, see :class:`Conv3d`) is
    computed as sums of shifted maps on every platform.
    """
    strides, pads = _triple(strides), _pad_pairs(padding)
    if kernel.shape[-1] == 1 and groups == 1:
        return _single_output(jnp.pad(x, ((0, 0), *pads, (0, 0))), kernel, strides)
    # GPUs and TPUs have fast 3D convolutions of their own.
    return jax.lax.platform_dependent(
        x, kernel, cpu=functools.partial(_by_2d_convolutions, strides=strides, pads=pads, groups=groups),
        default=lambda x, kernel: jax.lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=groups))


def _by_2d_convolutions(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
                        pads: tuple[tuple[int, int], ...], groups: int) -> jax.Array:
    """:func:`convolve3d` on CPU: a sum over temporal taps of 2D convolutions, or one 2D convolution
    over stacked temporal taps when there are few input channels."""
    (t0, t1), (h0, h1), (w0, w1) = pads
    kt, kh, kw, cin, cout = kernel.shape
    st, sh, sw = strides
    x = jnp.pad(x, ((0, 0), (t0, t1), (0, 0), (0, 0), (0, 0)))
    n, t, h, w, c = x.shape
    frames = (t - kt) // st + 1

    def conv2d(frames_in: jax.Array, kernel2d: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            frames_in.reshape(n * frames, h, w, frames_in.shape[-1]), kernel2d, (sh, sw), ((h0, h1), (w0, w1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
        return y.reshape(n, frames, *y.shape[1:])

    if kt > 1 and groups == 1 and kt * cin < _FEW_CHANNELS:
        stacked = jnp.concatenate([_frames(x, a, frames, st) for a in range(kt)], axis=-1)
        return conv2d(stacked, jnp.moveaxis(kernel, 0, 2).reshape(kh, kw, kt * cin, cout))
    return sum(conv2d(_frames(x, a, frames, st), kernel[a]) for a in range(kt))


class Conv3d(nn.Module):
    """``torch.nn.Conv3d`` on NTHWC, computed by :func:`convolve3d`; params ``kernel`` (DHWIO) and
    ``bias``, laid out and initialised as Flax's ``nn.Conv``.

    ``__call__(x, project=None)``: with ``project`` ``(Cout,)`` it returns only the projection
    ``output @ project`` as ``(N, T', H', W', 1)``, computed with the projected kernel
    ``kernel @ project``: one output channel's worth of work instead of ``Cout``. An integer
    ``project`` ``()`` selects that output channel (its kernel and bias alone, so another
    channel's weights cannot reach it, even non-finite ones).
    """

    features: int
    kernel_size: tuple[int, int, int]
    strides: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[tuple[int, int], ...] = ((0, 0),) * 3
    use_bias: bool = True
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, project: jax.Array | None = None) -> jax.Array:
        shape = (*self.kernel_size, x.shape[-1] // self.groups, self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        if project is not None:
            if self.groups != 1:
                raise ValueError(f"{self.name}: a grouped convolution cannot be projected onto its outputs")
            if jnp.issubdtype(jnp.result_type(project), jnp.integer):
                kernel = jnp.take(kernel, project[None], axis=-1)
                bias = None if bias is None else jnp.take(bias, project[None])
            else:
                kernel = kernel @ project[:, None]
                bias = None if bias is None else bias @ project[:, None]
        y = convolve3d(x, kernel.astype(x.dtype), self.strides, self.padding, self.groups)
        return y if bias is None else y + bias.astype(x.dtype)


def conv3d(name: str, features: int, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
           padding: int | Sequence[int] = 0, bias: bool = False, groups: int = 1) -> Conv3d:
    """A ``torch.nn.Conv3d`` as a :class:`Conv3d` on NTHWC: symmetric zero padding of ``padding`` per axis."""
    return Conv3d(features, _triple(kernel), strides=_triple(stride), padding=_pad_pairs(_triple(padding)),
                  use_bias=bias, groups=groups, name=name)


def same_pad_conv3d(name: str, features: int, kernel: int, stride: int | Sequence[int] = 1,
                    bias: bool = True) -> Conv3d:
    """VideoGPT's ``SamePadConv3d``: total padding ``k - s`` per axis, the odd pixel in front."""
    pads = tuple((k - s) // 2 + (k - s) % 2 for k, s in zip(_triple(kernel), _triple(stride)))
    after = tuple((k - s) // 2 for k, s in zip(_triple(kernel), _triple(stride)))
    return Conv3d(features, _triple(kernel), strides=_triple(stride),
                  padding=tuple(zip(pads, after)), use_bias=bias, name=name)


def batch_norm(name: str, eps: float = 1e-5) -> nn.BatchNorm:
    """``torch.nn.BatchNorm3d`` in eval mode: running statistics from the ``batch_stats`` collection."""
    return nn.BatchNorm(use_running_average=True, epsilon=eps, name=name)


def _windows(x: jax.Array, window: tuple[int, int, int]) -> jax.Array:
    """The non-overlapping ``window`` cells of ``x`` ``(N, T, H, W, C)`` (a remainder is dropped, as
    in floor mode): ``(N, T', H', W', C, cell size)``."""
    n, t, h, w, c = x.shape
    a, b, d = window
    x = x[:, :t // a * a, :h // b * b, :w // d * d]
    x = x.reshape(n, t // a, a, h // b, b, w // d, d, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(*x.shape[:5], a * b * d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cell_max(x: jax.Array, window: tuple[int, int, int]) -> jax.Array:
    return _windows(x, window).max(-1)


def _cell_max_forward(x, window):
    cells = _windows(x, window)
    # The backward pass needs only which cell element won (one byte per output), not the input:
    # a quarter to an eighth of a byte per input element instead of four.
    return cells.max(-1), (cells.argmax(-1).astype(jnp.int8), x.shape)


def _cell_max_backward(window, residuals, grad):
    winner, shape = residuals
    n, t, h, w, c = grad.shape
    a, b, d = window
    spread = jnp.where(jnp.arange(a * b * d, dtype=jnp.int8) == winner[..., None], grad[..., None], 0)
    spread = spread.reshape(n, t, h, w, c, a, b, d).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    spread = spread.reshape(n, t * a, h * b, w * d, c)
    return (jnp.pad(spread, [(0, full - cut) for full, cut in zip(shape, spread.shape)]),)


_cell_max.defvjp(_cell_max_forward, _cell_max_backward)


def max_pool3d(x: jax.Array, window: int | Sequence[int], stride: int | Sequence[int],
               padding: Padding = 0) -> jax.Array:
    """``torch.nn.MaxPool3d`` (floor mode) on NTHWC; padded cells never win (they are -inf).
    ``padding``: an int, one per axis, or ``(before, after)`` pairs (TensorFlow's "SAME" pads more after).

    Non-overlapping unpadded windows (C3D's pools) are a max over reshaped cells whose gradient
    goes, as PyTorch's does, to the first maximum of each cell; on CPU it runs several times
    faster and keeps a sixteenth of the memory of ``reduce_window``'s select-and-scatter.
    """
    window, stride, pads = _triple(window), _triple(stride), _pad_pairs(padding)
    if window != stride or any(p for pair in pads for p in pair):
        return nn.max_pool(x, window, strides=stride, padding=pads)
    return _cell_max(x, window)
