"""How an optimised video is represented (Lucid's *parameterizations*; SPEC §2 items 1–2).

A parameterization is a pair of pure functions: ``init(key, shape) -> param`` draws the
starting parameter pytree for a ``(T, H, W)`` video and ``to_video(param)`` maps it to a
``(T, H, W, 3)`` video in [0, 1]. Each goes through Lucid's colour decorrelation and a sigmoid,
so the optimiser works in a space where colour channels are decorrelated and pixel values
can never leave [0, 1]. ``pixel`` and ``fourier`` describe every frame freely;
``maco`` (Fel et al. 2023) fixes the video's amplitude spectrum and optimises its phase;
``static_displacement`` is SPEC §3's model, one static image warped by a displacement per
frame; ``static_velocity`` is the same model with each pixel's displacement moving at a
constant velocity (:mod:`kv3d_jax.refine` optimises either); their ``maco_`` twins represent the
static image by the phase of a spectrum with the natural-image amplitude (:func:`maco_texture`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kv3d_jax import spectrum
from kv3d_jax.warp import warp

# Lucid's square root of the ImageNet colour correlation matrix, scaled so that its largest
# column has unit norm.
COLOR_CORRELATION_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)
COLOR_DECORRELATION = COLOR_CORRELATION_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SQRT, axis=0))


class Parameterization(NamedTuple):
    """``init(key, (T, H, W)) -> param`` and ``to_video(param) -> (T, H, W, 3)`` in [0, 1]."""

    init: Callable[[jax.Array, tuple[int, int, int]], Any]
    to_video: Callable[[Any], jax.Array]


def to_valid_rgb(x: jax.Array) -> jax.Array:
    """``sigmoid(x @ C.T)`` for decorrelated colours ``x`` ``(..., 3)``: RGB in (0, 1), same shape."""
    return jax.nn.sigmoid(x @ jnp.asarray(COLOR_DECORRELATION).T)


def pixel_init(key: jax.Array, shape: tuple[int, int, int], sd: float = 0.01) -> jax.Array:
    """A pixel parameter ``(T, H, W, 3)`` drawn from ``N(0, sd²)``."""
    return sd * jax.random.normal(key, (*shape, 3), jnp.float32)


def pixel_to_video(param: jax.Array) -> jax.Array:
    """The video ``(T, H, W, 3)`` of a pixel parameter of the same shape."""
    return to_valid_rgb(param)


def _spectrum_scale(t: int, h: int, w: int, decay_power: float) -> np.ndarray:
    """Gain ``(T, H, W//2+1, 1)`` of each rfft coefficient: Lucid's 1/f law over (t, y, x).

    Frequencies are in cycles per frame and cycles per pixel, combined as one radius, so
    slow, coarse structure starts with the same energy per octave in time as in space.
    """
    ft = np.fft.fftfreq(t)[:, None, None]
    fy = np.fft.fftfreq(h)[None, :, None]
    fx = np.fft.rfftfreq(w)[None, None, :]
    radius = np.sqrt(ft**2 + fy**2 + fx**2)
    scale = 1.0 / np.maximum(radius, 1.0 / max(t, h, w)) ** decay_power
    return (scale * np.sqrt(t * h * w)).astype(np.float32)[..., None]


def _check_even_width(w: int, name: str) -> None:
    """Raises ValueError unless ``w`` (px) is even: a spectral parameterization recovers the width of
    its rfft grid as ``2 * (W//2+1 - 1)``."""
    if w % 2:
        raise ValueError(f"the {name} parameterization needs an even width, got W={w}; "
                         "use an even width or parameterization='pixel'")


def fourier_init(key: jax.Array, shape: tuple[int, int, int], sd: float = 0.01) -> jax.Array:
    """A spectral parameter ``(T, H, W//2+1, 3, 2)`` (real, imaginary parts) from ``N(0, sd²)``.

    The width must be even: ``to_video`` recovers it as ``2 * (W//2+1 - 1)``.
    """
    t, h, w = shape
    _check_even_width(w, "Fourier")
    return sd * jax.random.normal(key, (t, h, w // 2 + 1, 3, 2), jnp.float32)


def fourier_to_video(param: jax.Array, decay_power: float = 1.0) -> jax.Array:
    """The video ``(T, H, W, 3)`` whose 3D spectrum is ``param`` scaled by 1/f^decay_power.

    As in Lucid, the inverse transform is divided by 4 so the initial video has roughly
    the contrast of the pixel parameterization's.
    """
    t, h, wf = param.shape[:3]
    w = 2 * (wf - 1)
    spectrum = jax.lax.complex(param[..., 0], param[..., 1]) * _spectrum_scale(t, h, w, decay_power)
    x = jnp.fft.irfftn(spectrum, s=(t, h, w), axes=(0, 1, 2)) / 4.0
    return to_valid_rgb(x.astype(jnp.float32))


def maco_init(key: jax.Array, shape: tuple[int, int, int], sd: float = 1.0) -> jax.Array:
    """A phase parameter ``(T, H, W//2+1, 3)`` (radians, one per rfft coefficient and decorrelated
    colour) drawn from ``N(0, sd²)``, as MACO draws its phase (Xplique's ``init_maco_buffer``).

    The width must be even: ``to_video`` recovers it as ``2 * (W//2+1 - 1)``.
    """
    t, h, w = shape
    _check_even_width(w, "MACO")
    return sd * jax.random.normal(key, (t, h, w // 2 + 1, 3), jnp.float32)


def _mirror(plane: jax.Array) -> jax.Array:
    """``plane[-t, -y]`` of a ``(T, H, ...)`` plane of the rfft grid: the coefficient at the opposite frequency."""
    return jnp.roll(jnp.flip(plane, axis=(0, 1)), 1, axis=(0, 1))


def hermitian_phase(phase: jax.Array, width: int) -> jax.Array:
    """``phase`` ``(T, H, W//2+1, ...)`` made odd, ``φ(-f) = -φ(f)``, on the planes ``f_x = 0`` and (even
    ``width``) ``f_x = 1/2``, the planes of the rfft grid that hold both ``f`` and ``-f``.

    There ``(φ(f) - φ(-f)) / 2`` replaces ``φ``: with an even amplitude this makes the spectrum
    that of a real video, so the inverse transform keeps every amplitude exactly (``irfftn`` would
    otherwise keep only the Hermitian part, whose amplitude is ``|cos((φ(f) + φ(-f)) / 2)|`` times
    smaller). Self-conjugate coefficients (the mean among them) get phase 0.
    """
    planes = [0] + ([phase.shape[2] - 1] if width % 2 == 0 and phase.shape[2] > 1 else [])
    for x in planes:
        plane = phase[:, :, x]
        phase = phase.at[:, :, x].set((plane - _mirror(plane)) / 2.0)
    return phase


def maco_magnitude(shape: tuple[int, int, int], magnitude: np.ndarray | None = None,
                   exponents: tuple[float, float] = spectrum.NATURAL_EXPONENTS, contrast: float = 1.0) -> np.ndarray:
    """The fixed amplitude ``(T, H, W//2+1, 3)`` float32 of a ``(T, H, W)`` MACO video, per decorrelated colour.

    ``magnitude`` (e.g. :func:`kv3d_jax.spectrum.from_clips`), broadcastable to that shape, or by
    default :func:`kv3d_jax.spectrum.natural_law` with ``exponents`` for all three colours. The
    mean (zero frequency) is set to 0 and the rest scaled so the pre-sigmoid video has a root mean
    square of ``contrast`` over all its values: MACO standardises its image after the inverse
    transform (``contrast`` 1), which with a fixed amplitude is this constant scaling (Parseval) and
    the removal of the mean.
    """
    t, h, w = shape
    grid = (t, h, w // 2 + 1, 3)
    source = spectrum.natural_law(shape, exponents)[..., None] if magnitude is None else np.asarray(magnitude)
    try:
        amplitude = np.broadcast_to(np.asarray(source, np.float64), grid).copy()
    except ValueError:
        raise ValueError(f"a MACO magnitude of shape {np.shape(source)} does not fit a {shape} video, whose "
                         f"spectrum is {grid}; estimate it from clips of that size") from None
    amplitude[0, 0, 0] = 0.0
    # rfft coefficients strictly inside the x axis stand for two (f and -f); Parseval's weight.
    weight = np.full(grid[2], 2.0)
    weight[0] = 1.0
    if w % 2 == 0 and grid[2] > 1:
        weight[-1] = 1.0
    energy = np.sum(weight[None, None, :, None] * amplitude**2) / (t * h * w) ** 2
    if energy <= 0:
        raise ValueError("a MACO magnitude must have some energy away from the zero frequency")
    return (contrast * amplitude / np.sqrt(energy / 3.0)).astype(np.float32)


def maco_colours(phase: jax.Array, magnitude: np.ndarray, width: int, standardize: bool = True) -> jax.Array:
    """The pre-sigmoid, decorrelated video ``(T, H, W, 3)`` of a MACO phase ``(T, H, W//2+1, 3)``.

    As in MACO, the phase is standardised over all its values (mean 0, standard deviation 1, so
    Adam's step size means the same whatever the phase has drifted to; ``standardize=False`` takes
    it as it is), made odd where the rfft grid needs it (:func:`hermitian_phase`) and combined with
    the fixed ``magnitude`` (:func:`maco_magnitude`); ``rfftn`` of the result has amplitude exactly
    ``magnitude``.
    """
    t, h = phase.shape[:2]
    phase = jnp.asarray(phase)
    if standardize:
        phase = (phase - jnp.mean(phase)) / (jnp.std(phase) + 1e-5)
    phase = hermitian_phase(phase, width)
    magnitude = jnp.asarray(magnitude)
    coefficients = jax.lax.complex(magnitude * jnp.cos(phase), magnitude * jnp.sin(phase))
    return jnp.fft.irfftn(coefficients, s=(t, h, width), axes=(0, 1, 2)).astype(jnp.float32)


def maco(magnitude: np.ndarray | None = None, exponents: tuple[float, float] = spectrum.NATURAL_EXPONENTS,
         contrast: float = 1.0) -> Parameterization:
    """The MACO parameterization (Fel et al. 2023, "Unlocking feature visualization for deeper
    networks with magnitude constrained optimization"): the video's amplitude spectrum is fixed
    and only its phase is optimised.

    ``to_video(phase)`` is ``to_valid_rgb(maco_colours(phase, maco_magnitude(...), W))``: decorrelated
    colour and a sigmoid as the other parameterizations. The magnitude is ``magnitude`` (e.g. the
    mean spectrum of clips, :func:`kv3d_jax.spectrum.from_clips`) or the natural-video law with
    ``exponents``, scaled to the root mean square ``contrast`` before the colour transform; it is
    a constant of the parameterization, built once per video shape (the
    width is even, ``2 * (W//2+1 - 1)``, as :func:`maco_init` requires).
    """
    def to_video(phase: jax.Array) -> jax.Array:
        t, h, wf = phase.shape[:3]
        w = 2 * (wf - 1)
        return to_valid_rgb(maco_colours(phase, maco_magnitude((t, h, w), magnitude, exponents, contrast), w))

    return Parameterization(maco_init, to_video)


def maco_texture(phase: jax.Array) -> jax.Array:
    """The pre-sigmoid, decorrelated texture ``(H, W, 3)`` of a phase ``(H, W//2+1, 3)`` (radians, the width
    even): a still image whose 2D amplitude spectrum is fixed to the natural-image law ``1/f_s``
    (:func:`maco_magnitude` of a one-frame video, root mean square 1).

    Unlike :func:`maco`'s video, the phase is used as it is, not standardised, so that every image's
    phase can be represented: a refinement (stage 3) starts from stage 2's texture with its phase
    kept and its amplitude replaced by the law's (:func:`maco_texture_phase`).
    """
    h, wf = phase.shape[:2]
    w = 2 * (wf - 1)
    return maco_colours(phase[None], maco_magnitude((1, h, w)), w, standardize=False)[0]


def maco_texture_phase(colours: jax.Array) -> jax.Array:
    """The phase ``(..., H, W//2+1, 3)`` (radians) of textures given as pre-sigmoid, decorrelated
    colours ``(..., H, W, 3)``: where :func:`maco_texture` keeps their structure."""
    return jnp.angle(jnp.fft.rfft2(jnp.asarray(colours, jnp.float32), axes=(-3, -2)))


def static_displacement_init(key: jax.Array, shape: tuple[int, int, int], sd: float = 0.01) -> dict:
    """A texture-plus-motion parameter for a ``(T, H, W)`` video: ``{"static": (H, W, 3)``
    decorrelated colours, ``"displacement": (T, H, W, 2)`` px``}``, both drawn from ``N(0, sd²)``."""
    t, h, w = shape
    ks, kd = jax.random.split(key)
    return {
        "static": sd * jax.random.normal(ks, (h, w, 3), jnp.float32),
        "displacement": sd * jax.random.normal(kd, (t, h, w, 2), jnp.float32),
    }


def static_displacement_to_video(param: dict) -> jax.Array:
    """``V_t = warp(I, D_t)`` (SPEC §3's model) with ``I = to_valid_rgb(static)``: ``(T, H, W, 3)`` in [0, 1].

    The colour transform comes before the warp, so every frame is exactly a bilinear
    resampling of one static image in [0, 1].
    """
    return warp(to_valid_rgb(param["static"]), param["displacement"])


def constant_velocity(displacement: jax.Array) -> jax.Array:
    """Least-squares fit of ``D_t`` by ``D_c + (t - t_c) w`` at every pixel: ``(..., T, H, W, 2)`` -> same.

    ``t_c`` is the middle frame. The fit's content velocity ``-w`` (px/frame) is the same in
    every frame; applying the fit twice changes nothing.
    """
    t = displacement.shape[-4]
    offsets = np.arange(t) - (t - 1) / 2.0
    # Summed frame by frame in a fixed order rather than as a reduction: XLA may order a
    # reduction differently for different batch sizes, and where the frames' gradients
    # nearly cancel, Adam magnifies that rounding into a result that depends on the batch.
    frames = [displacement[..., s, :, :, :] for s in range(t)]
    centre = sum(frames[1:], frames[0]) / t
    slope = sum((o * f for o, f in zip(offsets[1:], frames[1:])), offsets[0] * frames[0])
    slope = slope / (float(np.sum(offsets**2)) if t > 1 else 1.0)  # one frame: no velocity
    return jnp.stack([centre + o * slope for o in offsets], axis=-4)


def static_velocity_to_video(param: dict) -> jax.Array:
    """``V_t = warp(I, D̄_t)``, ``D̄ = constant_velocity(D)``: a ``"static_displacement"`` parameter
    whose every pixel moves at a constant velocity, ``(T, H, W, 3)`` in [0, 1].

    Keeping ``D`` per frame and fitting it inside (rather than storing a centre and a
    velocity) lets the parameter, its initialisation and its regularisers stay those of
    ``static_displacement``; the video only sees the fit.
    """
    return warp(to_valid_rgb(param["static"]), constant_velocity(param["displacement"]))


def maco_static_displacement_init(key: jax.Array, shape: tuple[int, int, int], sd: float = 0.01) -> dict:
    """A texture-plus-motion parameter whose texture is a :func:`maco_texture` phase: ``{"static": (H, W//2+1, 3)``
    radians uniform in [-π, π), ``"displacement": (T, H, W, 2)`` px from ``N(0, sd²)````}``; even width."""
    t, h, w = shape
    _check_even_width(w, "MACO texture")
    ks, kd = jax.random.split(key)
    return {
        "static": jax.random.uniform(ks, (h, w // 2 + 1, 3), jnp.float32, -np.pi, np.pi),
        "displacement": sd * jax.random.normal(kd, (t, h, w, 2), jnp.float32),
    }


def maco_static_displacement_to_video(param: dict) -> jax.Array:
    """``V_t = warp(I, D_t)`` with ``I = to_valid_rgb(maco_texture(static))``: ``(T, H, W, 3)`` in [0, 1]."""
    return warp(to_valid_rgb(maco_texture(param["static"])), param["displacement"])


def maco_static_velocity_to_video(param: dict) -> jax.Array:
    """``V_t = warp(I, constant_velocity(D)_t)`` with the MACO texture ``I`` of
    :func:`maco_static_displacement_to_video`: ``(T, H, W, 3)`` in [0, 1]."""
    return warp(to_valid_rgb(maco_texture(param["static"])), constant_velocity(param["displacement"]))


PARAMETERIZATIONS: dict[str, Parameterization] = {
    "pixel": Parameterization(pixel_init, pixel_to_video),
    "fourier": Parameterization(fourier_init, fourier_to_video),
    "maco": maco(),
    "static_displacement": Parameterization(static_displacement_init, static_displacement_to_video),
    "static_velocity": Parameterization(static_displacement_init, static_velocity_to_video),
    "maco_static_displacement": Parameterization(maco_static_displacement_init, maco_static_displacement_to_video),
    "maco_static_velocity": Parameterization(maco_static_displacement_init, maco_static_velocity_to_video),
}
# How a texture-plus-motion parameter's ``"static"`` becomes pre-sigmoid, decorrelated colours
# ``(H, W, 3)``: per pixel (``"pixel"``) or a MACO phase (``"maco"``, :func:`maco_texture`).
TEXTURES = {"pixel": lambda static: static, "maco": maco_texture}


def get(name: str) -> Parameterization:
    """The parameterization registered as ``name``; a clear error lists the valid names."""
    try:
        return PARAMETERIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown parameterization {name!r}; valid parameterizations are: {', '.join(PARAMETERIZATIONS)}"
        ) from None
