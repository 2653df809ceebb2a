"""Slow and fast kernels: how far a kernel's stage-1 objective falls as a temporal-variation penalty grows.

Feichtenhofer, Pinz, Wildes and Zisserman (CVPR 2018; IJCV 2020) maximise a unit's activation
with a penalty ``λ · Σ_t ||x_t − x_{t−1}||²`` on the video's change over time and watch the
activation as ``λ`` grows: a *slow* unit (static appearance) keeps most of it, since its optimum
hardly needs to change over time, a *fast* unit (motion) loses it.

Here a kernel is optimised as in stage 1 (:mod:`kv3d_jax.maximization`, the same step, jitter and
optimiser) once per weight of a small grid, all ``K × L`` (kernel, weight) pairs as one
:func:`kv3d_jax.runner.run`; every weight of a channel starts from the same parameter and draws the
same jitter (keys from the channel), so the weights are compared on paired runs.

The penalty is :func:`temporal_variation` of the rendered video (values in [0, 1]) times ``λ``
times the kernel's objective at the previous step (clipped at 0, held constant in the gradient).
Its gradient is then the objective's times that of ``log objective − λ · TV``: the optimum trades
a *fraction* of the activation against the variation, so ``λ`` means the same for a channel that
reaches 5 and one that reaches 500 (a plain ``λ · TV`` would let strong channels keep more for
being strong). ``λ`` is in 1/TV units: at the optimum, one unit of TV less costs ``λ`` in log
objective.

The read-out, :func:`slowness`, is the fraction of the unpenalised objective that the optimum
under the strongest penalty keeps: ``objective(λ_max) / objective(0)``, dimensionless, near 1 for
a slow kernel and near 0 for a fast one (high = slow).

It is checked against the temporal frequency (TF) each channel prefers among drifting gratings,
:func:`preferred_tf`, measured on a fine grid (:data:`SPATIAL_FREQS`, :data:`TEMPORAL_FREQS`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import distribute, maximization, runner, tuning
from kv3d_jax.models.base import Params, VideoModel

# The penalty weights of the grid (1/TV units, see the module doc); the first must be 0. The index
# reads only the first and the last, so the default grid is those two (docs/slowfast.md).
WEIGHTS = (0.0, 3.0)
# The one penalty weight of `kv3d visualize --slowfast`'s index: the grid's strongest.
DEFAULT_WEIGHT = WEIGHTS[-1]
# The gratings a preferred TF is read from: spatial frequencies (cycles/px) a factor of √2 apart,
# temporal frequencies (cycles/frame) a factor of 2^(1/4) apart from 1/64 up to 0.35 (0.5 is
# Nyquist's, where a grating has no direction). On a √2 TF grid the parabola's vertex moved by half
# the spread of MotionNet's preferred TFs and bunched them in two groups (docs/slowfast.md).
SPATIAL_FREQS = tuple(0.025 * 2 ** (k / 2) for k in range(8))
TEMPORAL_FREQS = tuple(2 ** (k / 4) / 64 for k in range(19))


def temporal_variation(video: jax.Array) -> jax.Array:
    """``Σ_{t=1}^{T−1} mean_{y,x,c} (video[t] − video[t−1])²`` of one video ``(T, H, W, C)``: a scalar
    in squared pixel values per frame pair, summed over the ``T − 1`` pairs (Feichtenhofer et al.'s
    ``Σ_t ||x_t − x_{t−1}||²`` divided by the ``H·W·C`` values of a frame, so it does not grow with
    the frame size)."""
    diff = video[1:] - video[:-1]
    return jnp.sum(jnp.mean(jnp.square(diff), axis=(1, 2, 3)))


class State(NamedTuple):
    """One (kernel, weight) pair's state: stage 1's, the penalty weight ``()`` and the objective of
    the previous step ``()`` clipped at 0 (the penalty's scale)."""

    stage1: maximization.State
    weight: jax.Array
    scale: jax.Array


@functools.lru_cache(maxsize=16)
def problem(model: VideoModel, layer: str, config: maximization.Config, shape: tuple[int, int, int],
            compute_dtype=jnp.float32) -> runner.Problem:
    """The per-pair problem for ``(T, H, W)`` videos: target ``(channel (), weight ())``, a stage-1
    step (:func:`kv3d_jax.maximization.kernel_step`) with the penalty of the module doc, outputs
    ``(objective (), temporal variation ())`` of the final video (objective without jitter, as stage
    1 reports it; variation of the video before its min–max normalisation)."""
    to_video = maximization.parameterization_of(config).to_video
    stage1 = maximization.problem(model, layer, config, shape, compute_dtype)

    def init(key, target):
        channel, weight = target
        return State(stage1.init(key, channel), jnp.asarray(weight, jnp.float32), jnp.float32(0.0))

    def step(model_params, state, key):
        def penalty(param):
            return state.weight * state.scale * temporal_variation(to_video(param))

        inner = maximization.kernel_step(model, layer, config, penalty=penalty, compute_dtype=compute_dtype)
        new, value = inner(model_params, state.stage1, key)
        return State(new, state.weight, jnp.maximum(value, 0.0)), value

    def outputs(model_params, state):
        _, value = stage1.outputs(model_params, state.stage1)
        return value, temporal_variation(to_video(state.stage1.param))

    return runner.Problem(init, step, outputs, convolves=True)


class SlowFast(NamedTuple):
    """The read-out of K kernels of one layer over L penalty weights.

    Attributes:
      channels: ``(K,)`` the kernels' channels.
      weights: ``(L,)`` the penalty weights, 1/TV units, the first 0.
      objective: ``(K, L)`` the objective (an activation) each optimum reaches.
      variation: ``(K, L)`` :func:`temporal_variation` of each optimum.
      failed: ``(K, L)`` True where the optimisation gave a non-finite value.
      index: ``(K,)`` :func:`slowness` (high = slow); NaN for a kernel it does not apply to.
    """

    channels: np.ndarray
    weights: np.ndarray
    objective: np.ndarray
    variation: np.ndarray
    failed: np.ndarray
    index: np.ndarray


def slowness(objective: np.ndarray, failed: np.ndarray | None = None) -> np.ndarray:
    """The slow/fast index ``(K,)`` from the objectives ``(K, L)`` over increasing weights:
    ``objective[:, -1] / objective[:, 0]``, the fraction of the unpenalised objective kept under the
    strongest penalty (dimensionless; 1 = as slow as can be, 0 = all lost). NaN where the
    unpenalised objective is not positive (a dead kernel has nothing to keep) or where a run of the
    kernel ``failed`` ``(K, L)``."""
    objective = np.asarray(objective, np.float64)
    first, last = objective[:, 0], objective[:, -1]
    bad = ~(first > 0) | ~np.isfinite(last)
    if failed is not None:
        bad |= np.asarray(failed).any(axis=1)
    return np.where(bad, np.nan, last / np.where(bad, 1.0, first))


def _run_pairs(model: VideoModel, params: Params, layer: str, config: maximization.Config, shape, ids: np.ndarray,
               grid: np.ndarray, key, **run) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (channel of ``ids`` ``(K,)``, weight of ``grid`` ``(L,)``) pair optimised as one
    :func:`kv3d_jax.runner.run`, pair ``(k, l)`` with the key ``fold_in(key, ids[k])``; returns the
    objective, the temporal variation (float64) and ``failed``, each ``(K, L)``. ``run``: the
    runner's ``mesh``, ``memory_budget``, ``batch_size``, ``per_device``, ``compute_dtype`` and
    ``callback``."""
    k, l = len(ids), grid.size
    pair_channels = np.repeat(ids, l)
    keys = runner.kernel_keys(key, pair_channels)
    targets = (jnp.asarray(pair_channels, jnp.int32), jnp.asarray(np.tile(grid, k)))
    compute_dtype = run.pop("compute_dtype", jnp.float32)
    result = runner.run(problem(model, layer, config, shape, jnp.dtype(compute_dtype)), params, targets,
                        pair_channels, config.steps, chunk=config.chunk, key=keys, compute_dtype=compute_dtype,
                        share=False, **run)
    objective, variation = (np.asarray(a, np.float64).reshape(k, l) for a in result.outputs)
    return objective, variation, np.asarray(result.failed).reshape(k, l)


def _checked(model: VideoModel, params: Params, layer: str, config: maximization.Config | str):
    """``(config, video shape, channels of the layer)`` for a slow/fast run of ``layer``, or a ValueError."""
    config = maximization.get_preset(config) if isinstance(config, str) else config
    if config.objective == "weighted":
        raise ValueError("the slow/fast read-out takes a channel or neuron objective, not 'weighted'")
    if config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    shape = tuple(config.shape or model.input_shape)
    return config, shape, maximization.check_reachable(model, params, layer, config, shape)


def measure(
    model: VideoModel,
    params: Params,
    layer: str,
    channels=None,
    *,
    config: maximization.Config | str = "native",
    weights: Sequence[float] = WEIGHTS,
    key: jax.Array | None = None,
    mesh=None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    per_device: int | None = None,
    compute_dtype=jnp.float32,
    callback: runner.Callback | None = None,
) -> SlowFast:
    """Optimises every channel of ``channels`` (default all of ``layer``) at every penalty weight of
    ``weights`` (increasing, the first 0) and reads off its slow/fast index: a :class:`SlowFast`.

    ``config`` is stage 1's (a :class:`kv3d_jax.maximization.Config` or a preset's name; its
    objective reads one channel: ``channel`` or ``neuron``). The ``K × L`` pairs run as one
    :func:`kv3d_jax.runner.run` (``mesh``, ``memory_budget``, ``batch_size``, ``per_device``,
    ``compute_dtype`` and ``callback`` as there); pair ``(k, l)`` gets the key ``fold_in(key,
    channels[k])`` whatever ``l``. Under ``jax.distributed`` each process measures its share of
    the channels.
    """
    config, shape, num = _checked(model, params, layer, config)
    grid = np.asarray(weights, np.float32).reshape(-1)
    if grid.size < 2 or grid[0] != 0 or not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise ValueError(f"weights must start at 0 and increase, at least two of them; got {grid.tolist()}")
    ids = distribute.process_share(maximization.channel_ids(channels, num, layer))
    objective, variation, failed = _run_pairs(
        model, params, layer, config, shape, ids, grid, key, mesh=mesh, memory_budget=memory_budget,
        batch_size=batch_size, per_device=per_device, compute_dtype=compute_dtype, callback=callback)
    return SlowFast(ids, grid, objective, variation, failed, slowness(objective, failed))


def penalised(
    model: VideoModel,
    params: Params,
    layer: str,
    channels,
    weight: float,
    *,
    config: maximization.Config | str,
    key: jax.Array | None = None,
    per_device: int | None = None,
    compute_dtype=jnp.float32,
    callback: runner.Callback | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The optimum of each of ``channels`` ``(K,)`` of ``layer`` under the one penalty ``weight`` (> 0,
    1/TV units): ``(objective (K,), temporal variation (K,), failed (K,))``.

    The other half of a slow/fast index whose unpenalised half is a stage-1 run already made: with
    that run's ``config``, ``key`` and ``per_device``, channel ``c`` starts from the same parameter
    and draws the same jitter as it did there (key ``fold_in(key, c)``), so the two are paired, and
    ``slowness(stack([stage-1 objective, objective]))`` is :func:`measure`'s index over the grid
    ``(0, weight)``. No process share is taken: ``channels`` are this process's already.
    """
    config, shape, num = _checked(model, params, layer, config)
    if not (np.isfinite(weight) and weight > 0):
        raise ValueError(f"the penalty weight must be a positive number, got {weight!r}")
    ids = maximization.channel_ids(channels, num, layer)
    objective, variation, failed = _run_pairs(
        model, params, layer, config, shape, ids, np.asarray([weight], np.float32), key, per_device=per_device,
        compute_dtype=compute_dtype, callback=callback)
    return objective[:, 0], variation[:, 0], failed[:, 0]


