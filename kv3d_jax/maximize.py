"""Stage 1: the video that maximally activates each kernel of a layer, all kernels at once (SPEC §2).

Every kernel's problem is independent, so a layer is one batched problem: a pure step
optimises K videos together, each with its own parameter, Adam state, target and PRNG
key, ``vmap``-ped over kernels and ``jit``-compiled; steps run as a ``lax.scan`` in chunks
so a caller can report progress without recompiling. A kernel's randomness is derived
from its own identity (channel index), so its result does not depend on which other
kernels share its batch.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import Mesh

from kv3d_jax import distribute, objectives, parameterizations, transforms
from kv3d_jax.models.base import IMAGENET_MEAN, IMAGENET_STD, VideoModel

Params = Any


@dataclasses.dataclass(frozen=True)
class Preset:
    """A stage-1 configuration, as data.

    Attributes:
      shape: the optimised video's ``(T, H, W)``; ``None`` means the model's input size.
      resize: the ``(T, H, W)`` the video is trilinearly resized to (``align_corners=True``)
        before the model; ``None`` feeds it at its own size.
      normalization: ``"imagenet"`` (ImageNet mean/std) or ``"model"`` (the model's own).
      max_shift: jitter shifts ``dx, dy, dt`` are drawn from ``{0..max_shift-1}``.
      scales: jitter scales are drawn from these.
      learning_rate: Adam's learning rate.
      steps: optimisation steps.
    """

    shape: tuple[int, int, int] | None
    resize: tuple[int, int, int] | None
    normalization: str
    max_shift: tuple[int, int, int] = transforms.MAX_SHIFT
    scales: tuple[float, ...] = transforms.SCALES
    learning_rate: float = 0.05
    steps: int = 1500


PRESETS: dict[str, Preset] = {
    # The reference's defaults, SPEC §2 exactly.
    "paper": Preset(shape=(16, 128, 128), resize=(32, 224, 224), normalization="imagenet"),
    # The model's own clip size and normalisation, no resize; the jitter is kept.
    "native": Preset(shape=None, resize=None, normalization="model"),
}


def get_preset(name: str) -> Preset:
    """The preset registered as ``name``; a clear error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}") from None


class State(NamedTuple):
    """Optimisation state of K kernels; every leaf has a leading kernel axis.

    Attributes:
      param: the parameterization's pytree, ``(K, ...)``.
      opt_state: Adam's state per kernel.
      target: ``(K,)`` channel indices, or ``(K, C)`` channel weights for ``weighted``.
    """

    param: Any
    opt_state: Any
    target: jax.Array


@flax.struct.dataclass
class Stage1Result:
    """What stage 1 found for K kernels of one layer.

    Attributes:
      videos: ``(K, T, H, W, 3)`` final untransformed videos, each min–max normalised to
        [0, 1] over the whole video (SPEC §2 item 7).
      objective: ``(K,)`` the objective of each final video (before the min–max
        normalisation, without jitter) as an activation: positive means activated.
      channels: ``(K,)`` the channel of each kernel (for ``weighted``: the row of ``weights``).
      layer: the tapped layer.
      linear: whether the objective is linear in the model input (a layer in
        ``model.linear_layers``, not rectified), SPEC §5.
    """

    videos: jax.Array
    objective: jax.Array
    channels: np.ndarray
    layer: str = flax.struct.field(pytree_node=False)
    linear: bool = flax.struct.field(pytree_node=False)


def _optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def mean_std(model: VideoModel, preset: Preset):
    """The per-channel ``(mean, std)`` that ``preset`` normalises ``model``'s input with."""
    if preset.normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if preset.normalization == "model":
        return model.mean, model.std
    raise ValueError(f"unknown normalization {preset.normalization!r}; valid ones are: imagenet, model")


def model_input(video: jax.Array, jitter: transforms.Jitter | None, resize, mean, std) -> jax.Array:
    """What the model sees of ``video`` ``(T, H, W, 3)``: jittered (unless ``jitter`` is None),
    normalised with ``mean``/``std`` and resized to ``resize`` (unless None): ``(T', H', W', 3)``.

    The resize's rows sum to one, so resizing after normalising equals normalising after
    resizing; the jitter and the resize are therefore folded into one matrix per axis.
    """
    shape = video.shape[:3]
    matrices = None if jitter is None else transforms.jitter_matrices(jitter, shape)
    if resize is not None:
        scale = transforms.resize_matrices(shape, resize)
        matrices = scale if matrices is None else transforms.compose(scale, matrices)
    if matrices is not None:
        video = transforms.apply(video, matrices)
    return transforms.normalize(video, mean, std)


