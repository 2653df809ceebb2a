"""Timing kv3d_jax's stage-1 step: K kernels at once, or every channel of a layer in memory-sized batches.

Shared by ``compare.py`` (CPU, beside PyTorch) and ``gpu.py`` (one accelerator). Compilation
is timed apart from the steps; every timing follows one untimed step. FLOPs are XLA's cost
analysis of the compiled step, and of the conventional step that computes every channel of
the tapped layer (the model without ``apply_projected``), which is what PyTorch computes.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import distribute
from kv3d_jax.maximization import Config as Preset, init_state, make_step
from kv3d_jax.runner import kernel_keys


def _setup(model, params, layer: str, preset: Preset, k: int, compute_dtype):
    channels = model.num_channels(params, layer)
    init_keys = run_keys = kernel_keys(jax.random.PRNGKey(0), np.arange(k))
    state = init_state(init_keys, jnp.arange(k) % channels, preset.shape)
    step = jax.jit(make_step(model, layer, preset, compute_dtype=compute_dtype))
    return step, state, run_keys


def _time_steps(compiled, params, state, run_keys, steps: int) -> float:
    """Seconds for ``steps`` steps after one untimed step."""
    keys = lambda i: jax.vmap(jax.random.fold_in, (0, None))(run_keys, i)
    state, _ = jax.block_until_ready(compiled(params, state, keys(0)))
    start = time.perf_counter()
    for i in range(1, steps + 1):
        state, _ = compiled(params, state, keys(i))
    jax.block_until_ready(state)
    return time.perf_counter() - start


def conventional_flops(model, params, layer: str, preset: Preset, compute_dtype=jnp.float32) -> float:
    """FLOPs of one kernel-step that computes every channel of ``layer`` (XLA's count, before optimisation)."""
    step, state, run_keys = _setup(dataclasses.replace(model, apply_projected=None), params, layer, preset, 1,
                                   compute_dtype)
    return step.lower(params, state, run_keys).cost_analysis()["flops"]


def kv3d_step(model, params, layer: str, preset: Preset, k: int, steps: int, compute_dtype=jnp.float32) -> dict:
    """Times K kernels of stage 1 in kv3d_jax: compile seconds, kernel-steps/s and FLOPs per kernel-step."""
    step, state, run_keys = _setup(model, params, layer, preset, k, compute_dtype)
    start = time.perf_counter()
    compiled = step.lower(params, state, run_keys).compile()
    compile_s = time.perf_counter() - start
    seconds = _time_steps(compiled, params, state, run_keys, steps)
    return {
        "k": k,
        "compile_s": compile_s,
        "kernel_steps_per_s": k * steps / seconds,
        "flops_per_kernel_step": compiled.cost_analysis()["flops"] / k,
        "conventional_flops_per_kernel_step": conventional_flops(model, params, layer, preset, compute_dtype),
    }


def kv3d_layer(model, params, layer: str, preset: Preset, steps: int, compute_dtype=jnp.float32,
               memory_budget: int | None = None) -> dict:
    """Times every channel of ``layer`` on one device, in batches as large as fit ``memory_budget``
    bytes (default 70 % of the device's memory; XLA's memory analysis, as ``maximize`` plans). Every batch has one
    compiled shape (the last is padded), so one batch is timed for ``steps`` steps and the layer
    takes that times the number of batches."""
    channels = model.num_channels(params, layer)
    mesh = distribute.kernel_mesh(jax.local_devices()[:1])
    start = time.perf_counter()

    @functools.lru_cache(maxsize=None)
    def compile_for(n: int):
        step, state, run_keys = _setup(model, params, layer, preset, n, compute_dtype)
        return step.lower(params, state, run_keys).compile()

    budget = distribute.device_memory_budget(mesh) if memory_budget is None else memory_budget
    batch = distribute.kernels_per_device(compile_for, budget, channels, distribute.analysis_undercount(mesh))
    compiled = compile_for(batch)
    compile_s = time.perf_counter() - start
    _, state, run_keys = _setup(model, params, layer, preset, batch, compute_dtype)
    batches = -(-channels // batch)
    seconds = batches * _time_steps(compiled, params, state, run_keys, steps)
    return {
        "k": channels,
        "batch": batch,
        "batches": batches,
        "compile_s": compile_s,
        "kernel_steps_per_s": channels * steps / seconds,
        "flops_per_kernel_step": compiled.cost_analysis()["flops"] / batch,
        "peak_bytes": distribute.program_bytes(compiled),
        "conventional_flops_per_kernel_step": conventional_flops(model, params, layer, preset, compute_dtype),
    }
