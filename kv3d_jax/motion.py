"""Motion read-out of a decomposition: velocity fields, the dominant motion and whether it can be
trusted (SPEC §1, §4).

Two readings of one decomposition:

* the velocity field ``u_t = -(D_{t+1} - D_t)``, where each pixel's content moves, drawn
  in the motion pictures where it is observable (:func:`observability`);
* the dominant motion (:func:`translation`): the one velocity ``v`` that best carries
  each frame of the reconstruction onto the next. Periodic content lets a decomposition
  explain a video with displacements that differ by whole periods (temporal aliases):
  on the optimal videos of MotionNet its velocity field reads 5-20 px/frame where the
  video drifts by 1-2. The reconstruction's frame-to-frame change is what the video
  shows, so the dominant direction and speed are read from it. On a rigidly moving
  texture both readings agree.

The summary also says how much of the frames' change the translation explains
(:func:`explained`) and whether the speed can be told from its temporal alias
(:func:`aliased`); with stage 1's objective and a random-video baseline it scores each
kernel's reliability (:mod:`kv3d_jax.reliability`).

Observability weights each velocity of the field:

* texture: each pixel is weighted by the gradient energy of the static at its sample
  point (``|∇I|²`` summed over channels, smoothed by a 1 px Gaussian). On a flat patch
  any displacement reconstructs equally well, so its velocity says nothing;
* inside: both sample points ``p + D_t(p)`` and ``p + D_{t+1}(p)`` lie at least
  ``margin`` px inside the image. Content that entered through the border has no true
  sample point in the static; the optimiser still fits it, mostly by sliding its sample
  points along the clamped border to pick matching edge colours, and those velocities
  are not motion;
* border band: pixels within ``border`` px of the frame edge are dropped, where image
  gradients are one-sided and the fit has support on one side only.

If a video has no texture at all, the weights fall back to uniform over the pixels that
pass the other two tests.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from kv3d_jax import reliability as trust
from kv3d_jax.decomposition import Decomposition, psnr
from kv3d_jax.warp import gaussian_blur, inside, pixel_grid, sample, warp

# Coarse-to-fine blurs (px) and Gauss-Newton iterations per blur of :func:`translation`.
SCALES = (2.0, 1.0, 0.0)
ITERATIONS = 8
# Share of the frames' strongest gradient direction (an eigenvalue ratio of their structure
# tensor) below which a direction counts as unconstrained. Along a grating's stripes (the aperture
# problem) only resampling and edge effects pull; a read-out that followed them turned drifting
# gratings by a median of 41 degrees (docs/readout.md).
APERTURE = 1e-2
# Temporal frequency (cycles/frame) of the dominant pattern from which a speed is ambiguous:
# 0.5 is the Nyquist limit, and near it a shift and its alias differ by little.
ALIAS_FREQUENCY = 0.4
# Share of a static's power in its dominant pattern (:func:`periodicity`) from which the content
# counts as periodic; only periodic content has temporal aliases.
PERIODIC_SHARE = 0.5


@flax.struct.dataclass
class MotionSummary:
    """Per-kernel motion read-out.

    Attributes:
      direction_deg: ``(K,)`` dominant direction, degrees, 0° = right, 90° = up on
        screen, in [0, 360): the direction of :attr:`translation`; NaN for a still video.
      speed: ``(K,)`` ``|translation|`` px/frame; NaN where ``aliased`` (ambiguous).
      psnr: ``(K,)`` dB of the reconstruction against the video (peak 1).
      translation: ``(K, 2)`` dominant velocity ``(vx, vy)`` px/frame, ``vy`` downwards.
      explained: ``(K,)`` fraction of the frames' change the translation explains, in [0, 1].
      period: ``(K,)`` px between crests of the static's dominant pattern along the
        motion (inf where the motion runs along its crests or there is no pattern).
      aliased: ``(K,)`` bool, the speed cannot be told from a temporal alias.
      reliability: ``(K,)`` in [0, 1] (:func:`kv3d_jax.reliability.score`).
      reliable: ``(K,)`` bool, ``reliability >= RELIABLE``.
      field_direction_deg: ``(K,)`` SPEC §4's direction: the magnitude-weighted circular mean
        of the velocity field, observability-weighted; it differs from ``direction_deg`` where
        the field is a temporal alias of the video's motion.
      velocity: ``(K, T-1, H, W, 2)`` per-frame content velocity, px/frame.
      weight: ``(K, T-1, H, W)`` observability weight of each velocity (see module doc).
    """

    direction_deg: jax.Array
    speed: jax.Array
    psnr: jax.Array
    translation: jax.Array
    explained: jax.Array
    period: jax.Array
    aliased: jax.Array
    reliability: jax.Array
    reliable: jax.Array
    field_direction_deg: jax.Array
    velocity: jax.Array
    weight: jax.Array


def velocity(displacement: jax.Array) -> jax.Array:
    """Content velocity ``u_t = -(D_{t+1} - D_t)`` px/frame: ``(..., T, H, W, 2) -> (..., T-1, H, W, 2)``."""
    return -jnp.diff(displacement, axis=-4)


def direction_deg(vx: jax.Array, vy: jax.Array) -> jax.Array:
    """Screen direction of ``(vx, vy)`` (``vy`` downwards) in degrees, 0° = right, 90° = up, in [0, 360)."""
    return jnp.mod(jnp.degrees(jnp.arctan2(-vy, vx)), 360.0)


def observability(static: jax.Array, displacement: jax.Array, border: int = 2, margin: float = 2.0) -> jax.Array:
    """Weight ``(T-1, H, W)`` of each velocity of one decomposition (see module doc).

    ``static`` ``(H, W, 3)``, ``displacement`` ``(T, H, W, 2)`` px; ``border``: width of
    the ignored band of the frame, px; ``margin``: how far inside the image sample
    points must lie, px.
    """
    gy, gx = jnp.gradient(static, axis=(0, 1))
    energy = gaussian_blur(jnp.sum(gx**2 + gy**2, axis=-1, keepdims=True), 1.0)
    texture = warp(energy, displacement)[:-1, ..., 0]
    valid = inside(displacement[:-1], margin) & inside(displacement[1:], margin)
    valid = valid & _interior(*static.shape[:2], border)
    # A floor relative to the strongest texture keeps a flat video's weights uniform
    # instead of all zero.
    floor = 1e-6 * jnp.max(texture) + 1e-30
    return jnp.where(valid, texture + floor, 0.0)


def _interior(h: int, w: int, border: int) -> jax.Array:
    rows = (jnp.arange(h) >= border) & (jnp.arange(h) < h - border)
    cols = (jnp.arange(w) >= border) & (jnp.arange(w) < w - border)
    return rows[:, None] & cols[None, :]


def _unit_range(video: jax.Array) -> jax.Array:
    lo, hi = jnp.min(video), jnp.max(video)
    return (video - lo) / jnp.maximum(hi - lo, 1e-12)


def translation(video: jax.Array, border: int = 2) -> jax.Array:
    """The velocity ``(vx, vy)`` px/frame (``vy`` downwards) that best carries each frame of
    ``video`` ``(T, H, W, C)`` onto the next: ``V_{t+1}(p + v) ≈ V_t(p)`` in least squares over
    all frame pairs and the pixels at least ``border`` px inside the frame.

    Gauss-Newton from ``v = 0``, coarse to fine over the blurs :data:`SCALES`, each step
    at most 1 px per axis, so it settles on the smallest motion consistent with the frames. A
    direction the frames do not constrain (:data:`APERTURE`) gets no motion: a drifting grating
    reads its normal velocity, across its stripes.
    """
    t, h, w, c = video.shape
    frames = _unit_range(video)
    grid = pixel_grid(h, w)
    mask = _interior(h, w, border)[None, :, :, None].astype(video.dtype)
    v = jnp.zeros(2, video.dtype)
    for sigma in SCALES:
        blurred = gaussian_blur(frames, sigma)
        before, after = blurred[:-1], blurred[1:]
        stacked = jnp.concatenate([after, *_gradient(after)], axis=-1)

        def step(v, _, before=before, stacked=stacked):
            moved = jax.vmap(lambda frame: sample(frame, grid + v))(stacked)
            value, jx, jy = moved[..., :c], moved[..., c:2 * c], moved[..., 2 * c:]
            residual = (value - before) * mask
            sxx, sxy, syy = jnp.sum(jx * jx * mask), jnp.sum(jx * jy * mask), jnp.sum(jy * jy * mask)
            b = -jnp.stack([jnp.sum(jx * residual), jnp.sum(jy * residual)])
            return _constrained_step(jnp.array([[sxx, sxy], [sxy, syy]]), b, v), None

        v, _ = jax.lax.scan(step, v, None, length=ITERATIONS)
    return v


def _gradient(frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(d/dx, d/dy)`` of ``frames`` ``(T, H, W, C)`` per px: five-point central differences,
    edge-clamped. The three-point ones shrink a grating's gradient unequally along the two axes
    (to 65 % along x and 99 % along y for stripes 4 px apart at 10 degrees), turning its normal."""
    pad = jnp.pad(frames, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    rows, cols = pad[:, 2:-2], pad[:, :, 2:-2]
    gx = (rows[:, :, :-4] - 8 * rows[:, :, 1:-3] + 8 * rows[:, :, 3:-1] - rows[:, :, 4:]) / 12
    gy = (cols[:, :-4] - 8 * cols[:, 1:-3] + 8 * cols[:, 3:-1] - cols[:, 4:]) / 12
    return gx, gy


def _constrained_step(structure: jax.Array, b: jax.Array, v: jax.Array) -> jax.Array:
    """One Gauss-Newton step from ``v`` ``(2,)`` with the structure tensor ``structure`` ``(2, 2)``
    and ``b = -J^T r`` ``(2,)``: solved, and ``v`` kept, only along the eigenvectors whose
    eigenvalue is at least :data:`APERTURE` of the largest; the step clipped to 1 px per axis."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(structure)
    constrained = eigenvalues >= APERTURE * eigenvalues[-1] + 1e-12
    delta = eigenvectors @ jnp.where(constrained, (eigenvectors.T @ b) / jnp.where(constrained, eigenvalues, 1.0), 0.0)
    return eigenvectors @ jnp.where(constrained, eigenvectors.T @ v, 0.0) + jnp.clip(delta, -1.0, 1.0)


def explained(video: jax.Array, v: jax.Array, border: int = 2) -> jax.Array:
    """Fraction ``()`` of the frame-to-frame change of ``video`` ``(T, H, W, C)`` that moving each
    frame by ``v`` px/frame explains: ``1 - Σ(V_{t+1}(p + v) - V_t(p))² / Σ(V_{t+1}(p) - V_t(p))²``
    over the pixels ``border`` px inside, clipped to [0, 1]; 0 for a still video."""
    h, w = video.shape[1:3]
    frames = _unit_range(video)
    mask = _interior(h, w, border)[None, :, :, None]
    moved = jax.vmap(lambda frame: sample(frame, pixel_grid(h, w) + v))(frames[1:])
    left = jnp.sum(jnp.where(mask, (moved - frames[:-1]) ** 2, 0.0))
    change = jnp.sum(jnp.where(mask, (frames[1:] - frames[:-1]) ** 2, 0.0))
    return jnp.where(change > 1e-12, jnp.clip(1.0 - left / jnp.maximum(change, 1e-12), 0.0, 1.0), 0.0)


def _pattern(static: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The dominant pattern of ``static`` ``(H, W, C)``: its wavevector ``(kx, ky)`` cycles/px and
    the share (0-1) of power within one frequency bin of it, from one power spectrum of the
    channel mean (mean removed, Hann-windowed)."""
    h, w = static.shape[:2]
    image = jnp.mean(static, axis=-1)
    window = jnp.outer(jnp.hanning(h), jnp.hanning(w))
    power = jnp.abs(jnp.fft.fft2((image - jnp.mean(image)) * window)) ** 2
    peak = jnp.argmax(power)
    py, px = peak // w, peak % w
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]

    def near(y, x):
        dy, dx = jnp.abs(rows - y) % h, jnp.abs(cols - x) % w
        return (jnp.minimum(dy, h - dy) <= 1) & (jnp.minimum(dx, w - dx) <= 1)

    # A real image's spectrum is symmetric: the pattern's power sits at the peak and its mirror.
    around = near(py, px) | near(-py % h, -px % w)
    share = jnp.sum(jnp.where(around, power, 0.0)) / jnp.maximum(jnp.sum(power), 1e-30)
    return jnp.stack([jnp.fft.fftfreq(w)[px], jnp.fft.fftfreq(h)[py]]), share


