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
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import distribute, maximization, runner, tuning
from kv3d_jax.models.base import Params, VideoModel

# The penalty weights of the grid (1/TV units, see the module doc); the first must be 0.
WEIGHTS = (0.0, 0.3, 1.0, 3.0)


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
    config = maximization.get_preset(config) if isinstance(config, str) else config
    if config.objective == "weighted":
        raise ValueError("the slow/fast read-out takes a channel or neuron objective, not 'weighted'")
    if config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    grid = np.asarray(weights, np.float32).reshape(-1)
    if grid.size < 2 or grid[0] != 0 or not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise ValueError(f"weights must start at 0 and increase, at least two of them; got {grid.tolist()}")
    shape = tuple(config.shape or model.input_shape)
    num = maximization.check_reachable(model, params, layer, config, shape)
    ids = distribute.process_share(maximization.channel_ids(channels, num, layer))
    k, l = len(ids), grid.size
    pair_channels = np.repeat(ids, l)
    keys = runner.kernel_keys(key, pair_channels)
    targets = (jnp.asarray(pair_channels, jnp.int32), jnp.asarray(np.tile(grid, k)))
    result = runner.run(problem(model, layer, config, shape, jnp.dtype(compute_dtype)), params, targets,
                        pair_channels, config.steps, chunk=config.chunk, key=keys, mesh=mesh,
                        memory_budget=memory_budget, batch_size=batch_size, compute_dtype=compute_dtype,
                        callback=callback, share=False, per_device=per_device)
    objective, variation = (np.asarray(a, np.float64).reshape(k, l) for a in result.outputs)
    failed = np.asarray(result.failed).reshape(k, l)
    return SlowFast(ids, grid, objective, variation, failed, slowness(objective, failed))


def preferred_tf(responses: np.ndarray, temporal_freqs: Sequence[float],
                 result: tuning.DirectionTuning) -> np.ndarray:
    """Each channel's grating-preferred temporal frequency ``(C,)``, cycles/frame: the geometric mean
    of the ``temporal_freqs`` (all positive) weighted by its responses to them at its preferred
    direction and best spatial frequency, from :func:`kv3d_jax.tuning.grating_responses` output
    ``(D, S, F, C)`` and its :func:`kv3d_jax.tuning.direction_tuning`. NaN for a channel that
    responds to none of them."""
    tfs = np.asarray(temporal_freqs, np.float64)
    if tfs.ndim != 1 or np.any(tfs <= 0):
        raise ValueError(f"temporal frequencies must be positive for a preferred TF, got {tfs.tolist()}")
    responses = np.asarray(responses, np.float64)
    channels = np.arange(responses.shape[-1])
    directions = np.argmax(result.curve, axis=1)
    at_best = responses[directions, result.best_sf, :, channels]  # (C, F)
    total = at_best.sum(axis=1)
    log_mean = (at_best @ np.log(tfs)) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, np.exp(log_mean), np.nan)


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
