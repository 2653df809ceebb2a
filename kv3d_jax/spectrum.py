"""Amplitude spectra of videos: the natural-video law, its estimate from clips, and slope measurements.

A video ``(T, H, W)`` has its 3D spectrum on the ``rfftn`` grid ``(T, H, W//2+1)``: temporal
frequency ``f_t`` in cycles per frame, spatial frequency ``f_s = sqrt(f_x² + f_y²)`` in cycles per
pixel. The MACO parameterization (:func:`kv3d_jax.parameterizations.maco`) fixes a video's
amplitude on this grid to one of these spectra and optimises only the phase.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Amplitude exponents (a, b) of the natural-video law A(f_s, f_t) = 1 / (f_s^a · f_t^b).
# Spatial: the amplitude spectrum of natural images falls as 1/f_s, power as 1/f_s² (Field 1987,
# JOSA A 4:2379; van der Schaaf & van Hateren 1996, Vision Res. 36:2759, power exponent 1.88 ± 0.43
# over 276 images). Temporal: the power of natural movies at a fixed spatial frequency falls as
# about 1/f_t² over most of the temporal range (Dong & Atick 1995, Network 6:345; the temporal
# amplitude spectra of Billock, de Guzman & Kelso 2001, Physica D 148:136, fall as about 1/f_t).
NATURAL_EXPONENTS = (1.0, 1.0)


def frequencies(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(|f_t|, f_s)`` on the rfft grid of a ``(T, H, W)`` video, each ``(T, H, W//2+1)`` float64:
    cycles per frame and cycles per pixel (``sqrt(f_x² + f_y²)``)."""
    t, h, w = shape
    ft = np.abs(np.fft.fftfreq(t))[:, None, None]
    fy = np.fft.fftfreq(h)[None, :, None]
    fx = np.fft.rfftfreq(w)[None, None, :]
    grid = (t, h, w // 2 + 1)
    return np.broadcast_to(ft, grid).copy(), np.broadcast_to(np.sqrt(fy**2 + fx**2), grid).copy()


def natural_law(shape: tuple[int, int, int], exponents: tuple[float, float] = NATURAL_EXPONENTS) -> np.ndarray:
    """The amplitude ``1 / (f_s^a · f_t^b)`` on the rfft grid of a ``(T, H, W)`` video: ``(T, H, W//2+1)``
    float64, ``(a, b) = exponents``.

    Guarded at zero frequency: ``f_s`` below the lowest non-zero spatial frequency ``1/max(H, W)``
    and ``f_t`` below ``1/T`` are raised to them, so the static components and the spatially
    uniform flicker get the law's value at its lowest frequency instead of infinity. The law is
    separable, so the power summed over ``f_t`` falls exactly as ``f_s^(-2a)``.
    """
    a, b = exponents
    t, h, w = shape
    ft, fs = frequencies(shape)
    return 1.0 / (np.maximum(fs, 1.0 / max(h, w)) ** a * np.maximum(ft, 1.0 / t) ** b)


def from_clips(clips: np.ndarray, decorrelation: np.ndarray) -> np.ndarray:
    """The mean amplitude spectrum of ``clips`` ``(N, T, H, W, 3)`` in [0, 1]: ``(T, H, W//2+1, 3)`` float64.

    Each clip's colours are first mapped into the decorrelated space the parameterizations
    optimise in (``rgb @ inv(decorrelation.T)``, the inverse of the colour transform that
    :func:`kv3d_jax.parameterizations.to_valid_rgb` applies before its sigmoid); then the
    amplitude ``|rfftn|`` over ``(T, H, W)`` of each clip and colour, averaged over the clips.
    """
    clips = np.asarray(clips, np.float64)
    if clips.ndim != 5 or clips.shape[-1] != 3 or clips.shape[0] < 1:
        raise ValueError(f"clips must be (N, T, H, W, 3) with N >= 1, got shape {clips.shape}")
    colours = clips @ np.linalg.inv(np.asarray(decorrelation, np.float64).T)
    return np.mean(np.abs(np.fft.rfftn(colours, axes=(1, 2, 3))), axis=0)


class Magnitude:
    """A fixed amplitude spectrum ``(T, H, W//2+1, 3)`` as a value: compared and hashed by its
    contents, so a stage-1 :class:`~kv3d_jax.maximization.Config` holding one stays a cache key."""

    __slots__ = ("array", "_digest")

    def __init__(self, array):
        self.array = np.array(array, np.float32)
        self.array.setflags(write=False)
        if self.array.ndim != 4 or self.array.shape[-1] != 3:
            raise ValueError(f"a magnitude spectrum is (T, H, W//2+1, 3), got shape {self.array.shape}")
        if not np.all(np.isfinite(self.array)) or np.any(self.array < 0):
            raise ValueError("a magnitude spectrum must be finite and non-negative")
        self._digest = hashlib.sha256(repr(self.array.shape).encode() + self.array.tobytes()).digest()

    def __eq__(self, other):
        return isinstance(other, Magnitude) and self._digest == other._digest

    def __hash__(self):
        return hash(self._digest)

    def __repr__(self):
        return f"Magnitude(shape={self.array.shape}, sha256={self._digest.hex()[:12]})"


def _fit_slope(freqs: np.ndarray, power: np.ndarray) -> float:
    keep = (freqs > 0) & (power > 0)
    return float(np.polyfit(np.log(freqs[keep]), np.log(power[keep]), 1)[0])


def power_slopes(videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spatial and temporal power-spectrum slopes of ``videos`` ``(K, T, H, W, C)``: two ``(K,)`` arrays.

    Per video: the power ``|fftn|²`` of its channel mean, mean removed, over ``(T, H, W)``. The
    spatial slope is the least-squares slope of ``log power`` against ``log f_s`` where the power is
    averaged over every ``f_t`` and over rings of width one frequency step ``1/max(H, W)`` (rings
    up to the Nyquist frequency 0.5 cycles/px); the temporal slope is that of the power averaged
    over all spatial frequencies against ``|f_t|`` (``1/T`` to 0.5 cycles/frame). A video whose
    spectrum falls as ``f_s^(-2a)`` and ``f_t^(-2b)`` has slopes ``-2a`` and ``-2b``.
    """
    videos = np.asarray(videos, np.float64)
    _, t, h, w, _ = videos.shape
    grey = videos.mean(axis=-1)
    grey = grey - grey.mean(axis=(1, 2, 3), keepdims=True)
    power = np.abs(np.fft.fftn(grey, axes=(1, 2, 3))) ** 2
    fs = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    step = 1.0 / max(h, w)
    rings = np.rint(fs / step).astype(int)
    ring_ids = np.arange(1, int(round(0.5 / step)) + 1)
    spatial_power = power.mean(axis=1)  # over f_t: (K, H, W)
    ft = np.abs(np.fft.fftfreq(t))
    temporal_power = power.mean(axis=(2, 3))  # over space: (K, T)
    spatial, temporal = [], []
    for k in range(len(videos)):
        ring_power = np.array([spatial_power[k][rings == r].mean() for r in ring_ids])
        spatial.append(_fit_slope(ring_ids * step, ring_power))
        bins = np.unique(ft[ft > 0])
        temporal.append(_fit_slope(bins, np.array([temporal_power[k][ft == f].mean() for f in bins])))
    return np.asarray(spatial), np.asarray(temporal)