def wavevector(static: jax.Array) -> jax.Array:
    """The dominant spatial frequency ``(kx, ky)`` cycles/px (``ky`` downwards) of ``static``
    ``(H, W, C)``: the peak of its power spectrum, mean removed and Hann-windowed."""
    return _pattern(static)[0]


def periodicity(static: jax.Array) -> jax.Array:
    """The share (0-1) of ``static`` ``(H, W, C)``'s power within one frequency bin of its
    dominant pattern (the spectrum's peak and its mirror): near 1 for a grating, about 0.1 for
    white noise on 16x16 px and less on larger frames."""
    return _pattern(static)[1]


def aliased(v: jax.Array, k: jax.Array, field_mean: jax.Array, periodic: jax.Array) -> jax.Array:
    """Whether the speed of translation ``v`` ``(2,)`` px/frame cannot be told from a temporal alias
    for content that is ``periodic`` (bool) with wavevector ``k`` ``(2,)`` cycles/px: its temporal
    frequency ``|k·v|`` is at least :data:`ALIAS_FREQUENCY`, or the velocity field's mean
    ``field_mean`` ``(2,)`` px/frame is a different alias (differs from ``v`` by half a period or
    more along ``k``). Content without a dominant period has no alias."""
    return periodic & ((jnp.abs(jnp.dot(k, v)) >= ALIAS_FREQUENCY) | (jnp.abs(jnp.dot(k, field_mean - v)) >= 0.5))


