"""The one engine behind every stage: a per-kernel problem, optimised for many kernels at once.

A stage is a :class:`Problem`, three pure functions of one kernel:

* ``init(key, target) -> state``: the kernel's starting state from its key and its target
  (a channel index, a video, a start parameter: any pytree with the kernel's leaves);
* ``step(model_params, state, key) -> (state, metric)``: one optimisation step, with the
  step's own key; ``metric`` is a float32 scalar (the objective, or the loss) for progress;
* ``outputs(model_params, state) -> outputs``: the kernel's results (a pytree of arrays).

:func:`run` owns everything else, the same for every stage:

* keys: kernel ``k`` gets ``fold_in(key, ids[k])`` (or the ``k``-th of ``K`` given keys),
  its ``init`` that key and step ``i`` the key ``fold_in(split(key)[1], i)``, so a kernel's
  result does not depend on which kernels share its batch, device or process;
* each process's share under ``jax.distributed`` (:func:`kv3d_jax.distribute.process_share`);
* sharding over any 1-D mesh (``jax.make_mesh((n,), ("kernels",))`` with its default axis
  types, a hand-built ``Mesh``, any axis name) or all local devices: the kernels are split
  over the mesh's devices with ``shard_map`` and the model params replicated, so every
  device runs the vmapped problem on its own kernels and nothing is communicated;
* batches: as many kernels per device as XLA's memory analysis of the compiled chunk fits
  in a memory budget (:func:`kv3d_jax.distribute.kernels_per_device`), the last batch padded
  with copies of its last kernel so every batch has one compiled shape;
* chunks: ``chunk`` steps per compiled ``lax.scan``, then ``callback(done, total, metric)``
  with the steps done over all batches and the mean metric of the batch's finite kernels;
* the compute dtype: floating model params are cast to it once, before they are replicated;
* failures: a kernel whose final state or outputs hold a non-finite value is reported in
  ``failed``; kernels never mix (every step is vmapped), so it changes no other kernel;
* compiled programs are cached per (problem, mesh, chunk) in the process, and across
  processes by JAX's persistent compilation cache once :func:`enable_compilation_cache` ran.

What comes next fits without changing the runner. Several optima of one channel that share
an objective term (Lucid's diversity objective) are one *kernel* of the runner: its state
holds ``N`` parameters along a leading axis and its ``step`` adds the diversity term over
them; the runner never looks inside a state. A new parameterization (e.g. a magnitude-
constrained phase parameterization in 3D) is a pair ``init``/``to_video`` in
:mod:`kv3d_jax.parameterizations`; the stage-1 problem builds its ``init`` and ``step``
from whichever is named.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from kv3d_jax import distribute

Params = Any
Callback = Callable[[int, int, float], None]
KERNELS = PartitionSpec(distribute.KERNELS)
REPLICATED = PartitionSpec()


class Problem(NamedTuple):
    """One kernel's optimisation as pure functions (see the module doc). ``convolves``: its step
    runs convolutions, whose chunks are unrolled on CPU devices (:func:`unrolled`)."""

    init: Callable[[jax.Array, Any], Any]
    step: Callable[[Params, Any, jax.Array], tuple[Any, jax.Array]]
    outputs: Callable[[Params, Any], Any]
    convolves: bool = False


class Result(NamedTuple):
    """What :func:`run` returns for the K kernels of this process.

    Attributes:
      outputs: the problem's outputs, each leaf with a leading kernel axis ``(K, ...)``.
      failed: ``(K,)`` bool, True where the kernel's final state or outputs are not finite.
      ids: ``(K,)`` the kernels' ids (this process's share of those asked for).
    """

    outputs: Any
    failed: np.ndarray
    ids: np.ndarray


def kernel_keys(key: jax.Array | None, ids) -> jax.Array:
    """One key per kernel ``(K,)``: ``fold_in(key, ids[k])`` of a single ``key`` (default
    ``PRNGKey(0)``), or ``key`` itself when it already holds one key per kernel."""
    ids = np.asarray(ids).reshape(-1)
    key = jax.random.PRNGKey(0) if key is None else jnp.asarray(key)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (0 if typed else 1):
        return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(ids, jnp.uint32))
    if key.ndim != (1 if typed else 2) or key.shape[0] != len(ids):
        raise ValueError(f"got keys of shape {tuple(key.shape)} for {len(ids)} kernels; pass one key "
                         "(e.g. jax.random.key(0)) or one per kernel")
    return key


def chunk_length(steps: int, chunk: int, problem: Problem | None = None, mesh=None) -> int:
    """Steps per compiled chunk: ``chunk``, or ``steps`` if fewer (at least 1); at most
    :data:`CPU_CHUNK` where ``problem``'s chunks are unrolled on ``mesh`` (:func:`unrolled`)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 step, got {chunk}")
    length = max(1, min(chunk, steps))
    return min(length, CPU_CHUNK) if problem is not None and unrolled(problem, mesh) else length


