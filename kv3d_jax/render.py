"""Pictures of a decomposition as arrays (SPEC §4): colour-coded motion, its legend, a side-by-side panel.

Motion colours: hue = screen direction of the content velocity (0° = right is red, 90° =
up is yellow-green, 180° = left is cyan, 270° = down is violet; the legend shows the
wheel with "up" at the top), brightness = speed (black = still, full brightness =
``max_speed``), full saturation. Pixels a read-out ignores (see
:func:`kv3d_jax.motion.observability`) can be drawn mid-grey, which no velocity maps to.
Everything returns float32 arrays in [0, 1]; files are written by :mod:`kv3d_jax.writers`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from matplotlib.colors import hsv_to_rgb

from kv3d_jax.warp import gaussian_blur

GREY = 0.5


def _hsv(direction_deg: np.ndarray, value: np.ndarray) -> np.ndarray:
    hsv = np.stack([np.mod(direction_deg, 360.0) / 360.0, np.ones_like(value), np.clip(value, 0.0, 1.0)], axis=-1)
    return hsv_to_rgb(hsv).astype(np.float32)


MIN_MAX_SPEED = 0.1


def default_max_speed(velocity, valid=None) -> float:
    """A robust full-brightness speed for ``velocity`` ``(..., 2)``: the 99th-percentile
    speed over the ``valid`` pixels (all by default), at least ``MIN_MAX_SPEED`` px/frame
    so that a still video stays dark instead of showing its numerical noise at full brightness."""
    speed = np.linalg.norm(np.asarray(velocity, np.float32), axis=-1)
    if valid is not None:
        speed = speed[np.asarray(valid, bool)]
    return float(max(np.percentile(speed, 99.0) if speed.size else 0.0, MIN_MAX_SPEED))


def smooth_velocity(velocity, sigma: float = 1.0, valid=None) -> np.ndarray:
    """``velocity`` ``(..., H, W, 2)`` Gaussian-smoothed over space (std ``sigma`` px), for display.

    With ``valid`` ``(..., H, W)`` only valid pixels are averaged (a normalised
    convolution), so ignored pixels do not bleed into the field. A per-pixel velocity is
    a difference of two weakly regularised displacements and carries pixel noise of
    about 0.1 px/frame that hides the pattern; the reference smooths its display too.
    """
    velocity = np.asarray(velocity, np.float32)
    mask = np.ones(velocity.shape[:-1], np.float32) if valid is None else np.asarray(valid, np.float32)
    summed = np.asarray(gaussian_blur(jnp.asarray(velocity * mask[..., None]), sigma))
    weight = np.asarray(gaussian_blur(jnp.asarray(mask[..., None]), sigma))
    return np.where(weight > 1e-6, summed / np.maximum(weight, 1e-6), velocity)


def motion_colours(velocity, max_speed: float | None = None, valid=None) -> np.ndarray:
    """Colour-coded velocity ``(..., H, W, 2)`` px/frame -> ``(..., H, W, 3)`` RGB.

    ``max_speed``: the speed shown at full brightness (default :func:`default_max_speed` of the valid pixels).
    ``valid``: optional boolean ``(..., H, W)``; False pixels are drawn mid-grey.
    """
    velocity = np.asarray(velocity, np.float32)
    if velocity.shape[-1] != 2:
        raise ValueError(f"motion_colours needs velocity (..., 2); got shape {velocity.shape}")
    max_speed = default_max_speed(velocity, valid) if max_speed is None else float(max_speed)
    if max_speed <= 0:
        raise ValueError(f"max_speed must be positive; got {max_speed}")
    vx, vy = velocity[..., 0], velocity[..., 1]
    rgb = _hsv(np.degrees(np.arctan2(-vy, vx)), np.hypot(vx, vy) / max_speed)
    if valid is not None:
        rgb = np.where(np.asarray(valid, bool)[..., None], rgb, np.float32(GREY))
    return rgb


def colour_wheel(size: int) -> np.ndarray:
    """The legend ``(size, size, 3)``: each pixel coloured as a velocity pointing from the
    centre to it, reaching full speed at the rim; black outside the disc."""
    centre = (size - 1) / 2.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    vx, vy = (xs - centre) / max(centre, 1.0), (ys - centre) / max(centre, 1.0)
    radius = np.hypot(vx, vy)
    rgb = _hsv(np.degrees(np.arctan2(-vy, vx)), radius)
    return np.where((radius <= 1.0)[..., None], rgb, np.float32(0.0))


def with_legend(frames, legend_size: int | None = None) -> np.ndarray:
    """``frames`` ``(N, H, W, 3)`` with a colour wheel in a black strip on the right:
    ``(N, H, W + L, 3)``, ``L = legend_size`` (default ``min(H, W) // 2``, at least 8, at most H)."""
    frames = np.asarray(frames, np.float32)
    n, h, w, _ = frames.shape
    size = min(h, max(8, min(h, w) // 2)) if legend_size is None else int(legend_size)
    strip = np.zeros((h, size, 3), np.float32)
    strip[:size] = colour_wheel(size)[: min(size, h)]
    return np.concatenate([frames, np.broadcast_to(strip, (n, h, size, 3))], axis=2)


def deform_frames(static, velocity, max_speed: float | None = None, valid=None) -> np.ndarray:
    """The reference's ``_deform.gif`` content: the static ``(H, W, 3)`` followed by the
    colour-coded motion frames of ``velocity`` ``(T-1, H, W, 2)``: ``(T, H, W, 3)``."""
    motion = motion_colours(velocity, max_speed, valid)
    return np.concatenate([np.asarray(static, np.float32)[None], motion], axis=0)


def panel(video, static, velocity, reconstruction, max_speed: float | None = None, valid=None, gap: int = 2) -> np.ndarray:
    """Side by side, per frame: video | static | motion | reconstruction | legend: ``(T, H, 4W + L + 3 gap, 3)``.

    ``video``, ``reconstruction`` ``(T, H, W, 3)``; ``static`` ``(H, W, 3)``;
    ``velocity`` ``(T-1, H, W, 2)``. Motion frame ``t`` shows ``u_t`` (between frames
    ``t`` and ``t + 1``); the last frame repeats ``u_{T-2}``. Gaps are white.
    """
    video = np.asarray(video, np.float32)
    reconstruction = np.asarray(reconstruction, np.float32)
    t, h, w, _ = video.shape
    if reconstruction.shape != video.shape or np.shape(static) != (h, w, 3) or np.shape(velocity) != (t - 1, h, w, 2):
        raise ValueError(
            f"panel needs video and reconstruction (T, H, W, 3), static (H, W, 3) and velocity (T-1, H, W, 2); got "
            f"{video.shape}, {reconstruction.shape}, {np.shape(static)}, {np.shape(velocity)}"
        )
    motion = motion_colours(velocity, max_speed, valid)
    motion = np.concatenate([motion, motion[-1:]], axis=0)
    statics = np.broadcast_to(np.asarray(static, np.float32), video.shape)
    white = np.ones((t, h, gap, 3), np.float32)
    parts = [video, white, statics, white, motion, white, reconstruction]
    return with_legend(np.concatenate(parts, axis=2), min(h, max(8, min(h, w) // 2)))


def side_by_side(videos, gap: int = 2) -> np.ndarray:
    """N videos ``(N, T, H, W, 3)`` in [0, 1] tiled along the width, per frame, with ``gap`` px white
    columns between them: ``(T, H, N·W + (N-1)·gap, 3)``."""
    videos = np.asarray(videos, np.float32)
    if videos.ndim != 5 or videos.shape[-1] != 3 or len(videos) == 0:
        raise ValueError(f"side_by_side needs videos (N, T, H, W, 3) with N >= 1, got {videos.shape}")
    _, t, h, _, _ = videos.shape
    white = np.ones((t, h, gap, 3), np.float32)
    parts = [part for video in videos for part in (white, video)][1:]
    return np.concatenate(parts, axis=2)


def transparency(video, attribution, quantile: float = 0.99, background: float = 1.0) -> np.ndarray:
    """``video`` ``(T, H, W, 3)`` seen through its attribution map ``(T, H, W)``: ``(T, H, W, 3)`` in [0, 1].

    As MACO draws its "transparency" figures, each pixel's opacity is its attribution over the
    map's ``quantile`` (clipped to [0, 1]; the quantile rather than the maximum, so that a few
    extreme gradients do not make the rest transparent), over a ``background`` grey level (white).
    """
    video = np.asarray(video, np.float32)
    attribution = np.asarray(attribution, np.float32)
    if attribution.shape != video.shape[:-1]:
        raise ValueError(f"an attribution map {attribution.shape} does not fit a video {video.shape}: need (T, H, W)")
    scale = float(np.quantile(attribution, quantile))
    alpha = np.clip(attribution / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(attribution)
    return alpha[..., None] * video + (1.0 - alpha[..., None]) * np.float32(background)


__all__ = [
    "colour_wheel", "default_max_speed", "deform_frames", "motion_colours", "panel", "smooth_velocity",
    "transparency", "with_legend",
]
