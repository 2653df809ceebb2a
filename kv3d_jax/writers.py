"""Files a person looks at: GIFs and PNGs of videos and images, named as SPEC §4.

Everything here is a side effect at the edge of the data path; inputs are numpy-convertible
arrays in [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

from kv3d_jax import motion, render
from kv3d_jax.untrusted import output_path


def to_uint8(x) -> np.ndarray:
    """``x`` in [0, 1] (clipped) as uint8 in [0, 255]."""
    return np.round(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def kernel_stem(model: str, layer: str, channel: int) -> str:
    """The file-name stem for one kernel, ``{model}_{layer}_{channel}``."""
    return f"{model}_{layer}_{channel}"


def _atomic_write(path: Path, write) -> Path:
    """Runs ``write(tmp_path)`` then renames onto ``path``, so a crash never leaves half a file and a
    failed write (full disk, unwritable folder, any error) leaves no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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

    return _atomic_write(Path(path), write)


def save_npz(path, **arrays) -> Path:
    """Writes ``arrays`` (numpy-convertible, no objects) to an uncompressed ``.npz`` at ``path``."""
    data = {name: np.asarray(value) for name, value in arrays.items()}
    return _atomic_write(Path(path), lambda p: np.savez(p, **data))


def save_text(path, text: str) -> Path:
    """Writes ``text`` (UTF-8)."""
    return _atomic_write(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def save_png(path, image) -> Path:
    """Writes ``image`` ``(H, W, 3)`` in [0, 1] as a PNG."""
    pixels = to_uint8(image)
    return _atomic_write(Path(path), lambda p: iio.imwrite(p, pixels, extension=".png"))


DECOMPOSITION_FILES = ("stage1", "static", "deform", "motion", "recon", "panel")
# The formats moving pictures can be written in; the first is the default of a job.
MEDIA = ("gif",)


def media_file(stem: str, kind: str, media: str) -> str:
    """The file name of picture ``kind`` of a kernel: ``{stem}_{kind}.png`` for a still image,
    else ``{stem}_{kind}.{media}``."""
    return f"{stem}_{kind}.{'png' if kind in ('static', 'refined_static') else media}"


def _motion_pictures(displacement, valid):
    """Velocity ``(T-1, H, W, 2)`` px/frame smoothed over 1 px, its brightness scale (px/frame)
    and its colour frames, as every motion picture of a kernel draws them."""
    velocity = render.smooth_velocity(motion.velocity(np.asarray(displacement, np.float32)), 1.0, valid)
    max_speed = render.default_max_speed(velocity, valid)
    return velocity, max_speed, render.motion_colours(velocity, max_speed, valid)


def save_decomposition(out_dir, stem: str, video, static, displacement, reconstruction, valid=None,
                       fps: float = 8.0, media: str = "gif") -> dict[str, Path]:
    """Writes one kernel's stage-2 pictures (SPEC §4) as ``out_dir/{stem}_{kind}.{gif,png}``.

    Inputs: ``video`` and ``reconstruction`` ``(T, H, W, 3)`` in [0, 1], ``static``
    ``(H, W, 3)``, ``displacement`` ``(T, H, W, 2)`` px, ``valid`` optional boolean
    ``(T-1, H, W)`` (pixels the motion read-out uses; others are drawn grey). Files
    (:data:`DECOMPOSITION_FILES`), with ``L = min(H, W) // 2`` (at least 8, at most H):

    * ``_stage1.gif``: the video, T frames of H×W;
    * ``_static.png``: the static texture, H×W;
    * ``_deform.gif``: the static, then the T-1 colour-coded motion frames: T frames of H×W;
    * ``_motion.gif``: the T-1 motion frames with a colour-wheel legend: H×(W+L);
    * ``_recon.gif``: the reconstruction, T frames of H×W;
    * ``_panel.gif``: video | static | motion | reconstruction | legend, 2 px white gaps:
      T frames of H×(4W+6+L).

    Every path is checked to lie inside ``out_dir`` (:func:`kv3d_jax.untrusted.output_path`) before
    anything is written. Motion is shown smoothed over 1 px (:func:`kv3d_jax.render.smooth_velocity`), all frames
    on one brightness scale (:func:`kv3d_jax.render.default_max_speed`).
    A GIF can hold fewer frames than listed (:func:`save_gif`).
    Returns ``{kind: path}``.
    """
    paths = {kind: output_path(out_dir, f"{stem}_{kind}.{'png' if kind == 'static' else 'gif'}")
             for kind in DECOMPOSITION_FILES}
    velocity, max_speed, colours = _motion_pictures(displacement, valid)
    return {
        "stage1": save_gif(paths["stage1"], video, fps),
        "static": save_png(paths["static"], static),
        "deform": save_gif(paths["deform"], render.deform_frames(static, velocity, max_speed, valid), fps),
        "motion": save_gif(paths["motion"], render.with_legend(colours), fps),
        "recon": save_gif(paths["recon"], reconstruction, fps),
        "panel": save_gif(paths["panel"], render.panel(video, static, velocity, reconstruction, max_speed, valid), fps),
    }


REFINEMENT_FILES = ("refined_video", "refined_static", "refined_deform", "refined_motion")


def save_refinement(out_dir, stem: str, video, static, displacement, valid=None, fps: float = 8.0,
                    media: str = "gif") -> dict[str, Path]:
    """Writes one kernel's texture-plus-motion refinement (:mod:`kv3d_jax.refine`) beside its
    stage-2 pictures, as ``out_dir/{stem}_{kind}.{gif,png}`` (:data:`REFINEMENT_FILES`).

    Inputs as for :func:`save_decomposition` (``video = warp(static, displacement)``, so there
    is no separate reconstruction): ``_refined_video.gif``, ``_refined_static.png``,
    ``_refined_deform.gif`` and ``_refined_motion.gif``, drawn as their stage-2 namesakes.
    Returns ``{kind: path}``.
    """
    paths = {kind: output_path(out_dir, f"{stem}_{kind}.{'png' if kind == 'refined_static' else 'gif'}")
             for kind in REFINEMENT_FILES}
    velocity, max_speed, colours = _motion_pictures(displacement, valid)
    return {
        "refined_video": save_gif(paths["refined_video"], video, fps),
        "refined_static": save_png(paths["refined_static"], static),
        "refined_deform": save_gif(paths["refined_deform"], render.deform_frames(static, velocity, max_speed, valid),
                                   fps),
        "refined_motion": save_gif(paths["refined_motion"], render.with_legend(colours), fps),
    }
