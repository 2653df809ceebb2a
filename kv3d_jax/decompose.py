"""Stage 2: a video as a static texture seen through a displacement field (SPEC §3).

For each video ``V`` (min-max normalised to [0, 1], then shifted by -0.5) find a static
image ``I`` ``(H, W, 3)`` and displacements ``D`` ``(T, H, W, 2)`` in pixels with
``V̂_t(p) = I(p + D_t(p))`` (:func:`kv3d_jax.warp.warp`: bilinear, border clamped),
minimising the SPEC objective

    L = mean (V - V̂)^2 + λ_D TV(D) + λ_I TV(I) + λ_0 mean (I - V_0)^2,

with means over every element and ``TV(x)`` the sum over axes of the mean absolute
difference between neighbours (time, rows and columns for ``D``; rows and columns for
``I``), as in the reference code. All K videos are independent problems, solved at once
in one ``jit``: the optimisation sums the K objectives (so each video's gradient is its
own) and warps all K statics with one flat gather, which XLA runs about twice as fast on
CPU as a ``vmap``-ed one. The cheap initialisation runs video by video (``lax.map``):
batched matmuls round differently for different batch sizes, and Adam turns a last-bit
difference in the start into a full step wherever a TV sign flips, so a ``vmap``-ed
start would make a video's result depend on its batch.

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

Defaults were chosen by measurement on the ground-truth set of ``tests/test_decompose``
(smooth random textures translating at 0.5-2 px/frame in 8 directions plus a still one,
16×64×64; read-out of :func:`kv3d_jax.motion.motion_summary`):

* ``λ_D = 1e-4``: its time-TV term penalises motion itself. At 400 steps ``λ_D = 1e-3``
  understated speeds by up to 7 % (worst direction error 2.2°); ``1e-4`` by under 1.4 %.
  ``1e-5`` lost 2 dB of PSNR at 2 px/frame.
* ``λ_0 = 0.1`` and ``λ_I = 1e-4``: content that enters through the border during the clip
  is in no frame-sized static; a looser anchor to frame 0 and less smoothing let the static's
  edges and the displacement there explain more of it. At 2000 steps the 2 px/frame videos
  reach 30.2 and 31.7 dB, against 29.6 and 30.9 with ``λ_0 = 1``, ``λ_I = 1e-3``; motion is
  unchanged (median direction error 0.18°, worst 0.57°, speeds within 1.3 %). ``λ_I = 1e-2``
  blurs the static enough to cost the still video about 20 dB.
* ``lr_displacement = 0.1``: 0.2 gains as much PSNR but leaves per-pixel velocity noise: the
  still video reads 0.013 px/frame instead of 0.
* 2000 steps (the reference's): motion is within 1° and 1.5 % after 400 steps; the rest
  mostly improves the fit of content entering through the border.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kv3d_jax import distribute
from kv3d_jax.warp import gaussian_blur, pixel_grid, sample, warp, warp_batch


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
    """

    static: jax.Array
    displacement: jax.Array
    reconstruction: jax.Array
    terms: dict
    psnr: jax.Array


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


def _batch_objective(params, videos, config: Config):
    """Per-kernel objectives ``(K,)`` and terms of a batch of parameters."""
    displacement = jax.vmap(_displacement)(params)
    reconstruction = warp_batch(params["static"], displacement)
    return jax.vmap(functools.partial(_objective_terms, config=config))(
        params["static"], displacement, videos, reconstruction
    )


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
    origin = params["origin"][None]
    return jnp.concatenate([origin, origin + jnp.cumsum(params["increments"], axis=0)], axis=0)


def _optimiser(steps: int, config: Config) -> optax.GradientTransformation:
    def adam(lr):
        return optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.01))

    labels = {"static": "static", "origin": "displacement", "increments": "displacement"}
    return optax.multi_transform(
        {"static": adam(config.lr_static), "displacement": adam(config.lr_displacement)}, labels
    )


def _init(video: jax.Array, key: jax.Array, use_key: bool, config: Config):
    normalised, lo, scale = normalise(video)
    static = normalised[0]
    if use_key:
        static = static + config.init_noise * jax.random.normal(key, static.shape, static.dtype)
    displacement = initial_displacement(normalised, config)
    params = {"static": static, "origin": displacement[0], "increments": jnp.diff(displacement, axis=0)}
    return params, normalised, lo, scale


@functools.partial(jax.jit, static_argnames=("use_key", "config", "mesh"))
def _start(videos, keys, use_key: bool, config: Config, mesh):
    def start(videos, keys):
        return jax.lax.map(lambda args: _init(*args, use_key=use_key, config=config), (videos, keys))

    return distribute.per_kernel(start, mesh)(videos, keys)


@functools.partial(jax.jit, static_argnames=("length", "steps", "config", "mesh"))
def _run_chunk(params, state, videos, length: int, steps: int, config: Config, mesh):
    """``length`` Adam steps on every kernel at once, each device on its share of the kernels.

    The objective is summed over kernels, so each kernel's gradient is its own; Adam
    is elementwise, so the kernels stay independent problems.
    """
    optimiser = _optimiser(steps, config)

    def step(carry, _):
        params, state, videos = carry
        grads = jax.grad(lambda p: jnp.sum(_batch_objective(p, videos, config)[0]))(params)
        updates, state = optimiser.update(grads, state, params)
        return (optax.apply_updates(params, updates), state, videos), None

    def run(params, state, videos):
        (params, state, _), _ = jax.lax.scan(step, (params, state, videos), None, length=length)
        return params, state

    return distribute.per_kernel(run, mesh)(params, state, videos)


