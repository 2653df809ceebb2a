"""The results store of a ``kv3d visualize`` run: one folder, one file per finished kernel.

Layout of a run folder::

    run.json                          what the results depend on (config, params checksum)
    kernels/{layer}/{channel}.npz     one finished kernel: its arrays and summary
    quarantine/{layer}/...            kernel files that failed their check, kept for inspection

A kernel file is the commit point of that kernel's work: it is written to a temporary
file, flushed to disk and renamed into place, so a file under its final name is always
whole, and a sweep that is killed resumes with every kernel whose file exists. A kernel
file is never rewritten. A file that is there but fails its check (unreadable, wrong
arrays or shapes, another kernel's record) did not come from an interrupted write; it is
moved to ``quarantine/`` and its kernel computed again. Files that a store never writes
are reported and left alone. One run at a time may write into a run folder: its first process
opens it (:meth:`Store.open`, which locks it), the other processes of a ``jax.distributed`` run
join it (:meth:`Store.join`) and each writes only its own kernels.

Every file of a run folder (kernel files, pictures, figures, pages) is written under a
temporary name ``.{name}.tmp{pid}`` or ``.{name}.tmp{pid}{suffix}`` in its own folder and
renamed into place. Opening a folder removes those a killed run left in the folder itself
and in its picture folders; :meth:`Store.audit` removes those in a layer's kernels folder.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from kv3d_jax.files import write_atomically
from kv3d_jax.untrusted import output_path

RUN_FILE = "run.json"
KERNELS = "kernels"
QUARANTINE = "quarantine"
_LOCK = ".lock"
_FORMAT = 1
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "kv3d-jax")
_KERNEL_NAME = re.compile(r"(0|[1-9][0-9]*)\.npz")
_TEMP_NAME = re.compile(r"\..+\.tmp[0-9]+(\.[A-Za-z0-9]+)?")

# Name → (shape, dtype) of every array of a kernel file.
Schema = Mapping[str, tuple[tuple[int, ...], str]]


class StoreError(ValueError):
    """A run folder cannot be used for this run."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A file in a run folder that is not a usable kernel file, and what was done with it.

    Attributes:
      path: the file, where it was found.
      reason: why it is not usable.
      action: ``"quarantined"`` (moved to ``moved_to``, its kernel is computed again),
        ``"removed"`` (a killed writer's temporary file) or ``"ignored"`` (left as it is).
      moved_to: where a quarantined file now is.
    """

    path: Path
    reason: str
    action: str
    moved_to: Path | None = None

    def __str__(self) -> str:
        where = f" to {self.moved_to}" if self.moved_to else ""
        return f"{self.path}: {self.reason} ({self.action}{where})"


@dataclasses.dataclass(frozen=True)
class Audit:
    """What a layer's folder holds: the channels ``done`` and the ``problems`` found."""

    done: frozenset[int]
    problems: tuple[Problem, ...]


def params_checksum(params) -> str:
    """sha256 (hex) of a params pytree: every leaf's path, dtype, shape and bytes, in path order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    digest = hashlib.sha256()
    for path, leaf in sorted(((jax.tree_util.keystr(p), np.asarray(x)) for p, x in leaves), key=lambda e: e[0]):
        digest.update(f"{path}|{leaf.dtype.str}|{leaf.shape}|".encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run's numbers depend on."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _remove_leftovers(root: Path) -> tuple[Problem, ...]:
    """Removes the temporary files of killed writers in ``root`` and its picture folders (every
    subfolder but ``kernels/`` and ``quarantine/``); returns them as removed problems."""
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and p.name not in (KERNELS, QUARANTINE))
    removed = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and _TEMP_NAME.fullmatch(path.name):
                path.unlink()
                removed.append(Problem(path, "an unfinished write of a killed run", "removed"))
    return tuple(removed)


def _as_json(value):
    """``value`` as it reads back from JSON (tuples become lists), so stored and new configs compare equal."""
    return json.loads(json.dumps(value))


def _differences(stored: dict, wanted: dict) -> list[str]:
    names = sorted(set(stored) | set(wanted))
    missing = "(not set)"
    return [
        f"{name}: {stored.get(name, missing)!r} there, {wanted.get(name, missing)!r} now"
        for name in names
        if stored.get(name, missing) != wanted.get(name, missing)
    ]


def _identity(record: Mapping[str, np.ndarray]) -> tuple[str, int] | None:
    """The ``(layer, channel)`` a kernel record says it belongs to, or None if it does not say."""
    layer, channel = record.get("layer"), record.get("channel")
    if layer is None or channel is None or layer.shape != () or channel.shape != ():
        return None
    if layer.dtype.kind != "U" or channel.dtype.kind not in "iu":
        return None
    return str(layer), int(channel)


class Store:
    """An open run folder; use :meth:`open`, and ``close`` it (or use it as a context manager)."""

    def __init__(self, root: Path, run: dict, lock_fd: int, notes: tuple[str, ...], leftovers: tuple[Problem, ...]):
        self.root, self.run, self._lock_fd = root, run, lock_fd
        self.notes = notes  # things a user should know about the folder, e.g. other package versions
        self.leftovers = leftovers  # temporary files of a killed run, removed when the folder was opened

    @classmethod
    def open(cls, root, config: dict, checksum: str) -> "Store":
        """Opens run folder ``root`` for a run with ``config`` (JSON-able) and params ``checksum``.

        A new or empty folder gets a ``run.json``. A folder with a ``run.json`` must
        record the same config and checksum, else :class:`StoreError` lists what differs.
        A non-empty folder without ``run.json`` is refused, so unrelated files are never
        overwritten, and so is a folder another process is writing into. The temporary
        files a killed run left in the folder and its picture folders are removed
        (``leftovers``).
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise StoreError(f"run folder {root} is a file, not a folder; choose another run folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot make run folder {root}: {err.strerror or err}; choose another run folder") from None
        # Checked before the lock file is made, so a refused folder is left exactly as it was.
        others = sorted(p.name for p in root.iterdir() if p.name != _LOCK)
        if others and not (root / RUN_FILE).exists():
            raise StoreError(
                f"{root} is not empty and holds no {RUN_FILE} ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}), so it is not a kv3d run folder; choose a new or empty run folder"
            )
        lock_fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreError(f"another kv3d process is writing into {root}; wait for it or choose another run folder") from None
        try:
            run, notes = cls._run_record(root, _as_json(config), checksum)
            leftovers = _remove_leftovers(root)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(root, run, lock_fd, notes, leftovers)

    @classmethod
    def join(cls, root, config: dict, checksum: str) -> "Store":
        """Joins run folder ``root`` that process 0 of this ``jax.distributed`` run has opened: its
        ``run.json`` must record ``config`` and ``checksum``. Takes no lock and removes nothing."""
        root = Path(root)
        if not (root / RUN_FILE).is_file():
            raise StoreError(f"{root} holds no {RUN_FILE}: process 0 of this run has not opened it; start every "
                             "process with the same --out on a filesystem they share")
        run, notes = cls._run_record(root, _as_json(config), checksum)
        return cls(root, run, None, notes, ())

    @staticmethod
    def _run_record(root: Path, config: dict, checksum: str) -> tuple[dict, tuple[str, ...]]:
        run_file = root / RUN_FILE
        versions = package_versions()
        if not run_file.exists():
            run = {"format": _FORMAT, "config": config, "params_sha256": checksum, "versions": versions}
            write_atomically(run_file, lambda tmp: tmp.write_text(json.dumps(run, indent=2, sort_keys=True) + "\n"),
                             durable=True)
            return run, ()
        try:
            run = json.loads(run_file.read_text())
            stored = (run["format"], run["config"], run["params_sha256"], run["versions"])
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
            raise StoreError(
                f"{run_file} is not a kv3d run record ({type(err).__name__}: {err}); choose another run folder"
            ) from None
        if stored[0] != _FORMAT:
            raise StoreError(f"{run_file} has format {stored[0]!r}, this kv3d writes {_FORMAT}; choose another run folder")
        differences = _differences(stored[1], config)
        if stored[2] != checksum:
            differences.append(f"model params: sha256 {stored[2][:12]}… there, {checksum[:12]}… now")
        if differences:
            raise StoreError(
                f"{root} holds a run with other settings, so its results cannot be reused: "
                + "; ".join(differences)
                + ". Use another run folder, or the settings recorded in " + str(run_file)
            )
        changed = _differences(stored[3], versions)
        notes = (f"{root} was computed with other package versions ({'; '.join(changed)}); "
                 "finished kernels are kept as they are",) if changed else ()
        return run, notes

    def close(self) -> None:
        """Releases the folder for other processes."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def kernel_path(self, layer: str, channel: int) -> Path:
        """Where kernel ``(layer, channel)``'s file lives."""
        return output_path(self.root, KERNELS, layer, f"{int(channel)}.npz")

    def layers(self) -> list[str]:
        """The layers that have a kernels folder, sorted by name."""
        folder = self.root / KERNELS
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def finished(self, layer: str) -> frozenset[int]:
        """The channels of ``layer`` with a kernel file, by name alone (:meth:`audit` checks them)."""
        folder = self.root / KERNELS / layer
        names = (p.name for p in folder.iterdir()) if folder.is_dir() else ()
        return frozenset(int(name[:-4]) for name in names if _KERNEL_NAME.fullmatch(name))

    def foreign_entries(self, layers) -> tuple[Problem, ...]:
        """Entries of ``kernels/`` other than the folders of ``layers`` (a model's layers): reported, left alone."""
        folder = self.root / KERNELS
        return tuple(
            Problem(path, "not the kernels folder of a layer of this model", "ignored")
            for path in (sorted(folder.iterdir()) if folder.is_dir() else ())
            if not (path.is_dir() and path.name in layers)
        )

    def write(self, layer: str, channel: int, record: Mapping[str, np.ndarray]) -> Path:
        """Stores finished kernel ``(layer, channel)``'s ``record`` (name → array), compressed; never
        overwrites one."""
        path = self.kernel_path(layer, channel)
        if path.exists():
            raise StoreError(f"{path} exists; a finished kernel is never rewritten")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: np.asarray(value) for name, value in record.items()}
        arrays.update(layer=np.asarray(layer), channel=np.asarray(int(channel), np.int64))
        write_atomically(path, lambda tmp: np.savez_compressed(tmp, **arrays), durable=True)
        return path

    def read(self, layer: str, channel: int, schema: Schema) -> dict[str, np.ndarray]:
        """Kernel ``(layer, channel)``'s record, checked against ``schema`` (name → (shape, dtype)).

        Raises :class:`StoreError` saying what is wrong with the file.
        """
        path = self.kernel_path(layer, channel)
        try:
            with np.load(path, allow_pickle=False) as data:
                record = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
            raise StoreError(f"unreadable kernel file ({type(err).__name__}: {err})") from None
        problems = []
        missing = sorted(set(schema) - set(record))
        extra = sorted(set(record) - set(schema) - {"layer", "channel"})
        if missing:
            problems.append(f"arrays {', '.join(missing)} missing")
        if extra:
            problems.append(f"unexpected arrays {', '.join(extra)}")
        for name, (shape, dtype) in schema.items():
            if name in record and (record[name].shape != tuple(shape) or record[name].dtype != np.dtype(dtype)):
                problems.append(f"{name} is {record[name].dtype}{list(record[name].shape)}, "
                                f"expected {dtype}{list(shape)}")
        if _identity(record) != (layer, channel):
            problems.append(f"it records kernel {_identity(record)}, not {(layer, channel)}")
        if problems:
            raise StoreError("; ".join(problems))
        return {name: record[name] for name in schema}

    def audit(self, layer: str, schema: Schema) -> Audit:
        """Checks every file in ``layer``'s folder: which channels are done, and the problems.

        A kernel file that fails :meth:`read` is moved to ``quarantine/{layer}/`` (so
        its kernel is computed again); a killed writer's temporary file is removed;
        any other file is left alone and reported.
        """
        folder = self.root / KERNELS / layer
        done, problems = set(), []
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if path.is_file() and _KERNEL_NAME.fullmatch(path.name):
                channel = int(path.stem)
                try:
                    self.read(layer, channel, schema)
                except StoreError as err:
                    problems.append(Problem(path, str(err), "quarantined", self._quarantine(layer, path)))
                else:
                    done.add(channel)
            elif path.is_file() and _TEMP_NAME.fullmatch(path.name):
                path.unlink()
                problems.append(Problem(path, "an unfinished write of a killed run", "removed"))
            else:
                problems.append(Problem(path, "not a kernel file (expected {channel}.npz)", "ignored"))
        return Audit(frozenset(done), tuple(problems))

    def _quarantine(self, layer: str, path: Path) -> Path:
        folder = self.root / QUARANTINE / layer
        folder.mkdir(parents=True, exist_ok=True)
        n = 0
        while (target := folder / f"{path.name}.{n}").exists():
            n += 1
        os.replace(path, target)
        return target
