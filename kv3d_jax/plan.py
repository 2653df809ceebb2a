"""The plan of a run before its work: which process computes which kernels, and what it costs.

A run's pending kernels are cut into *units*, ``width`` kernels of one layer (the last unit of
a layer may be shorter), and the units are dealt to the processes by cost, largest first, each
to the process with the least work so far (ties to the lowest index): every process derives
the same plan from the same pending kernels, with no message passed. A kernel's result does
not depend on its unit or its process (:class:`kv3d_jax.job.Job`'s ``batch``), so any plan
gives the same files.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from kv3d_jax import maximization


@dataclasses.dataclass(frozen=True)
class Unit:
    """Kernels ``channels`` of ``layer``, computed and stored together by one process;
    ``flops``: their estimated cost."""

    layer: str
    channels: tuple[int, ...]
    flops: float


def units(pending: Mapping[str, Sequence[int]], width: int, flops_per_kernel: Mapping[str, float]) -> list[Unit]:
    """``pending`` (layer → channels not done, in order) cut into units of at most ``width``
    kernels, layer by layer; a unit's cost is its kernels' ``flops_per_kernel[layer]``."""
    if width < 1:
        raise ValueError(f"a unit holds at least 1 kernel, got width {width}")
    return [Unit(layer, tuple(channels[i:i + width]), len(channels[i:i + width]) * flops_per_kernel[layer])
            for layer, channels in pending.items() for i in range(0, len(channels), width)]


def deal(work: Sequence[Unit], processes: int) -> list[list[Unit]]:
    """``work`` dealt to ``processes`` processes, balanced by cost: the most expensive unit first,
    each to the process with the least cost so far (ties: the lower index). Each process's units
    keep ``work``'s order, so a process finishes its layers in the order they were asked for."""
    if processes < 1:
        raise ValueError(f"a plan needs at least 1 process, got {processes}")
    load, owner = [0.0] * processes, {}
    for index in sorted(range(len(work)), key=lambda i: (-work[i].flops, i)):
        process = min(range(processes), key=lambda p: (load[p], p))
        owner[index] = process
        load[process] += work[index].flops
    return [[unit for i, unit in enumerate(work) if owner[i] == p] for p in range(processes)]


def stage1_step_flops(model, params, layer: str, config: maximization.Config, compute_dtype=jnp.float32) -> float:
    """FLOPs of one stage-1 step of one kernel of ``layer``: the objective's value and gradient
    with respect to a ``config``-shaped video, as XLA's cost analysis of the lowered program
    counts them (jitter and the optimiser's update are not counted; 0 where the backend does
    not count)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
    leaves, structure = jax.tree.flatten(shapes)
    return _stage1_step_flops(model, layer, config, jnp.dtype(compute_dtype), tuple(leaves), structure)


@functools.lru_cache(maxsize=64)
def _stage1_step_flops(model, layer, config, compute_dtype, leaves, structure) -> float:
    mean, std = maximization.mean_std(model, config)
    value = maximization.objective_value(model, layer, config.objective, config.rectify, compute_dtype)

    def objective(params, video):
        return value(params, maximization.model_input(video, None, config.resize, mean, std), jnp.int32(0))

    video = jax.ShapeDtypeStruct((*(config.shape or model.input_shape), 3), jnp.float32)
    params = jax.tree.unflatten(structure, leaves)
    cost = jax.jit(jax.grad(objective, argnums=1)).lower(params, video).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0
