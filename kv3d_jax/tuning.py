"""Direction tuning of every channel of a layer, measured with drifting gratings.

The physiologist's check on what the visualisations say about motion: show each
channel sinusoidal gratings drifting in many directions at several spatial and
temporal frequencies, and read off the direction it prefers and how selective it is
(direction-selectivity index, DSI). Directions follow SPEC §1 (0° = right, 90° = up).
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kv3d_jax import stimuli, writers
from kv3d_jax.models.base import Params, VideoModel

DS_THRESHOLD = 0.3  # DSI at or above which a channel counts as direction-selective ...
PEAK_FRACTION = 0.1  # ... if its peak response is also at least this fraction of the layer's strongest


class DirectionTuning(NamedTuple):
    """Per-channel direction tuning, each field indexed by channel ``c``.

    Attributes:
      preferred_deg: ``(C,)`` direction of the strongest response, degrees.
      dsi: ``(C,)`` ``(R_pref - R_null) / (R_pref + R_null)`` with ``R_null`` the
        response at ``preferred + 180°``, both at the channel's best SF and TF; 0 for a
        channel that never responds.
      best_sf, best_tf: ``(C,)`` indices of the spatial and temporal frequency of the
        strongest response.
      curve: ``(C, D)`` response to each direction at the best SF and TF.
      peak: ``(C,)`` the strongest response (preferred direction, best SF and TF).
    """

    preferred_deg: np.ndarray
    dsi: np.ndarray
    best_sf: np.ndarray
    best_tf: np.ndarray
    curve: np.ndarray
    peak: np.ndarray


class AgreementRow(NamedTuple):
    """One direction-selective channel: grating-preferred vs stage-2 dominant direction (degrees),
    whether its kernel record counts as reliable (None where unknown), and, for a run with the
    slow/fast index (:mod:`kv3d_jax.slowfast`), its index and grating-preferred TF (cycles/frame;
    NaN where unknown)."""

    layer: str
    channel: int
    grating_deg: float
    dsi: float
    stage2_deg: float
    difference_deg: float
    reliable: bool | None = None
    slowness: float = float("nan")
    preferred_tf: float = float("nan")


@functools.partial(jax.jit, static_argnames=("model", "layer", "shape", "chunk"))
def _grid_responses(params, grid, *, model, layer, shape, chunk):
    """Mean rectified activation ``(G, C)`` of ``layer`` for the G gratings ``grid`` ``(G, 4)``."""
    mean = jnp.asarray(model.mean, jnp.float32)
    std = jnp.asarray(model.std, jnp.float32)

    def response(row):
        direction, sf, tf, phase = row
        video = stimuli.drifting_grating(*shape, direction, sf, tf, phase)
        act = model.apply(params, ((video - mean) / std)[None], layer)[0]
        return jnp.mean(jax.nn.relu(act), axis=(0, 1, 2))

    return jax.lax.map(response, grid, batch_size=chunk)


def grating_responses(
    model: VideoModel,
    params: Params,
    layer: str,
    directions: Sequence[float],
    spatial_freqs: Sequence[float],
    temporal_freqs: Sequence[float],
    num_phases: int = 4,
    input_shape: tuple[int, int, int] | None = None,
    chunk: int = 8,
) -> np.ndarray:
    """Responses ``(D, S, F, C)`` of every channel of ``layer`` to full-contrast drifting gratings.

    Entry ``[d, s, f, c]`` is the space-time mean of ``relu(activation[..., c])`` for a
    grating drifting towards ``directions[d]`` degrees with spatial frequency
    ``spatial_freqs[s]`` (cycles/px) and temporal frequency ``temporal_freqs[f]``
    (cycles/frame), averaged over ``num_phases`` evenly spaced starting phases.
    Gratings are ``input_shape`` (default the model's native ``(T, H, W)``) and
    normalised the model's way. All stimuli run in one jitted call, ``chunk`` at a time.
    """
    model.check_layer(layer)
    if num_phases < 1 or chunk < 1:
        raise ValueError(f"num_phases and chunk must be >= 1, got {num_phases} and {chunk}")
    axes = [np.asarray(a, np.float32) for a in (directions, spatial_freqs, temporal_freqs)]
    for name, values in zip(("directions", "spatial_freqs", "temporal_freqs"), axes):
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {values.shape}")
    phases = 2 * np.pi * np.arange(num_phases, dtype=np.float32) / num_phases
    grid = np.stack(np.meshgrid(*axes, phases, indexing="ij"), axis=-1).reshape(-1, 4)
    shape = tuple(input_shape or model.input_shape)
    out = _grid_responses(params, jnp.asarray(grid), model=model, layer=layer, shape=shape, chunk=chunk)
    sizes = [a.size for a in axes]
    return np.asarray(out).reshape(*sizes, num_phases, -1).mean(axis=3)


def angular_difference(a_deg, b_deg) -> np.ndarray:
    """Unsigned difference of two directions in degrees, in [0, 180]."""
    return np.abs((np.asarray(a_deg) - np.asarray(b_deg) + 180.0) % 360.0 - 180.0)


def direction_tuning(responses: np.ndarray, directions: Sequence[float]) -> DirectionTuning:
    """Preferred direction and DSI of each channel from ``grating_responses`` output ``(D, S, F, C)``.

    ``directions`` must contain the opposite (``+180°``) of each of its directions, so
    that every channel's null response is measured rather than interpolated.
    """
    responses = np.asarray(responses, np.float64)
    directions = np.mod(np.asarray(directions, np.float64), 360.0)
    if responses.ndim != 4 or responses.shape[0] != directions.size:
        raise ValueError(
            f"responses must be (directions, sfs, tfs, channels) with {directions.size} directions, "
            f"got shape {responses.shape}"
        )
    gap = angular_difference(directions[None, :], directions[:, None] + 180.0)
    opposite = np.argmin(gap, axis=1)
    if not np.allclose(gap[np.arange(directions.size), opposite], 0.0, atol=1e-3):
        raise ValueError(
            "directions must include the opposite of each direction (e.g. evenly spaced over 360°), "
            f"got {directions.tolist()}"
        )
    d, s, f, c = responses.shape
    flat = responses.reshape(d * s * f, c)
    pref, best_sf, best_tf = np.unravel_index(np.argmax(flat, axis=0), (d, s, f))
    curve = responses[:, best_sf, best_tf, np.arange(c)].T
    r_pref = curve[np.arange(c), pref]
    r_null = curve[np.arange(c), opposite[pref]]
    total = r_pref + r_null
    dsi = np.where(total > 0, (r_pref - r_null) / np.where(total > 0, total, 1.0), 0.0)
    return DirectionTuning(directions[pref], dsi, best_sf, best_tf, curve, r_pref)


def direction_selective(tuning: DirectionTuning, min_dsi: float = DS_THRESHOLD,
                        min_peak: float = PEAK_FRACTION) -> np.ndarray:
    """Which channels ``(C,)`` are direction-selective: DSI at least ``min_dsi`` and a peak response at
    least ``min_peak`` times the strongest peak of the channels in ``tuning`` (its layer), so that a
    channel that hardly responds is not counted on a ratio of small numbers."""
    peak = np.asarray(tuning.peak, np.float64)
    strongest = peak.max() if peak.size else 0.0
    return (np.asarray(tuning.dsi) >= min_dsi) & (peak > 0) & (peak >= min_peak * strongest)


def agreement_table(
    layers: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    min_dsi: float = DS_THRESHOLD,
) -> tuple[list[AgreementRow], dict[str, float]]:
    """Grating-preferred vs stage-2 dominant direction for the direction-selective channels.

    ``layers`` maps a layer name to per-channel ``(grating_deg, dsi, stage2_deg)``,
    each ``(C,)``. Returns one row per channel with ``dsi >= min_dsi`` and, per layer,
    the median angular difference over those rows (NaN for a layer without any).
    """
    rows, medians = [], {}
    for layer, (grating_deg, dsi, stage2_deg) in layers.items():
        grating_deg, dsi, stage2_deg = (np.asarray(a, np.float64) for a in (grating_deg, dsi, stage2_deg))
        if not grating_deg.shape == dsi.shape == stage2_deg.shape or grating_deg.ndim != 1:
            raise ValueError(
                f"layer {layer!r}: grating_deg, dsi and stage2_deg must be 1-D with one entry per "
                f"channel, got shapes {grating_deg.shape}, {dsi.shape}, {stage2_deg.shape}"
            )
        selective = np.flatnonzero(dsi >= min_dsi)
        diffs = angular_difference(grating_deg[selective], stage2_deg[selective])
        rows += [
            AgreementRow(layer, int(c), float(grating_deg[c]), float(dsi[c]), float(stage2_deg[c]), float(diff))
            for c, diff in zip(selective, diffs)
        ]
        medians[layer] = float(np.median(diffs)) if diffs.size else float("nan")
    return rows, medians


def polar_plot(path, tuning: DirectionTuning, directions: Sequence[float], title: str = "", cols: int = 8):
    """Writes a PNG of every channel's direction-tuning curve (polar, normalised to its peak).

    Each panel is one channel's ``tuning.curve`` at its best SF/TF, labelled with the
    channel index and DSI; direction-selective channels (DSI >= 0.3) are drawn in red.
    """
    curve = np.asarray(tuning.curve, np.float64)
    n = curve.shape[0]
    rows = -(-n // cols)
    theta = np.deg2rad(np.append(directions, directions[0]))
    fig = Figure(figsize=(1.6 * cols, 1.7 * rows + 0.4), dpi=80)
    canvas = FigureCanvasAgg(fig)
    for c in range(n):
        ax = fig.add_subplot(rows, cols, c + 1, projection="polar")
        peak = curve[c].max()
        radius = curve[c] / peak if peak > 0 else curve[c]
        colour = "tab:red" if tuning.dsi[c] >= DS_THRESHOLD else "tab:blue"
        ax.plot(theta, np.append(radius, radius[0]), color=colour, lw=1.2)
        ax.set_ylim(0, 1.05)
        ax.set_xticks(np.deg2rad([0, 90, 180, 270]))
        ax.set_xticklabels([])
        ax.set_yticks([])
        ax.set_title(f"{c}  DSI {tuning.dsi[c]:.2f}", fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3] / 255.0
    return writers.save_png(path, image)