def unrolled(problem: Problem, mesh) -> bool:
    """Whether a chunk's steps are unrolled rather than looped: for a problem that convolves, on
    CPU devices, where XLA runs the body of a loop without spreading its convolutions over the
    cores (a stage-1 step of MotionNet conv3 took 2-4 times as long inside ``lax.scan`` as
    unrolled; stage 2's warps gained nothing)."""
    return problem.convolves and mesh.devices.flat[0].platform == "cpu"


def cast_floats(tree: Any, dtype) -> Any:
    """``tree`` with every floating leaf cast to ``dtype`` (integer leaves unchanged)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def _finite(tree: Any) -> jax.Array:
    """Whether every floating value of one kernel's ``tree`` is finite: a scalar bool."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class _InMesh:
    """A jitted program called and lowered with its kernel mesh as the context mesh, whatever
    mesh the caller has set (``jax.set_mesh``)."""

    def __init__(self, program, mesh):
        self.program, self.mesh = program, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.program(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.program.lower(*args)

    def eval_shape(self, *args):
        with jax.set_mesh(self.mesh):
            return self.program.eval_shape(*args)


# Most steps in one unrolled chunk: compile time grows with it.
CPU_CHUNK = 10


# A few layers' worth: a layer's stages reuse theirs chunk after chunk, and a finished layer's
# programs must go. Each XLA:CPU executable holds hundreds of memory mappings (up to about 1,800
# for one entry: a MotionNet stage-1 chunk with its batch-sizing compiles) and Linux allows a
# process 65,530 (vm.max_map_count); past that, compiling aborts the process.
@functools.lru_cache(maxsize=16)
def _programs(problem: Problem, mesh, length: int):
    """Jitted ``init(keys, targets)``, ``advance(params, state, run_keys, start)`` (``length``
    steps) and ``finish(params, state) -> (outputs, failed)``, each device on its own kernels."""
    def shard(fn, in_specs, out_specs):
        return _InMesh(jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                             check_vma=False)), mesh)

    def init(keys, targets):
        # Kernel by kernel: a vmapped start could round differently for different batch sizes.
        return jax.lax.map(lambda args: problem.init(*args), (keys, targets))

    def advance(params, state, run_keys, start):
        def body(state, i):
            keys = jax.vmap(jax.random.fold_in, (0, None))(run_keys, i)
            return jax.vmap(problem.step, in_axes=(None, 0, 0))(params, state, keys)

        return jax.lax.scan(body, state, start + jnp.arange(length, dtype=jnp.uint32),
                            unroll=length if unrolled(problem, mesh) else 1)

    def finish(params, state):
        outputs = jax.vmap(problem.outputs, in_axes=(None, 0))(params, state)
        failed = ~jax.vmap(lambda s, o: _finite((s, o)))(state, outputs)
        return outputs, failed

    return (shard(init, (KERNELS, KERNELS), KERNELS),
            shard(advance, (REPLICATED, KERNELS, KERNELS, REPLICATED), (KERNELS, PartitionSpec(None, distribute.KERNELS))),
            shard(finish, (REPLICATED, KERNELS), (KERNELS, KERNELS)))


