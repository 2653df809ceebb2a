"""Do the visualisations tell the truth? Grating-preferred vs stage-2 dominant direction.

For the direction-selective channels of each layer of a ``kv3d visualize`` run (DSI at
least 0.3 and a peak response at least a fraction of the layer's strongest,
:func:`kv3d_jax.tuning.direction_selective`), the direction of the drifting grating a
channel prefers (:mod:`kv3d_jax.tuning`) beside the dominant direction of the motion in its
optimal video (stage 2's read-out), or of its refinement's motion (stage 3, for a run made
with ``--refine``); with the median difference over all of them and over the ones whose
kernel record counts as reliable (:mod:`kv3d_jax.reliability`) and the rest. For a run made with
``--slowfast``, also each one's slow/fast index beside the temporal frequency it prefers among
gratings, and how often the two agree in sign (:func:`kv3d_jax.slowfast.agreement`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from kv3d_jax import slowfast, tuning, zoo
from kv3d_jax.job import Job
from kv3d_jax.store import RUN_FILE, Store, StoreError, params_checksum

# The grating grid: 16 directions (each with its opposite), three spatial and temporal frequencies.
DIRECTIONS = np.arange(16) * 22.5
SPATIAL_FREQS = (0.05, 0.1, 0.2)  # cycles/px
TEMPORAL_FREQS = (0.05, 0.1, 0.2)  # cycles/frame
# Whose dominant direction is compared: stage name -> (kernel record field, table label).
STAGES = {"stage2": ("direction_deg", "stage-2 dominant"), "refined": ("refined_direction_deg", "refined dominant")}


def load_run(run_dir, weights=None) -> tuple[Job, object, object]:
    """The :class:`~kv3d_jax.job.Job` run folder ``run_dir``'s ``run.json`` records, with its model
    and params loaded as ``kv3d visualize`` loads them (``weights`` unless the model is embedded)."""
    path = Path(run_dir) / RUN_FILE
    try:
        config = json.loads(path.read_text())["config"]
        job = Job.from_config(config)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a `kv3d visualize` run folder") from None
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{path} is not a kv3d run record ({type(err).__name__}: {err})") from None
    model, params = zoo.load(job.model, weights)
    return job, model, params


def _records(store: Store, model, layer: str, job: Job) -> dict[int, dict]:
    """``{channel: arrays}`` of ``layer``'s finished kernels in ``store``."""
    arrays = job.record(model).arrays()
    return {c: store.read(layer, c, arrays) for c in sorted(store.audit(layer, arrays).done)}


def layer_agreement(model, params, layer: str, stage2: dict[int, float], reliable: dict[int, bool] | None = None,
                    min_peak: float = tuning.PEAK_FRACTION,
                    slowness: dict[int, float] | None = None) -> tuple[list, float]:
    """Rows of :func:`kv3d_jax.tuning.agreement_table` for the direction-selective channels of
    ``layer`` among those in ``stage2`` (:func:`kv3d_jax.tuning.direction_selective` with
    ``min_peak``, the peak measured against all of the layer's channels), each marked with
    ``reliable[channel]`` and, given ``slowness`` (channel → slow/fast index), with it and the
    channel's grating-preferred TF (:func:`kv3d_jax.slowfast.grating_tf`); and their median angular
    difference (degrees; NaN when none).

    Channels whose read-out found no direction (NaN) are left out.
    """
    stage2 = {c: d for c, d in stage2.items() if np.isfinite(d)}
    responses = tuning.grating_responses(model, params, layer, DIRECTIONS, SPATIAL_FREQS, TEMPORAL_FREQS)
    result = tuning.direction_tuning(responses, DIRECTIONS)
    selective = tuning.direction_selective(result, min_peak=min_peak)
    channels = np.asarray([c for c in sorted(stage2) if selective[c]], np.int64)
    rows, medians = tuning.agreement_table(
        {layer: (result.preferred_deg[channels], result.dsi[channels], [stage2[c] for c in channels])}
    )
    # agreement_table numbers rows by position; name the real channels.
    rows = [row._replace(channel=int(channels[row.channel]),
                         reliable=None if reliable is None else reliable[int(channels[row.channel])]) for row in rows]
    if slowness is not None and rows:
        tf = slowfast.grating_tf(model, params, layer, result.preferred_deg, channels)
        rows = [row._replace(slowness=float(slowness[row.channel]), preferred_tf=float(tf[row.channel]))
                for row in rows]
    return rows, medians[layer]


