"""What bfloat16 compute does to stage 1: the objective reached and the step time, beside float32.

C3D with random weights, the same kernels, keys and steps in both dtypes
(``make_step(..., compute_dtype=...)``: the model runs in that dtype, the video parameter
and Adam's state stay float32). The objective of the start and of each run's final
parameter is computed in float32 without jitter, and each dtype is scored by the share of
float32's gain (final minus start) it reaches.

    python benchmarks/precision.py --layer conv3b --channels 0-3 --steps 50 --shape 16x56x56
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import models, parameterizations
from kv3d_jax.maximization import PRESETS, init_state, make_step, mean_std, model_input, objective_value
from kv3d_jax.pipeline import parse_channels
from kv3d_jax.runner import kernel_keys
from kv3d_jax.models import c3d


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="conv3b", choices=c3d.CONV_LAYERS)
    parser.add_argument("--channels", default="0-3")
    parser.add_argument("--preset", default="native", choices=tuple(PRESETS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shape", default="16x56x56", help="video T x H x W")
    args = parser.parse_args(argv)
    model, params = models.get("c3d"), jax.jit(c3d.init_params)(jax.random.PRNGKey(0))
    preset = dataclasses.replace(PRESETS[args.preset], shape=tuple(int(n) for n in args.shape.split("x")))
    channels = jnp.asarray(parse_channels(args.channels, model.num_channels(params, args.layer)))
    to_video = parameterizations.get("pixel").to_video
    value, (mean, std) = objective_value(model, args.layer), mean_std(model, preset)
    score = jax.jit(jax.vmap(lambda p, c: value(params, model_input(to_video(p), None, preset.resize, mean, std), c)))
    init_keys = run_keys = kernel_keys(jax.random.PRNGKey(0), np.asarray(channels))
    start_state = init_state(init_keys, channels, preset.shape)
    start = np.asarray(score(start_state.param, channels))
    print(f"C3D {args.layer} channels {channels.tolist()}, preset {args.preset} at {args.shape}, {args.steps} steps, "
          f"{jax.devices()[0].device_kind}; objective at the start {np.round(start, 3).tolist()}")
    reached = {}
    for dtype in ("float32", "bfloat16"):
        step = jax.jit(make_step(model, args.layer, preset, compute_dtype=jnp.dtype(dtype)))
        keys = lambda i: jax.vmap(jax.random.fold_in, (0, None))(run_keys, i)
        state, _ = jax.block_until_ready(step(params, start_state, keys(0)))  # compiles
        begin = time.perf_counter()
        for i in range(1, args.steps):
            state, _ = step(params, state, keys(i))
        jax.block_until_ready(state)
        rate = len(channels) * (args.steps - 1) / (time.perf_counter() - begin)
        reached[dtype] = np.asarray(score(state.param, channels))
        print(f"{dtype:>9}: {rate:.2f} kernel-steps/s, objective (in float32) {np.round(reached[dtype], 3).tolist()}")
    share = (reached["bfloat16"] - start) / (reached["float32"] - start)
    print(f"bfloat16's gain as a share of float32's: {np.round(share, 3).tolist()} (median {np.median(share):.3f})")


if __name__ == "__main__":
    main()
