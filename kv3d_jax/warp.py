"""Image operators of the decomposition: bilinear backward warping (SPEC §3) and Gaussian blur.

Pixel ``(x, y)`` is the centre of column ``x``, row ``y``; an image covers
``[0, W - 1] × [0, H - 1]``, so this is ``grid_sample(..., align_corners=True)``.

Outside the image the border is clamped (``padding_mode="border"``): a sample point
past the edge reads the nearest edge pixel. A decomposition wants this rather than
zeros: a sample point that pokes slightly out of the frame should see the content
next to it, not an artificial grey frame whose edge would pull the fit. The price is
that a clamped coordinate carries no gradient, and content that entered through the
border has no true sample point; ``motion`` therefore ignores pixels whose sample
point falls outside, or near the edge (:func:`inside` with a margin).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def pixel_grid(h: int, w: int) -> jax.Array:
    """The ``(H, W, 2)`` grid of pixel-centre coordinates ``(x, y)``."""
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    return jnp.stack([xs, ys], axis=-1)


def _cells(h: int, w: int, x: jax.Array, y: jax.Array):
    """Flat index of each point's upper-left cell corner and its fractional offsets.

    A non-finite coordinate reads pixel 0 (or the clamped edge): every index stays inside the
    image, so a failed kernel's NaN can never address another kernel's pixels.
    """
    x = jnp.clip(jnp.nan_to_num(x), 0.0, w - 1.0)
    y = jnp.clip(jnp.nan_to_num(y), 0.0, h - 1.0)
    # The corner is clamped one short of the far edge, so a point on that edge
    # keeps weight 1 on the edge pixel instead of reading past it.
    x0 = jnp.clip(jnp.floor(x), 0.0, max(w - 2, 0))
    y0 = jnp.clip(jnp.floor(y), 0.0, max(h - 2, 0))
    return (y0 * w + x0).astype(jnp.int32), (x - x0)[..., None], (y - y0)[..., None]


def _quads(image: jax.Array) -> jax.Array:
    """``(H, W, 4C)``: each pixel, then its right, lower and lower-right neighbours (edge-clamped).

    One gather of this table fetches all four corners of a bilinear cell.
    """
    right = jnp.concatenate([image[:, 1:], image[:, -1:]], axis=1)
    down = jnp.concatenate([image[1:], image[-1:]], axis=0)
    diag = jnp.concatenate([right[1:], right[-1:]], axis=0)
    return jnp.concatenate([image, right, down, diag], axis=-1)


def _corners(q: jax.Array, c: int):
    return q[..., :c], q[..., c : 2 * c], q[..., 2 * c : 3 * c], q[..., 3 * c :]


def _channel_sum(x: jax.Array) -> jax.Array:
    # An explicit sum: XLA on CPU reduces a 3-wide minor axis ~10x slower than this.
    total = x[..., 0]
    for i in range(1, x.shape[-1]):
        total = total + x[..., i]
    return total


def _batch_offsets(idx: jax.Array, b: int, hw: int) -> jax.Array:
    return idx + (jnp.arange(b, dtype=idx.dtype) * hw).reshape((b,) + (1,) * (idx.ndim - 1))


# The batch of images is flattened into one table and one 1-D index rather than
# vmapped: XLA on CPU runs batched gathers and scatters about twice as slowly.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sample(shape, images, x, y):
    return _sample_fwd(shape, images, x, y)[0]


def _sample_fwd(shape, images, x, y):
    b, h, w, c = shape
    idx, fx, fy = _cells(h, w, x, y)
    idx = _batch_offsets(idx, b, h * w)
    table = jax.vmap(_quads)(images).reshape(b * h * w, 4 * c)
    q = jnp.take(table, idx, axis=0, mode="clip")
    a, bb, cc, d = _corners(q, c)
    out = (a * (1 - fx) + bb * fx) * (1 - fy) + (cc * (1 - fx) + d * fx) * fy
    return out, (q, idx, fx, fy, x, y)


def _sample_bwd(shape, res, g):
    b, h, w, c = shape
    q, idx, fx, fy, x, y = res
    a, bb, cc, d = _corners(q, c)
    gx = _channel_sum(g * ((bb - a) * (1 - fy) + (d - cc) * fy))
    gy = _channel_sum(g * ((cc - a) * (1 - fx) + (d - bb) * fx))
    gx = jnp.where((x > 0) & (x < w - 1), gx, 0.0)
    gy = jnp.where((y > 0) & (y < h - 1), gy, 0.0)
    right, down = min(1, w - 1), min(1, h - 1) * w
    flat = idx.reshape(-1)
    gimages = jnp.zeros((b * h * w, c), g.dtype)
    for offset, weight in ((0, (1 - fx) * (1 - fy)), (right, fx * (1 - fy)), (down, (1 - fx) * fy), (right + down, fx * fy)):
        gimages = gimages.at[flat + offset].add((g * weight).reshape(-1, c), mode="promise_in_bounds")
    return gimages.reshape(b, h, w, c).astype(q.dtype), gx, gy


_sample.defvjp(_sample_fwd, _sample_bwd)


def sample_batch(images: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinear samples of each of ``images`` ``(B, H, W, C)`` at its ``points`` ``(B, ..., 2)`` = ``(x, y)`` px.

    Points outside an image read its clamped border. Returns ``(B, ..., C)``.
    Differentiable in both arguments (hand-written VJP: one gather forward, four
    scatter-adds backward).
    """
    if images.ndim != 4 or points.shape[0] != images.shape[0] or points.shape[-1] != 2:
        raise ValueError(
            f"sample_batch needs images (B, H, W, C) and points (B, ..., 2); "
            f"got {tuple(images.shape)} and {tuple(points.shape)}"
        )
    return _sample(tuple(images.shape), images, points[..., 0], points[..., 1])


