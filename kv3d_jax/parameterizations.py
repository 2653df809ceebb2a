"""How an optimised video is represented (Lucid's *parameterizations*; SPEC §2 items 1–2).

A parameterization is a pair of pure functions: ``init(key, shape) -> param`` draws the
starting parameter pytree for a ``(T, H, W)`` video and ``to_video(param)`` maps it to a
``(T, H, W, 3)`` video in [0, 1]. Each goes through Lucid's colour decorrelation and a sigmoid,
so the optimiser works in a space where colour channels are decorrelated and pixel values
can never leave [0, 1]. ``pixel`` and ``fourier`` describe every frame freely;
``static_displacement`` is SPEC §3's model, one static image warped by a displacement per
frame; ``static_velocity`` is the same model with each pixel's displacement moving at a
constant velocity (:mod:`kv3d_jax.refine` optimises either).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax.warp import warp

# Lucid's square root of the ImageNet colour correlation matrix, scaled so that its largest
# column has unit norm.
COLOR_CORRELATION_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)
COLOR_DECORRELATION = COLOR_CORRELATION_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SQRT, axis=0))


class Parameterization(NamedTuple):
    """``init(key, (T, H, W)) -> param`` and ``to_video(param) -> (T, H, W, 3)`` in [0, 1]."""

    init: Callable[[jax.Array, tuple[int, int, int]], Any]
    to_video: Callable[[Any], jax.Array]


def to_valid_rgb(x: jax.Array) -> jax.Array:
    """``sigmoid(x @ C.T)`` for decorrelated colours ``x`` ``(..., 3)``: RGB in (0, 1), same shape."""
    return jax.nn.sigmoid(x @ jnp.asarray(COLOR_DECORRELATION).T)


def pixel_init(key: jax.Array, shape: tuple[int, int, int], sd: float = 0.01) -> jax.Array:
    """A pixel parameter ``(T, H, W, 3)`` drawn from ``N(0, sd²)``."""
    return sd * jax.random.normal(key, (*shape, 3), jnp.float32)


def pixel_to_video(param: jax.Array) -> jax.Array:
    """The video ``(T, H, W, 3)`` of a pixel parameter of the same shape."""
    return to_valid_rgb(param)


def _spectrum_scale(t: int, h: int, w: int, decay_power: float) -> np.ndarray:
    """Gain ``(T, H, W//2+1, 1)`` of each rfft coefficient: Lucid's 1/f law over (t, y, x).

    Frequencies are in cycles per frame and cycles per pixel, combined as one radius, so
    slow, coarse structure starts with the same energy per octave in time as in space.
    """
    ft = np.fft.fftfreq(t)[:, None, None]
    fy = np.fft.fftfreq(h)[None, :, None]
    fx = np.fft.rfftfreq(w)[None, None, :]
    radius = np.sqrt(ft**2 + fy**2 + fx**2)
    scale = 1.0 / np.maximum(radius, 1.0 / max(t, h, w)) ** decay_power
    return (scale * np.sqrt(t * h * w)).astype(np.float32)[..., None]


def fourier_init(key: jax.Array, shape: tuple[int, int, int], sd: float = 0.01) -> jax.Array:
    """A spectral parameter ``(T, H, W//2+1, 3, 2)`` (real, imaginary parts) from ``N(0, sd²)``.

    The width must be even: ``to_video`` recovers it as ``2 * (W//2+1 - 1)``.
    """
    t, h, w = shape
    if w % 2:
        raise ValueError(
            f"the Fourier parameterization needs an even width, got W={w}; "
            "use an even width or parameterization='pixel'"
        )
    return sd * jax.random.normal(key, (t, h, w // 2 + 1, 3, 2), jnp.float32)


def fourier_to_video(param: jax.Array, decay_power: float = 1.0) -> jax.Array:
    """The video ``(T, H, W, 3)`` whose 3D spectrum is ``param`` scaled by 1/f^decay_power.

    As in Lucid, the inverse transform is divided by 4 so the initial video has roughly
    the contrast of the pixel parameterization's.
    """
    t, h, wf = param.shape[:3]
    w = 2 * (wf - 1)
    spectrum = jax.lax.complex(param[..., 0], param[..., 1]) * _spectrum_scale(t, h, w, decay_power)
    x = jnp.fft.irfftn(spectrum, s=(t, h, w), axes=(0, 1, 2)) / 4.0
    return to_valid_rgb(x.astype(jnp.float32))


def static_displacement_init(key: jax.Array, shape: tuple[int, int, int], sd: float = 0.01) -> dict:
    """A texture-plus-motion parameter for a ``(T, H, W)`` video: ``{"static": (H, W, 3)``
    decorrelated colours, ``"displacement": (T, H, W, 2)`` px``}``, both drawn from ``N(0, sd²)``."""
    t, h, w = shape
    ks, kd = jax.random.split(key)
    return {
        "static": sd * jax.random.normal(ks, (h, w, 3), jnp.float32),
        "displacement": sd * jax.random.normal(kd, (t, h, w, 2), jnp.float32),
    }


def static_displacement_to_video(param: dict) -> jax.Array:
    """``V_t = warp(I, D_t)`` (SPEC §3's model) with ``I = to_valid_rgb(static)``: ``(T, H, W, 3)`` in [0, 1].

    The colour transform comes before the warp, so every frame is exactly a bilinear
    resampling of one static image in [0, 1].
    """
    return warp(to_valid_rgb(param["static"]), param["displacement"])


def constant_velocity(displacement: jax.Array) -> jax.Array:
    """Least-squares fit of ``D_t`` by ``D_c + (t - t_c) w`` at every pixel: ``(..., T, H, W, 2)`` -> same.

    ``t_c`` is the middle frame. The fit's content velocity ``-w`` (px/frame) is the same in
    every frame; applying the fit twice changes nothing.
    """
    t = displacement.shape[-4]
    offsets = np.arange(t) - (t - 1) / 2.0
    # Summed frame by frame in a fixed order rather than as a reduction: XLA may order a
    # reduction differently for different batch sizes, and where the frames' gradients
    # nearly cancel, Adam magnifies that rounding into a result that depends on the batch.
    frames = [displacement[..., s, :, :, :] for s in range(t)]
    centre = sum(frames[1:], frames[0]) / t
    slope = sum((o * f for o, f in zip(offsets[1:], frames[1:])), offsets[0] * frames[0])
    slope = slope / (float(np.sum(offsets**2)) if t > 1 else 1.0)  # one frame: no velocity
    return jnp.stack([centre + o * slope for o in offsets], axis=-4)


def static_velocity_to_video(param: dict) -> jax.Array:
    """``V_t = warp(I, D̄_t)``, ``D̄ = constant_velocity(D)``: a ``"static_displacement"`` parameter
    whose every pixel moves at a constant velocity, ``(T, H, W, 3)`` in [0, 1].

    Keeping ``D`` per frame and fitting it inside (rather than storing a centre and a
    velocity) lets the parameter, its initialisation and its regularisers stay those of
    ``static_displacement``; the video only sees the fit.
    """
    return warp(to_valid_rgb(param["static"]), constant_velocity(param["displacement"]))


PARAMETERIZATIONS: dict[str, Parameterization] = {
    "pixel": Parameterization(pixel_init, pixel_to_video),
    "fourier": Parameterization(fourier_init, fourier_to_video),
    "static_displacement": Parameterization(static_displacement_init, static_displacement_to_video),
    "static_velocity": Parameterization(static_displacement_init, static_velocity_to_video),
}


def get(name: str) -> Parameterization:
    """The parameterization registered as ``name``; a clear error lists the valid names."""
    try:
        return PARAMETERIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown parameterization {name!r}; valid parameterizations are: {', '.join(PARAMETERIZATIONS)}"
        ) from None
