"""Synthetic videos with known motion: translating textures, drifting gratings, moving dots.

All videos are ``(T, H, W, 3)`` float32 in [0, 1]. Velocities are content velocities in
pixels/frame as ``(vx, vy)`` with ``vx`` to the right and ``vy`` downwards (SPEC §1);
directions are degrees with 0° rightward and 90° upward on screen.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def velocity_from_direction(direction_deg: float, speed: float) -> tuple[float, float]:
    """``(vx, vy)`` in px/frame for a direction (0° right, 90° up on screen) and a speed."""
    rad = math.radians(direction_deg)
    return speed * math.cos(rad), -speed * math.sin(rad)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma_px: float) -> np.ndarray:
    """Periodic Gaussian-filtered white noise ``(h, w, 3)``, band-limited, zero mean, unit std."""
    noise = rng.standard_normal((h, w, 3))
    fy = np.fft.fftfreq(h)[:, None, None]
    fx = np.fft.fftfreq(w)[None, :, None]
    gain = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    field = np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * gain, axes=(0, 1)).real
    return (field - field.mean()) / field.std()


def translating_texture(
    rng: np.random.Generator,
    t: int,
    h: int,
    w: int,
    velocity: tuple[float, float],
    sigma_px: float = 3.0,
    contrast: float = 0.15,
) -> np.ndarray:
    """A smooth random texture moving rigidly at ``velocity`` px/frame: ``(t, h, w, 3)``.

    Frame ``k`` is ``texture(p - k * velocity)``, sampled exactly (Fourier shift of a
    band-limited texture on a canvas larger than the view plus the total travel), so
    new content enters through the borders as it would in a real video.
    """
    vx, vy = velocity
    margin = int(math.ceil(max(abs(vx), abs(vy)) * t)) + int(4 * sigma_px) + 1
    ch, cw = h + 2 * margin, w + 2 * margin
    spectrum = np.fft.fft2(_smooth_noise(rng, ch, cw, sigma_px), axes=(0, 1))
    fy = np.fft.fftfreq(ch)[:, None, None]
    fx = np.fft.fftfreq(cw)[None, :, None]
    frames = []
    for k in range(t):
        shift = np.exp(-2j * math.pi * (fx * vx * k + fy * vy * k))
        frame = np.fft.ifft2(spectrum * shift, axes=(0, 1)).real
        frames.append(frame[margin : margin + h, margin : margin + w])
    video = 0.5 + contrast * np.stack(frames)
    return np.clip(video, 0.0, 1.0).astype(np.float32)


def drifting_grating(
    t: int,
    h: int,
    w: int,
    direction_deg,
    spatial_freq,
    temporal_freq,
    phase=0.0,
    contrast: float = 1.0,
) -> jnp.ndarray:
    """A grey sinusoidal grating drifting along ``direction_deg``: ``(t, h, w, 3)``.

    ``spatial_freq`` is in cycles/pixel and ``temporal_freq`` in cycles/frame, so the
    grating moves at ``temporal_freq / spatial_freq`` px/frame. Arguments may be
    traced JAX scalars, so this can be vmapped over a stimulus grid.
    """
    rad = jnp.deg2rad(direction_deg)
    tt = jnp.arange(t, dtype=jnp.float32)[:, None, None]
    yy = jnp.arange(h, dtype=jnp.float32)[None, :, None]
    xx = jnp.arange(w, dtype=jnp.float32)[None, None, :]
    along = xx * jnp.cos(rad) - yy * jnp.sin(rad)  # screen "up" is -y
    wave = jnp.sin(2 * jnp.pi * (spatial_freq * along - temporal_freq * tt) + phase)
    frame = 0.5 + 0.5 * contrast * wave
    return jnp.broadcast_to(frame[..., None], (t, h, w, 3)).astype(jnp.float32)


def moving_dots(
    rng: np.random.Generator,
    t: int,
    h: int,
    w: int,
    velocity: tuple[float, float],
    n_dots: int = 20,
    radius: float = 2.0,
) -> np.ndarray:
    """Bright Gaussian dots on grey moving together at ``velocity`` px/frame: ``(t, h, w, 3)``.

    Dots wrap around the frame (a torus), so the dot density stays constant.
    """
    vx, vy = velocity
    pos = rng.uniform(0, 1, (n_dots, 2)) * np.array([w, h])
    colours = rng.uniform(0.6, 1.0, (n_dots, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = []
    for k in range(t):
        frame = np.full((h, w, 3), 0.5)
        centres = pos + k * np.array([vx, vy])
        for (cx, cy), colour in zip(centres, colours):
            dx = (xx - cx + w / 2) % w - w / 2
            dy = (yy - cy + h / 2) % h - h / 2
            blob = np.exp(-(dx**2 + dy**2) / (2 * radius**2))[..., None]
            frame = frame * (1 - blob) + colour * blob
        frames.append(frame)
    return np.stack(frames).astype(np.float32)