def objective_value(
    model: VideoModel,
    layer: str,
    objective: str = "channel",
    rectify: bool = False,
    compute_dtype=jnp.float32,
) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """``value(model_params, x, target) -> ()``: ``objective`` of one model input ``x`` ``(T, H, W, 3)``.

    An objective that reads one combination of the layer's channels (every objective but a
    rectified weighted sum) is computed from ``model.projected_features``, so a model that
    supports it computes one output channel of ``layer`` instead of all of them. The model
    runs in ``compute_dtype`` (its params and input cast to it); the value is float32.
    """
    projection = objectives.projection(objective, rectify)
    objective_fn = objectives.get(objective, rectify)
    compute_dtype = jnp.dtype(compute_dtype)

    def cast(tree):
        return jax.tree.map(lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    def value(model_params, x, target):
        model_params, x = cast(model_params), cast(x)[None]
        if projection is None:
            return objective_fn(model.features(model_params, x, layer)[0].astype(jnp.float32), target)
        channels = jax.eval_shape(lambda p, v: model.features(p, v, layer), model_params, x).shape[-1]
        weights = projection.weights(target, channels).astype(compute_dtype)
        return projection.reduce(model.projected_features(model_params, x, layer, weights)[0].astype(jnp.float32))

    return value


def make_step(
    model: VideoModel,
    layer: str,
    preset: Preset,
    parameterization: str = "pixel",
    objective: str = "channel",
    rectify: bool = False,
    penalty: Callable[[Any], jax.Array] | None = None,
    compute_dtype=jnp.float32,
) -> Callable[[Params, State, jax.Array], tuple[State, jax.Array]]:
    """The batched optimisation step ``step(model_params, state, keys) -> (state, objective)``.

    For each of K kernels (``vmap``): draw a jitter from its key in ``keys`` ``(K,)``,
    render the video, run the model up to ``layer`` only, and take one Adam step on the
    video parameter along the gradient of ``-objective``. ``model_params`` is an ordinary
    argument rather than a closed-over constant (XLA would otherwise constant-fold the
    convolutions at compile time) and is never differentiated: no weight gradients are
    computed. Returns the new state and each kernel's objective ``(K,)`` before the step.
    ``penalty(param)``, if given, is a regulariser added to the minimised ``-objective``.
    ``compute_dtype`` is the model's, as in :func:`objective_value`; the parameter and Adam's
    state stay float32.
    """
    model.check_layer(layer)
    to_video = parameterizations.get(parameterization).to_video
    value_fn = objective_value(model, layer, objective, rectify, compute_dtype)
    optimizer = _optimizer(preset.learning_rate)
    mean, std = mean_std(model, preset)

    def loss(param, model_params, key, target):
        jitter = transforms.random_jitter(key, preset.max_shift, preset.scales)
        x = model_input(to_video(param), jitter, preset.resize, mean, std)
        value = value_fn(model_params, x, target)
        return (-value if penalty is None else penalty(param) - value), value

    def kernel_step(model_params, param, opt_state, key, target):
        grad, value = jax.grad(loss, has_aux=True)(param, model_params, key, target)
        updates, opt_state = optimizer.update(grad, opt_state, param)
        return optax.apply_updates(param, updates), opt_state, value

    def step(model_params, state, keys):
        param, opt_state, value = jax.vmap(kernel_step, in_axes=(None, 0, 0, 0, 0))(
            model_params, state.param, state.opt_state, keys, state.target
        )
        return State(param, opt_state, state.target), value

    return step


def init_state(
    keys: jax.Array, target: jax.Array, shape, parameterization: str = "pixel", learning_rate: float = 0.05
) -> State:
    """Initial state of K kernels from their init keys ``(K,)`` and targets, for ``(T, H, W)`` videos."""
    init = parameterizations.get(parameterization).init
    param = jax.vmap(lambda k: init(k, tuple(shape)))(keys)
    return State(param, jax.vmap(_optimizer(learning_rate).init)(param), jnp.asarray(target))


def kernel_keys(key: jax.Array, ids) -> tuple[jax.Array, jax.Array]:
    """Each kernel's ``(init_keys, run_keys)`` ``(K,)``, derived from ``key`` and its id alone.

    Step ``i`` of a kernel draws its jitter from ``fold_in(run_key, i)``.
    """
    own = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(ids, jnp.uint32))
    split = jax.vmap(jax.random.split)(own)
    return split[:, 0], split[:, 1]


