"""A bank of motion-energy units whose preferred temporal frequencies are known by construction.

Channel k of the one layer, ``energy``, is the energy ``even_k² + odd_k²`` of a quadrature pair
of space-time Gabor filters on the luminance (Adelson and Bergen 1985): ``cos`` and ``sin`` of
``2π (spatial_freq · x − temporal_freqs[k] · t)`` under a Gaussian envelope, each filter of zero
mean and unit norm. Such a unit responds most to a grating drifting towards 0° (+x) at
``spatial_freq`` cycles/px and ``temporal_freqs[k]`` cycles/frame; with a temporal frequency of 0
it is a static, *slow* unit, and the higher the frequency the *faster* it is.

It is no trained network and is not in the registry: it is a ground truth to check read-outs of
what a unit prefers against (the slow/fast index, ``docs/slowfast.md``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax.models.base import Params, VideoModel

LAYER = "energy"


def filters(temporal_freqs: Sequence[float], spatial_freq: float = 0.125, size: tuple[int, int] = (7, 7),
            sigma: tuple[float, float] = (2.5, 2.0)) -> np.ndarray:
    """The quadrature pairs ``(t, s, s, 1, 2K)`` float32: the K even filters, then the K odd ones, of
    ``size`` ``(t, s)`` taps and Gaussian envelope ``sigma`` ``(frames, px)``; each of zero mean and
    unit norm, so that a flat video excites no unit and the units are equally strong."""
    taps_t, taps_s = size
    t = np.arange(taps_t) - taps_t // 2
    s = np.arange(taps_s) - taps_s // 2
    tt, yy, xx = np.meshgrid(t, s, s, indexing="ij")
    envelope = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma[1] ** 2) - tt ** 2 / (2 * sigma[0] ** 2))
    phase = [2 * np.pi * (spatial_freq * xx - tf * tt) for tf in temporal_freqs]
    bank = np.stack([envelope * np.cos(p) for p in phase] + [envelope * np.sin(p) for p in phase], axis=-1)
    bank = bank - bank.mean(axis=(0, 1, 2))
    bank = bank / np.sqrt(np.sum(bank ** 2, axis=(0, 1, 2)))
    return bank[:, :, :, None, :].astype(np.float32)


def bank(temporal_freqs: Sequence[float], spatial_freq: float = 0.125, shape: tuple[int, int, int] = (16, 24, 24),
         size: tuple[int, int] = (7, 7), sigma: tuple[float, float] = (2.5, 2.0)) -> tuple[VideoModel, Params]:
    """``(model, params)``: one motion-energy unit per entry of ``temporal_freqs`` (cycles/frame), each
    at ``spatial_freq`` (cycles/px) towards 0°, on clips ``shape`` ``(T, H, W)`` normalised with mean
    0.5 and std 0.25; layer :data:`LAYER` is ``(N, T', H', W', K)`` over the valid positions."""
    if len(temporal_freqs) < 1:
        raise ValueError("the bank needs at least one temporal frequency")
    params = {"filters": jnp.asarray(filters(temporal_freqs, spatial_freq, size, sigma))}
    k = len(temporal_freqs)

    def apply(params: Params, video: jax.Array, upto: str) -> jax.Array:
        if upto != LAYER:
            raise ValueError(f"the motion-energy bank has no layer {upto!r}; its one layer is {LAYER!r}")
        luminance = jnp.mean(video, axis=-1, keepdims=True)
        out = jax.lax.conv_general_dilated(luminance, params["filters"], (1, 1, 1), "VALID",
                                           dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return jnp.square(out[..., :k]) + jnp.square(out[..., k:])

    model = VideoModel(name="energy", apply=apply, layers=(LAYER,), input_shape=tuple(shape), mean=(0.5,) * 3,
                       std=(0.25,) * 3)
    return model, params
