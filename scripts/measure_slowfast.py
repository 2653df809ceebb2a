"""Measures the slow/fast read-out against grating temporal-frequency preference (docs/slowfast.md).

For each layer: drifting-grating tuning (:mod:`kv3d_jax.tuning`, the gratings of ``--sf`` and
``--tf``) picks the direction-selective channels (:func:`kv3d_jax.tuning.direction_selective`) and
their preferred directions; at that direction, gratings on a finer grid give each its preferred TF
(:func:`kv3d_jax.slowfast.grating_tf`); the slow/fast index of those channels is measured with
:func:`kv3d_jax.slowfast.measure`; the script prints, as JSON, per channel both measures and, per
layer and over all layers, the share of channels whose signs agree
(:func:`kv3d_jax.slowfast.agreement`), the Spearman correlation of the two, and that of the index
with the unpenalised objective (a strong channel should not look fast for being strong).

    .venv/bin/python scripts/measure_slowfast.py --model motionnet --layers conv3 --steps 400
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from kv3d_jax import maximization, slowfast, tuning, zoo


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` (no ties expected in float measurements)."""
    if a.size < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="motionnet")
    parser.add_argument("--layers", default="conv2,conv3,conv4")
    parser.add_argument("--preset", default="native")
    parser.add_argument("--steps", type=int, help="default: the preset's")
    parser.add_argument("--weights", default=",".join(map(str, slowfast.WEIGHTS)))
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--sf", default="0.05,0.1,0.2")
    parser.add_argument("--tf", default="0.03125,0.0625,0.125,0.25,0.375")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-device", type=int, default=8,
                        help="pairs per device in a batch (default 8; on a CPU far faster than one batch of all)")
    args = parser.parse_args()

    model, params = zoo.load(args.model)
    config = maximization.preset(args.preset, **({} if args.steps is None else {"steps": args.steps}))
    weights = [float(w) for w in args.weights.split(",")]
    directions = np.arange(args.directions) * 360.0 / args.directions
    sfs, tfs = [float(v) for v in args.sf.split(",")], [float(v) for v in args.tf.split(",")]
    report = {"model": args.model, "preset": args.preset, "steps": config.steps, "weights": weights,
              "sf": sfs, "tf": tfs, "preferred_tf_sf": list(slowfast.SPATIAL_FREQS),
              "preferred_tf_tf": list(slowfast.TEMPORAL_FREQS), "directions": args.directions,
              "device": str(jax.devices()[0]), "layers": {}}
    all_index, all_tf, all_agree = [], [], []
    for layer in args.layers.split(","):
        start = time.time()
        responses = tuning.grating_responses(model, params, layer, directions, sfs, tfs)
        result = tuning.direction_tuning(responses, directions)
        tuned = tuning.direction_selective(result)
        channels = np.flatnonzero(tuned)
        tf = slowfast.grating_tf(model, params, layer, result.preferred_deg, channels)
        print(f"{layer}: {channels.size} tuned channels", file=sys.stderr, flush=True)
        measured = slowfast.measure(model, params, layer, channels, config=config, weights=weights,
                                    key=jax.random.PRNGKey(args.seed), per_device=args.per_device)
        index = np.full(tuned.size, np.nan)
        index[measured.channels] = measured.index
        usable = np.isfinite(measured.index)
        agreement = slowfast.agreement(index, tf, tuned)
        compared = np.flatnonzero(agreement.compared)
        report["layers"][layer] = {
            "channels": tuned.size, "tuned": int(tuned.sum()), "compared": int(compared.size),
            "agree": int(agreement.agree[compared].sum()), "share": agreement.share,
            "spearman_index_vs_tf": spearman(index[compared], tf[compared]),
            "spearman_index_vs_objective": spearman(measured.index[usable], measured.objective[usable, 0]),
            "index_median_range": [float(np.nanmedian(measured.index)), float(np.nanmin(measured.index)),
                                   float(np.nanmax(measured.index))],
            "preferred_tf_median_range": [float(np.nanmedian(tf[tuned])), float(np.nanmin(tf[tuned])),
                                          float(np.nanmax(tf[tuned]))],
            "mean_objective": measured.objective.mean(axis=0).round(3).tolist(),
            "mean_variation": measured.variation.mean(axis=0).round(4).tolist(),
            "best_tf_counts": np.bincount(result.best_tf[tuned], minlength=len(tfs)).tolist(),
            "seconds": round(time.time() - start, 1),
            "per_channel": [
                {"channel": int(c), "dsi": round(float(result.dsi[c]), 3), "preferred_tf": round(float(tf[c]), 4),
                 "index": round(float(index[c]), 4), "fast_index": bool(agreement.fast_index[c]),
                 "fast_tf": bool(agreement.fast_tf[c]), "agree": bool(agreement.agree[c]),
                 "objective": np.round(measured.objective[k], 2).tolist(),
                 "variation": np.round(measured.variation[k], 4).tolist()}
                for k, c in enumerate(measured.channels)],
        }
        all_index.append(index[compared]), all_tf.append(tf[compared]), all_agree.append(agreement.agree[compared])
        print(f"{layer}: share {agreement.share:.3f} of {compared.size}, {time.time() - start:.0f} s",
              file=sys.stderr, flush=True)
    agree = np.concatenate(all_agree)
    report["overall"] = {"compared": int(agree.size), "agree": int(agree.sum()),
                         "share": float(agree.mean()) if agree.size else float("nan"),
                         "spearman_index_vs_tf": spearman(np.concatenate(all_index), np.concatenate(all_tf))}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