def sample(image: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinear samples of ``image`` ``(H, W, C)`` at ``points`` ``(..., 2)`` = ``(x, y)`` px: ``(..., C)``.

    Points outside the image read the clamped border.
    """
    return sample_batch(image[None], points[None])[0]


def warp_batch(images: jax.Array, displacements: jax.Array) -> jax.Array:
    """:func:`warp` of each of ``images`` ``(B, H, W, C)`` by its ``displacements`` ``(B, ..., H, W, 2)``."""
    if images.ndim != 4 or displacements.ndim < 4 or displacements.shape[0] != images.shape[0] or (
        displacements.shape[-3:] != images.shape[1:3] + (2,)
    ):
        raise ValueError(
            f"warp_batch needs images (B, H, W, C) and displacements (B, ..., H, W, 2) with the same B, H, W; "
            f"got {tuple(images.shape)} and {tuple(displacements.shape)}"
        )
    return sample_batch(images, pixel_grid(*images.shape[1:3]) + displacements)


def warp(image: jax.Array, displacement: jax.Array) -> jax.Array:
    """``V̂(p) = I(p + D(p))``: ``image`` ``(H, W, C)`` backward-warped by ``displacement``.

    ``displacement`` is ``(..., H, W, 2)`` in pixels (``[..., 0] = dx`` right,
    ``[..., 1] = dy`` down); leading axes (e.g. time) give one warp of the same image
    each. Bilinear; border-clamped outside. Returns ``(..., H, W, C)``.
    """
    if image.ndim != 3 or displacement.ndim < 3 or displacement.shape[-3:] != image.shape[:2] + (2,):
        raise ValueError(
            f"warp needs image (H, W, C) and displacement (..., H, W, 2) with the same H, W; "
            f"got {tuple(image.shape)} and {tuple(displacement.shape)}"
        )
    return warp_batch(image[None], displacement[None])[0]


def inside(displacement: jax.Array, margin: float = 0.0) -> jax.Array:
    """Whether each sample point ``p + D(p)`` lies in the image shrunk by ``margin`` px.

    ``displacement`` is ``(..., H, W, 2)``; returns a boolean ``(..., H, W)``.
    """
    h, w = displacement.shape[-3], displacement.shape[-2]
    points = pixel_grid(h, w) + displacement
    x, y = points[..., 0], points[..., 1]
    return (x >= margin) & (x <= w - 1 - margin) & (y >= margin) & (y <= h - 1 - margin)


def _blur_matrix(n: int, sigma: float) -> jax.Array:
    """``(n, n)`` Gaussian filter along one axis with edge-clamped boundaries; rows sum to 1."""
    radius = max(1, int(3.0 * sigma + 0.5))
    offsets = jnp.arange(-radius, radius + 1)
    taps = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    sources = jnp.clip(jnp.arange(n)[:, None] + offsets[None, :], 0, n - 1)
    return jnp.einsum("ik,ikj->ij", jnp.broadcast_to(taps, sources.shape), jax.nn.one_hot(sources, n))


def gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
    """Gaussian blur of ``images`` ``(..., H, W, C)`` with std ``sigma`` px (a static
    Python float; 0 returns the input), edge-clamped at the borders."""
    if sigma <= 0:
        return images
    h, w = images.shape[-3], images.shape[-2]
    images = jnp.einsum("yi,...ixc->...yxc", _blur_matrix(h, sigma), images)
    return jnp.einsum("xj,...yjc->...yxc", _blur_matrix(w, sigma), images)
