"""Files a person looks at: GIFs and PNGs of videos and images, named as SPEC §4.

Everything here is a side effect at the edge of the data path; inputs are numpy-convertible
arrays in [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np


def to_uint8(x) -> np.ndarray:
    """``x`` in [0, 1] (clipped) as uint8 in [0, 255]."""
    return np.round(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def kernel_stem(model: str, layer: str, channel: int) -> str:
    """The file-name stem for one kernel, ``{model}_{layer}_{channel}``."""
    return f"{model}_{layer}_{channel}"


def _atomic_write(path: Path, write) -> Path:
    """Runs ``write(tmp_path)`` then renames onto ``path``, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def save_gif(path, video, fps: float = 8.0) -> Path:
    """Writes ``video`` ``(T, H, W, 3)`` in [0, 1] as a looping GIF at ``fps`` frames/s."""
    frames = to_uint8(video)
    return _atomic_write(
        Path(path), lambda p: iio.imwrite(p, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    )


def save_png(path, image) -> Path:
    """Writes ``image`` ``(H, W, 3)`` in [0, 1] as a PNG."""
    pixels = to_uint8(image)
    return _atomic_write(Path(path), lambda p: iio.imwrite(p, pixels, extension=".png"))