def preferred_tf(responses: np.ndarray, temporal_freqs: Sequence[float], directions: np.ndarray) -> np.ndarray:
    """Each channel's grating-preferred temporal frequency ``(C,)``, cycles/frame, from
    :func:`kv3d_jax.tuning.grating_responses` output ``(D, S, F, C)`` over increasing positive
    ``temporal_freqs`` ``(F,)``: at the channel's direction (index into D, ``directions`` ``(C,)``,
    e.g. its preferred one) and the spatial frequency where it responds most, the TF of its
    strongest response, refined by the parabola through the logarithms of that response and its two
    neighbours against log TF (the TF itself at either end of the grid, or where a neighbour is 0).
    NaN for a channel that responds to none of them."""
    tfs = np.asarray(temporal_freqs, np.float64)
    if tfs.ndim != 1 or tfs.size < 1 or np.any(tfs <= 0) or np.any(np.diff(tfs) <= 0):
        raise ValueError(f"temporal frequencies must be positive and increasing for a preferred TF, got {tfs.tolist()}")
    responses = np.asarray(responses, np.float64)
    channels = np.arange(responses.shape[-1])
    at_direction = responses[np.asarray(directions), :, :, channels]  # (C, S, F)
    best_sf = np.argmax(at_direction.max(axis=2), axis=1)
    curve = at_direction[channels, best_sf]  # (C, F)
    peak = np.argmax(curve, axis=1)
    log_tf = np.log(tfs)
    result = tfs[peak].copy()
    for c in np.flatnonzero((peak > 0) & (peak < tfs.size - 1)):
        x, y = log_tf[peak[c] - 1:peak[c] + 2], curve[c, peak[c] - 1:peak[c] + 2]
        if np.all(y > 0):
            a, b, _ = np.polyfit(x, np.log(y), 2)
            if a < 0:  # the middle one is the largest, so the vertex lies between the outer two
                result[c] = np.exp(-b / (2 * a))
    return np.where(curve.max(axis=1) > 0, result, np.nan)


