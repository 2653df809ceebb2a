"""The slow/fast read-out on units whose temporal frequency is known: a motion-energy bank (docs/slowfast.md).

Builds :func:`kv3d_jax.models.energy.bank` with one unit per ``--tfs`` entry, reads each unit's
preferred TF from drifting gratings towards 0° and 180° on :mod:`kv3d_jax.slowfast`'s fine grid,
measures the slow/fast index (:func:`kv3d_jax.slowfast.measure`) of every unit, and prints, as
JSON, both per unit, the DSI, the objectives and temporal variations, the sign agreement over all
units and the Spearman correlation of the index with the true TF.

    .venv/bin/python scripts/slowfast_bank.py --steps 400
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from kv3d_jax import maximization, slowfast, tuning
from kv3d_jax.models import energy
from slowfast_reliability import spearman


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tfs", default="0,0.03125,0.0625,0.09375,0.125,0.1875,0.25,0.3125",
                        help="the units' temporal frequencies, cycles/frame")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    true_tf = [float(v) for v in args.tfs.split(",")]
    model, params = energy.bank(true_tf)
    directions = np.array([0.0, 180.0])
    responses = tuning.grating_responses(model, params, energy.LAYER, directions, slowfast.SPATIAL_FREQS,
                                         slowfast.TEMPORAL_FREQS)
    result = tuning.direction_tuning(responses, directions)
    tf = slowfast.preferred_tf(responses, slowfast.TEMPORAL_FREQS, np.searchsorted(directions, result.preferred_deg))
    start = time.time()
    measured = slowfast.measure(model, params, energy.LAYER, config=maximization.preset("native", steps=args.steps),
                                key=jax.random.PRNGKey(args.seed), per_device=8)
    agreement = slowfast.agreement(measured.index, tf, np.ones(len(true_tf), bool))
    print(json.dumps({
        "steps": args.steps, "seed": args.seed, "weights": measured.weights.tolist(), "true_tf": true_tf,
        "grating_tf": np.round(tf, 4).tolist(), "dsi": np.round(result.dsi, 2).tolist(),
        "index": np.round(measured.index, 3).tolist(), "objective": np.round(measured.objective, 2).tolist(),
        "variation": np.round(measured.variation, 3).tolist(),
        "agree": int(agreement.agree[agreement.compared].sum()), "compared": int(agreement.compared.sum()),
        "spearman_index_vs_tf": spearman(measured.index, np.asarray(true_tf)), "seconds": round(time.time() - start, 1),
        "device": str(jax.devices()[0])}, indent=1))


if __name__ == "__main__":
    main()