def report(run_dir, weights=None, layers: Sequence[str] | None = None, stage: str = "stage2",
           min_peak: float = tuning.PEAK_FRACTION) -> tuple[list, dict[str, float], int]:
    """Agreement rows, per-layer medians and kernels compared, for run folder ``run_dir``,
    with the dominant directions of ``stage`` (a key of :data:`STAGES`); ``min_peak``: see
    :func:`layer_agreement` (0 counts every channel with a DSI of at least 0.3).

    The run's model is loaded as ``kv3d visualize`` loads it (``weights`` unless it is the
    embedded default model), and must be the one the run recorded.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid stages are: {', '.join(STAGES)}")
    job, model, params = load_run(run_dir, weights)
    if stage == "refined" and not job.refine_steps:
        raise ValueError(f"{run_dir} was run without the refinement; run `kv3d visualize --refine` into a new "
                         "folder to compare refined directions")
    field = STAGES[stage][0]
    rows, medians, compared = [], {}, 0
    with Store.open(run_dir, job.config(model), params_checksum(params)) as store:
        for layer in layers or [layer for layer in model.layers if layer in store.layers()]:
            records = _records(store, model, model.check_layer(layer), job)
            if not records:
                continue
            layer_rows, medians[layer] = layer_agreement(
                model, params, layer, {c: float(r[field]) for c, r in records.items()},
                {c: bool(r["reliable"]) for c, r in records.items()}, min_peak,
                {c: float(r["slowness"]) for c, r in records.items()} if job.slowfast else None)
            rows += layer_rows
            compared += len(records)
    return rows, medians, compared


def split_medians(rows, layer: str) -> tuple[tuple[int, float], tuple[int, float], tuple[int, float]]:
    """``(count, median difference)`` of ``layer``'s rows: all, the reliable ones, the others (NaN median
    for none)."""
    def summary(chosen):
        diffs = [r.difference_deg for r in chosen]
        return len(diffs), float(np.median(diffs)) if diffs else float("nan")
    mine = [r for r in rows if r.layer == layer]
    return summary(mine), summary([r for r in mine if r.reliable]), summary([r for r in mine if not r.reliable])


def _value(x: float) -> str:
    return f"{x:.3f}" if np.isfinite(x) else "–"


def slowfast_signs(rows, layer: str) -> tuple[int, int]:
    """``(agree, compared)``: of ``layer``'s rows, how many are compared in sign by
    :func:`kv3d_jax.slowfast.agreement` (slow/fast index and preferred TF both finite and off their
    medians over these rows) and how many of those agree."""
    mine = [r for r in rows if r.layer == layer]
    signs = slowfast.agreement([r.slowness for r in mine], [r.preferred_tf for r in mine], [True] * len(mine))
    return int(signs.agree[signs.compared].sum()), int(signs.compared.sum())


def markdown(rows, medians: dict[str, float], stage: str = "stage2") -> str:
    """The per-layer summary (all direction-selective channels, the reliable ones, the others) and
    the per-channel table as Markdown (``stage`` names the direction column); rows with a slow/fast
    index add its columns and a per-layer count of signs that agree with the preferred TF's."""
    def cell(count, median):
        return f"{count} | {median:.1f}" if count else f"{count} | –"
    lines = ["| layer | DS channels | median difference (deg) | reliable | median (deg) | unreliable | median (deg) |",
             "|---|---|---|---|---|---|---|"]
    for layer in medians:
        lines.append(f"| {layer} | " + " | ".join(cell(*part) for part in split_medians(rows, layer)) + " |")
    indexed = any(np.isfinite(r.slowness) for r in rows)
    if indexed:
        lines += ["", "| layer | slow/fast index and preferred TF agree in sign (fast = index below its median = TF "
                  "above its median) |", "|---|---|"]
        for layer in medians:
            agree, compared = slowfast_signs(rows, layer)
            share = f" ({agree / compared:.0%})" if compared else ""
            lines.append(f"| {layer} | {agree} of {compared}{share} |")
    extra = (" slow/fast index | preferred TF (cycles/frame) |", "---|---|") if indexed else ("", "")
    lines += ["", f"| layer | channel | grating-preferred (deg) | DSI | {STAGES[stage][1]} (deg) | difference (deg) "
              f"| reliable |{extra[0]}", f"|---|---|---|---|---|---|---|{extra[1]}"]
    lines += [f"| {r.layer} | {r.channel} | {r.grating_deg:.1f} | {r.dsi:.2f} | {r.stage2_deg:.1f} | {r.difference_deg:.1f} "
              f"| {'–' if r.reliable is None else 'yes' if r.reliable else 'no'} |"
              + (f" {_value(r.slowness)} | {_value(r.preferred_tf)} |" if indexed else "") for r in rows]
    return "\n".join(lines) + "\n"