def grating_tf(model: VideoModel, params: Params, layer: str, preferred_deg: np.ndarray, channels=None,
               num_phases: int = 4) -> np.ndarray:
    """The preferred TF ``(C,)`` (cycles/frame, :func:`preferred_tf`) of ``channels`` (default all) of
    ``layer``, each at its direction ``preferred_deg[c]`` (degrees, ``(C,)``, e.g.
    :attr:`kv3d_jax.tuning.DirectionTuning.preferred_deg`), from drifting gratings at those
    directions, :data:`SPATIAL_FREQS` and :data:`TEMPORAL_FREQS`, ``num_phases`` phases each; NaN
    for the other channels. Only the directions ``channels`` prefer are shown."""
    preferred_deg = np.asarray(preferred_deg, np.float64)
    wanted = np.zeros(preferred_deg.shape, bool)
    wanted[np.arange(preferred_deg.size) if channels is None else np.asarray(channels, np.int64)] = True
    directions = np.unique(preferred_deg[wanted])
    if directions.size == 0:
        return np.full(preferred_deg.shape, np.nan)
    responses = tuning.grating_responses(model, params, layer, directions, SPATIAL_FREQS, TEMPORAL_FREQS, num_phases)
    index = np.searchsorted(directions, np.where(wanted, preferred_deg, directions[0]))
    return np.where(wanted, preferred_tf(responses, TEMPORAL_FREQS, index), np.nan)


