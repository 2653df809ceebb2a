"""Stage 2: a video as a static texture seen through a displacement field (SPEC §3).

For each video ``V`` (min-max normalised to [0, 1], then shifted by -0.5) find a static
image ``I`` ``(H, W, 3)`` and displacements ``D`` ``(T, H, W, 2)`` in pixels with
``V̂_t(p) = I(p + D_t(p))`` (:func:`kv3d_jax.warp.warp`: bilinear, border clamped),
minimising the SPEC objective

    L = mean (V - V̂)^2 + λ_D TV(D) + λ_I TV(I) + λ_0 mean (I - V_0)^2,

with means over every element and ``TV(x)`` the sum over axes of the mean absolute
difference between neighbours (time, rows and columns for ``D``; rows and columns for
``I``), as in the reference code. All K videos are independent problems, solved at once
in one ``jit``. Each video is one kernel of :func:`kv3d_jax.runner.run` (:func:`problem`), which
starts kernels one by one (``lax.map``): batched matmuls round differently for different
batch sizes, and Adam turns a last-bit difference in the start into a full step wherever a
TV sign flips, so a ``vmap``-ed start would make a video's result depend on its batch.

The objective is the SPEC's; the optimisation strategy is ours:

* Initialisation. ``I`` starts as frame 0 (``λ_0`` anchors it there anyway, which fixes
  frame 0 as the reference of ``D``). ``D`` starts from dense coarse-to-fine
  Lucas-Kanade between consecutive frames, composed along time: gradient descent on the
  SPEC loss from ``D = 0`` stalls after a pixel or two, because bilinear sampling only
  sees its neighbourhood, while a video moving 2 px/frame needs ``D_15 = 30`` px.
* Parameterisation. ``D`` is ``D_0`` plus a running sum of per-frame increments
  ``D_{t+1} - D_t`` (minus the velocity), so a step changes one frame's motion rather
  than one frame's position.
* Schedule. Adam with separate learning rates for ``I`` and ``D``, cosine-decayed to 1 %.

Defaults were chosen by measurement on a ground-truth set: docs/decompose.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kv3d_jax import runner
from kv3d_jax.warp import gaussian_blur, pixel_grid, sample, warp


@dataclasses.dataclass(frozen=True)
class Config:
    """Weights (pixel units) and optimisation settings of the decomposition.

    Attributes:
      lambda_d: ``λ_D``, weight of ``TV(D)``, ``D`` in pixels.
      lambda_i: ``λ_I``, weight of ``TV(I)``, ``I`` in normalised intensity.
      lambda_0: ``λ_0``, weight of ``mean (I - V_0)^2``.
      lr_static: Adam learning rate of ``I`` (intensity units).
      lr_displacement: Adam learning rate of ``D_0`` and the increments (pixels).
      init_scales: blur std (px) of each coarse-to-fine Lucas-Kanade level.
      init_iterations: Gauss-Newton iterations per level.
      init_window: std (px) of the Lucas-Kanade window (at least twice the level's blur).
      init_noise: std of the N(0, σ²) jitter added to the initial static when a key is given.
      steps: Adam steps (0: the initialisation).
      chunk: optimisation steps per compiled ``lax.scan`` (progress is reported between chunks).
    """

    lambda_d: float = 1e-4
    lambda_i: float = 1e-4
    lambda_0: float = 0.1
    lr_static: float = 0.01
    lr_displacement: float = 0.1
    init_scales: tuple[float, ...] = (4.0, 2.0, 1.0)
    init_iterations: int = 4
    init_window: float = 4.0
    init_noise: float = 0.01
    steps: int = 2000
    chunk: int = 100


@flax.struct.dataclass
class Decomposition:
    """The decomposition of K videos.

    Attributes:
      static: ``(K, H, W, 3)`` the static texture ``I``, in the input video's intensity
        units (the -0.5 shift and the min-max normalisation undone), clipped to [0, 1].
      displacement: ``(K, T, H, W, 2)`` ``D`` in pixels (``[..., 0] = dx`` right).
      reconstruction: ``(K, T, H, W, 3)`` ``I(p + D_t(p))`` in the input's units, clipped to [0, 1].
      terms: per-kernel ``(K,)`` values of the objective at the end, in normalised units:
        ``"total"``, ``"reconstruction"``, ``"tv_displacement"``, ``"tv_static"``, ``"anchor"``.
      psnr: ``(K,)`` dB of ``reconstruction`` against the input video (peak 1).
      failed: ``(K,)`` bool, True where the video or its decomposition is not finite.
    """

    static: jax.Array
    displacement: jax.Array
    reconstruction: jax.Array
    terms: dict
    psnr: jax.Array
    failed: np.ndarray


def normalise(video: jax.Array):
    """``video`` ``(T, H, W, C)`` min-max normalised to [0, 1] then shifted by -0.5.

    Returns ``(normalised, lo, scale)`` with ``video = (normalised + 0.5) * scale + lo``.
    A constant video maps to -0.5 everywhere.
    """
    lo = jnp.min(video)
    scale = jnp.maximum(jnp.max(video) - lo, 1e-6)
    return (video - lo) / scale - 0.5, lo, scale


def total_variation(x: jax.Array, axes) -> jax.Array:
    """Sum over ``axes`` of the mean absolute difference between neighbours along that axis."""
    return sum(jnp.mean(jnp.abs(jnp.diff(x, axis=a))) for a in axes)


def _objective_terms(static, displacement, video, reconstruction, config: Config):
    terms = {
        "reconstruction": jnp.mean((video - reconstruction) ** 2),
        "tv_displacement": total_variation(displacement, (0, 1, 2)),
        "tv_static": total_variation(static, (0, 1)),
        "anchor": jnp.mean((static - video[0]) ** 2),
    }
    total = (
        terms["reconstruction"]
        + config.lambda_d * terms["tv_displacement"]
        + config.lambda_i * terms["tv_static"]
        + config.lambda_0 * terms["anchor"]
    )
    return total, {"total": total, **terms}


def objective(static: jax.Array, displacement: jax.Array, video: jax.Array, config: Config = Config()):
    """The SPEC §3 loss of one decomposition and its terms.

    ``static`` ``(H, W, 3)`` and ``video`` ``(T, H, W, 3)`` in normalised units (see
    :func:`normalise`), ``displacement`` ``(T, H, W, 2)`` px. Returns ``(total, terms)``.
    """
    return _objective_terms(static, displacement, video, warp(static, displacement), config)


def psnr(reconstruction: jax.Array, videos: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """PSNR (dB, peak 1) of each ``(K, T, H, W, C)`` reconstruction against its video: ``(K,)``.

    ``where``: optional boolean ``(K, T, H, W)``, the pixels to compare (e.g.
    :func:`kv3d_jax.warp.inside` of the displacement: the part of each video that a
    static image of the frame's size can explain at all).
    """
    squared = (reconstruction - videos) ** 2
    axes = tuple(range(1, reconstruction.ndim))
    if where is None:
        mse = jnp.mean(squared, axis=axes)
    else:
        mask = jnp.broadcast_to(jnp.asarray(where, squared.dtype)[..., None], squared.shape)
        mse = jnp.sum(squared * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))


def _image_gradients(image: jax.Array):
    return jnp.gradient(image, axis=1), jnp.gradient(image, axis=0)


def _lucas_kanade(a: jax.Array, b: jax.Array, config: Config) -> jax.Array:
    """Backward flow ``δ`` ``(H, W, 2)`` px with ``b(p) ≈ a(p + δ(p))``, frames ``(H, W, C)``.

    Dense Lucas-Kanade: Gauss-Newton on a Gaussian-windowed least squares, from the
    most blurred level to the sharpest, warping ``a`` by the current estimate.
    """
    h, w, c = a.shape
    grid = pixel_grid(h, w)
    delta = jnp.zeros((h, w, 2), a.dtype)
    for sigma in config.init_scales:
        blurred_a = gaussian_blur(a, sigma)
        blurred_b = gaussian_blur(b, sigma)
        gx, gy = _image_gradients(blurred_a)
        stacked = jnp.concatenate([blurred_a, gx, gy], axis=-1)
        window = max(config.init_window, 2.0 * sigma)
        for _ in range(config.init_iterations):
            warped = sample(stacked, grid + delta)
            wa, wgx, wgy = warped[..., :c], warped[..., c : 2 * c], warped[..., 2 * c :]
            err = blurred_b - wa
            moments = jnp.stack(
                [jnp.sum(p, axis=-1) for p in (wgx * wgx, wgx * wgy, wgy * wgy, wgx * err, wgy * err)], axis=-1
            )
            gxx, gxy, gyy, bx, by = jnp.moveaxis(gaussian_blur(moments, window), -1, 0)
            # Ridge term: where there is no texture the step falls to zero instead of
            # blowing up; along an edge it leaves the normal component.
            ridge = 1e-3 * jnp.mean(gxx + gyy) + 1e-12
            gxx, gyy = gxx + ridge, gyy + ridge
            det = gxx * gyy - gxy**2
            step = jnp.stack([(gyy * bx - gxy * by) / det, (gxx * by - gxy * bx) / det], axis=-1)
            delta = delta + step
    return delta


def initial_displacement(video: jax.Array, config: Config = Config()) -> jax.Array:
    """A first estimate of ``D`` ``(T, H, W, 2)`` px for ``video`` ``(T, H, W, 3)``, frame 0 as reference.

    Lucas-Kanade between consecutive frames gives ``δ_t`` with ``V_{t+1}(p) ≈ V_t(p + δ_t(p))``;
    composing, ``D_{t+1}(p) = δ_t(p) + D_t(p + δ_t(p))`` and ``D_0 = 0``.
    """
    t, h, w, _ = video.shape
    deltas = jax.vmap(functools.partial(_lucas_kanade, config=config))(video[:-1], video[1:])
    grid = pixel_grid(h, w)

    def compose(previous, delta):
        current = delta + sample(previous, grid + delta)
        return current, current

    zero = jnp.zeros((h, w, 2), video.dtype)
    _, rest = jax.lax.scan(compose, zero, deltas)
    return jnp.concatenate([zero[None], rest], axis=0)


def _displacement(params) -> jax.Array:
    # Added frame by frame rather than with cumsum, whose summation order XLA chooses per
    # program: a kernel's displacement must not depend on how many kernels share its device.
    frames = [params["origin"]]
    for increment in params["increments"]:
        frames.append(frames[-1] + increment)
    return jnp.stack(frames)


def _optimiser(steps: int, config: Config) -> optax.GradientTransformation:
    def adam(lr):
        return optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.01))

    labels = {"static": "static", "origin": "displacement", "increments": "displacement"}
    return optax.multi_transform(
        {"static": adam(config.lr_static), "displacement": adam(config.lr_displacement)}, labels
    )


class State(NamedTuple):
    """One video's decomposition in progress.

    Attributes:
      params: ``{"static": (H, W, 3), "origin": (H, W, 2), "increments": (T-1, H, W, 2)}``.
      opt_state: Adam's state.
      video: ``(T, H, W, 3)`` the input video.
      normalised: ``(T, H, W, 3)`` the video as :func:`normalise` maps it.
      lo, scale: ``()`` the affine map undone by the outputs.
    """

    params: dict
    opt_state: Any
    video: jax.Array
    normalised: jax.Array
    lo: jax.Array
    scale: jax.Array


@functools.lru_cache(maxsize=32)
def problem(config: Config, use_key: bool, compute_dtype=jnp.float32) -> runner.Problem:
    """Stage 2's per-kernel problem: target a video ``(T, H, W, 3)``; with ``use_key``, the
    initial static is jittered with the kernel's key. The reconstruction's warp reads the
    static in ``compute_dtype``; parameters, Adam's state and the objective stay float32.

    Outputs: ``(static (H, W, 3), displacement (T, H, W, 2) px, reconstruction (T, H, W, 3),
    terms {name: ()}, psnr ())``, as in :class:`Decomposition`.
    """
    optimiser = _optimiser(config.steps, config)
    dtype = jnp.dtype(compute_dtype)

    def terms(params, normalised):
        displacement = _displacement(params)
        reconstruction = warp(params["static"].astype(dtype), displacement).astype(jnp.float32)
        return _objective_terms(params["static"], displacement, normalised, reconstruction, config)

    def init(key, video):
        normalised, lo, scale = normalise(video)
        static = normalised[0]
        if use_key:
            static = static + config.init_noise * jax.random.normal(key, static.shape, static.dtype)
        displacement = initial_displacement(normalised, config)
        params = {"static": static, "origin": displacement[0], "increments": jnp.diff(displacement, axis=0)}
        return State(params, optimiser.init(params), video, normalised, lo, scale)

    def step(model_params, state, key):
        grads, values = jax.grad(lambda p: terms(p, state.normalised), has_aux=True)(state.params)
        updates, opt_state = optimiser.update(grads, state.opt_state, state.params)
        return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), values["total"]

    def outputs(model_params, state):
        _, values = terms(state.params, state.normalised)
        displacement = _displacement(state.params)
        reconstruction = warp(state.params["static"], displacement)
        reconstruction = jnp.clip((reconstruction + 0.5) * state.scale + state.lo, 0.0, 1.0)
        static = jnp.clip((state.params["static"] + 0.5) * state.scale + state.lo, 0.0, 1.0)
        return static, displacement, reconstruction, values, psnr(reconstruction[None], state.video[None])[0]

    return runner.Problem(init, step, outputs)


def _check_videos(videos) -> jax.Array:
    videos = jnp.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(
            f"decompose needs videos (K, T, H, W, 3); got shape {tuple(videos.shape)}. "
            "Add a leading axis for a single video (videos[None]) and repeat a grey channel 3 times."
        )
    if videos.shape[0] == 0:
        raise ValueError("decompose got no videos: pass at least one, (K, T, H, W, 3) with K >= 1")
    if videos.shape[1] < 2 or videos.shape[2] < 2 or videos.shape[3] < 2:
        raise ValueError(f"decompose needs at least 2 frames of at least 2x2 pixels; got shape {tuple(videos.shape)}")
    if not jnp.issubdtype(videos.dtype, jnp.floating):
        raise ValueError(f"decompose needs float videos in [0, 1]; got dtype {videos.dtype} (divide uint8 by 255)")
    return videos.astype(jnp.float32)


def decompose(
    videos,
    ids=None,
    *,
    config: Config = Config(),
    key: jax.Array | None = None,
    mesh=None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    compute_dtype=jnp.float32,
    callback: runner.Callback | None = None,
    per_device: int | None = None,
) -> Decomposition:
    """Decomposes each of ``videos`` ``(K, T, H, W, 3)`` (floats, any range; stage-1
    outputs are in [0, 1]) into a static texture and a displacement field (SPEC §3).

    Args:
      videos: ``(K, T, H, W, 3)``; a video with a non-finite value is decomposed as failed
        (``result.failed``) and changes no other video's result.
      ids: ``(K,)`` ints naming the videos (default ``0..K-1``; pass e.g. channel indices so
        that a kernel's result does not depend on the batch it was in).
      config: the objective's weights and the optimisation's settings (:class:`Config`).
      key: optional PRNG key, or one per video, for an N(0, ``init_noise``²) jitter of the
        initial static (the reference starts from noise; without a key the start is
        deterministic). A single key gives video ``k`` the key ``fold_in(key, ids[k])``.
      mesh, memory_budget, batch_size, per_device, callback: as for :func:`kv3d_jax.maximize`
        (``callback(steps_done, steps_total, mean_loss)``).
      compute_dtype: the dtype the reconstruction reads the static in.

    The videos are this process's: under ``jax.distributed`` nothing is split between
    processes. Each video's result is independent of the others in the batch.
    """
    if not isinstance(config, Config):
        raise ValueError(f"config must be a kv3d_jax.decomposition.Config, got {type(config).__name__}")
    # A hashable config: it is part of the cached problem.
    config = dataclasses.replace(config, init_scales=tuple(float(s) for s in config.init_scales))
    videos = _check_videos(videos)
    k = videos.shape[0]
    ids = np.arange(k) if ids is None else np.asarray(ids).reshape(-1)
    if len(ids) != k:
        raise ValueError(f"decompose got {len(ids)} ids for {k} videos; pass one id per video")
    result = runner.run(problem(config, key is not None, jnp.dtype(compute_dtype)), {}, videos, ids, config.steps,
                        chunk=config.chunk, key=key, mesh=mesh, memory_budget=memory_budget, batch_size=batch_size,
                        callback=callback, share=False, per_device=per_device)
    static, displacement, reconstruction, terms, quality = result.outputs
    return Decomposition(jnp.asarray(static), jnp.asarray(displacement), jnp.asarray(reconstruction),
                         {name: jnp.asarray(value) for name, value in terms.items()}, jnp.asarray(quality),
                         result.failed)


__all__ = ["Config", "Decomposition", "decompose", "initial_displacement", "normalise", "objective", "problem", "psnr",
           "total_variation"]
