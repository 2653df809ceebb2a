"""What happens to a video between the parameterization and the model (SPEC §2 items 3–5).

The random jitter is a 3D shift + isotropic scale and the resize is trilinear; both are
separable, so each is a small interpolation matrix per axis (``T'×T``, ``H'×H``, ``W'×W``)
applied with ``einsum``, and a jitter followed by a resize is one matrix per axis. This
replaces a gather-based ``grid_sample`` at a fraction of the cost and with exact gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCALES = tuple(1.0 + (i - 5) / 50.0 for i in range(11))  # 0.90, 0.92, ..., 1.10
MAX_SHIFT = (8, 8, 4)  # dx, dy in {0..7} px, dt in {0..3} frames

Matrices = tuple[jax.Array, jax.Array, jax.Array]  # (T'×T, H'×H, W'×W)


class Jitter(NamedTuple):
    """One draw of the random affine: content moves by ``dx`` px right, ``dy`` px down,
    ``dt`` frames later, and is scaled by ``scale`` about the ``(0, 0, 0)`` corner."""

    dx: jax.Array
    dy: jax.Array
    dt: jax.Array
    scale: jax.Array


def random_jitter(key: jax.Array, max_shift=MAX_SHIFT, scales=SCALES) -> Jitter:
    """A jitter with ``dx, dy, dt`` uniform in ``{0..max_shift-1}`` and ``scale`` uniform in ``scales``."""
    kx, ky, kt, ks = jax.random.split(key, 4)
    shift = lambda k, n: jax.random.randint(k, (), 0, n).astype(jnp.float32)
    scale = jax.random.choice(ks, jnp.asarray(scales, jnp.float32))
    return Jitter(shift(kx, max_shift[0]), shift(ky, max_shift[1]), shift(kt, max_shift[2]), scale)


def _linear_weights(xp, coords, n: int):
    lo = xp.floor(coords)
    frac = (coords - lo)[:, None]
    j = xp.arange(n, dtype=coords.dtype)[None, :]
    return (1.0 - frac) * (j == lo[:, None]) + frac * (j == lo[:, None] + 1.0)


def interpolation_matrix(coords: jax.Array, n: int) -> jax.Array:
    """Weights ``(len(coords), n)`` that linearly interpolate a length-``n`` signal at ``coords``.

    ``coords`` are pixel indices; taps outside ``[0, n-1]`` read zero (``grid_sample``'s
    ``padding_mode='zeros'``), so a row can sum to less than one near the border.
    """
    return _linear_weights(jnp, coords, n)


def affine_source_coords(n: int, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Source index ``(n,)`` read by each destination index of one axis of length ``n``.

    This is kornia's ``warp_affine3d(x, [[s,0,0,dx],[0,s,0,dy],[0,0,s,dt]], align_corners=False)``
    along one axis. kornia normalises pixels with ``x ↦ 2x/(n-1) - 1`` (corner pixel centres at
    ±1) but samples with ``align_corners=False`` (outer pixel edges at ±1); composed, a
    destination index ``i`` reads ``((i + ½) - shift·n/(n-1)) / scale - ½``, i.e. the scale
    pivots on the outer corner of pixel 0 and the shift is stretched by ``n/(n-1)``.
    """
    if n < 2:
        raise ValueError(f"the jitter needs at least 2 samples along every axis, got {n}")
    i = jnp.arange(n, dtype=jnp.float32)
    # A product with the reciprocal, not a quotient: XLA rewrites ``x / scale`` as
    # ``x * (1 / scale)`` in some programs and not in others (it depends on the batch per
    # device), and the one-ulp difference moves a tap; written out, every program rounds alike.
    return ((i + 0.5) - shift * (n / (n - 1.0))) * (1.0 / scale) - 0.5


def jitter_matrices(jitter: Jitter, shape: tuple[int, int, int]) -> Matrices:
    """The jitter as per-axis interpolation matrices for a ``(T, H, W)`` video: ``(T×T, H×H, W×W)``."""
    t, h, w = shape
    return tuple(
        interpolation_matrix(affine_source_coords(n, d, jitter.scale), n)
        for n, d in ((t, jitter.dt), (h, jitter.dy), (w, jitter.dx))
    )


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear-resize weights with ``align_corners=True``, as PyTorch computes them.

    Built with numpy (a constant of the compiled program), in float32 like PyTorch's kernel.
    """
    step = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    coords = np.arange(n_out, dtype=np.float32) * step
    return _linear_weights(np, coords, n_in).astype(np.float32)


def resize_matrices(shape: tuple[int, int, int], size: tuple[int, int, int]) -> Matrices:
    """Trilinear resize ``(T, H, W)`` → ``size`` (``align_corners=True``) as per-axis matrices."""
    return tuple(jnp.asarray(resize_matrix(n_in, n_out)) for n_in, n_out in zip(shape, size))


def compose(outer: Matrices, inner: Matrices) -> Matrices:
    """The per-axis matrices of applying ``inner`` then ``outer``."""
    return tuple(a @ b for a, b in zip(outer, inner))


def apply(video: jax.Array, matrices: Matrices) -> jax.Array:
    """``video`` ``(T, H, W, C)`` resampled by per-axis matrices ``(T'×T, H'×H, W'×W)``: ``(T', H', W', C)``."""
    mt, mh, mw = matrices
    # Width then height then time: the cheapest order when time is upsampled most.
    x = jnp.einsum("vw,thwc->thvc", mw, video)
    x = jnp.einsum("uh,thvc->tuvc", mh, x)
    return jnp.einsum("st,tuvc->suvc", mt, x)


def normalize(video: jax.Array, mean, std) -> jax.Array:
    """``(video - mean) / std`` per colour channel; ``video`` is ``(..., 3)``."""
    return (video - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
