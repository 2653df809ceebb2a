"""Tries formulations of the diversity loss on one layer (the variants of docs/diversity.md).

Each variant is a JSON object naming an objective term, a penalty on the pairwise cosines, a weight
and options; it is optimised as :mod:`kv3d_jax.diversity` optimises its own loss (the same runner
problem, starts, jitter and keys), and the script prints one JSON line per variant: the flat
pattern's pairwise cosines (max over kernels, mean, max per kernel; and the largest of the variant's
own pattern), each optimum's objective over the best of its kernel's N (min, mean, min per kernel),
the mean objective, how many kernels meet issue #25's acceptance (every cosine <= 0.5, every optimum
>= 80 % of the best of its N) and how many are dead (no optimum reaches a positive objective; they do
not meet it).

    objective: "mean"       mean_i v_i
               "norm"       mean_i v_i / stop_gradient(max_j v_j)
               "log"        mean_i log(max(v_i, 1e-3 max_j v_j) / max_j v_j)   (max_j held constant)
               "softmin"    -tau log sum_i exp(-v_i / tau), tau in activation units ("tau")
               "relsoftmin" the same with tau = "tau" x stop_gradient(mean_i |v_i|) (kv3d's own)
               "normsoftmin" relsoftmin / stop_gradient(mean_i |v_i|)
    penalty:   "mean"       mean_{i != j} cos_ij
               "hinge"      mean_{i != j} relu(cos_ij - "margin")^2 (kv3d's own)
               "lse"        "dtau" log sum_{i != j} exp(cos_ij / "dtau") (a soft largest pair)
    options:   "w" the penalty's weight; "ramp" the fraction of the steps over which it ramps in;
               "wscale" 1: the weight times stop_gradient(mean_i |v_i|); "pattern" flat, gram or cov
               (the Gram matrix of the activation less each channel's space-time mean).
    parity:    "parity" rho with weight "pw" adds pw x r x mean_i relu(rho max_j v_j - v_i)^2 / s,
               s = stop_gradient(mean_i |v_i|), r the penalty's ramp. The max is not held
               constant, so the term lowers the best as well as raising the optima below rho of it.
               "lift" 1: the max is held constant (the term only raises them).
               "pdelay" 1: r is a second ramp of the same length, starting where the first ends.
               "prel" 1: the term is pw x r x s x mean_i relu(rho - max(v_i, 0) / max_j v_j)^2,
               the shortfall of each share of the best; an optimum at or below 0 neither gains
               from it nor pulls the best down.

    .venv/bin/python scripts/diversity_variants.py --steps 150 \\
        '{"obj": "relsoftmin", "tau": 0.1, "div": "hinge", "margin": 0.4, "w": 100, "ramp": 0.3}'
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kv3d_jax import diversity, maximization, pipeline, runner, transforms, zoo
from kv3d_jax.maximization import State


def centred_gram(act: jax.Array) -> jax.Array:
    """The Gram matrix ``(C · C,)`` of one activation ``(T', H', W', C)`` less each channel's mean."""
    flat = act.reshape(-1, act.shape[-1])
    flat = flat - flat.mean(axis=0)
    return (flat.T @ flat).reshape(-1)


PATTERNS = {"flat": diversity.flat, "gram": diversity.gram, "cov": centred_gram}


def objective_term(variant: dict, values: jax.Array) -> jax.Array:
    """The variant's objective term (to maximise) of the N optima's objectives ``values`` ``(N,)``."""
    best = jax.lax.stop_gradient(jnp.maximum(jnp.abs(jnp.max(values)), 1e-3))
    kind = variant["obj"]
    if kind == "mean":
        return jnp.mean(values)
    if kind == "norm":
        return jnp.mean(values) / best
    if kind == "log":
        return jnp.mean(jnp.log(jnp.maximum(values, 1e-3 * best) / best))
    if kind == "softmin":
        return -variant["tau"] * jax.scipy.special.logsumexp(-values / variant["tau"])
    if kind == "relsoftmin":
        return diversity.soft_minimum(values, variant["tau"])
    if kind == "normsoftmin":
        scale = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(values)), 1e-6))
        return diversity.soft_minimum(values, variant["tau"]) / scale
    raise ValueError(f"unknown objective term {kind!r}")


def penalty_term(variant: dict, cosine: jax.Array) -> jax.Array:
    """The variant's penalty (to minimise) of the N optima's pairwise cosines ``(N, N)``."""
    n = cosine.shape[-1]
    off = cosine[~np.eye(n, dtype=bool)]
    kind = variant["div"]
    if kind == "mean":
        return jnp.mean(off)
    if kind == "hinge":
        return diversity.hinge(cosine, variant["margin"])
    if kind == "lse":
        return variant["dtau"] * jax.scipy.special.logsumexp(off / variant["dtau"])
    raise ValueError(f"unknown penalty {kind!r}")


def problem(model, layer: str, config: maximization.Config, shape, n: int, variant: dict) -> runner.Problem:
    """:func:`kv3d_jax.diversity.problem` with the variant's loss; outputs ``(videos, objective, flat cosine,
    the variant's pattern's cosine)``."""
    to_video = maximization.parameterization_of(config).to_video
    act_fn = diversity._layer(model, layer, config, jnp.float32)
    pattern = PATTERNS[variant.get("pattern", "flat")]
    optimizer = optax.adam(config.learning_rate)
    mean, std = maximization.mean_std(model, config)
    index = jnp.arange(n, dtype=jnp.uint32)
    ramp_steps = variant.get("ramp", 0.0) * config.steps

    def init(key, target):
        params = jax.vmap(lambda i: maximization.initial_state(jax.random.fold_in(key, i), target, shape,
                                                               config.parameterization,
                                                               config.learning_rate).param)(index)
        return State(params, optimizer.init(params), jnp.asarray(target))

    def loss(params, model_params, key, target, ramp, ramp_done):
        def one(param, i):
            jitter = transforms.random_jitter(jax.random.fold_in(key, i), config.max_shift, config.scales)
            return maximization.model_input(to_video(param), jitter, config.resize, mean, std)

        acts, spoiled = act_fn(model_params, jax.vmap(one)(params, index))
        values = diversity._values(config, acts, target, spoiled)
        weight = variant["w"] * ramp
        if variant.get("wscale"):
            weight = weight * jax.lax.stop_gradient(jnp.mean(jnp.abs(values)))
        penalty = weight * penalty_term(variant, diversity.cosines(jax.vmap(pattern)(acts)))
        if "parity" in variant:
            scale = jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(values)), 1e-6))
            best = jax.lax.stop_gradient(jnp.max(values)) if variant.get("lift") else jnp.max(values)
            late = jnp.clip(ramp_done - 1.0, 0.0, 1.0) if variant.get("pdelay") else ramp
            if variant.get("prel"):
                short = jax.nn.relu(variant["parity"] - jax.nn.relu(values) / jnp.maximum(best, 1e-6))
                penalty = penalty + variant["pw"] * late * scale * jnp.mean(short * short)
            else:
                short = jax.nn.relu(variant["parity"] * best - values)
                penalty = penalty + variant["pw"] * late * jnp.mean(short * short) / scale
        return penalty - objective_term(variant, values), jnp.mean(values)

    def step(model_params, state, key):
        done = optax.tree_utils.tree_get(state.opt_state, "count")
        # How many ramps' lengths of steps are done (2 once the steps after the first ramp are as many again).
        ramp_done = done / ramp_steps if ramp_steps > 0 else 2.0
        ramp = jnp.minimum(1.0, ramp_done)
        grad, value = jax.grad(loss, has_aux=True)(state.param, model_params, key, state.target, ramp, ramp_done)
        updates, opt_state = optimizer.update(grad, state.opt_state, state.param)
        return State(optax.apply_updates(state.param, updates), opt_state, state.target), value

    def outputs(model_params, state):
        videos = jax.vmap(to_video)(state.param)
        x = jax.vmap(lambda v: maximization.model_input(v, None, config.resize, mean, std))(videos)
        acts, spoiled = act_fn(model_params, x)
        return (maximization.minmax_normalize(videos), diversity._values(config, acts, state.target, spoiled),
                diversity.cosines(jax.vmap(diversity.flat)(acts)), diversity.cosines(jax.vmap(pattern)(acts)))

    return runner.Problem(init, step, outputs, convolves=True)


def summary(objective: np.ndarray, cosine: np.ndarray) -> dict:
    """Issue #25's numbers of K kernels' objectives ``(K, N)`` and flat cosines ``(K, N, N)``."""
    off = diversity.off_diagonal(cosine)
    # A kernel none of whose optima reaches a positive objective is dead: a share of its best means nothing.
    live = objective.max(axis=1) > 0
    of_best = np.where(live[:, None], objective / np.where(live, objective.max(axis=1), 1)[:, None], np.nan)
    meeting = live & (off.max(axis=1) <= 0.5) & (of_best.min(axis=1) >= 0.8)
    return {"cosine_max": round(float(off.max()), 3), "cosine_mean": round(float(off.mean()), 3),
            "cosine_max_per_kernel": [round(float(x), 2) for x in off.max(axis=1)],
            "of_best_min": round(float(np.nanmin(of_best)), 3) if live.any() else None,
            "of_best_mean": round(float(np.nanmean(of_best)), 3) if live.any() else None,
            "of_best_min_per_kernel": [None if np.isnan(x) else round(float(x), 2) for x in of_best.min(axis=1)],
            "objective_mean": round(float(objective.mean()), 3), "kernels_meeting": int(meeting.sum()),
            "dead": int((~live).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="conv3")
    parser.add_argument("--channels", default="0-7")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("variants", nargs="+", help="JSON objects (see the module doc)")
    args = parser.parse_args()

    model, params = zoo.load("motionnet")
    channels = pipeline.parse_channels(args.channels, model.num_channels(params, args.layer), args.layer)
    config = maximization.preset("native", steps=args.steps)
    shape, ids, target, _ = maximization.checked_targets(model, params, args.layer, config, channels, None)
    for text in args.variants:
        variant = json.loads(text)
        start = time.perf_counter()
        result = runner.run(problem(model, args.layer, config, shape, args.n, variant), params, target, ids,
                            config.steps, chunk=config.chunk, key=jax.random.PRNGKey(args.seed), batch_size=len(ids))
        _, objective, cosine, own = (np.asarray(x) for x in result.outputs)
        own_max = float(diversity.off_diagonal(own).max())
        print(json.dumps({"layer": args.layer, "steps": args.steps, **variant, **summary(objective, cosine),
                          "pattern_cosine_max": round(own_max, 3), "seconds": round(time.perf_counter() - start, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
