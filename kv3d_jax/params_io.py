"""Params files: a params pytree (nested dicts of arrays) stored as Flax msgpack.

msgpack holds only data — dicts, strings, numbers and raw array bytes with their dtype
and shape — so loading a params file never runs code, unlike a pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import serialization


class ParamsFileError(ValueError):
    """A file is not a params file written by :func:`save`."""


def save(path, params) -> Path:
    """Writes ``params`` (nested dicts of arrays) to ``path``, atomically; returns the path."""
    path = Path(path)
    data = serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def load(path) -> dict:
    """The params pytree saved at ``path``: nested dicts of (read-only) numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist or is not a file")
    try:
        params = serialization.msgpack_restore(path.read_bytes())
    except (ValueError, TypeError) as err:  # msgpack's errors, and numpy's on a bad array record
        raise _not_params(path, f"{type(err).__name__}: {err}") from None
    if not isinstance(params, dict) or not params:
        raise _not_params(path, f"it holds a {type(params).__name__}, not a dict of arrays")
    # msgpack_serialize stores 0-d arrays as numpy scalars; give them back as 0-d arrays.
    params = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, np.generic) else x, params)
    bad = [leaf for leaf in jax.tree.leaves(params) if not isinstance(leaf, np.ndarray)]
    if bad:
        raise _not_params(path, f"it holds a {type(bad[0]).__name__} where arrays belong")
    return params


def _not_params(path: Path, reason: str) -> ParamsFileError:
    return ParamsFileError(
        f"{path} is not a kv3d params file (Flax msgpack of arrays): {reason}; "
        "write one with `kv3d convert MODEL CHECKPOINT -o PARAMS_FILE`"
    )