def scan_steps(step: Callable, chunk: int) -> Callable:
    """``run(model_params, state, run_keys, start) -> (state, objectives (chunk, K))``: ``chunk``
    applications of :func:`make_step`'s ``step``, step ``i`` (counted from ``start``) with each
    kernel's key ``fold_in(run_key, i)``."""
    def run(model_params, state, run_keys, start):
        def body(state, i):
            keys = jax.vmap(jax.random.fold_in, (0, None))(run_keys, i)
            return step(model_params, state, keys)

        return jax.lax.scan(body, state, start + jnp.arange(chunk, dtype=jnp.uint32))

    return run


@functools.lru_cache(maxsize=32)
def _compiled(model, layer, preset, parameterization, objective, rectify, chunk, compute_dtype):
    """Jitted ``run(model_params, state, run_keys, start)`` (``chunk`` steps) and
    ``evaluate(model_params, param, target) -> (videos, objective)``, cached per configuration."""
    step = make_step(model, layer, preset, parameterization, objective, rectify, compute_dtype=compute_dtype)
    to_video = parameterizations.get(parameterization).to_video
    value_fn = objective_value(model, layer, objective, rectify, compute_dtype)
    mean, std = mean_std(model, preset)

    def evaluate_one(model_params, param, target):
        video = to_video(param)
        return video, value_fn(model_params, model_input(video, None, preset.resize, mean, std), target)

    evaluate = jax.vmap(evaluate_one, in_axes=(None, 0, 0))
    return jax.jit(scan_steps(step, chunk)), jax.jit(evaluate)


def _chunk_length(steps: int, chunk: int) -> int:
    """The largest divisor of ``steps`` not above ``chunk``: every chunk then has one compiled length."""
    return max(d for d in range(1, min(steps, chunk) + 1) if steps % d == 0)


def minmax_normalize(videos: jax.Array) -> jax.Array:
    """Each video of ``videos`` ``(K, T, H, W, C)`` affinely mapped onto [0, 1] over all its values."""
    axes = tuple(range(1, videos.ndim))
    lo = jnp.min(videos, axis=axes, keepdims=True)
    hi = jnp.max(videos, axis=axes, keepdims=True)
    return (videos - lo) / jnp.maximum(hi - lo, jnp.finfo(videos.dtype).tiny)


