"""Diverse optima: N distinct videos per kernel, pushed apart by a diversity term (issue #25).

The N optima of one channel share an objective term, so they are one *kernel* of the runner
(:func:`kv3d_jax.runner.run`): its state holds N stage-1 parameters along a leading axis, and
its step minimises

    -softmin_τ(v_1, …, v_N) + weight · s · r(t) · mean_{i≠j} relu(c_ij - margin)²,
    c_ij = cos(pattern(act_i), pattern(act_j)),

where ``v_i`` is optimum i's objective and ``act_i`` ``(T', H', W', C)`` the tapped layer's
activation for its jittered input, ``pattern`` is the flattened activation itself (the default) or
its Gram matrix over positions (Lucid's ``diversity`` objective, which ignores where a feature
sits), and ``s = mean_i |v_i|`` (:func:`objective_scale`, held constant in the gradient). The soft
minimum (:func:`soft_minimum`, its temperature relative to ``s``) gives the weakest optimum the
most of the objective's gradient, so no optimum buys distance by giving up its activation; the
squared hinge (:func:`hinge`) pushes only pairs still more alike than ``margin``; ``s`` prices the
penalty in the kernel's own objective, so one weight serves layers whose activations differ in
scale (MotionNet's conv4 reaches ~30 times conv3's); ``r(t)`` ramps the penalty in linearly over
the first ``warmup`` fraction of the steps, so the optima first find the feature, then move apart.
K channels with N optima each are K kernels of N-fold state, so batching, sharding and memory
planning are the runner's own.
Stage 1's pieces (parameterization, jitter, normalisation, objective) are reused unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kv3d_jax import objectives, runner, transforms
from kv3d_jax.maximization import (Config, State, checked_targets, get_preset, initial_state, mean_std,
                                   minmax_normalize, model_input, parameterization_of)
from kv3d_jax.models.base import VideoModel, finite_channels

Params = Any

# Measured on MotionNet conv3, channels 0-7, N = 4, 300 steps (docs/diversity.md, which also lists
# what else was tried): every kernel meets issue #25's acceptance (every pairwise cosine <= 0.5, every
# optimum >= 80 % of the best of its N), at about half the objective of independent optima. The
# earlier mean objective minus 2 x the mean pairwise cosine met it on none: pairs stayed at 0.76-0.86
# while weak optima gave up their activation.
DEFAULT_WEIGHT = 40.0
DEFAULT_PATTERN = "flat"
DEFAULT_MARGIN = 0.4
DEFAULT_TEMPERATURE = 0.1
DEFAULT_WARMUP = 0.3


def gram(act: jax.Array) -> jax.Array:
    """The Gram matrix ``A^T A`` ``(C · C,)`` (flattened) of one activation ``(T', H', W', C)``
    taken as ``A`` ``(T'·H'·W', C)``: which channels fire together, wherever they fire."""
    flat = act.reshape(-1, act.shape[-1])
    return (flat.T @ flat).reshape(-1)


def flat(act: jax.Array) -> jax.Array:
    """One activation ``(T', H', W', C)`` as a vector ``(T'·H'·W'·C,)``: what fires where."""
    return act.reshape(-1)


PATTERNS: dict[str, Callable[[jax.Array], jax.Array]] = {"gram": gram, "flat": flat}


def get_pattern(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation pattern registered as ``name``; a clear error lists the valid names."""
    try:
        return PATTERNS[name]
    except KeyError:
        raise ValueError(f"unknown diversity pattern {name!r}; valid ones are: {', '.join(PATTERNS)}") from None


def cosines(patterns: jax.Array) -> jax.Array:
    """Pairwise cosine similarity ``(N, N)`` of ``patterns`` ``(N, D)`` (1 on the diagonal; a zero
    pattern has cosine 0 with every other)."""
    patterns = patterns.astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(patterns * patterns, axis=-1, keepdims=True))
    unit = patterns / jnp.maximum(norms, 1e-10)
    return unit @ unit.T


def off_diagonal(matrix) -> np.ndarray:
    """The off-diagonal entries ``(..., N·(N-1))`` of square matrices ``(..., N, N)``: every pair of
    distinct optima's cosine in :attr:`DiverseResult.cosine`."""
    matrix = np.asarray(matrix)
    return matrix[..., ~np.eye(matrix.shape[-1], dtype=bool)]


def hinge(cosine: jax.Array, margin: float) -> jax.Array:
    """The diversity penalty of N optima: ``mean_{i≠j} relu(cosine[i, j] - margin)²`` of their pairwise
    cosines ``(N, N)``, N ≥ 2; 0 once every pair is at most ``margin`` alike."""
    n = cosine.shape[-1]
    excess = jnp.where(jnp.eye(n, dtype=bool), 0.0, jax.nn.relu(cosine - margin))
    return jnp.sum(excess * excess) / (n * (n - 1))


def objective_scale(values: jax.Array) -> jax.Array:
    """``mean_i |values_i|`` of N objectives ``(N,)`` (at least 1e-6), held constant in the gradient: the
    unit that makes the diversity loss independent of the activation's scale."""
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(jnp.abs(values)), 1e-6))


def soft_minimum(values: jax.Array, temperature: float) -> jax.Array:
    """``-τ · log Σ_i exp(-values_i / τ)`` of ``values`` ``(N,)``, with ``τ = temperature ·``
    :func:`objective_scale`: at most ``min(values)``, within ``τ · log N`` of it. Its gradient weighs
    each value by a softmax of ``-values / τ`` (weights summing to 1, so Adam sees the objective's own
    gradient scale), most the smallest; a relative ``τ`` makes those weights independent of the
    activation's scale."""
    tau = temperature * objective_scale(values)
    return -tau * jax.scipy.special.logsumexp(-values / tau)


def _layer(model: VideoModel, layer: str, config: Config, compute_dtype):
    """``act(model_params, x) -> (acts, spoiled)``: the tapped layer ``(N, T', H', W', C)`` float32
    (rectified when ``config.rectify``) for N model inputs ``x`` ``(N, T, H, W, 3)``, run in
    ``compute_dtype``, and ``spoiled`` ``(C,)``: 0 for a channel, NaN for one whose weights are not
    finite. Such a channel is computed from zero weights (:func:`kv3d_jax.models.base.finite_channels`):
    a pattern spans every channel, so its NaN would otherwise spoil every kernel's run."""
    compute_dtype = jnp.dtype(compute_dtype)

    def act(model_params, x):
        model_params, finite = finite_channels(model_params, layer)
        model_params, x = runner.cast_floats(model_params, compute_dtype), runner.cast_floats(x, compute_dtype)
        out = model.features(model_params, x, layer).astype(jnp.float32)
        spoiled = jnp.zeros(out.shape[-1:]) if finite is None else jnp.where(finite, 0.0, jnp.nan)
        return (jax.nn.relu(out) if config.rectify else out), spoiled

    return act


def _values(config: Config, acts: jax.Array, target: jax.Array, spoiled: jax.Array) -> jax.Array:
    """The objective ``(N,)`` of each of N activations ``(N, T', H', W', C)`` (already rectified); NaN
    where it reads a channel that ``spoiled`` ``(C,)`` marks, so that its own kernel fails (the rest
    of the value and its gradient are the activations')."""
    objective = objectives.get(config.objective)
    values = jax.vmap(objective, in_axes=(0, None))(acts, target)
    return values + jax.lax.stop_gradient(objective(jnp.broadcast_to(spoiled, acts.shape[1:]), target))


@functools.lru_cache(maxsize=32)
def problem(model: VideoModel, layer: str, config: Config, shape: tuple[int, int, int], n: int, weight: float,
            pattern: str = DEFAULT_PATTERN, compute_dtype=jnp.float32, margin: float = DEFAULT_MARGIN,
            temperature: float = DEFAULT_TEMPERATURE, warmup: float = DEFAULT_WARMUP) -> runner.Problem:
    """The runner problem of one channel's ``n`` diverse optima of ``(T, H, W)`` videos (the module doc
    gives the loss; ``config.steps`` sets the warm-up's length).

    Target: a channel index ``()`` (or weights ``(C,)``). State: a :class:`~kv3d_jax.maximization.State`
    whose parameter and Adam state have a leading axis of ``n``; optimum i starts from
    ``fold_in(key, i)`` as a stage-1 kernel starts from its key, and step i's jitter is drawn
    from ``fold_in(step_key, i)``. Metric: the mean objective of the n optima before the step.
    Outputs: ``(videos (n, T, H, W, 3)`` each min–max normalised, ``objective (n,)`` without
    jitter, ``cosine (n, n)`` of the unjittered optima's activation patterns``)``.
    """
    if n < 2:
        raise ValueError(f"diversity needs at least 2 optima per kernel, got {n}")
    to_video = parameterization_of(config).to_video
    act_fn = _layer(model, layer, config, compute_dtype)
    pattern_fn = get_pattern(pattern)
    optimizer = optax.adam(config.learning_rate)
    mean, std = mean_std(model, config)
    index = jnp.arange(n, dtype=jnp.uint32)
    warmup_steps = warmup * config.steps

    def init(key, target):
        params = jax.vmap(lambda i: initial_state(jax.random.fold_in(key, i), target, shape, config.parameterization,
                                                  config.learning_rate).param)(index)
        return State(params, optimizer.init(params), jnp.asarray(target))

    def loss(params, model_params, key, target, ramp):
        def one(param, i):
            jitter = transforms.random_jitter(jax.random.fold_in(key, i), config.max_shift, config.scales)
            return model_input(to_video(param), jitter, config.resize, mean, std)

        acts, spoiled = act_fn(model_params, jax.vmap(one)(params, index))
        values = _values(config, acts, target, spoiled)
        penalty = hinge(cosines(jax.vmap(pattern_fn)(acts)), margin)
        return weight * objective_scale(values) * ramp * penalty - soft_minimum(values, temperature), jnp.mean(values)

    def step(model_params, state, key):
        done = optax.tree_utils.tree_get(state.opt_state, "count")
        ramp = jnp.minimum(1.0, done / warmup_steps) if warmup_steps > 0 else 1.0
        grad, value = jax.grad(loss, has_aux=True)(state.param, model_params, key, state.target, ramp)
        updates, opt_state = optimizer.update(grad, state.opt_state, state.param)
        return State(optax.apply_updates(state.param, updates), opt_state, state.target), value

    def outputs(model_params, state):
        videos = jax.vmap(to_video)(state.param)
        x = jax.vmap(lambda v: model_input(v, None, config.resize, mean, std))(videos)
        acts, spoiled = act_fn(model_params, x)
        return (minmax_normalize(videos), _values(config, acts, state.target, spoiled),
                cosines(jax.vmap(pattern_fn)(acts)))

    return runner.Problem(init, step, outputs, convolves=True)


def similarity(model: VideoModel, params: Params, layer: str, videos: jax.Array, *, config: Config | str = "paper",
               pattern: str = DEFAULT_PATTERN, compute_dtype=jnp.float32) -> jax.Array:
    """Pairwise cosine ``(K, N, N)`` of the activation patterns at ``layer`` of ``videos``
    ``(K, N, T, H, W, 3)`` (values in [0, 1]), each fed unjittered as ``config`` feeds stage 1
    (its normalisation, resize and ``rectify``); ``pattern`` is ``"gram"`` or ``"flat"``."""
    config = get_preset(config) if isinstance(config, str) else config
    act_fn = _layer(model, model.check_layer(layer), config, compute_dtype)
    pattern_fn = get_pattern(pattern)
    mean, std = mean_std(model, config)

    def one(model_params, kernel_videos):
        x = jax.vmap(lambda v: model_input(v, None, config.resize, mean, std))(kernel_videos)
        return cosines(jax.vmap(pattern_fn)(act_fn(model_params, x)[0]))

    # The params are an argument, not a closed-over constant that XLA would fold at compile time.
    every = jax.jit(lambda model_params, vs: jax.lax.map(lambda v: one(model_params, v), vs))
    return every(params, jnp.asarray(videos, jnp.float32))


@flax.struct.dataclass
class DiverseResult:
    """What :func:`maximize_diverse` found for K kernels with N optima each.

    Attributes:
      videos: ``(K, N, T, H, W, 3)`` final untransformed videos, each min–max normalised to [0, 1].
      objective: ``(K, N)`` each optimum's objective (unjittered, before the normalisation).
      cosine: ``(K, N, N)`` pairwise cosine of the optima's activation patterns at the layer
        (unjittered, the pattern the diversity term used).
      failed: ``(K,)`` bool, True where any of the kernel's N optima is not finite.
      channels: ``(K,)`` the channel of each kernel (for ``weighted``: the row of ``weights``).
      layer: the tapped layer.
      linear: whether the objective is linear in the model input (SPEC §5).
    """

    videos: jax.Array
    objective: jax.Array
    cosine: jax.Array
    failed: np.ndarray
    channels: np.ndarray
    layer: str = flax.struct.field(pytree_node=False)
    linear: bool = flax.struct.field(pytree_node=False)


def maximize_diverse(
    model: VideoModel,
    params: Params,
    layer: str,
    channels=None,
    n: int = 4,
    *,
    config: Config | str = "paper",
    weight: float = DEFAULT_WEIGHT,
    pattern: str = DEFAULT_PATTERN,
    margin: float = DEFAULT_MARGIN,
    temperature: float = DEFAULT_TEMPERATURE,
    warmup: float = DEFAULT_WARMUP,
    weights=None,
    key: jax.Array | None = None,
    mesh=None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    per_device: int | None = None,
    compute_dtype=jnp.float32,
    callback: runner.Callback | None = None,
    share: bool = True,
) -> DiverseResult:
    """``n`` diverse optima for each kernel of ``layer``: stage 1 (:func:`kv3d_jax.maximization.maximize`,
    whose arguments these are) maximising the soft minimum of the optima's objectives
    (:func:`soft_minimum` at ``temperature``) less ``weight`` times their mean absolute objective
    times the squared excess of their activation ``pattern``'s (``"flat"``, or Lucid's ``"gram"``)
    pairwise cosines over ``margin`` (:func:`hinge`), the penalty ramped in over the first ``warmup``
    fraction (0 to 1) of the steps (the module doc has the loss).

    A kernel (a channel and its ``n`` optima) is one runner kernel: its keys are
    ``fold_in(key, channel)``, so its result does not depend on the kernels beside it, and
    ``batch_size`` / ``per_device`` count kernels, each holding ``n`` videos. ``weight=0``
    gives ``n`` stage-1 optima without a diversity term. Returns a :class:`DiverseResult`.
    """
    config = get_preset(config) if isinstance(config, str) else config
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"diversity needs an integer n of at least 2 optima per kernel, got {n!r}")
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"the diversity weight must be a finite number of at least 0, got {weight!r}")
    if not -1 <= margin <= 1:
        raise ValueError(f"the diversity margin is a cosine, from -1 to 1, got {margin!r}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the soft minimum's temperature must be a finite number above 0, got {temperature!r}")
    if not 0 <= warmup <= 1:
        raise ValueError(f"the warm-up is a fraction of the steps, from 0 to 1, got {warmup!r}")
    get_pattern(pattern)
    shape, ids, target, linear = checked_targets(model, params, layer, config, channels, weights)
    result = runner.run(problem(model, layer, config, shape, int(n), float(weight), pattern, jnp.dtype(compute_dtype),
                                float(margin), float(temperature), float(warmup)),
                        params, target, ids, config.steps, chunk=config.chunk, key=key, mesh=mesh,
                        memory_budget=memory_budget, batch_size=batch_size, compute_dtype=compute_dtype,
                        callback=callback, per_device=per_device, share=share)
    videos, values, cosine = result.outputs
    return DiverseResult(videos=jnp.asarray(videos), objective=jnp.asarray(values), cosine=jnp.asarray(cosine),
                         failed=result.failed, channels=result.ids, layer=layer, linear=linear)
