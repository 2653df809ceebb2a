"""Measures diverse optima (kv3d_jax.diversity) on one layer at several weights (docs/diversity.md).

For each diversity weight and activation pattern, N optima of each channel are optimised with the
same preset, steps, seed, margin, temperature and warm-up; the script prints, as JSON, the
off-diagonal pairwise cosine of the optima's activation patterns (max and mean over kernels), each
optimum's objective over the best of its kernel's N (min and mean), the mean objective over the best
plain (weight 0) optimum of the channel, and how many kernels meet issue #25's acceptance (max cosine
<= 0.5, every optimum >= 80 % of the best of its N) and how many are dead (no optimum reaches a
positive objective; they count as not meeting it, and their objective ratios are left out).

    .venv/bin/python scripts/measure_diversity.py --layer conv3 --channels 0-7 --n 4 --steps 300 --weights 0,100
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from kv3d_jax import diversity, maximization, pipeline, zoo


def summary(result: diversity.DiverseResult, plain_best: np.ndarray | None, gram: np.ndarray) -> dict:
    """The cosines and objective ratios of ``result`` (see the module doc); the ratio to the plain
    optimum only when ``plain_best`` ``(K,)`` is known (weight 0 among the weights). ``gram``
    ``(K, N, N)``: the optima's cosines of the Gram pattern, which ignores where features sit."""
    off, gram_off = diversity.off_diagonal(result.cosine), diversity.off_diagonal(gram)
    objective = np.asarray(result.objective)
    # A kernel none of whose optima reaches a positive objective is dead: a share of its best means nothing.
    live = objective.max(axis=1) > 0
    of_best = np.where(live[:, None], objective / np.where(live, objective.max(axis=1), 1)[:, None], np.nan)
    kernel_ok = live & (off.max(axis=1) <= 0.5) & (of_best.min(axis=1) >= 0.8)
    return {"cosine_max": float(off.max()), "cosine_mean": float(off.mean()),
            "cosine_max_per_kernel": off.max(axis=1).round(3).tolist(),
            "of_best_min": float(np.nanmin(of_best)) if live.any() else None,
            "of_best_mean": float(np.nanmean(of_best)) if live.any() else None,
            "of_best_min_per_kernel": [None if np.isnan(x) else round(float(x), 3) for x in of_best.min(axis=1)],
            "of_plain_best_mean": None if plain_best is None else float((objective / plain_best[:, None]).mean()),
            "objective_mean": float(objective.mean()),
            "gram_cosine_min": float(gram_off.min()), "gram_cosine_mean": float(gram_off.mean()),
            "kernels_meeting": int(kernel_ok.sum()), "dead": int((~live).sum()), "failed": int(result.failed.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="motionnet")
    parser.add_argument("--layer", default="conv3")
    parser.add_argument("--channels", default="0-7")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--preset", default="native")
    parser.add_argument("--steps", type=int, help="default: the preset's")
    parser.add_argument("--weights", default=f"0,{diversity.DEFAULT_WEIGHT:g}")
    parser.add_argument("--patterns", default=diversity.DEFAULT_PATTERN)
    parser.add_argument("--margin", type=float, default=diversity.DEFAULT_MARGIN)
    parser.add_argument("--temperature", type=float, default=diversity.DEFAULT_TEMPERATURE)
    parser.add_argument("--warmup", type=float, default=diversity.DEFAULT_WARMUP)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, params = zoo.load(args.model)
    channels = pipeline.parse_channels(args.channels, model.num_channels(params, args.layer), args.layer)
    config = maximization.preset(args.preset, **({} if args.steps is None else {"steps": args.steps}))
    key = jax.random.PRNGKey(args.seed)
    report = {"model": args.model, "layer": args.layer, "channels": [int(c) for c in channels], "n": args.n,
              "steps": config.steps, "preset": args.preset, "margin": args.margin, "temperature": args.temperature,
              "warmup": args.warmup, "device": str(jax.devices()[0]), "runs": {}}
    plain_best = None
    for pattern in args.patterns.split(","):
        for weight in map(float, args.weights.split(",")):
            if weight == 0 and plain_best is not None:
                continue
            start = time.perf_counter()
            result = diversity.maximize_diverse(model, params, args.layer, channels, args.n, config=config,
                                                weight=weight, pattern=pattern, margin=args.margin,
                                                temperature=args.temperature, warmup=args.warmup, key=key)
            jax.block_until_ready(result.videos)
            if weight == 0:
                plain_best = np.asarray(result.objective).max(axis=1)
            seconds = round(time.perf_counter() - start, 1)
            name = "weight 0" if weight == 0 else f"{pattern} weight {weight:g}"
            # On the min-max normalised videos, as written (within about 0.05 of the raw optima's cosines).
            gram = diversity.similarity(model, params, args.layer, result.videos, config=config, pattern="gram")
            # The load average over the last 5 minutes when the run ended: a shared CPU's seconds grow with it.
            report["runs"][name] = {**summary(result, plain_best, gram), "seconds": seconds,
                                    "load": round(os.getloadavg()[1], 2)}
            print(name, json.dumps(report["runs"][name]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
