"""Params files: a params pytree (nested dicts of arrays) stored as Flax msgpack.

msgpack holds only data — dicts, strings, numbers and raw array bytes with their dtype
and shape — so loading a params file never runs code, unlike a pickle. Beside the
params, a file records which model they are for and that model's config (e.g. VideoGPT's
``downsample``), as a JSON string under the top-level key :data:`METADATA`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

METADATA = "__kv3d__"


class ParamsFileError(ValueError):
    """A file is not a params file written by :func:`save`."""


@dataclasses.dataclass(frozen=True)
class ParamsFile:
    """What a params file holds: ``params`` (nested dicts of numpy arrays), the ``model`` name they
    are for (None in files written without one) and that model's ``config`` (a dict, empty for
    one-architecture models)."""

    params: dict
    model: str | None
    config: dict[str, Any]


def save(path, params, model: str | None = None, config: dict | None = None) -> Path:
    """Writes ``params`` (nested dicts of arrays), the ``model`` name and its ``config`` (JSON-able)
    to ``path``, atomically (a failed write leaves neither the file nor a temporary one); returns the path."""
    path = Path(path)
    data = dict(jax.tree.map(np.asarray, params))
    if METADATA in data:
        raise ValueError(f"params may not have a top-level entry named {METADATA!r}")
    data[METADATA] = json.dumps({"model": model, "config": dict(config or {})})
    payload = serialization.msgpack_serialize(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read(path) -> ParamsFile:
    """The params, model name and config saved at ``path``; params as nested dicts of numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist or is not a file")
    try:
        params = serialization.msgpack_restore(path.read_bytes())
    except (ValueError, TypeError) as err:  # msgpack's errors, and numpy's on a bad array record
        raise _not_params(path, f"{type(err).__name__}: {err}") from None
    if not isinstance(params, dict) or not params:
        raise _not_params(path, f"it holds a {type(params).__name__}, not a dict of arrays")
    model, config = _metadata(path, params.pop(METADATA, None))
    # msgpack_serialize stores 0-d arrays as numpy scalars; give them back as 0-d arrays.
    params = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, params)
    bad = [leaf for leaf in jax.tree.leaves(params) if not isinstance(leaf, np.ndarray)]
    if bad:
        raise _not_params(path, f"it holds a {type(bad[0]).__name__} where arrays belong")
    return ParamsFile(params, model, config)


def load(path) -> dict:
    """The params pytree saved at ``path``: nested dicts of (read-only) numpy arrays."""
    return read(path).params


def _metadata(path: Path, entry) -> tuple[str | None, dict]:
    if entry is None:
        return None, {}
    try:
        meta = json.loads(entry) if isinstance(entry, str) else None
    except ValueError:
        meta = None
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), (str, type(None)))
            and isinstance(meta.get("config"), dict)):
        raise _not_params(path, f"its {METADATA!r} entry is not the model name and config kv3d writes")
    return meta["model"], meta["config"]


def _not_params(path: Path, reason: str) -> ParamsFileError:
    return ParamsFileError(
        f"{path} is not a kv3d params file (Flax msgpack of arrays): {reason}; "
        "convert the model's checkpoint to write one"
    )
