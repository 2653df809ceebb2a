"""Stage 3, texture-plus-motion optimisation: each kernel maximised directly over a static image and its displacements.

Stage 2 explains a stage-1 video as ``V_t = warp(I, D_t)``; it does not ask the kernel. This
stage closes the loop: the video is *parameterised* as ``V_t = warp(I, D_t)``
(:mod:`kv3d_jax.parameterizations`) and stage 1's step (:func:`kv3d_jax.maximization.kernel_step`:
same jitter, resize, normalisation and objectives) maximises the kernel's objective over
``I`` and ``D``, minus SPEC §3's regularisers

    λ_D · TV(D) + λ_I · TV(I)        (TV: mean absolute neighbour difference per axis;
                                      D in pixels over time, rows and columns; I in [0, 1]
                                      over rows and columns)

By construction the result is separable into a texture and a motion that the kernel itself
prefers. It starts from a stage-2 :class:`~kv3d_jax.decomposition.Decomposition` (or from
``N(0, 0.01²)`` noise without one) and returns a :class:`Refinement`, which reads like a
decomposition (``static``, ``displacement``, ``reconstruction``, ``psnr``) so that
:func:`kv3d_jax.motion.motion_summary` and the writers take it as they take stage 2's.

Weights are in units of the objective (an activation) per unit of TV, so their effect depends
on the scale of the model's activations: see :class:`Config`.

What the motion may be is :attr:`Config.motion`. By default (``"constant"``, the
``"static_velocity"`` parameterization) every pixel's displacement changes at a constant
velocity, as in a drifting grating. ``"free"`` (``"static_displacement"``) lets each frame's
displacement be anything, which also lets it *resample* ``I`` frame by frame into patterns
that are not motion. How each agrees with the kernels' grating tuning, and how many steps
deep kernels need: docs/refine.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import maximization, objectives, parameterizations, runner
from kv3d_jax.decomposition import Decomposition, psnr, total_variation
from kv3d_jax.maximization import State, kernel_step, mean_std, minmax_normalize, model_input, objective_value
from kv3d_jax.models.base import Params, VideoModel
from kv3d_jax.warp import warp


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
# A constant velocity is reached slowly: docs/refine.md measures how many steps deep kernels need.
DEFAULT_STEPS = 400


@dataclasses.dataclass(frozen=True)
class Config:
    """Regulariser weights, the start and the settings of the refinement.

    The default weights keep the regularisers small beside the objective (docs/refine.md);
    raise them for smoother motion and texture at some cost in objective.

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
      steps: Adam steps (at the stage-1 config's learning rate).
      preset: stage 1's config (:class:`kv3d_jax.maximization.Config` or a preset name): its
        jitter, resize, normalisation, learning rate, objective (``"channel"`` or
        ``"neuron"``), ``rectify`` and, when starting from noise, video shape; its steps,
        chunk and parameterization are not used.
      chunk: at most this many steps per compiled call (progress is reported between chunks).
      texture: how the texture ``I`` is represented
        (:data:`kv3d_jax.parameterizations.TEXTURES`): ``"pixel"``, decorrelated colours per
        pixel, or ``"maco"``, the phase of a spectrum whose amplitude is fixed to the
        natural-image law (:func:`kv3d_jax.parameterizations.maco_texture`; even widths only),
        which starts from a decomposition's texture with its phase kept and its amplitude
        replaced.
    """

    lambda_d: float = 1e-3
    lambda_i: float = 1e-3
    motion: str = "constant"
    start_range: tuple[float, float] = (0.05, 0.95)
    steps: int = DEFAULT_STEPS
    preset: str | maximization.Config = "paper"
    chunk: int = 50
    texture: str = "pixel"

    @property
    def parameterization(self) -> str:
        """The name of the parameterization whose videos this refinement optimises."""
        name = MOTIONS[self.motion].parameterization
        return name if self.texture == "pixel" else f"{self.texture}_{name}"

    @property
    def stage1(self) -> maximization.Config:
        """The stage-1 config :attr:`preset` names."""
        return maximization.get_preset(self.preset) if isinstance(self.preset, str) else self.preset


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
      failed: ``(K,)`` bool, True where the kernel's state or results are not finite.
      channels: ``(K,)`` the channel of each kernel.
      layer: the tapped layer.
    """

    static: jax.Array
    displacement: jax.Array
    video: jax.Array
    objective: jax.Array
    terms: dict
    psnr: jax.Array
    failed: np.ndarray
    channels: np.ndarray = flax.struct.field(pytree_node=False)
    layer: str = flax.struct.field(pytree_node=False)

    @property
    def reconstruction(self) -> jax.Array:
        """The video, which the static and displacement reproduce exactly (stage 2's field name)."""
        return self.video


def penalty(param: dict, config: Config = Config()) -> jax.Array:
    """``λ_D TV(D) + λ_I TV(I)`` of one parameter (SPEC §3's regularisers), ``D`` as ``config.motion`` uses it."""
    return config.lambda_d * _tv_displacement(param, config) + config.lambda_i * _tv_static(param, config)


def used_displacement(param: dict, config: Config = Config()) -> jax.Array:
    """The displacement ``(T, H, W, 2)`` px that the video of ``param`` uses under ``config.motion``."""
    return MOTIONS[config.motion].displacement(param["displacement"])


def _tv_displacement(param: dict, config: Config) -> jax.Array:
    return total_variation(used_displacement(param, config), (0, 1, 2))


def texture(param: dict, config: Config = Config()) -> jax.Array:
    """The texture ``I`` ``(H, W, 3)`` in [0, 1] (before min–max normalisation) of one parameter."""
    return parameterizations.to_valid_rgb(parameterizations.TEXTURES[config.texture](param["static"]))


def _tv_static(param: dict, config: Config) -> jax.Array:
    return total_variation(texture(param, config), (0, 1))


def from_decomposition(decomposition: Decomposition, config: Config = Config()) -> dict:
    """The parameters ``(K, ...)`` of ``config.parameterization`` whose video is ``decomposition``'s
    reconstruction, up to the affine map of the static onto ``config.start_range``; a MACO
    texture keeps the static's phase and takes the natural-image amplitude."""
    lo, hi = config.start_range
    static = lo + (hi - lo) * jnp.clip(jnp.asarray(decomposition.static, jnp.float32), 0.0, 1.0)
    logits = jnp.log(static) - jnp.log1p(-static)
    colours = logits @ jnp.linalg.inv(jnp.asarray(parameterizations.COLOR_DECORRELATION).T)
    if config.texture == "maco":
        colours = parameterizations.maco_texture_phase(colours)
    return {"static": colours, "displacement": jnp.asarray(decomposition.displacement, jnp.float32)}


@functools.lru_cache(maxsize=32)
def problem(model: VideoModel, layer: str, config: Config, shape: tuple[int, int, int], from_start: bool,
            compute_dtype=jnp.float32) -> runner.Problem:
    """Stage 3's per-kernel problem for ``(T, H, W)`` videos.

    Target: ``{"channel": ()}``, with ``from_start`` also ``"start"`` (a parameter of
    :func:`from_decomposition`) and ``"reconstruction"`` ``(T, H, W, 3)`` (the decomposition's,
    for the PSNR). Outputs: ``(static (H, W, 3) in [0, 1], displacement (T, H, W, 2) px, video
    (T, H, W, 3), objective (), terms {name: ()})`` and, with ``from_start``, the PSNR ``()``.
    """
    stage1 = config.stage1
    parameterization = config.parameterization
    to_video = parameterizations.get(parameterization).to_video
    value_fn = objective_value(model, layer, stage1.objective, stage1.rectify, compute_dtype)
    mean, std = mean_std(model, stage1)

    def init(key, target):
        return maximization.initial_state(key, target["channel"], shape, parameterization, stage1.learning_rate)

    def outputs(model_params, state: State):
        value = value_fn(model_params, model_input(to_video(state.param), None, stage1.resize, mean, std),
                         state.target)
        terms = {"objective": value, "tv_displacement": _tv_displacement(state.param, config),
                 "tv_static": _tv_static(state.param, config)}
        terms["total"] = penalty(state.param, config) - value
        displacement = used_displacement(state.param, config)
        static = minmax_normalize(texture(state.param, config)[None])[0]
        return static, displacement, warp(static, displacement), value, terms

    step = kernel_step(model, layer, stage1, parameterization, functools.partial(penalty, config=config),
                       compute_dtype)
    if not from_start:
        return runner.Problem(init, step, outputs, convolves=True)

    # From a decomposition the state is (State, the decomposition's reconstruction), the latter
    # kept for the PSNR only. Adam's initial state holds no parameter values, so it fits the start as well.
    def init_from_start(key, target):
        return init(key, target)._replace(param=target["start"]), target["reconstruction"]

    def step_from_start(model_params, state, key):
        optimised, value = step(model_params, state[0], key)
        return (optimised, state[1]), value

    def outputs_from_start(model_params, state):
        result = outputs(model_params, state[0])
        return result, psnr(result[2][None], state[1][None])[0]

    return runner.Problem(init_from_start, step_from_start, outputs_from_start, convolves=True)


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
    *,
    config: Config = Config(),
    key: jax.Array | None = None,
    mesh=None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    compute_dtype=jnp.float32,
    callback: runner.Callback | None = None,
    per_device: int | None = None,
) -> Refinement:
    """Maximises the objective for each kernel of ``layer`` over a static image and its displacements.

    Args:
      model, params: the video model and its Flax variables.
      layer: one of ``model.layers``.
      decomposition: stage 2's result for the same kernels (anything with ``.static``
        ``(K, H, W, 3)`` in [0, 1], ``.displacement`` ``(K, T, H, W, 2)`` px and
        ``.reconstruction`` ``(K, T, H, W, 3)``, e.g. a :class:`Refinement`), the start of the
        optimisation; None starts from noise.
      channels: the channel of each kernel (default: every channel of the layer).
      config: the refinement's settings and stage 1's (:class:`Config`).
      key: PRNG key (default ``PRNGKey(0)``); each kernel's keys come from it and its
        channel, so its result does not depend on its batch.
      mesh, memory_budget, batch_size, per_device, compute_dtype, callback: as for
        :func:`kv3d_jax.maximize` (``callback(steps_done, steps_total, mean_objective)``).

    From noise under ``jax.distributed``, each process refines its own share of the channels;
    a decomposition is taken to be this process's share already.

    Returns:
      A :class:`Refinement`.
    """
    if not isinstance(config, Config):
        raise ValueError(f"config must be a kv3d_jax.refinement.Config, got {type(config).__name__}")
    stage1 = config.stage1
    if stage1.objective == "weighted":
        raise ValueError("refine takes one channel per kernel: use objective='channel' or 'neuron'")
    objectives.get(stage1.objective)
    if config.motion not in MOTIONS:
        raise ValueError(f"unknown motion {config.motion!r}; valid motions are: {', '.join(MOTIONS)}")
    if config.texture not in parameterizations.TEXTURES:
        raise ValueError(f"unknown texture {config.texture!r}; valid textures are: "
                         + ", ".join(parameterizations.TEXTURES))
    if config.steps < 1:
        raise ValueError(f"steps must be at least 1, got {config.steps}")
    ids = maximization.channel_ids(channels, model.num_channels(params, model.check_layer(layer)), layer)
    if decomposition is None:
        shape = tuple(stage1.shape or model.input_shape)
        target = {"channel": jnp.asarray(ids, jnp.int32)}
    else:
        shape = _decomposition_shape(decomposition, len(ids))
        target = {"channel": jnp.asarray(ids, jnp.int32), "start": from_decomposition(decomposition, config),
                  "reconstruction": jnp.asarray(decomposition.reconstruction, jnp.float32)}
    maximization.check_reachable(model, params, layer, stage1, shape)
    result = runner.run(problem(model, layer, config, shape, decomposition is not None, jnp.dtype(compute_dtype)),
                        params, target, ids, config.steps, chunk=config.chunk, key=key, mesh=mesh,
                        memory_budget=memory_budget, batch_size=batch_size, compute_dtype=compute_dtype,
                        callback=callback, share=decomposition is None, per_device=per_device)
    if decomposition is None:
        outputs, quality = result.outputs, np.full(len(result.ids), np.nan, np.float32)
    else:
        outputs, quality = result.outputs
    static, displacement, video, value, terms = outputs
    return Refinement(static=jnp.asarray(static), displacement=jnp.asarray(displacement), video=jnp.asarray(video),
                      objective=jnp.asarray(value), terms={name: jnp.asarray(v) for name, v in terms.items()},
                      psnr=jnp.asarray(quality), failed=result.failed, channels=result.ids, layer=layer)


__all__ = ["Config", "DEFAULT_STEPS", "MOTIONS", "Motion", "Refinement", "from_decomposition", "penalty", "problem",
           "refine", "texture", "used_displacement"]
