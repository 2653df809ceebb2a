"""Stage-1 speed side by side: the reference-faithful PyTorch loop, a strong PyTorch baseline, kv3d_jax.

All three run in one process on the same model (``--model c3d``: C3D with one set of random
weights, a PyTorch init converted for JAX; ``--model inception_i3d``: DeepMind's real
Kinetics-400 I3D, the weights kv3d reads from the ``i3d`` extra, given to piergiaj's PyTorch
architecture, ``tests/inception_i3d_torch.py``, through
``converters.inception_i3d.piergiaj_state``), layer and the paper preset (SPEC §2, which the PyTorch
baselines implement), with as many threads as the machine has cores (XLA's CPU client uses one per core; PyTorch is set to match). For each K:

1. ``reference``: :func:`torch_baselines.reference_faithful`, the reference's loop over
   kernels (its rate does not depend on K; it is measured once, on one kernel);
2. ``strong``: :func:`torch_baselines.strong`, K kernels batched, truncated forward, no
   weight gradients;
3. ``kv3d``: :func:`kv3d_timing.kv3d_step`, one jitted :func:`kv3d_jax.maximization.make_step`
   of K kernels, compiled first (compile time reported apart), then timed.

Every timing follows one untimed warm-up step. FLOPs per kernel-step are XLA's cost
analysis: of kv3d's compiled step, and of the conventional step that computes every channel
of the tapped layer (what both PyTorch baselines compute, before the reference's weight
gradients); achieved FLOP/s divides each program's own count by its time.

    python benchmarks/compare.py --layer conv1 --kernels 1,4 --steps 3
    python benchmarks/compare.py --model inception_i3d --layer Mixed_4f --kernels 1 --steps 2 --no-reference
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
import torch_baselines  # noqa: E402
import torch_models  # noqa: E402
from converters import c3d as c3d_converter, inception_i3d as i3d_converter  # noqa: E402
from inception_i3d_torch import InceptionI3d  # noqa: E402
from kv3d_jax import models, zoo  # noqa: E402
from kv3d_jax.maximization import PRESETS  # noqa: E402
from kv3d_timing import kv3d_step  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def c3d_pair(seed: int = 0):
    """A PyTorch C3D with random weights (eval mode) and the same weights as kv3d_jax params."""
    torch.manual_seed(seed)
    torch_model = torch_models.C3D().eval()
    state = {name: value.detach().numpy() for name, value in torch_model.state_dict().items()}
    return torch_model, jax.device_put(c3d_converter.convert(state))


def inception_i3d_pair():
    """piergiaj's PyTorch Inception-I3D (eval mode) holding DeepMind's Kinetics-400 weights, and the
    same weights as kv3d_jax params (both from the checkpoint the ``i3d`` extra ships)."""
    _, params = zoo.load("inception_i3d")
    torch_model = InceptionI3d().eval()
    state = {name: torch.from_numpy(value) for name, value in i3d_converter.piergiaj_state(params).items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    if unexpected or any(not name.endswith("num_batches_tracked") for name in missing):
        raise RuntimeError(f"piergiaj's InceptionI3d does not take the converted weights: {missing} {unexpected}")
    return torch_model, jax.device_put(params)


PAIRS = {"c3d": c3d_pair, "inception_i3d": inception_i3d_pair}


def machine() -> dict:
    """What the numbers were measured on."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": cores(), "load_average": os.getloadavg(), "jax": jax.__version__,
            "torch": torch.__version__, "device": str(jax.devices()[0].device_kind)}


def compare(layer: str, kernels: list[int], steps: int, compute_dtype: str = "float32",
            reference: bool = True, model_name: str = "c3d") -> dict:
    """Runs the three on ``model_name``'s ``layer`` for each K in ``kernels``; returns every measurement."""
    torch.set_num_threads(cores())
    torch_model, params = PAIRS[model_name]()
    model, config = models.get(model_name), PRESETS["paper"]
    layer = model.check_layer(layer)
    channels = model.num_channels(params, layer)
    rows = []
    ref = torch_baselines.reference_faithful(torch_model, layer, [0], steps) if reference else None
    for k in kernels:
        ours = kv3d_step(model, params, layer, config, k, steps, DTYPES[compute_dtype])
        strong = torch_baselines.strong(torch_model, layer, [c % channels for c in range(k)], steps)
        rows.append({"k": k, "reference": ref, "strong": strong, **ours})
    return {"model": model_name, "layer": layer, "preset": "paper", "steps": steps,
            "compute_dtype": compute_dtype, "machine": machine(), "rows": rows}


def report(results: dict) -> str:
    """The measurements as a plain-text table."""
    lines = [f"{results.get('model', 'c3d')} {results['layer']}, preset {results['preset']}, "
             f"{results['steps']} timed steps, "
             f"{results['compute_dtype']}; {results['machine']}",
             f"{'K':>4} {'reference':>10} {'strong':>8} {'kv3d':>8} {'kv3d/ref':>9} {'kv3d/strong':>12} "
             f"{'compile s':>10} {'GFLOP/kstep':>12} {'conv. GFLOP':>12} {'kv3d GFLOP/s':>13} {'strong GFLOP/s':>15}"]
    for r in results["rows"]:
        ref = r["reference"]
        lines.append(
            f"{r['k']:>4} {ref or float('nan'):>10.4f} {r['strong']:>8.4f} {r['kernel_steps_per_s']:>8.4f} "
            f"{r['kernel_steps_per_s'] / ref if ref else float('nan'):>9.2f} "
            f"{r['kernel_steps_per_s'] / r['strong']:>12.2f} {r['compile_s']:>10.1f} "
            f"{r['flops_per_kernel_step'] / 1e9:>12.1f} {r['conventional_flops_per_kernel_step'] / 1e9:>12.1f} "
            f"{r['flops_per_kernel_step'] * r['kernel_steps_per_s'] / 1e9:>13.1f} "
            f"{r['conventional_flops_per_kernel_step'] * r['strong'] / 1e9:>15.1f}")
    lines.append("rates in kernel-steps/s")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="c3d", choices=tuple(PAIRS))
    parser.add_argument("--layer", default="conv1", help="a layer of the model (`kv3d layers MODEL`)")
    parser.add_argument("--kernels", default="1,4", help="comma-separated K values")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="kv3d_jax's compute dtype")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the reference-faithful loop (slow at deep layers)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    results = compare(args.layer, [int(k) for k in args.kernels.split(",")], args.steps, args.dtype,
                      args.reference, args.model)
    print(report(results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
