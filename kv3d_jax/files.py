"""Writing a file whole or not at all: every file kv3d writes goes through :func:`write_atomically`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, write: Callable[[Path], object], durable: bool = False) -> Path:
    """Runs ``write(tmp)`` on a temporary path ``.{name}.tmp{pid}{suffix}`` beside ``path`` (same
    folder, same suffix, so that encoders that go by the suffix work) and renames it onto ``path``:
    a reader never sees half a file, and a failed write (full disk, any error) leaves no temporary
    file. ``durable``: the file and its folder are synced to disk before this returns, for a file
    that commits work (a kernel record). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync(path.parent)
    return path
