"""Files a person looks at: videos (MP4, WebM or GIF) and PNGs, named as SPEC §4.

Everything here is a side effect at the edge of the data path; inputs are numpy-convertible
arrays in [0, 1]. MP4 and WebM are encoded by the ffmpeg binary that the ``imageio-ffmpeg``
package ships, so no system ffmpeg is needed.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
from PIL import Image

from kv3d_jax import render
from kv3d_jax.files import write_atomically
from kv3d_jax.untrusted import output_path


def to_uint8(x) -> np.ndarray:
    """``x`` in [0, 1] (clipped) as uint8 in [0, 255]."""
    return np.round(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def kernel_stem(model: str, layer: str, channel: int) -> str:
    """The file-name stem for one kernel, ``{model}_{layer}_{channel}``."""
    return f"{model}_{layer}_{channel}"


def save_gif(path, video, fps: float = 8.0) -> Path:
    """Writes ``video`` ``(T, H, W, 3)`` in [0, 1] as a looping GIF at ``fps`` frames/s.

    Each frame gets its own 256-colour palette by Pillow's fast octree, without dithering: as
    close to the frame as the median-cut palette Pillow picks by default, and several times
    faster (median cut took more of a CPU sweep's time than stage 2).

    Pillow's GIF encoder stores a run of identical consecutive frames (after 8-bit rounding)
    once, with their durations added: it plays the same, but a reader counts fewer frames
    (e.g. a motion GIF whose velocity field does not change over time).
    """
    images = [Image.fromarray(frame).quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
              for frame in to_uint8(video)]

    def write(p):
        images[0].save(p, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0)

    return write_atomically(Path(path), write)


# The moving-picture formats, by file suffix: H.264 MP4 and VP9 WebM (browsers play both in a
# <video>, a fraction of a GIF's size) and GIF (plays anywhere, as an <img>).
MEDIA = ("mp4", "webm", "gif")

# ffmpeg's output options per suffix. On the default job's pictures (32-px frames, enlarged twice) x264 at
# CRF 20 gives 35 dB PSNR at half a GIF's size (GIF: 36 dB), VP9 at CRF 30 33 dB at 40 % of it; yuv420p and
# H.264's main profile are what every browser decodes; +faststart puts the index first, so a page can
# start playing before the whole file has arrived. One encoder thread: x264 and libvpx decide
# differently with another thread count, so the same video encoded on a host with more cores would
# give other bytes (measured: 1 core vs 2 differ in both formats); a kernel's files must not depend
# on the machine, and these videos are small enough to encode on one core. +bitexact: no random
# container ids (WebM's segment UID differed on every run) and no version strings.
_ENCODERS = {
    ".mp4": ["-c:v", "libx264", "-preset", "medium", "-crf", "20", "-profile:v", "main", "-pix_fmt", "yuv420p",
             "-threads", "1", "-movflags", "+faststart", "-fflags", "+bitexact", "-f", "mp4"],
    ".webm": ["-c:v", "libvpx-vp9", "-crf", "30", "-b:v", "0", "-deadline", "good", "-cpu-used", "2",
              "-pix_fmt", "yuv420p", "-threads", "1", "-row-mt", "0", "-fflags", "+bitexact", "-f", "webm"],
}
# A frame whose shorter side is under this many pixels is enlarged (see :func:`encoded_size`).
MIN_VIDEO_SIDE = 64


def encoded_size(height: int, width: int) -> tuple[int, int]:
    """The frame size ``(height, width)`` px that :func:`save_video` encodes a ``height×width`` frame at
    in an MP4 or WebM.

    A frame whose shorter side is under :data:`MIN_VIDEO_SIDE` px is enlarged by the smallest whole
    factor that brings it there, each pixel to a square block (nearest neighbour): yuv420p stores one
    colour per 2×2 pixels, which would smear the colour of single pixels of a 32-px motion picture,
    and a browser would smooth a few-pixel video where a block keeps the pixels visible. Then an odd
    height or width gains one row or column, a copy of the last (the encoders need even sizes).
    """
    scale = _video_scale(height, width)
    return height * scale + (height * scale) % 2, width * scale + (width * scale) % 2


def _video_scale(height: int, width: int) -> int:
    """The whole enlargement factor of :func:`encoded_size`."""
    return max(1, math.ceil(MIN_VIDEO_SIDE / min(height, width)))


def _encoder_frames(video) -> np.ndarray:
    """``video`` ``(T, H, W, 3)`` in [0, 1] as uint8 frames of :func:`encoded_size`."""
    frames = to_uint8(video)
    scale = _video_scale(*frames.shape[1:3])
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")


def _encode(path: Path, frames: np.ndarray, fps: float, name: str) -> None:
    """Encodes uint8 ``frames`` ``(T, H, W, 3)`` (H, W even) to ``path`` with ffmpeg's options for its
    suffix; an error names the file as ``name``."""
    _, h, w, _ = frames.shape
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", repr(float(fps)), "-i", "-",
               "-an", *_ENCODERS[path.suffix.lower()], str(path)]
    result = subprocess.run(command, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise OSError(f"ffmpeg could not write {name}: {reason[:300]}")


def save_video(path, video, fps: float = 8.0) -> Path:
    """Writes ``video`` ``(T, H, W, 3)`` in [0, 1] at ``fps`` frames/s in the format of ``path``'s suffix,
    one of :data:`MEDIA`, replacing any file there whole (a failed write leaves no temporary file).

    ``.gif``: :func:`save_gif`. ``.mp4``: H.264 (main profile), yuv420p, the index at the start
    (``+faststart``). ``.webm``: VP9, yuv420p. Both are encoded by imageio-ffmpeg's ffmpeg at
    :func:`encoded_size`: frames under :data:`MIN_VIDEO_SIDE` px are enlarged by whole factors
    (nearest neighbour), an odd height or width is padded to even by repeating the last row or
    column. They hold every frame (a GIF merges equal ones) and do not loop by themselves (the
    gallery's ``<video loop>`` loops them). Raises ``ValueError`` for another suffix and ``OSError``
    with ffmpeg's message when it fails.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix.lstrip(".") not in MEDIA:
        raise ValueError(f"cannot write a video as {path.name!r}: the name must end in one of "
                         + ", ".join(f".{m}" for m in MEDIA))
    if suffix == ".gif":
        return save_gif(path, video, fps)
    frames = _encoder_frames(video)
    return write_atomically(path, lambda p: _encode(p, frames, fps, path.name))


def save_npz(path, **arrays) -> Path:
    """Writes ``arrays`` (numpy-convertible, no objects) to an uncompressed ``.npz`` at ``path``."""
    data = {name: np.asarray(value) for name, value in arrays.items()}
    return write_atomically(Path(path), lambda p: np.savez(p, **data))


def save_text(path, text: str) -> Path:
    """Writes ``text`` (UTF-8)."""
    return write_atomically(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def save_png(path, image) -> Path:
    """Writes ``image`` ``(H, W, 3)`` in [0, 1] as a PNG."""
    pixels = to_uint8(image)
    return write_atomically(Path(path), lambda p: iio.imwrite(p, pixels, extension=".png"))


DECOMPOSITION_FILES = ("stage1", "static", "deform", "motion", "recon", "panel")
REFINEMENT_FILES = ("refined_video", "refined_static", "refined_deform", "refined_motion")
ATTRIBUTION_FILES = ("attribution",)
DIVERSITY_FILES = ("diverse",)
# The kinds that are still images, written as PNG whatever the media of the moving ones.
STILL_FILES = ("static", "refined_static")


def media_file(stem: str, kind: str, media: str) -> str:
    """The file name of one kernel's picture of ``kind`` (:data:`DECOMPOSITION_FILES`,
    :data:`REFINEMENT_FILES`, :data:`ATTRIBUTION_FILES`, :data:`DIVERSITY_FILES`) when its moving pictures are
    written as ``media`` (:data:`MEDIA`):
    ``{stem}_{kind}.png`` for a still image (:data:`STILL_FILES`), else ``{stem}_{kind}.{media}``,
    e.g. ``media_file("m_conv1_3", "motion", "mp4") == "m_conv1_3_motion.mp4"``."""
    if media not in MEDIA:
        raise ValueError(f"media must be one of {', '.join(MEDIA)}; got {media!r}")
    kinds = DECOMPOSITION_FILES + REFINEMENT_FILES + ATTRIBUTION_FILES + DIVERSITY_FILES
    if kind not in kinds:
        raise ValueError(f"no picture of kind {kind!r}; the kinds are " + ", ".join(kinds))
    return f"{stem}_{kind}.{'png' if kind in STILL_FILES else media}"


def _paths(out_dir, stem: str, kinds, media: str) -> dict[str, Path]:
    """``{kind: out_dir/media_file(stem, kind, media)}``, each checked to lie inside ``out_dir``."""
    return {kind: output_path(out_dir, media_file(stem, kind, media)) for kind in kinds}


def _motion_pictures(displacement, valid):
    """Velocity ``(T-1, H, W, 2)`` px/frame smoothed over 1 px, its brightness scale (px/frame)
    and its colour frames, as every motion picture of a kernel draws them."""
    # Content velocity u_t = -(D_{t+1} - D_t) (kv3d_jax.motion.velocity), in numpy: writing a picture
    # needs none of the optimisation modules.
    raw = -np.diff(np.asarray(displacement, np.float32), axis=0)
    velocity = render.smooth_velocity(raw, 1.0, valid)
    max_speed = render.default_max_speed(velocity, valid)
    return velocity, max_speed, render.motion_colours(velocity, max_speed, valid)


def save_decomposition(out_dir, stem: str, video, static, displacement, reconstruction, valid=None,
                       fps: float = 8.0, media: str = "gif") -> dict[str, Path]:
    """Writes one kernel's stage-2 pictures (SPEC §4) as ``out_dir/{stem}_{kind}.{media,png}``
    (:func:`media_file`; ``media`` one of :data:`MEDIA`, the static texture always PNG).

    Inputs: ``video`` and ``reconstruction`` ``(T, H, W, 3)`` in [0, 1], ``static``
    ``(H, W, 3)``, ``displacement`` ``(T, H, W, 2)`` px, ``valid`` optional boolean
    ``(T-1, H, W)`` (pixels the motion read-out uses; others are drawn grey). Files
    (:data:`DECOMPOSITION_FILES`), with ``L = min(H, W) // 2`` (at least 8, at most H):

    * ``_stage1``: the video, T frames of H×W;
    * ``_static.png``: the static texture, H×W;
    * ``_deform``: the static, then the T-1 colour-coded motion frames: T frames of H×W;
    * ``_motion``: the T-1 motion frames with a colour-wheel legend: H×(W+L);
    * ``_recon``: the reconstruction, T frames of H×W;
    * ``_panel``: video | static | motion | reconstruction | legend, 2 px white gaps:
      T frames of H×(4W+6+L).

    Every path is checked to lie inside ``out_dir`` (:func:`kv3d_jax.untrusted.output_path`) before
    anything is written. Motion is shown smoothed over 1 px (:func:`kv3d_jax.render.smooth_velocity`), all frames
    on one brightness scale (:func:`kv3d_jax.render.default_max_speed`).
    A GIF can hold fewer frames than listed (:func:`save_gif`); an MP4 or WebM holds them all, at
    :func:`encoded_size` (:func:`save_video`).
    Returns ``{kind: path}``.
    """
    paths = _paths(out_dir, stem, DECOMPOSITION_FILES, media)
    velocity, max_speed, colours = _motion_pictures(displacement, valid)
    return {
        "stage1": save_video(paths["stage1"], video, fps),
        "static": save_png(paths["static"], static),
        "deform": save_video(paths["deform"], render.deform_frames(static, velocity, max_speed, valid), fps),
        "motion": save_video(paths["motion"], render.with_legend(colours), fps),
        "recon": save_video(paths["recon"], reconstruction, fps),
        "panel": save_video(paths["panel"], render.panel(video, static, velocity, reconstruction, max_speed, valid),
                            fps),
    }


def save_refinement(out_dir, stem: str, video, static, displacement, valid=None, fps: float = 8.0,
                    media: str = "gif") -> dict[str, Path]:
    """Writes one kernel's texture-plus-motion refinement (:mod:`kv3d_jax.refine`) beside its
    stage-2 pictures, as ``out_dir/{stem}_{kind}.{media,png}`` (:data:`REFINEMENT_FILES`,
    :func:`media_file`).

    Inputs as for :func:`save_decomposition` (``video = warp(static, displacement)``, so there
    is no separate reconstruction): ``_refined_video``, ``_refined_static.png``,
    ``_refined_deform`` and ``_refined_motion``, drawn as their stage-2 namesakes.
    Returns ``{kind: path}``.
    """
    paths = _paths(out_dir, stem, REFINEMENT_FILES, media)
    velocity, max_speed, colours = _motion_pictures(displacement, valid)
    return {
        "refined_video": save_video(paths["refined_video"], video, fps),
        "refined_static": save_png(paths["refined_static"], static),
        "refined_deform": save_video(paths["refined_deform"],
                                     render.deform_frames(static, velocity, max_speed, valid), fps),
        "refined_motion": save_video(paths["refined_motion"], render.with_legend(colours), fps),
    }


def save_attribution(out_dir, stem: str, video, attribution, fps: float = 8.0, media: str = "gif") -> dict[str, Path]:
    """Writes one kernel's video seen through its attribution map (:func:`kv3d_jax.render.transparency`)
    as ``out_dir/{stem}_attribution.{media}``: ``video`` ``(T, H, W, 3)`` in [0, 1], ``attribution``
    ``(T, H, W)`` (MACO's accumulated input gradients, :func:`kv3d_jax.maximization.attribution`).
    Returns ``{"attribution": path}``."""
    paths = _paths(out_dir, stem, ATTRIBUTION_FILES, media)
    return {"attribution": save_video(paths["attribution"], render.transparency(video, attribution), fps)}


def save_diverse(out_dir, stem: str, videos, fps: float = 8.0, media: str = "gif") -> dict[str, Path]:
    """Writes one kernel's N diverse optima ``videos`` ``(N, T, H, W, 3)`` in [0, 1] side by side
    (:func:`kv3d_jax.render.side_by_side`, 2 px white gaps: T frames of H×(N·W + 2(N-1))) as
    ``out_dir/{stem}_diverse.{media}`` (:func:`media_file`). Returns ``{"diverse": path}``."""
    paths = _paths(out_dir, stem, DIVERSITY_FILES, media)
    return {"diverse": save_video(paths["diverse"], render.side_by_side(videos), fps)}