def motion_summary(decomposition: Decomposition, videos=None, border: int = 2, margin: float = 2.0,
                   objective=None, baseline=None, peak=None) -> MotionSummary:
    """Dominant direction, speed, PSNR and reliability of each decomposed video (SPEC §4).

    ``videos`` ``(K, T, H, W, 3)`` in [0, 1]: if given, the PSNR is measured against
    them; otherwise the decomposition's own PSNR against its input is reported.
    ``border``, ``margin``: see :func:`observability`. ``objective`` ``(K,)`` and
    ``baseline`` ``(K, N)``: stage 1's objective and random videos' objectives
    (:func:`kv3d_jax.reliability.baseline`); ``peak`` ``(K,)``: each kernel's largest
    activation on its own video (:func:`kv3d_jax.reliability.peak`, default positive).
    Without ``objective`` and ``baseline`` the reliability rests on the motion alone.
    """
    out = _read_out(decomposition.static, decomposition.displacement, decomposition.reconstruction, border, margin)
    direction, speed, v, fraction, period, alias, field_direction, u, weight = out
    quality = decomposition.psnr if videos is None else psnr(decomposition.reconstruction, jnp.asarray(videos))
    if objective is None or baseline is None:
        gain, dead = jnp.full(speed.shape, jnp.inf), jnp.zeros(speed.shape, bool)
    else:
        gain = trust.gain(objective, baseline)
        dead = trust.dead(jnp.ones(speed.shape) if peak is None else peak, gain)
    score = trust.score(gain, fraction, alias, dead)
    return MotionSummary(direction_deg=direction, speed=speed, psnr=quality, translation=v, explained=fraction,
                         period=period, aliased=alias, reliability=score, reliable=trust.reliable(score),
                         field_direction_deg=field_direction, velocity=u, weight=weight)


