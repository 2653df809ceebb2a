"""Stage-1 speed on one accelerator: kv3d_jax beside both PyTorch baselines, at the paper preset.

For C3D conv1, conv3b and conv5b (random weights, one PyTorch init converted for JAX), or with
``--model inception_i3d`` for DeepMind's real Kinetics-400 I3D at Conv3d_2c_3x3 and Mixed_4f (the
``i3d`` extra's weights, in PyTorch through piergiaj's architecture):

* kv3d_jax with K = 1, 64 and every channel of the layer (in batches sized from XLA's
  memory analysis to 70 % of device memory): kernel-steps/s, compile time, XLA's FLOPs per
  kernel-step, achieved FLOP/s and model-FLOP utilisation against ``--peak-tflops``;
* if PyTorch sees the device (or with ``--smoke``, on CPU): the reference-faithful loop
  (one kernel) and the strong baseline (K = 1 and 64), and the ratios.

Each measurement is added to ``--out`` (JSON) as soon as it is made, and measurements stop
once ``--budget-s`` seconds have passed, so one command finishes in under 5 minutes:

    python benchmarks/gpu.py --out gpu_results.json
    python benchmarks/gpu.py --smoke --out smoke.json    # tiny sizes on any machine, to test the script
    python benchmarks/gpu.py --model inception_i3d --out gpu_i3d.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
from kv3d_jax import models  # noqa: E402
from kv3d_jax.maximization import PRESETS  # noqa: E402
from kv3d_jax.models import c3d  # noqa: E402
from kv3d_timing import kv3d_layer, kv3d_step  # noqa: E402

LAYERS = {"c3d": ("conv1", "conv3b", "conv5b"), "inception_i3d": ("Conv3d_2c_3x3", "Mixed_4f")}
# Dense tensor-core peaks in TFLOP/s: XLA and cuDNN run float32 convolutions as TF32.
PEAK_TFLOPS = {"H200": {"float32": 494.7, "bfloat16": 989.4}, "H100": {"float32": 494.7, "bfloat16": 989.4},
               "A100": {"float32": 156.0, "bfloat16": 312.0}}
# --smoke: the smallest clips that reach conv5b, 4 kernels instead of 64, and a memory budget
# that splits every layer into several batches.
SMOKE_SHAPE, SMOKE_RESIZE, SMOKE_K, SMOKE_BUDGET = (4, 12, 12), (8, 24, 24), 4, 2**29


def peak_tflops(dtype: str) -> float | None:
    """The device's dense peak for ``dtype`` if it is in :data:`PEAK_TFLOPS`, else None."""
    kind = jax.devices()[0].device_kind
    return next((peaks[dtype] for name, peaks in PEAK_TFLOPS.items() if name in kind), None)


def torch_pair(smoke: bool, model_name: str = "c3d"):
    """(PyTorch model on its device, kv3d_jax params with its weights), or (None, the params)
    when PyTorch is missing or cannot use the accelerator (outside ``smoke``)."""
    if model_name == "inception_i3d":
        return _i3d_pair(smoke)
    try:
        import torch
        import torch_models
        from converters import c3d as c3d_converter
    except ImportError:
        return None, jax.jit(c3d.init_params)(jax.random.PRNGKey(0))
    torch.manual_seed(0)
    model = torch_models.C3D().eval()
    state = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    params = jax.device_put(c3d_converter.convert(state))
    if torch.cuda.is_available():
        return model.cuda(), params
    return (model if smoke else None), params


def _i3d_pair(smoke: bool):
    """:func:`torch_pair` for inception_i3d: the real weights, in PyTorch if it is there."""
    try:
        import torch
        from compare import inception_i3d_pair
    except ImportError:
        from kv3d_jax import zoo
        return None, jax.device_put(zoo.load("inception_i3d")[1])
    model, params = inception_i3d_pair()
    if torch.cuda.is_available():
        return model.cuda(), params
    return (model if smoke else None), params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--model", default="c3d", choices=tuple(LAYERS), help="c3d (random weights) or "
                        "inception_i3d (DeepMind's Kinetics-400 weights, from the i3d extra)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="kv3d_jax compute dtype")
    parser.add_argument("--budget-s", type=float, default=270, help="start no measurement after this many seconds")
    parser.add_argument("--peak-tflops", type=float, help="device peak for the utilisation (default: by device kind)")
    parser.add_argument("--memory-budget", type=int, help="bytes a batch may use (default: 70%% of device memory)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny clips {SMOKE_SHAPE} -> {SMOKE_RESIZE}, K = 1 and {SMOKE_K}, 1 step")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    preset, size, resize, steps = PRESETS["paper"], (16, 128, 128), (32, 224, 224), args.steps
    ks, budget = (1, 64), args.memory_budget
    if args.smoke:
        preset = dataclasses.replace(preset, shape=SMOKE_SHAPE, resize=SMOKE_RESIZE, max_shift=(2, 2, 2))
        size, resize, steps, ks, budget = SMOKE_SHAPE, SMOKE_RESIZE, 1, (1, SMOKE_K), budget or SMOKE_BUDGET
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    peak = args.peak_tflops or peak_tflops(args.dtype)
    torch_model, params = torch_pair(args.smoke, args.model)
    model = models.get(args.model)
    results = {"model": args.model, "device": jax.devices()[0].device_kind, "platform": jax.default_backend(), "preset": "paper",
               "smoke": args.smoke, "steps": steps, "compute_dtype": args.dtype, "peak_tflops": peak,
               "torch_device": None if torch_model is None else str(next(torch_model.parameters()).device),
               "measurements": []}

    def record(entry: dict) -> None:
        flops = entry.get("flops_per_kernel_step")
        if flops is not None:
            entry["achieved_tflops"] = flops * entry["kernel_steps_per_s"] / 1e12
            entry["mfu"] = entry["achieved_tflops"] / peak if peak else None
        entry["elapsed_s"] = time.perf_counter() - start
        results["measurements"].append(entry)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(entry), flush=True)

    def measure(name: str, layer: str, k, run) -> None:
        if time.perf_counter() - start > args.budget_s:
            record({"who": name, "layer": layer, "k": k, "skipped": f"past --budget-s {args.budget_s:g}"})
            return
        try:
            record({"who": name, "layer": layer, "k": k, **run()})
        except (MemoryError, RuntimeError) as err:  # out of device memory, from XLA or PyTorch
            record({"who": name, "layer": layer, "k": k, "failed": str(err)[:300]})

    for layer in LAYERS[args.model]:
        channels = model.num_channels(params, layer)
        for k in ks:
            measure("kv3d", layer, k, lambda: kv3d_step(model, params, layer, preset, k, steps, dtype))
        measure("kv3d", layer, "all", lambda: kv3d_layer(model, params, layer, preset, steps, dtype, budget))
        if torch_model is None:
            continue
        import torch_baselines

        measure("reference", layer, 1, lambda: {"kernel_steps_per_s": torch_baselines.reference_faithful(
            torch_model, layer, [0], steps, size=size, resize=resize)})
        for k in ks:
            measure("strong", layer, k, lambda: {"kernel_steps_per_s": torch_baselines.strong(
                torch_model, layer, [c % channels for c in range(k)], steps, size=size, resize=resize)})
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
