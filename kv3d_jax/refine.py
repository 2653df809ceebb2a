"""Texture-plus-motion optimisation: each kernel maximised directly over a static image and its displacements.

Stage 2 explains a stage-1 video as ``V_t = warp(I, D_t)``; it does not ask the kernel. This
stage closes the loop: the video is *parameterised* as ``V_t = warp(I, D_t)``
(:mod:`kv3d_jax.parameterizations`) and stage 1's optimiser (:func:`kv3d_jax.maximize.make_step`:
same presets, jitter, resize and objectives) maximises the kernel's objective over ``I`` and
``D``, minus SPEC §3's regularisers

    λ_D · TV(D) + λ_I · TV(I)        (TV: mean absolute neighbour difference per axis;
                                      D in pixels over time, rows and columns; I in [0, 1]
                                      over rows and columns)

By construction the result is separable into a texture and a motion that the kernel itself
prefers. It starts from a stage-2 :class:`~kv3d_jax.decompose.Decomposition` (or from
``N(0, 0.01²)`` noise without one) and returns a :class:`Refinement`, which reads like a
decomposition (``static``, ``displacement``, ``reconstruction``, ``psnr``) so that
:func:`kv3d_jax.motion.motion_summary` and the writers take it as they take stage 2's.

Weights are in units of the objective (an activation) per unit of TV, so their effect depends
on the scale of the model's activations: see :class:`Config`.

What the motion may be is :attr:`Config.motion`. By default (``"constant"``, the
``"static_velocity"`` parameterization) every pixel's displacement changes at a constant
velocity, as in a drifting grating. ``"free"`` (``"static_displacement"``) lets each frame's
displacement be anything, which also lets it *resample* ``I`` frame by frame into patterns
that are not motion; measured, its motion drifts away from the direction the kernel prefers
in gratings the longer it runs (conv4 below: 26.9° after 50 steps, 33.3° after 200).

On the embedded MotionNet's direction-selective channels, the median angular difference
between the refined dominant direction and the grating-preferred one (the default job's
decompositions; ``kv3d visualize --layer conv3 --layer conv4 --refine`` then ``kv3d agreement
--stage refined``; ``"free"`` was measured at 200 steps, where it had already drifted):

    ============  =======  ============  ==============  ===========================
    layer (DS)    stage 2  free (200)    constant (400)  constant closer than stage 2
    ============  =======  ============  ==============  ===========================
    conv3 (64)    39.0°    41.6°         32.1°           44 of 64
    conv4 (40)    27.0°    33.3°         27.1°           22 of 40
    both (104)    34.8°    39.7°         31.7°           66 of 104
    ============  =======  ============  ==============  ===========================

Most of ``"constant"``'s gain is the fit itself: the constant-velocity fit of stage 2's
displacement, before any step, reads 33.3° (conv3) and 28.5° (conv4); the refinement then
moves it 1.2° and 1.4° closer to the gratings, where ``"free"`` moves away from them.

On C3D with random weights (``scripts/measure_refine.py c3d``: 4 channels per layer, native
preset at 8×32×32, 100 stage-1 steps), 400 ``"constant"`` steps bring every kernel to at
least 99 % of its stage-1 objective (conv5b channel 1; every other kernel ends above it, by
11 % or more where it is positive; the layers' summed objectives reach 1.2-2.5 times stage
1's). A constant velocity is reached slowly: after 100 steps some deep kernels were well
below (conv5b channel 1: 17 %, conv5a channel 2: 58 %). Each kernel's dominant direction
stays within a median 2.3° (at most 34°) of its start, the constant-velocity fit of stage
2's displacement. That fit can read a long way from stage 2's own direction (median 17°, up
to 172° on conv2): these displacements are no steady motion (the fit keeps less than half
of stage 2's speed for most kernels), and the two weight their small net drift differently
(every frame alike in stage 2's read-out, the middle frames most in the fit's velocity).
``"free"`` brings every kernel above its stage-1 objective within 100 steps and stays within
a median 3.9° of stage 2's direction; choose it where the objective matters more than a
motion one can read.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import objectives, parameterizations
from kv3d_jax.decompose import Decomposition, total_variation
from kv3d_jax.maximize import (
    Preset,
    mean_std,
    get_preset,
    init_state,
    kernel_keys,
    make_step,
    minmax_normalize,
    model_input,
    objective_value,
    scan_steps,
)
from kv3d_jax.models.base import Params, VideoModel
from kv3d_jax.warp import warp_batch


class Motion(NamedTuple):
    """What a refinement's motion may be.

    Attributes:
      parameterization: the name of the parameterization whose videos move so.
      displacement: maps the parameter's ``"displacement"`` ``(T, H, W, 2)`` px to the one
        its video uses (same shape and units).
    """

    parameterization: str
    displacement: Callable[[jax.Array], jax.Array]


# Config.motion -> the Motion.
MOTIONS = {"constant": Motion("static_velocity", parameterizations.constant_velocity),
           "free": Motion("static_displacement", lambda displacement: displacement)}
# A constant velocity is reached slowly: on C3D (random weights, 8x32x32) the deepest kernels
# need about 400 steps to regain their stage-1 objective (conv5b channel 1: 17 % after 100,
# 48 % after 200, 99 % after 400). Starting from noise, use the stage-1 preset's steps.
DEFAULT_STEPS = 400


@dataclasses.dataclass(frozen=True)
class Config:
    """Regulariser weights and the start of the refinement.

    The default weights keep the regularisers small beside the objective: on C3D (random
    weights, conv2, 8x32x32) the default refinement ends with TV(D) ≈ 3-5 px and
    TV(I) ≈ 0.3-0.8 against objectives of 80-220, so they smooth ties rather than trade
    against the kernel's preference. Raise them for smoother motion and texture at some cost
    in objective.

    Attributes:
      lambda_d: ``λ_D``, weight of ``TV(D)`` with ``D`` in pixels (time, rows, columns).
      lambda_i: ``λ_I``, weight of ``TV(I)`` with ``I`` in [0, 1] (rows, columns).
      motion: ``"constant"``: each pixel's displacement changes at a constant velocity
        (the least-squares fit of ``D``, :func:`kv3d_jax.parameterizations.constant_velocity`,
        is what the video, the regulariser and the result use); ``"free"``: any
        displacement per frame.
      start_range: a decomposition's static (in [0, 1]) is mapped affinely onto this
        range before it is inverted through the sigmoid: a value of exactly 0 or 1 has
        no finite parameter, and one near them would sit where the sigmoid is flat.
    """

    lambda_d: float = 1e-3
    lambda_i: float = 1e-3
    motion: str = "constant"
    start_range: tuple[float, float] = (0.05, 0.95)


@flax.struct.dataclass
class Refinement:
    """What the refinement found for K kernels of one layer; reads like a :class:`Decomposition`.

    Attributes:
      static: ``(K, H, W, 3)`` the texture ``I``, min–max normalised to [0, 1].
      displacement: ``(K, T, H, W, 2)`` ``D`` in pixels (``[..., 0] = dx`` right).
      video: ``(K, T, H, W, 3)`` ``warp(static, displacement)``: the optimised video, in
        ``static``'s units (the normalisation is affine, so the identity holds exactly).
      objective: ``(K,)`` the objective of each final video (before the normalisation,
        without jitter), as an activation.
      terms: per-kernel ``(K,)`` values at the end: ``"objective"``, ``"tv_displacement"``,
        ``"tv_static"`` and ``"total"`` (the minimised loss, without jitter).
      psnr: ``(K,)`` dB of ``video`` against the decomposition's reconstruction: how far
        the refinement moved it. NaN when started from noise.
      channels: ``(K,)`` the channel of each kernel.
      layer: the tapped layer.
    """

    static: jax.Array
    displacement: jax.Array
    video: jax.Array
    objective: jax.Array
    terms: dict
    psnr: jax.Array
    channels: np.ndarray = flax.struct.field(pytree_node=False)
    layer: str = flax.struct.field(pytree_node=False)

    @property
    def reconstruction(self) -> jax.Array:
        """The video, which the static and displacement reproduce exactly (stage 2's field name)."""
        return self.video


def penalty(param: dict, config: Config = Config()) -> jax.Array:
    """``λ_D TV(D) + λ_I TV(I)`` of one parameter (SPEC §3's regularisers), ``D`` as ``config.motion`` uses it."""
    return config.lambda_d * _tv_displacement(param, config) + config.lambda_i * _tv_static(param)


def used_displacement(param: dict, config: Config = Config()) -> jax.Array:
    """The displacement ``(T, H, W, 2)`` px that the video of ``param`` uses under ``config.motion``."""
    return MOTIONS[config.motion].displacement(param["displacement"])


def _tv_displacement(param: dict, config: Config) -> jax.Array:
    return total_variation(used_displacement(param, config), (0, 1, 2))


def _tv_static(param: dict) -> jax.Array:
    return total_variation(parameterizations.to_valid_rgb(param["static"]), (0, 1))


def from_decomposition(decomposition: Decomposition, config: Config = Config()) -> dict:
    """The ``"static_displacement"`` parameters ``(K, ...)`` whose video is ``decomposition``'s
    reconstruction, up to the affine map of the static onto ``config.start_range``."""
    lo, hi = config.start_range
    static = lo + (hi - lo) * jnp.clip(jnp.asarray(decomposition.static, jnp.float32), 0.0, 1.0)
    logits = jnp.log(static) - jnp.log1p(-static)
    colours = logits @ jnp.linalg.inv(jnp.asarray(parameterizations.COLOR_DECORRELATION).T)
    return {"static": colours, "displacement": jnp.asarray(decomposition.displacement, jnp.float32)}


@functools.lru_cache(maxsize=32)
def _compiled(model, layer, preset, objective, rectify, config, chunk):
    """Jitted ``run(model_params, state, run_keys, start)`` (``chunk`` steps) and
    ``evaluate(model_params, param, target) -> (displacement, static, objective, terms)``."""
    parameterization = MOTIONS[config.motion].parameterization
    to_video = parameterizations.get(parameterization).to_video
    step = make_step(model, layer, preset, parameterization, objective, rectify,
                     penalty=functools.partial(penalty, config=config))
    value_fn = objective_value(model, layer, objective, rectify)
    mean, std = mean_std(model, preset)

    def evaluate_one(model_params, param, target):
        video = to_video(param)
        value = value_fn(model_params, model_input(video, None, preset.resize, mean, std), target)
        terms = {"objective": value, "tv_displacement": _tv_displacement(param, config),
                 "tv_static": _tv_static(param)}
        terms["total"] = penalty(param, config) - value
        return used_displacement(param, config), parameterizations.to_valid_rgb(param["static"]), value, terms

    return jax.jit(scan_steps(step, chunk)), jax.jit(jax.vmap(evaluate_one, in_axes=(None, 0, 0)))


def _chunk_length(steps: int, chunk: int) -> int:
    """The largest divisor of ``steps`` not above ``chunk``: every chunk then has one compiled length."""
    return max(d for d in range(1, min(steps, chunk) + 1) if steps % d == 0)


def _decomposition_shape(decomposition, k: int) -> tuple[int, int, int]:
    """The ``(T, H, W)`` of ``decomposition``'s videos, after checking it holds ``k`` kernels."""
    static = getattr(decomposition, "static", None)
    displacement = getattr(decomposition, "displacement", None)
    if static is None or displacement is None:
        raise ValueError("refine needs a decomposition with .static (K, H, W, 3) and .displacement (K, T, H, W, 2), "
                         f"such as kv3d_jax.decompose's result; got {type(decomposition).__name__}")
    if (static.ndim != 4 or static.shape[-1] != 3 or displacement.ndim != 5
            or displacement.shape[:1] + displacement.shape[2:] != static.shape[:3] + (2,)):
        raise ValueError(f"the decomposition's static {tuple(static.shape)} and displacement "
                         f"{tuple(displacement.shape)} do not match: need (K, H, W, 3) and (K, T, H, W, 2)")
    if static.shape[0] != k:
        raise ValueError(f"the decomposition holds {static.shape[0]} kernels but {k} channels were named; "
                         "pass the channels it was computed for")
    return tuple(displacement.shape[1:4])


def refine(
    model: VideoModel,
    params: Params,
    layer: str,
    decomposition: Decomposition | None = None,
    channels=None,
    steps: int = DEFAULT_STEPS,
    key: jax.Array | None = None,
    *,
    preset: str | Preset = "paper",
    objective: str = "channel",
    rectify: bool = False,
    shape: tuple[int, int, int] | None = None,
    config: Config = Config(),
    batch_size: int | None = None,
    chunk: int = 50,
    callback: Callable[[int, int, float], None] | None = None,
) -> Refinement:
    """Maximises ``objective`` for each kernel of ``layer`` over a static image and its displacements.

    Args:
      model, params: the video model and its Flax variables.
      layer: one of ``model.layers``.
      decomposition: stage 2's result for the same kernels (anything with ``.static``
        ``(K, H, W, 3)`` in [0, 1] and ``.displacement`` ``(K, T, H, W, 2)`` px, e.g. a
        :class:`Refinement`), the start of the optimisation; None starts from noise.
      channels: the channel of each kernel (default: every channel of the layer).
      steps: Adam steps (at the preset's learning rate).
      key: PRNG key (default ``PRNGKey(0)``); each kernel's keys come from it and its
        channel (:func:`kv3d_jax.maximize.kernel_keys`), so its result does not depend
        on its batch.
      preset: stage 1's preset (a name in :data:`kv3d_jax.maximize.PRESETS` or a
        :class:`~kv3d_jax.maximize.Preset`): its jitter, resize, normalisation and
        learning rate; its number of steps is not used.
      objective, rectify: as for :func:`kv3d_jax.maximize.maximize` (``"channel"`` or ``"neuron"``).
      shape: the video's ``(T, H, W)`` when starting from noise (default the preset's,
        else the model's input size); a decomposition fixes its own.
      config: regulariser weights and start (:class:`Config`).
      batch_size: kernels optimised together per compiled batch (default: all).
      chunk: at most this many steps per compiled call.
      callback: called after each chunk with ``(steps_done, steps_total, mean_objective)``.

    Returns:
      A :class:`Refinement`.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    model.check_layer(layer)
    if objective == "weighted":
        raise ValueError("refine takes one channel per kernel: use objective='channel' or 'neuron'")
    objectives.get(objective)
    if config.motion not in MOTIONS:
        raise ValueError(f"unknown motion {config.motion!r}; valid motions are: {', '.join(MOTIONS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num = model.num_channels(params, layer)
    ids = np.arange(num) if channels is None else np.asarray(channels, dtype=np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= num)]
    if bad.size or ids.size == 0:
        raise ValueError(f"{layer} has channels 0..{num - 1}; got {bad.tolist() or 'none'}")
    if decomposition is None:
        shape = tuple(shape or preset.shape or model.input_shape)
    else:
        shape = _decomposition_shape(decomposition, len(ids))
    *reached, _ = model.output_shape(params, layer, preset.resize or shape)
    if min(reached) < 1:
        raise ValueError(f"a {preset.resize or shape} clip is too small to reach {layer} (its output would be "
                         f"{tuple(reached)}); use a larger shape")

    key = jax.random.PRNGKey(0) if key is None else key
    init_keys, run_keys = kernel_keys(key, ids)
    start = None if decomposition is None else from_decomposition(decomposition, config)
    target = jnp.asarray(ids, jnp.int32)

    k = len(ids)
    batch = k if batch_size is None else min(batch_size, k)
    n = _chunk_length(steps, chunk)
    run, evaluate = _compiled(model, layer, preset, objective, rectify, config, n)
    total, done = steps * (-(-k // batch)), 0
    outputs = []
    for lo in range(0, k, batch):
        # Pad the last batch with copies of its last kernel: one compiled shape for all.
        index = np.minimum(np.arange(lo, lo + batch), k - 1)
        keep = min(batch, k - lo)
        state = init_state(init_keys[index], target[index], shape, MOTIONS[config.motion].parameterization,
                           preset.learning_rate)
        if start is not None:
            # Adam's initial state holds no parameter values, so it fits the decomposition's start as well.
            state = state._replace(param=jax.tree.map(lambda leaf: leaf[index], start))
        for first in range(0, steps, n):
            state, metrics = run(params, state, run_keys[index], jnp.uint32(first))
            done += n
            if callback is not None:
                callback(done, total, float(jnp.mean(metrics[-1, :keep])))
        outputs.append(jax.tree.map(lambda leaf: leaf[:keep], evaluate(params, state.param, state.target)))
    displacement, static, value, terms = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *outputs)
    return _result(static, displacement, value, terms, decomposition, ids, layer)


def _result(static, displacement, value, terms, decomposition, ids, layer) -> Refinement:
    """Normalises each static onto [0, 1] and warps it: the video in the same units, exactly."""
    static = minmax_normalize(static[:, None])[:, 0]
    video = warp_batch(static, displacement)
    if decomposition is None:
        psnr = jnp.full((len(ids),), jnp.nan, jnp.float32)
    else:
        mse = jnp.mean((video - jnp.asarray(decomposition.reconstruction)) ** 2, axis=(1, 2, 3, 4))
        psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))
    return Refinement(static=static, displacement=displacement, video=video, objective=value, terms=terms,
                      psnr=psnr, channels=ids, layer=layer)


__all__ = ["Config", "DEFAULT_STEPS", "MOTIONS", "Motion", "Refinement", "from_decomposition", "penalty", "refine",
           "used_displacement"]
