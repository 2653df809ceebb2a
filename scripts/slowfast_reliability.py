"""How reliable the slow/fast index is, and how it relates to other grating TF measures (docs/slowfast.md).

Reads one layer's JSON reports of ``scripts/measure_slowfast.py`` or ``scripts/slowfast_onset.py``
(several seeds of one setting) and prints: the Spearman correlation of the index between every pair
of runs (test–retest), each run's agreement in sign with the grating-preferred TF and Spearman
correlation with it, and the same for the runs' mean log index. With ``--tf-measures`` it also
compares the index with other grating TF measures computed here from drifting gratings at all 16
directions and the fine grid of :mod:`kv3d_jax.slowfast`:

- ``peak@best_sf``: kv3d's preferred TF (:func:`kv3d_jax.slowfast.preferred_tf`);
- ``peak_over_sf``: the peak of the TF curve at the preferred direction, maximised over SF per TF;
- ``peak_over_all``: the same maximised over SF and direction;
- ``centroid_over_sf``: the response-weighted geometric mean TF of that curve;
- ``lowpass_loss``: 1 − its largest response at TF ≤ 1/16 cycle/frame over its largest (high = fast);
- ``lowpass_loss_all``: the same over SF and direction.

    .venv/bin/python scripts/slowfast_reliability.py conv4 s0.json s1.json s2.json --tf-measures
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from kv3d_jax import slowfast, tuning, zoo

DIRECTIONS = np.arange(16) * 22.5


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` over the entries finite in both."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a[ok])), np.argsort(np.argsort(b[ok]))
    return float(np.corrcoef(ra, rb)[0, 1])


def _peak(curves: np.ndarray) -> np.ndarray:
    """The parabola-refined peak TF of each curve ``(C, F)`` over :data:`kv3d_jax.slowfast.TEMPORAL_FREQS`."""
    return slowfast.preferred_tf(curves.T[None, None], slowfast.TEMPORAL_FREQS, np.zeros(len(curves), int))


def tf_measures(layer: str) -> dict[str, np.ndarray]:
    """Every grating TF measure of the module doc, each ``(C,)`` over the layer's channels."""
    model, params = zoo.load("motionnet")
    coarse = tuning.grating_responses(model, params, layer, DIRECTIONS, [0.05, 0.1, 0.2],
                                      [0.03125, 0.0625, 0.125, 0.25, 0.375])
    preferred = tuning.direction_tuning(coarse, DIRECTIONS).preferred_deg
    fine = np.asarray(tuning.grating_responses(model, params, layer, DIRECTIONS, slowfast.SPATIAL_FREQS,
                                               slowfast.TEMPORAL_FREQS, 4), np.float64)  # (D, S, F, C)
    channels = np.arange(fine.shape[-1])
    at_direction = fine[np.searchsorted(DIRECTIONS, preferred), :, :, channels]  # (C, S, F)
    over_sf, over_all = at_direction.max(axis=1), fine.max(axis=(0, 1)).T  # (C, F)
    tfs, low = np.asarray(slowfast.TEMPORAL_FREQS), np.asarray(slowfast.TEMPORAL_FREQS) <= 1 / 16
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "peak@best_sf": slowfast.preferred_tf(fine, slowfast.TEMPORAL_FREQS, np.searchsorted(DIRECTIONS, preferred)),
            "peak_over_sf": _peak(over_sf),
            "peak_over_all": _peak(over_all),
            "centroid_over_sf": np.exp((over_sf * np.log(tfs)).sum(1) / over_sf.sum(1)),
            "lowpass_loss": 1 - over_sf[:, low].max(1) / over_sf.max(1),
            "lowpass_loss_all": 1 - over_all[:, low].max(1) / over_all.max(1),
        }


def compare(index: np.ndarray, measure: np.ndarray) -> str:
    """``agree A of N (share), Spearman r`` of ``index`` against a TF ``measure`` (both ``(C,)``, NaN = absent)."""
    result = slowfast.agreement(index, measure, np.isfinite(index))
    agree, compared = int(result.agree[result.compared].sum()), int(result.compared.sum())
    return f"agree {agree:2d} of {compared} ({result.share:.0%}), Spearman {spearman(index, measure):+.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layer")
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--tf-measures", action="store_true")
    args = parser.parse_args()
    runs = [{row["channel"]: row for row in json.load(open(path))["layers"][args.layer]["per_channel"]}
            for path in args.reports]
    size = 1 + max(max(run) for run in runs)
    index = np.full((len(runs), size), np.nan)
    tf = np.full(size, np.nan)
    for r, run in enumerate(runs):
        for channel, row in run.items():
            index[r, channel] = row["index"]
            tf[channel] = row["preferred_tf"]
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            print(f"test-retest {args.reports[i]} vs {args.reports[j]}: Spearman {spearman(index[i], index[j]):+.2f}")
    with np.errstate(invalid="ignore", divide="ignore"):
        logs = np.log(index)
    counts = np.isfinite(logs).sum(axis=0)
    mean = np.exp(np.where(counts > 0, np.nansum(logs, axis=0) / np.maximum(counts, 1), np.nan))
    measures = {"preferred TF (report)": tf}
    if args.tf_measures:
        measures.update({name: value[:size] for name, value in tf_measures(args.layer).items()})
    for name, measure in measures.items():
        for r, path in enumerate(args.reports):
            print(f"{name:22s} {path}: {compare(index[r], measure)}")
        if len(runs) > 1:
            print(f"{name:22s} mean of {len(runs)}: {compare(mean, measure)}")


if __name__ == "__main__":
    main()
