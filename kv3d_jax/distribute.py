"""Spreading a layer's kernels over devices, hosts and memory.

Every kernel's problem is independent, so scaling out needs no communication at all:

* within a process, the kernel axis of every batched array is sharded over a 1-D
  :class:`jax.sharding.Mesh` whose axis is named ``"kernels"`` (model params replicated);
* across processes (``jax.distributed.initialize``), each process takes its own share of
  the kernels, optimises it on its own devices and writes its own outputs: nothing is
  gathered across hosts;
* within a device, kernels run in batches sized from the compiled program's memory
  analysis, so a layer of any width fits a memory budget.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

KERNELS = "kernels"
# Of the memory a device has, the share a batch may plan to use: the rest is headroom for
# the allocator, the host-side copies of results and whatever else the process holds.
DEFAULT_MEMORY_FRACTION = 0.7
# XLA's memory analysis undercounts what its CPU runtime really holds: one stage-1 step of C3D
# conv5b at the paper preset grew the resident memory by 1.26 GiB per kernel where the analysis
# says 0.88 GiB (x1.43; benchmarks/memory.py). Planned CPU batches are scaled up by this.
CPU_ANALYSIS_UNDERCOUNT = 1.5


def kernel_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"kernels"`` over ``devices`` (default: this process's devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (KERNELS,), axis_types=(AxisType.Auto,))


def as_kernel_mesh(mesh: Mesh | None) -> Mesh:
    """The devices of ``mesh`` as a :func:`kernel_mesh` (all local devices if None).

    ``mesh`` may be any mesh with one axis, of any name and axis type (``jax.make_mesh``'s
    default explicit axes included): kernels are independent, so the runner only needs its
    devices. They must be this process's: kernels are split between processes by
    :func:`process_share`.
    """
    if mesh is None:
        return kernel_mesh()
    devices = getattr(mesh, "devices", None)
    if not isinstance(devices, np.ndarray) or len(mesh.axis_names) != 1:
        raise ValueError(f"kernels are sharded over a 1-D mesh of devices; got {mesh!r}. Build one with "
                         "jax.make_mesh((jax.local_device_count(),), ('kernels',))")
    local = set(jax.local_devices())
    if any(d not in local for d in devices.flat):
        raise ValueError("the mesh holds devices of other processes; give each process a mesh of its own "
                         "devices (the default): kernels are split between processes by process_share")
    return kernel_mesh(devices.flat)


def process_share(ids: np.ndarray) -> np.ndarray:
    """The kernels of ``ids`` this process optimises: every ``process_count``-th, from its index.

    Strided rather than contiguous, so neighbouring (often similar) channels spread evenly.
    """
    return np.asarray(ids)[jax.process_index()::jax.process_count()]


class ProcessLost(RuntimeError):
    """Another process of a ``jax.distributed`` run stopped before it reached a barrier."""


def barrier(name: str) -> None:
    """Waits until every process of a ``jax.distributed`` run has reached the barrier ``name``
    (``jax.experimental.multihost_utils.sync_global_devices``); returns at once in a single process.
    Raises :class:`ProcessLost` if another process is gone (killed, crashed)."""
    if jax.process_count() > 1:
        try:
            multihost_utils.sync_global_devices(name)
        except Exception as err:  # noqa: BLE001 - the collective's own error names only a socket
            raise ProcessLost(f"another process of this run stopped before {name!r} ({type(err).__name__}); "
                              "the kernels finished are kept: run the same command again, on any number of "
                              "processes, to finish the rest") from None


def padded_batch(batch: int, mesh: Mesh) -> int:
    """``batch`` rounded up to a multiple of the mesh's device count."""
    n = mesh.devices.size
    return -(-batch // n) * n


def shard_kernels(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every leaf's leading (kernel) axis split over the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(KERNELS)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` copied whole to every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def kernel_shapes(tree: Any, mesh: Mesh) -> Any:
    """``jax.ShapeDtypeStruct`` of every leaf of ``tree``, kernel axis sharded over ``mesh`` (for lowering)."""
    sharding = NamedSharding(mesh, PartitionSpec(KERNELS))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def replicated_shapes(tree: Any, mesh: Mesh) -> Any:
    """``jax.ShapeDtypeStruct`` of every leaf of ``tree``, replicated over ``mesh`` (for lowering)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x),
                                                       sharding=sharding), tree)


def _host_memory() -> int:
    """Physical memory in bytes, or the cgroup (container) limit if that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.exists() and limit.read_text().strip().isdigit():
        total = min(total, int(limit.read_text()))
    return total


def device_memory_budget(mesh: Mesh, fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """Bytes one device of ``mesh`` may plan for: ``fraction`` of an accelerator's memory, or
    of the host's memory shared by its CPU devices."""
    device = mesh.devices.flat[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(fraction * stats["bytes_limit"])
    return int(fraction * _host_memory() / mesh.devices.size)


def program_bytes(compiled: jax.stages.Compiled) -> int:
    """Peak bytes per device of a compiled program: arguments, outputs and temporaries (XLA's memory analysis)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def analysis_undercount(mesh: Mesh) -> float:
    """How much more memory the mesh's devices really use than XLA's memory analysis says
    (:data:`CPU_ANALYSIS_UNDERCOUNT` on CPU; 1 elsewhere, where buffers are allocated as analysed)."""
    return CPU_ANALYSIS_UNDERCOUNT if mesh.devices.flat[0].platform == "cpu" else 1.0


def kernels_per_device(compile_for: Callable[[int], jax.stages.Compiled], budget: int, wanted: int,
                       undercount: float = 1.0) -> int:
    """How many kernels one device can run at once within ``budget`` bytes, at most ``wanted``.

    ``compile_for(n)`` compiles the program for ``n`` kernels per device (``jit`` reuses what
    it compiled). Its memory is ``undercount`` times XLA's memory analysis
    (:func:`analysis_undercount`). If ``wanted`` kernels do not fit, it is modelled as
    ``fixed + n · per_kernel`` from the programs for one and two kernels.
    """
    def used(n: int) -> float:
        return undercount * program_bytes(compile_for(n))

    if used(wanted) <= budget:
        return wanted
    one = used(1)
    if one > budget:
        raise MemoryError(f"one kernel needs {one / 2**30:.2f} GiB per device, over the budget of "
                          f"{budget / 2**30:.2f} GiB; use a smaller shape, compute_dtype=jnp.bfloat16 or a larger memory_budget")
    per_kernel = max(used(2) - one, 1)
    return int(max(1, min(wanted, (budget - (one - per_kernel)) // per_kernel)))
