"""Stage 1: the video that maximally activates each kernel of a layer, all kernels at once (SPEC §2).

A kernel's problem (:func:`problem`) is its video parameter, Adam's state and its target
channel; a step draws a jitter from the step's key, renders the video, runs the model up to
the layer and takes one Adam step along the gradient of ``-objective``. The runner
(:func:`kv3d_jax.runner.run`) optimises every kernel of a layer with it.
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

from kv3d_jax import objectives, parameterizations, runner, spectrum, transforms
from kv3d_jax.models.base import IMAGENET_MEAN, IMAGENET_STD, VideoModel

Params = Any


@dataclasses.dataclass(frozen=True)
class Config:
    """Stage 1's settings, as data.

    Attributes:
      shape: the optimised video's ``(T, H, W)``; ``None`` means the model's input size.
      resize: the ``(T, H, W)`` the video is trilinearly resized to (``align_corners=True``)
        before the model; ``None`` feeds it at its own size.
      normalization: ``"imagenet"`` (ImageNet mean/std) or ``"model"`` (the model's own).
      max_shift: jitter shifts ``dx, dy, dt`` are drawn from ``{0..max_shift-1}``.
      scales: jitter scales are drawn from these.
      learning_rate: Adam's learning rate.
      steps: optimisation steps.
      objective: ``"channel"`` (mean activation), ``"neuron"`` (centre activation) or
        ``"weighted"`` (weighted channel means, :func:`maximize`'s ``weights``).
      parameterization: a name in :data:`kv3d_jax.parameterizations.PARAMETERIZATIONS`.
      rectify: apply the objective to ``relu(activation)``.
      chunk: at most this many steps per compiled call (progress is reported between chunks).
      maco_exponents: ``(a, b)`` of the natural-video amplitude law ``1 / (f_s^a · f_t^b)`` that
        ``parameterization="maco"`` fixes (:data:`kv3d_jax.spectrum.NATURAL_EXPONENTS`, with the
        literature behind them).
      maco_contrast: the root mean square of a ``"maco"`` video before its colour transform and
        sigmoid (MACO's own standardisation: 1).
      magnitude: for ``"maco"``, a fixed amplitude spectrum ``(T, H, W//2+1, 3)`` to use instead of
        the law (e.g. estimated from clips, :func:`kv3d_jax.spectrum.from_clips`); None: the law.
    """

    shape: tuple[int, int, int] | None
    resize: tuple[int, int, int] | None
    normalization: str
    max_shift: tuple[int, int, int] = transforms.MAX_SHIFT
    scales: tuple[float, ...] = transforms.SCALES
    learning_rate: float = 0.05
    steps: int = 1500
    objective: str = "channel"
    parameterization: str = "pixel"
    rectify: bool = False
    chunk: int = 50
    maco_exponents: tuple[float, float] = spectrum.NATURAL_EXPONENTS
    maco_contrast: float = 1.0
    magnitude: spectrum.Magnitude | None = None


PRESETS: dict[str, Config] = {
    # The reference's defaults, SPEC §2 exactly.
    "paper": Config(shape=(16, 128, 128), resize=(32, 224, 224), normalization="imagenet"),
    # The model's own clip size and normalisation, no resize; the jitter is kept.
    "native": Config(shape=None, resize=None, normalization="model"),
}


def get_preset(name: str) -> Config:
    """The preset registered as ``name``; a clear error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets are: {', '.join(PRESETS)}") from None


def preset(name: str | Config = "paper", **changes) -> Config:
    """The preset ``name`` (or a :class:`Config`) with ``changes`` to its fields, e.g.
    ``preset("native", steps=100, rectify=True)``; a clear error names unknown fields."""
    config = get_preset(name) if isinstance(name, str) else name
    try:
        return dataclasses.replace(config, **changes)
    except TypeError:
        valid = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ValueError(f"unknown stage-1 setting(s) {sorted(changes)}; valid ones are: {valid}") from None


class State(NamedTuple):
    """Optimisation state of one kernel (a leading kernel axis when batched).

    Attributes:
      param: the parameterization's pytree.
      opt_state: Adam's state.
      target: the channel index ``()``, or channel weights ``(C,)`` for ``weighted``.
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
      failed: ``(K,)`` bool, True where the kernel's video or objective is not finite.
      channels: ``(K,)`` the channel of each kernel (for ``weighted``: the row of ``weights``).
      layer: the tapped layer.
      linear: whether the objective is linear in the model input (a layer in
        ``model.linear_layers``, not rectified), SPEC §5.
    """

    videos: jax.Array
    objective: jax.Array
    failed: np.ndarray
    channels: np.ndarray
    layer: str = flax.struct.field(pytree_node=False)
    linear: bool = flax.struct.field(pytree_node=False)


def parameterization_of(config: Config) -> parameterizations.Parameterization:
    """The parameterization ``config`` names, with its MACO magnitude (or law exponents) for ``"maco"``."""
    if config.parameterization == "maco":
        magnitude = None if config.magnitude is None else config.magnitude.array
        return parameterizations.maco(magnitude, tuple(config.maco_exponents), config.maco_contrast)
    if config.magnitude is not None:
        raise ValueError(f"a fixed magnitude is only used by parameterization='maco', not "
                         f"{config.parameterization!r}")
    return parameterizations.get(config.parameterization)


def _optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def mean_std(model: VideoModel, config: Config):
    """The per-channel ``(mean, std)`` that ``config`` normalises ``model``'s input with."""
    if config.normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if config.normalization == "model":
        return model.mean, model.std
    raise ValueError(f"unknown normalization {config.normalization!r}; valid ones are: imagenet, model")


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

    An objective that reads one channel, or one combination of the layer's channels (every
    objective but a rectified weighted sum), is computed from ``model.projected_features``, so
    a model that supports it computes one output channel of ``layer`` instead of all of them;
    a channel is selected, never multiplied by zero weights, so a non-finite weight of another
    channel cannot reach it. The model runs in ``compute_dtype`` (its params and input cast
    to it); the value is float32.
    """
    projection = objectives.projection(objective, rectify)
    objective_fn = objectives.get(objective, rectify)
    compute_dtype = jnp.dtype(compute_dtype)

    def value(model_params, x, target):
        model_params, x = runner.cast_floats(model_params, compute_dtype), runner.cast_floats(x, compute_dtype)[None]
        if projection is None:
            return objective_fn(model.features(model_params, x, layer)[0].astype(jnp.float32), target)
        channels = jax.eval_shape(lambda p, v: model.features(p, v, layer), model_params, x).shape[-1]
        weights = projection.weights(target, channels)
        if jnp.issubdtype(weights.dtype, jnp.floating):
            weights = weights.astype(compute_dtype)
        return projection.reduce(model.projected_features(model_params, x, layer, weights)[0].astype(jnp.float32))

    return value


def kernel_step(
    model: VideoModel,
    layer: str,
    config: Config,
    parameterization: str | None = None,
    penalty: Callable[[Any], jax.Array] | None = None,
    compute_dtype=jnp.float32,
) -> Callable[[Params, State, jax.Array], tuple[State, jax.Array]]:
    """One kernel's optimisation step ``step(model_params, state, key) -> (state, objective)``.

    Draws a jitter from ``key``, renders the video of ``parameterization`` (default
    ``config.parameterization``), runs the model up to ``layer`` only, and takes one Adam step
    on the video parameter along the gradient of ``-objective`` (plus ``penalty(param)``, a
    regulariser, if given). ``model_params`` is an ordinary argument rather than a closed-over
    constant (XLA would otherwise constant-fold the convolutions at compile time) and is never
    differentiated. Returns the new state and the objective ``()`` before the step.
    ``compute_dtype`` is the model's, as in :func:`objective_value`; the parameter and Adam's
    state stay float32.
    """
    model.check_layer(layer)
    chosen = parameterizations.get(parameterization) if parameterization else parameterization_of(config)
    to_video = chosen.to_video
    value_fn = objective_value(model, layer, config.objective, config.rectify, compute_dtype)
    optimizer = _optimizer(config.learning_rate)
    mean, std = mean_std(model, config)

    def loss(param, model_params, key, target):
        jitter = transforms.random_jitter(key, config.max_shift, config.scales)
        x = model_input(to_video(param), jitter, config.resize, mean, std)
        value = value_fn(model_params, x, target)
        return (-value if penalty is None else penalty(param) - value), value

    def step(model_params, state, key):
        grad, value = jax.grad(loss, has_aux=True)(state.param, model_params, key, state.target)
        updates, opt_state = optimizer.update(grad, state.opt_state, state.param)
        return State(optax.apply_updates(state.param, updates), opt_state, state.target), value

    return step


def make_step(model: VideoModel, layer: str, config: Config, penalty=None, compute_dtype=jnp.float32):
    """:func:`kernel_step` for K kernels at once: ``step(model_params, state, keys (K,)) ->
    (state, objectives (K,))``, every leaf of ``state`` with a leading kernel axis."""
    step = kernel_step(model, layer, config, penalty=penalty, compute_dtype=compute_dtype)
    return jax.vmap(step, in_axes=(None, 0, 0))


def initial_state(key: jax.Array, target: jax.Array, shape, parameterization: str = "pixel",
                  learning_rate: float = 0.05) -> State:
    """One kernel's initial state for a ``(T, H, W)`` video, its parameter drawn from
    ``split(key)[0]`` (the runner's step keys come from ``split(key)[1]``)."""
    param = parameterizations.get(parameterization).init(jax.random.split(key)[0], tuple(shape))
    return State(param, _optimizer(learning_rate).init(param), jnp.asarray(target))


def init_state(keys: jax.Array, target: jax.Array, shape, parameterization: str = "pixel",
               learning_rate: float = 0.05) -> State:
    """:func:`initial_state` of K kernels from their keys ``(K,)`` and targets."""
    return jax.vmap(lambda k, t: initial_state(k, t, shape, parameterization, learning_rate))(keys, target)


def minmax_normalize(videos: jax.Array) -> jax.Array:
    """Each video of ``videos`` ``(K, T, H, W, C)`` affinely mapped onto [0, 1] over all its values."""
    axes = tuple(range(1, videos.ndim))
    lo = jnp.min(videos, axis=axes, keepdims=True)
    hi = jnp.max(videos, axis=axes, keepdims=True)
    return (videos - lo) / jnp.maximum(hi - lo, jnp.finfo(videos.dtype).tiny)


@functools.lru_cache(maxsize=32)
def problem(model: VideoModel, layer: str, config: Config, shape: tuple[int, int, int],
            compute_dtype=jnp.float32) -> runner.Problem:
    """Stage 1's per-kernel problem for ``(T, H, W)`` videos: target a channel index ``()`` (or
    weights ``(C,)``), outputs ``(video (T, H, W, 3) min-max normalised, objective ())``."""
    to_video = parameterization_of(config).to_video
    value_fn = objective_value(model, layer, config.objective, config.rectify, compute_dtype)
    mean, std = mean_std(model, config)

    def init(key, target):
        return initial_state(key, target, shape, config.parameterization, config.learning_rate)

    def outputs(model_params, state):
        video = to_video(state.param)
        value = value_fn(model_params, model_input(video, None, config.resize, mean, std), state.target)
        return minmax_normalize(video[None])[0], value

    return runner.Problem(init, kernel_step(model, layer, config, compute_dtype=compute_dtype), outputs,
                          convolves=True)


def attribution(
    model: VideoModel,
    params: Params,
    layer: str,
    config: Config,
    videos: jax.Array,
    targets: jax.Array,
    keys: jax.Array,
    samples: int = 8,
    noise: float = 0.05,
    kernel_batch: int = 8,
    compute_dtype=jnp.float32,
) -> jax.Array:
    """MACO's attribution map of each kernel's video: where in space and time the objective draws on it.

    For kernel k, the sum over ``samples`` noisy, jittered copies of ``videos[k]`` ``(T, H, W, 3)`` of
    ``|∂ objective / ∂ video|`` summed over colours: ``(K, T, H, W)`` float32, in objective units per
    unit of pixel value. Each copy adds Gaussian noise of standard deviation ``noise`` (MACO adds
    noise of 0.05 to its crops) and draws a jitter as stage 1's steps do (``config``'s shifts and
    scales); ``targets`` are the kernels' targets (channel indices ``(K,)`` or weights ``(K, C)``)
    and ``keys`` ``(K,)`` their PRNG keys (a kernel's map depends on its own key, video and target
    alone; with ``kernel_batch=1`` bit for bit, whatever the kernels beside it). MACO accumulates the same absolute gradient over its optimisation
    steps; taking it at the final video, as SmoothGrad does, needs no change to the optimisation
    state and costs ``samples`` gradients per kernel. Kernels run ``kernel_batch`` at a time.
    """
    value_fn = objective_value(model, layer, config.objective, config.rectify, compute_dtype)
    mean, std = mean_std(model, config)

    def value(model_params, video, target, sample_key):
        kj, kn = jax.random.split(sample_key)
        jitter = transforms.random_jitter(kj, config.max_shift, config.scales)
        noisy = video + noise * jax.random.normal(kn, video.shape, video.dtype)
        return value_fn(model_params, model_input(noisy, jitter, config.resize, mean, std), target)

    grad = jax.grad(value, argnums=1)

    def one(model_params, video, target, kernel_key):
        def add(total, sample_key):
            return total + jnp.sum(jnp.abs(grad(model_params, video, target, sample_key)), axis=-1), None

        total, _ = jax.lax.scan(add, jnp.zeros(video.shape[:3], jnp.float32), jax.random.split(kernel_key, samples))
        return total

    @jax.jit
    def run(model_params, videos, targets, keys):
        return jax.lax.map(lambda x: one(model_params, *x), (videos, targets, keys), batch_size=kernel_batch)

    videos = jnp.asarray(videos, jnp.float32)
    return run(params, videos, jnp.asarray(targets), jnp.asarray(keys))


def check_reachable(model: VideoModel, params: Params, layer: str, config: Config, shape) -> int:
    """The number of channels of ``layer``, after checking a ``shape`` clip (resized as ``config``
    says) reaches it."""
    *reached, num = model.output_shape(params, model.check_layer(layer), config.resize or shape)
    if min(reached) < 1:
        raise ValueError(f"a {config.resize or shape} clip is too small to reach {layer} (its output would be "
                         f"{tuple(reached)}); use a larger shape")
    return num


def channel_ids(channels, num: int, layer: str) -> np.ndarray:
    """``channels`` (default all ``num``) as an int array, after checking each is a channel of ``layer``."""
    ids = np.arange(num) if channels is None else np.asarray(channels, dtype=np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= num)]
    if bad.size or ids.size == 0:
        raise ValueError(f"{layer} has channels 0..{num - 1}; got {bad.tolist() or 'none'}")
    return ids


def checked_targets(model: VideoModel, params: Params, layer: str, config: Config, channels, weights):
    """Checks a stage-1 request and returns ``(shape, ids, target, linear)``: the optimised clip's
    ``(T, H, W)``, the kernels' ids ``(K,)``, their targets (channel indices ``(K,)`` int32, or
    weights ``(K, C)`` for ``objective="weighted"``) and whether the objective is linear in the
    input (SPEC §5), warning when it is (the warning names the line that called the stage)."""
    parameterization_of(config)
    objectives.get(config.objective)
    if config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    shape = tuple(config.shape or model.input_shape)
    num = check_reachable(model, params, layer, config, shape)
    # A shape the parameterization cannot represent (an odd width, a magnitude of another size) is
    # refused here in one line, not from inside the compiled batch.
    jax.eval_shape(lambda k: parameterization_of(config).init(k, shape), jax.random.PRNGKey(0))
    if config.parameterization == "maco":
        parameterizations.maco_magnitude(shape, None if config.magnitude is None else config.magnitude.array,
                                         tuple(config.maco_exponents), config.maco_contrast)
    if config.objective == "weighted":
        if weights is None or channels is not None:
            raise ValueError("objective='weighted' needs weights (K, C) and no channels")
        target = jnp.asarray(weights, jnp.float32)
        if target.ndim != 2 or target.shape[1] != num:
            raise ValueError(f"weights must have shape (K, {num}) for {layer}, got {target.shape}")
        ids = np.arange(target.shape[0])
    else:
        if weights is not None:
            raise ValueError(f"weights are only used by objective='weighted', not {config.objective!r}")
        ids = channel_ids(channels, num, layer)
        target = jnp.asarray(ids, jnp.int32)

    linear = layer in model.linear_layers and not config.rectify
    if linear and config.objective in objectives.SPATIAL_MEANS:
        warnings.warn(
            f"the {config.objective} objective on {model.name} {layer} is linear in the input, so its optimum "
            "is a flat colour; use rectify=True (tap after the ReLU) or objective='neuron'",
            stacklevel=3,
        )
    return shape, ids, target, linear


def maximize(
    model: VideoModel,
    params: Params,
    layer: str,
    channels=None,
    *,
    config: Config | str = "paper",
    weights=None,
    key: jax.Array | None = None,
    mesh=None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    compute_dtype=jnp.float32,
    callback: runner.Callback | None = None,
    per_device: int | None = None,
    share: bool = True,
) -> Stage1Result:
    """Optimises the video that maximises the objective for each kernel of ``layer`` (SPEC §2).

    Args:
      model, params: the video model and its Flax variables.
      layer: one of ``model.layers``.
      channels: channel indices (default: every channel of the layer). For
        ``objective="weighted"`` leave it None and give ``weights``.
      config: a :class:`Config` or the name of one in :data:`PRESETS` (see :func:`preset`).
      weights: ``(K, C)`` channel weights, one row per kernel, for ``objective="weighted"``.
      key: PRNG key (default ``PRNGKey(0)``); each kernel's keys come from it and its channel.
      mesh: a 1-D mesh of this process's devices (e.g. ``jax.make_mesh((n,), ("kernels",))``;
        default all of them) over which the kernels are split, the model params replicated.
      memory_budget: bytes per device a batch may use when ``batch_size`` is None (default:
        70 % of an accelerator's memory, or of the host's memory shared by its CPU devices).
      batch_size: kernels optimised together per compiled batch (default: as many as fit
        ``memory_budget``).
      per_device: exactly this many kernels per device in every compiled batch, so that a
        kernel's result is bit-identical on any mesh and beside any kernels
        (:func:`kv3d_jax.runner.run`); overrides ``batch_size`` and ``memory_budget``.
      share: under ``jax.distributed``, optimise only this process's share of the channels
        (:func:`kv3d_jax.distribute.process_share`); False when ``channels`` already are its share.
      compute_dtype: the dtype the model runs in (e.g. ``jnp.bfloat16``); the optimised
        parameter, Adam's state and the reported objective stay float32.
      callback: ``callback(steps_done, steps_total, mean_objective)`` after each chunk.

    With several processes (``jax.distributed.initialize``), each process optimises its own
    share of the kernels and returns only those; ``result.channels`` says which.

    Returns:
      A :class:`Stage1Result`. Warns when the objective averages a channel that is linear
      in the input, whose optimum is a flat colour (SPEC §5).
    """
    config = get_preset(config) if isinstance(config, str) else config
    shape, ids, target, linear = checked_targets(model, params, layer, config, channels, weights)
    result = runner.run(problem(model, layer, config, shape, jnp.dtype(compute_dtype)), params, target, ids,
                        config.steps, chunk=config.chunk, key=key, mesh=mesh, memory_budget=memory_budget,
                        batch_size=batch_size, compute_dtype=compute_dtype, callback=callback, per_device=per_device,
                        share=share)
    videos, values = result.outputs
    return Stage1Result(videos=jnp.asarray(videos), objective=jnp.asarray(values), failed=result.failed,
                        channels=result.ids, layer=layer, linear=linear)
