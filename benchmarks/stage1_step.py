"""Kernel-steps/s of one jitted stage-1 step on C3D with random weights, for K=1 and K=many.

The step is ``kv3d_jax.maximization.make_step`` under ``jax.jit``: jitter, forward to the layer,
input gradient and Adam for K kernels at once. It is compiled first, then timed over
several repeats; the median is reported. The default (conv2, native preset on an 8×32×32
clip, K=1 and every channel of the layer) runs in about a minute on two cores; e.g.
``--preset paper --layer conv5b --kernels 1`` times one kernel at the paper preset.

    python benchmarks/stage1_step.py [--layer conv2] [--preset native] [--shape 8x32x32]
                                     [--kernels 1,all] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import models
from kv3d_jax.maximization import PRESETS, init_state, make_step
from kv3d_jax.runner import kernel_keys
from kv3d_jax.models import c3d


def time_step(model, params, layer, preset, shape, k: int, repeats: int) -> float:
    """Median seconds of one jitted step of ``k`` kernels (after one untimed compiling call)."""
    step = jax.jit(make_step(model, layer, preset))
    init_keys = run_keys = kernel_keys(jax.random.PRNGKey(0), np.arange(k))
    state = init_state(init_keys, jnp.arange(k) % model.num_channels(params, layer), shape)
    state, _ = jax.block_until_ready(step(params, state, run_keys))
    times = []
    for i in range(repeats):
        keys = jax.vmap(jax.random.fold_in, (0, None))(run_keys, i + 1)
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step(params, state, keys))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="conv2")
    parser.add_argument("--preset", default="native", choices=tuple(PRESETS))
    parser.add_argument("--shape", default="8x32x32", help="video TxHxW, or 'preset' for the preset's own")
    parser.add_argument("--kernels", default="1,all", help="comma-separated K values; 'all' = every channel")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = models.get("c3d")
    # jit lets XLA drop init's forward pass, which only fixes the shapes.
    params = jax.jit(c3d.init_params)(jax.random.PRNGKey(0))
    preset = PRESETS[args.preset]
    shape = tuple(preset.shape or model.input_shape) if args.shape == "preset" else tuple(
        int(n) for n in args.shape.split("x"))
    channels = model.num_channels(params, args.layer)
    print(f"C3D {args.layer} ({channels} channels), preset {args.preset}, video {shape}"
          f" -> model input {preset.resize or shape}; jax {jax.__version__} on {jax.devices()[0].platform}")
    for k in (channels if k == "all" else int(k) for k in args.kernels.split(",")):
        seconds = time_step(model, params, args.layer, preset, shape, k, args.repeats)
        print(f"K={k:<4d} {seconds:8.3f} s/step (median of {args.repeats})  {k / seconds:8.2f} kernel-steps/s",
              flush=True)


if __name__ == "__main__":
    main()