@functools.partial(jax.jit, static_argnames=("config",))
def _finish(params, videos, normalised, lo, scale, config: Config) -> Decomposition:
    _, terms = _batch_objective(params, normalised, config)
    displacement = jax.vmap(_displacement)(params)
    shape = (-1,) + (1,) * (videos.ndim - 1)
    lo, scale = lo.reshape(shape), scale.reshape(shape)
    reconstruction = warp_batch(params["static"], displacement)
    reconstruction = jnp.clip((reconstruction + 0.5) * scale + lo, 0.0, 1.0)
    static = jnp.clip((params["static"] + 0.5) * scale[:, 0] + lo[:, 0], 0.0, 1.0)
    mse = jnp.mean((reconstruction - videos) ** 2, axis=(1, 2, 3, 4))
    psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))
    return Decomposition(static, displacement, reconstruction, terms, psnr)


def _check_videos(videos) -> jax.Array:
    videos = jnp.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(
            f"decompose needs videos (K, T, H, W, 3); got shape {tuple(videos.shape)}. "
            "Add a leading axis for a single video (videos[None]) and repeat a grey channel 3 times."
        )
    if videos.shape[1] < 2 or videos.shape[2] < 2 or videos.shape[3] < 2:
        raise ValueError(f"decompose needs at least 2 frames of at least 2x2 pixels; got shape {tuple(videos.shape)}")
    if not jnp.issubdtype(videos.dtype, jnp.floating):
        raise ValueError(f"decompose needs float videos in [0, 1]; got dtype {videos.dtype} (divide uint8 by 255)")
    if not bool(jnp.isfinite(videos).all()):
        raise ValueError("decompose got videos with NaN or infinite values; replace them before decomposing")
    return videos.astype(jnp.float32)


def _kernel_keys(key, ids) -> jax.Array:
    """One key per video: a batch of K keys as given, or ``fold_in(key, ids[k])`` of a single key."""
    key = jnp.asarray(key)
    single = key.ndim == (0 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 1)
    if single:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(ids, jnp.uint32))
    if key.shape[0] != len(ids):
        raise ValueError(f"decompose got {key.shape[0]} keys for {len(ids)} videos; pass one key, or one per video")
    return key


def decompose(
    videos,
    steps: int = 2000,
    key: jax.Array | None = None,
    progress: Callable[[int, int], None] | None = None,
    ids=None,
    mesh=None,
    **config,
) -> Decomposition:
    """Decomposes each of ``videos`` ``(K, T, H, W, 3)`` (floats, any range; stage-1
    outputs are in [0, 1]) into a static texture and a displacement field (SPEC §3).

    ``steps`` Adam steps (0 returns the initialisation). ``key``: optional PRNG key, or
    one per video, for an N(0, ``init_noise``²) jitter of the initial static (the
    reference starts from noise; without a key the start is deterministic). A single
    key gives video ``k`` the key ``fold_in(key, ids[k])``; ``ids`` ``(K,)`` ints
    default to ``0..K-1`` (pass e.g. channel indices so that a kernel's result does not
    depend on the batch it was in). ``progress(done, steps)`` is called after every
    compiled chunk. ``mesh``: a 1-D ``"kernels"`` mesh of this process's devices
    (:func:`kv3d_jax.distribute.kernel_mesh`, the default: all of them) over which the videos
    are split, each device optimising its own. ``config``: overrides of :class:`Config`
    fields. Each video's result is independent of the others in the batch.
    """
    try:
        cfg = Config(**config)
    except TypeError:
        valid = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ValueError(f"unknown decompose option(s) {sorted(config)}; valid options are: {valid}") from None
    # A hashable config: it is a static argument of the compiled functions.
    cfg = dataclasses.replace(cfg, init_scales=tuple(float(s) for s in cfg.init_scales))
    if cfg.chunk < 1:
        raise ValueError(f"chunk must be at least 1 step; got {cfg.chunk}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    videos = _check_videos(videos)
    k = videos.shape[0]
    ids = np.arange(k) if ids is None else np.asarray(ids).reshape(-1)
    if len(ids) != k:
        raise ValueError(f"decompose got {len(ids)} ids for {k} videos; pass one id per video")
    mesh = distribute.check_mesh(mesh)
    use_key = key is not None
    # Without a key the init takes no randomness; the placeholder keys keep one compiled signature.
    keys = _kernel_keys(key, ids) if use_key else jax.random.split(jax.random.key(0), k)
    (videos, keys), _ = distribute.pad_kernels((videos, keys), mesh)
    videos, keys = distribute.shard_kernels((videos, keys), mesh)
    params, normalised, lo, scale = _start(videos, keys, use_key, cfg, mesh)
    state = _optimiser(steps, cfg).init(params)
    done = 0
    while done < steps:
        length = min(cfg.chunk, steps - done)
        params, state = _run_chunk(params, state, normalised, length, steps, cfg, mesh)
        done += length
        if progress is not None:
            jax.block_until_ready(params)
            progress(done, steps)
    return jax.tree.map(lambda x: x[:k], _finish(params, videos, normalised, lo, scale, cfg))


__all__ = ["Config", "Decomposition", "decompose", "initial_displacement", "normalise", "objective", "total_variation"]