@functools.partial(jax.jit, static_argnames=("border", "margin"))
def _read_out(static, displacement, reconstruction, border: int, margin: float):
    # Kernel by kernel: a vmapped read-out's reductions can round differently for another number
    # of kernels, and a kernel's record must not depend on its batch.
    def one(args):
        outputs = _read_out_batch(*(x[None] for x in args), border, margin)
        return tuple(x[0] for x in outputs)

    return jax.lax.map(one, (static, displacement, reconstruction))


def _read_out_batch(static, displacement, reconstruction, border: int, margin: float):
    u = velocity(displacement)
    weight = jax.vmap(lambda s, d: observability(s, d, border, margin))(static, displacement)
    field_mean = jnp.sum(weight[..., None] * u, axis=(1, 2, 3)) / jnp.sum(weight, axis=(1, 2, 3))[:, None]
    v = jax.vmap(lambda video: translation(video, border))(reconstruction)
    fraction = jax.vmap(lambda video, vk: explained(video, vk, border))(reconstruction, v)
    k, share = jax.vmap(_pattern)(static)
    alias = jax.vmap(aliased)(v, k, field_mean, share >= PERIODIC_SHARE)
    speed = jnp.linalg.norm(v, axis=-1)
    along = jnp.abs(jnp.sum(k * v, axis=-1)) / jnp.maximum(speed, 1e-12)
    period = jnp.where(along > 1e-6, 1.0 / jnp.maximum(along, 1e-6), jnp.inf)
    # A still video has no direction.
    direction = jnp.where(speed > 1e-6, direction_deg(v[:, 0], v[:, 1]), jnp.nan)
    field_direction = direction_deg(field_mean[:, 0], field_mean[:, 1])
    return direction, jnp.where(alias, jnp.nan, speed), v, fraction, period, alias, field_direction, u, weight


__all__ = ["MotionSummary", "aliased", "direction_deg", "explained", "motion_summary", "observability", "periodicity",
           "psnr", "translation", "velocity", "wavevector"]
