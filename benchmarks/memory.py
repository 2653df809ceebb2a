"""How a wide layer fits a memory budget: stage 1's batch plan from XLA's memory analysis, and a check of it.

For a C3D layer at the paper preset (random weights): the compiled step's memory for 1 and 2
kernels (hence per kernel), the batch size ``maximize`` would choose for ``--budget-gib`` per
device (on CPU it scales the analysis by ``distribute.analysis_undercount``) and the number of
batches for the whole layer. With ``--run K``, one step of K kernels is then run (K = 0: the
planned batch) and the process's peak resident memory is printed beside the memory analysis of
that program, to check the plan against what the operating system saw. Run it once per K:
the peak includes every program compiled before.

    python benchmarks/memory.py --layer conv5b --budget-gib 16.8 --run 0
"""

from __future__ import annotations

import argparse
import functools
import resource

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import distribute, models
from kv3d_jax.maximization import PRESETS, init_state, make_step
from kv3d_jax.runner import kernel_keys
from kv3d_jax.models import c3d

GIB = 2**30


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="conv5b", choices=c3d.CONV_LAYERS)
    parser.add_argument("--budget-gib", type=float, default=0.7 * 24, help="bytes per device, GiB (default 70%% of 24)")
    parser.add_argument("--run", type=int, help="then run one step of this many kernels (0: the planned batch)")
    args = parser.parse_args(argv)
    model, params, preset = models.get("c3d"), jax.jit(c3d.init_params)(jax.random.PRNGKey(0)), PRESETS["paper"]
    channels = model.num_channels(params, args.layer)
    step = jax.jit(make_step(model, args.layer, preset))

    def inputs(k: int):
        init_keys = run_keys = kernel_keys(jax.random.PRNGKey(0), np.arange(k))
        return init_state(init_keys, jnp.arange(k) % channels, preset.shape), run_keys

    @functools.lru_cache(maxsize=None)
    def compile_for(k: int):
        return step.lower(params, *inputs(k)).compile()

    one, two = (distribute.program_bytes(compile_for(k)) for k in (1, 2))
    undercount = distribute.analysis_undercount(distribute.kernel_mesh(jax.local_devices()[:1]))
    batch = distribute.kernels_per_device(compile_for, int(args.budget_gib * GIB), channels, undercount)
    planned = distribute.program_bytes(compile_for(batch))
    print(f"C3D {args.layer} ({channels} channels), paper preset: "
          f"step memory {one / GIB:.2f} GiB for 1 kernel, {two / GIB:.2f} GiB for 2 "
          f"({(two - one) / GIB:.3f} GiB per kernel)")
    print(f"budget {args.budget_gib:.1f} GiB per device: batches of {batch} kernels "
          f"({planned / GIB:.2f} GiB by the memory analysis, x{undercount} = {undercount * planned / GIB:.2f} GiB "
          f"planned), {-(-channels // batch)} batches for the layer")
    if args.run is not None:
        k = args.run or batch
        state, run_keys = inputs(k)
        jax.block_until_ready(compile_for(k)(params, state, run_keys))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"one step of {k} kernels: memory analysis {distribute.program_bytes(compile_for(k)) / GIB:.2f} GiB, "
              f"peak resident memory of the whole process {peak / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