def maximize(
    model: VideoModel,
    params: Params,
    layer: str,
    channels=None,
    preset: str | Preset = "paper",
    steps: int | None = None,
    key: jax.Array | None = None,
    objective: str = "channel",
    parameterization: str = "pixel",
    *,
    rectify: bool = False,
    weights=None,
    shape: tuple[int, int, int] | None = None,
    batch_size: int | None = None,
    chunk: int = 50,
    callback: Callable[[int, int, float], None] | None = None,
    mesh: Mesh | None = None,
    memory_budget: int | None = None,
    compute_dtype=jnp.float32,
) -> Stage1Result:
    """Optimises the video that maximises ``objective`` for each kernel of ``layer`` (SPEC §2).

    Args:
      model, params: the video model and its Flax variables.
      layer: one of ``model.layers``.
      channels: channel indices (default: every channel of the layer). For
        ``objective="weighted"`` leave it None and give ``weights``.
      preset: a name in :data:`PRESETS` or a :class:`Preset`.
      steps: overrides the preset's number of steps.
      key: PRNG key (default ``PRNGKey(0)``); each kernel's keys come from it and its channel.
      objective: ``"channel"`` (mean activation), ``"neuron"`` (centre activation) or
        ``"weighted"`` (``weights``-weighted channel means).
      parameterization: ``"pixel"`` or ``"fourier"``.
      rectify: apply the objective to ``relu(activation)``.
      weights: ``(K, C)`` channel weights, one row per kernel, for ``"weighted"``.
      shape: overrides the preset's video ``(T, H, W)``.
      batch_size: kernels optimised together per compiled batch (default: as many as fit
        ``memory_budget``); rounded up to a multiple of the mesh's devices. The last batch
        is padded so every batch has the same compiled shape.
      chunk: at most this many steps per compiled call (a divisor of ``steps``).
      callback: called after each chunk with ``(steps_done, steps_total, mean_objective)``,
        counting the steps of every batch.
      mesh: a 1-D mesh with axis ``"kernels"`` of this process's devices
        (:func:`kv3d_jax.distribute.kernel_mesh`, the default: all of them); each batch's
        kernels are split over it, the model params replicated.
      memory_budget: bytes per device a batch may use when ``batch_size`` is None (default:
        70 % of an accelerator's memory, or of the host's memory shared by its CPU devices);
        the batch size follows from XLA's memory analysis of the compiled step, scaled by
        :func:`kv3d_jax.distribute.analysis_undercount`.
      compute_dtype: the dtype the model runs in (e.g. ``jnp.bfloat16``); the optimised
        parameter, Adam's state and the reported objective stay float32.

    With several processes (``jax.distributed.initialize``), each process optimises its own
    share of the kernels (:func:`kv3d_jax.distribute.process_share`) and returns only those;
    ``result.channels`` says which.

    Returns:
      A :class:`Stage1Result`. Warns when the objective averages a channel that is linear
      in the input, whose optimum is a flat colour (SPEC §5).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    model.check_layer(layer)
    parameterizations.get(parameterization)
    objectives.get(objective)
    steps = preset.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    shape = tuple(shape or preset.shape or model.input_shape)
    key = jax.random.PRNGKey(0) if key is None else key
    *reached, num = model.output_shape(params, layer, preset.resize or shape)
    if min(reached) < 1:
        raise ValueError(
            f"a {preset.resize or shape} clip is too small to reach {layer} (its output would be "
            f"{tuple(reached)}); use a larger shape"
        )

    if objective == "weighted":
        if weights is None or channels is not None:
            raise ValueError("objective='weighted' needs weights (K, C) and no channels")
        target = jnp.asarray(weights, jnp.float32)
        if target.ndim != 2 or target.shape[1] != num:
            raise ValueError(f"weights must have shape (K, {num}) for {layer}, got {target.shape}")
        ids = np.arange(target.shape[0])
    else:
        if weights is not None:
            raise ValueError(f"weights are only used by objective='weighted', not {objective!r}")
        ids = np.arange(num) if channels is None else np.asarray(channels, dtype=np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= num)]
        if bad.size or ids.size == 0:
            raise ValueError(f"{layer} has channels 0..{num - 1}; got {bad.tolist() or 'none'}")
        target = jnp.asarray(ids, jnp.int32)

    linear = layer in model.linear_layers and not rectify
    if linear and objective in objectives.SPATIAL_MEANS:
        warnings.warn(
            f"the {objective} objective on {model.name} {layer} is linear in the input, so its optimum "
            "is a flat colour; use rectify=True (tap after the ReLU) or objective='neuron'",
            stacklevel=2,
        )

    mesh = distribute.check_mesh(mesh)
    share = distribute.process_share(np.arange(len(ids)))
    ids, target = ids[share], target[share]
    k = len(ids)
    if k == 0:
        return Stage1Result(videos=jnp.zeros((0, *shape, 3)), objective=jnp.zeros((0,)), channels=ids,
                            layer=layer, linear=linear)
    n = _chunk_length(steps, chunk)
    run, evaluate = _compiled(model, layer, preset, parameterization, objective, rectify, n,
                              jnp.dtype(compute_dtype))
    init_keys, run_keys = kernel_keys(key, ids)
    new_state = functools.partial(init_state, shape=shape, parameterization=parameterization,
                                  learning_rate=preset.learning_rate)
    if batch_size is None:
        devices = mesh.devices.size

        def compile_for(per_device: int):
            index = np.zeros(per_device * devices, dtype=np.int64)
            state = jax.eval_shape(new_state, init_keys[index], target[index])
            return run.lower(distribute.replicated_shapes(params, mesh), distribute.kernel_shapes(state, mesh),
                             distribute.kernel_shapes(run_keys[index], mesh),
                             jax.ShapeDtypeStruct((), jnp.uint32)).compile()

        budget = distribute.device_memory_budget(mesh) if memory_budget is None else memory_budget
        batch = devices * distribute.kernels_per_device(compile_for, budget, -(-k // devices),
                                                        distribute.analysis_undercount(mesh))
    else:
        batch = distribute.padded_batch(min(batch_size, k), mesh)
    params = distribute.replicate(params, mesh)
    total, done = steps * (-(-k // batch)), 0
    videos, values = [], []
    for lo in range(0, k, batch):
        # Pad the last batch with copies of its last kernel: one compiled shape for all.
        index = np.minimum(np.arange(lo, lo + batch), k - 1)
        keep = min(batch, k - lo)
        state = distribute.shard_kernels(new_state(init_keys[index], target[index]), mesh)
        keys = distribute.shard_kernels(run_keys[index], mesh)
        for start in range(0, steps, n):
            state, metrics = run(params, state, keys, jnp.uint32(start))
            done += n
            if callback is not None:
                callback(done, total, float(jnp.mean(metrics[-1, :keep])))
        video, value = evaluate(params, state.param, state.target)
        videos.append(np.asarray(minmax_normalize(video))[:keep])
        values.append(np.asarray(value)[:keep])
    return Stage1Result(
        videos=jnp.asarray(np.concatenate(videos)),
        objective=jnp.asarray(np.concatenate(values)),
        channels=ids,
        layer=layer,
        linear=linear,
    )