def compiled_chunk(problem: Problem, model_params: Params, targets: Any, per_device: int, length: int,
                   mesh=None, compute_dtype=jnp.float32) -> jax.stages.Compiled:
    """The compiled program of ``length`` steps for ``per_device`` kernels on every device of
    ``mesh`` (default all local devices), with targets shaped like one kernel of ``targets``
    ``(K, ...)``: its ``memory_analysis()`` is what :func:`run` sizes batches by."""
    mesh = distribute.as_kernel_mesh(mesh)
    init, advance, _ = _programs(problem, mesh, length)
    index = np.zeros(per_device * mesh.devices.size, dtype=np.int64)
    keys = kernel_keys(jax.random.PRNGKey(0), index)
    kernel = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((len(index), *np.shape(leaf)[1:]), jnp.result_type(leaf)),
                          (keys, targets))
    state = init.eval_shape(*distribute.kernel_shapes(kernel, mesh))
    params = jax.eval_shape(lambda p: cast_floats(p, compute_dtype), model_params)
    return advance.lower(distribute.replicated_shapes(params, mesh), distribute.kernel_shapes(state, mesh),
                         distribute.kernel_shapes(kernel[0], mesh), jax.ShapeDtypeStruct((), jnp.uint32)).compile()


def _batch_size(problem, model_params, targets, mesh, length: int, k: int, batch_size, memory_budget,
                compute_dtype, per_device=None) -> int:
    """Kernels per batch: ``per_device`` on every device, else ``batch_size`` rounded up to the
    mesh, else what ``memory_budget`` fits."""
    if per_device is not None:
        if per_device < 1:
            raise ValueError(f"per_device must be at least 1 kernel, got {per_device}")
        return per_device * mesh.devices.size
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return distribute.padded_batch(min(batch_size, k), mesh)
    devices = mesh.devices.size
    budget = distribute.device_memory_budget(mesh) if memory_budget is None else int(memory_budget)
    # A sweep asks for the same plan chunk after chunk: the compiles that size it run once.
    plan = (problem, mesh, length, k, budget, str(jnp.dtype(compute_dtype)), _signature(model_params),
            _signature(targets))
    if plan not in _PLANS:
        compile_for = lambda n: compiled_chunk(problem, model_params, targets, n, length, mesh, compute_dtype)
        _PLANS[plan] = devices * distribute.kernels_per_device(compile_for, budget, -(-k // devices),
                                                               distribute.analysis_undercount(mesh))
    return _PLANS[plan]


# Batch sizes already planned, by everything they depend on (see _batch_size).
_PLANS: dict = {}


def _signature(tree: Any) -> tuple:
    """The structure, shapes and dtypes of ``tree``: all a compiled program's memory depends on."""
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple((np.shape(leaf), str(jnp.result_type(leaf))) for leaf in leaves)


def _optimise(problem, model_params, targets, keys, mesh, k, steps, chunk, memory_budget, batch_size, compute_dtype,
              callback, per_device):
    """:func:`run`'s batch loop over ``k`` kernels: their outputs and failures, batch by batch."""
    length = chunk_length(steps, chunk, problem, mesh)
    batch = _batch_size(problem, model_params, targets, mesh, length, k, batch_size, memory_budget, compute_dtype,
                        per_device)
    init, advance, finish = _programs(problem, mesh, length)
    params = cast_floats(model_params, compute_dtype)
    rest = steps % length
    last = _programs(problem, mesh, rest)[1] if rest else advance
    params = distribute.replicate(params, mesh)
    total, done = steps * (-(-k // batch)), 0
    outputs, failed = [], []
    for lo in range(0, k, batch):
        index = np.minimum(np.arange(lo, lo + batch), k - 1)
        keep = min(batch, k - lo)
        # Indexed and split before they are sharded: eager work on the kernel mesh's arrays could
        # clash with a mesh the caller has set.
        batch_keys = keys[index]
        run_keys = jax.vmap(jax.random.split)(batch_keys)[:, 1]
        batch_keys, run_keys, batch_targets = distribute.shard_kernels(
            (batch_keys, run_keys, jax.tree.map(lambda leaf: leaf[index], targets)), mesh)
        state = init(batch_keys, batch_targets)
        for start in range(0, steps, length):
            program = advance if start + length <= steps else last
            state, metrics = program(params, state, run_keys, jnp.uint32(start))
            done += min(length, steps - start)
            if callback is not None:
                finite = np.asarray(metrics)[-1, :keep]
                finite = finite[np.isfinite(finite)]
                callback(done, total, float(finite.mean()) if finite.size else float("nan"))
        out, bad = finish(params, state)
        outputs.append(jax.tree.map(lambda leaf: np.asarray(leaf)[:keep], out))
        failed.append(np.asarray(bad)[:keep])
    return outputs, failed


def run(
    problem: Problem,
    model_params: Params,
    targets: Any,
    ids,
    steps: int,
    *,
    chunk: int,
    key: jax.Array | None = None,
    mesh=None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    compute_dtype=jnp.float32,
    callback: Callback | None = None,
    share: bool = True,
    per_device: int | None = None,
) -> Result:
    """Optimises ``problem`` for every kernel: ``steps`` steps each, batched, sharded and chunked.

    Args:
      problem: the stage's per-kernel :class:`Problem` (build it once per configuration, e.g.
        behind ``functools.lru_cache``: compiled programs are cached per problem).
      model_params: what every kernel's ``step`` and ``outputs`` read (e.g. the model's Flax
        variables), replicated on every device; ``{}`` for none.
      targets: each kernel's target, every leaf ``(K, ...)``.
      ids: ``(K,)`` integers naming the kernels (e.g. channel indices): keys derive from them.
      steps: optimisation steps per kernel (0: the outputs of the initial state).
      chunk: at most this many steps per compiled call, between progress reports.
      key: a PRNG key, or one per kernel ``(K,)`` (see :func:`kernel_keys`).
      mesh: a 1-D mesh of this process's devices (any axis name); default all local devices.
      memory_budget: bytes per device a batch may use when ``batch_size`` is None (default
        :func:`kv3d_jax.distribute.device_memory_budget`).
      batch_size: kernels per compiled batch, rounded up to a multiple of the mesh's devices.
      compute_dtype: floating leaves of ``model_params`` are cast to it.
      callback: ``callback(steps_done, steps_total, mean_metric)`` after every chunk, steps
        counted over all batches.
      share: split the kernels between processes (``jax.distributed``); False when ``targets``
        already are this process's share (e.g. its stage-1 videos).
      per_device: exactly this many kernels on every device in each compiled batch (the last
        batch padded), whatever ``batch_size``, ``memory_budget`` and the number of kernels:
        the compiled shape a kernel runs in is then the same on any mesh, so its result is
        bit-identical whichever kernels, devices or processes share the run (a batch of
        another shape may pick other convolution algorithms or reduction orders).

    Returns:
      A :class:`Result` for this process's kernels, in the order of ``ids``; with no kernels
      (e.g. a process whose share is empty), outputs of the problem's structure with 0 rows.
    """
    if steps < 0:
        raise ValueError(f"steps must be at least 0, got {steps}")
    ids = np.asarray(ids).reshape(-1)
    k = len(ids)
    if any(np.shape(leaf)[:1] != (k,) for leaf in jax.tree.leaves(targets)):
        raise ValueError(f"every target needs a leading axis of the {k} kernels; got shapes "
                         f"{[np.shape(leaf) for leaf in jax.tree.leaves(targets)]}")
    keys = kernel_keys(key, ids)
    mine = distribute.process_share(np.arange(k)) if share else np.arange(k)
    ids, keys = ids[mine], keys[mine]
    targets = jax.tree.map(lambda leaf: jnp.asarray(leaf)[mine], targets)
    k = len(ids)
    mesh = distribute.as_kernel_mesh(mesh)
    if k == 0:
        return Result(_no_outputs(problem, model_params, targets, keys, compute_dtype), np.zeros(0, bool), ids)
    outputs, failed = _optimise(problem, model_params, targets, keys, mesh, k, steps, chunk, memory_budget,
                                batch_size, compute_dtype, callback, per_device)
    return Result(jax.tree.map(lambda *leaves: np.concatenate(leaves), *outputs), np.concatenate(failed), ids)


def _no_outputs(problem: Problem, model_params: Params, targets: Any, keys: jax.Array, compute_dtype) -> Any:
    """The problem's outputs for zero kernels: every leaf shaped ``(0, ...)`` as one kernel's."""
    one = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf)[1:], jnp.result_type(leaf)), (keys, targets))
    params = jax.eval_shape(lambda p: cast_floats(p, compute_dtype), model_params)
    shapes = jax.eval_shape(lambda p, key, target: problem.outputs(p, problem.init(key, target)), params, *one)
    return jax.tree.map(lambda s: np.zeros((0, *s.shape), s.dtype), shapes)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in ``path`` (default ``$KV3D_CACHE`` or
    ``~/.cache/kv3d_jax/xla``), caching every program however quickly it compiled; returns the folder."""
    folder = Path(path or os.environ.get("KV3D_CACHE") or Path.home() / ".cache" / "kv3d_jax" / "xla")
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