class Agreement(NamedTuple):
    """Slow/fast index against grating TF preference over the tuned channels of one layer.

    Attributes:
      fast_index, fast_tf: ``(C,)`` bool, below the median slow/fast index (fast) and above the median
        preferred TF, medians over the compared channels.
      compared: ``(C,)`` bool, the tuned channels with both measures finite and off both medians.
      agree: ``(C,)`` bool, ``fast_index == fast_tf`` (meaningful where ``compared``).
      share: the fraction of compared channels that agree (NaN with none).
    """

    fast_index: np.ndarray
    fast_tf: np.ndarray
    compared: np.ndarray
    agree: np.ndarray
    share: float


def agreement(index: np.ndarray, tf: np.ndarray, tuned: np.ndarray) -> Agreement:
    """Whether each ``tuned`` channel's slow/fast ``index`` ``(C,)`` and preferred ``tf`` ``(C,)`` agree in sign.

    Neither measure has an absolute zero (the index depends on the weight grid, the preferred TF on
    the gratings shown), so each is signed about its median over the tuned channels where both are
    finite: fast = an index below its median, and = a preferred TF above its median. A channel on
    either median has no sign and is not compared.
    """
    index, tf = np.asarray(index, np.float64), np.asarray(tf, np.float64)
    usable = np.asarray(tuned, bool) & np.isfinite(index) & np.isfinite(tf)
    if not usable.any():
        empty = np.zeros_like(usable)
        return Agreement(empty, empty, empty, empty, float("nan"))
    mid_index, mid_tf = np.median(index[usable]), np.median(tf[usable])
    fast_index, fast_tf = index < mid_index, tf > mid_tf
    compared = usable & (index != mid_index) & (tf != mid_tf)
    agree = fast_index == fast_tf
    share = float(agree[compared].mean()) if compared.any() else float("nan")
    return Agreement(fast_index, fast_tf, compared, agree, share)
