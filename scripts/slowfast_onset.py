"""A variant of the slow/fast read-out, measured and not kept (docs/slowfast.md): the penalty switched
on only after ``--onset`` steps of plain stage 1, then ``--extra`` steps under it, so that the
penalised optimum continues from the unpenalised one instead of being found afresh. The λ = 0 pair
runs the same ``onset + extra`` steps with the same keys. Prints JSON in the format of
``scripts/measure_slowfast.py`` (per channel: index, preferred TF, objectives, variations).

    .venv/bin/python scripts/slowfast_onset.py --layer conv4 --onset 400 --extra 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import maximization, runner, slowfast, tuning, zoo


class State(NamedTuple):
    stage1: maximization.State
    weight: jax.Array
    scale: jax.Array
    count: jax.Array


def problem(model, layer: str, config: maximization.Config, shape, onset: int) -> runner.Problem:
    """:func:`kv3d_jax.slowfast.problem` with the penalty weight 0 for the first ``onset`` steps."""
    to_video = maximization.parameterization_of(config).to_video
    stage1 = maximization.problem(model, layer, config, shape)

    def init(key, target):
        channel, weight = target
        return State(stage1.init(key, channel), jnp.asarray(weight, jnp.float32), jnp.float32(0), jnp.int32(0))

    def step(model_params, state, key):
        weight = jnp.where(state.count >= onset, state.weight, 0.0)

        def penalty(param):
            return weight * state.scale * slowfast.temporal_variation(to_video(param))

        new, value = maximization.kernel_step(model, layer, config, penalty=penalty)(model_params, state.stage1, key)
        return State(new, state.weight, jnp.maximum(value, 0.0), state.count + 1), value

    def outputs(model_params, state):
        _, value = stage1.outputs(model_params, state.stage1)
        return value, slowfast.temporal_variation(to_video(state.stage1.param))

    return runner.Problem(init, step, outputs, convolves=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="conv4")
    parser.add_argument("--onset", type=int, default=400)
    parser.add_argument("--extra", type=int, default=200)
    parser.add_argument("--weight", type=float, default=slowfast.DEFAULT_WEIGHT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, params = zoo.load("motionnet")
    directions = np.arange(16) * 22.5
    responses = tuning.grating_responses(model, params, args.layer, directions, [0.05, 0.1, 0.2],
                                         [0.03125, 0.0625, 0.125, 0.25, 0.375])
    result = tuning.direction_tuning(responses, directions)
    tuned = tuning.direction_selective(result)
    ids = np.flatnonzero(tuned)
    tf = slowfast.grating_tf(model, params, args.layer, result.preferred_deg, ids)
    config = maximization.preset("native", steps=args.onset + args.extra)
    shape = tuple(config.shape or model.input_shape)
    pairs = np.repeat(ids, 2)
    targets = (jnp.asarray(pairs, jnp.int32), jnp.asarray(np.tile(np.array([0.0, args.weight], np.float32), ids.size)))
    start = time.time()
    run = runner.run(problem(model, args.layer, config, shape, args.onset), params, targets, pairs, config.steps,
                     chunk=config.chunk, key=runner.kernel_keys(jax.random.PRNGKey(args.seed), pairs), share=False,
                     per_device=8)
    objective, variation = (np.asarray(a, np.float64).reshape(-1, 2) for a in run.outputs)
    index = slowfast.slowness(objective)
    full = np.full(tuned.size, np.nan)
    full[ids] = index
    agreement = slowfast.agreement(full, tf, tuned)
    print(f"{args.layer}: agree {int(agreement.agree[agreement.compared].sum())} of {int(agreement.compared.sum())}, "
          f"{time.time() - start:.0f} s", file=sys.stderr)
    json.dump({"layers": {args.layer: {"per_channel": [
        {"channel": int(c), "index": float(index[k]), "preferred_tf": float(tf[c]), "objective": objective[k].tolist(),
         "variation": variation[k].tolist()} for k, c in enumerate(ids)]}}}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
