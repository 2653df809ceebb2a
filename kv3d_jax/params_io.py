"""Params files: a params pytree (nested dicts of arrays) stored as Flax msgpack.

msgpack holds only data — dicts, strings, numbers and raw array bytes with their dtype
and shape — so loading a params file never runs code, unlike a pickle. Beside the
params, a file records which model they are for and that model's config (e.g. VideoGPT's
``downsample``), as a JSON string under the top-level key :data:`METADATA`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import msgpack
import numpy as np
from flax import serialization

from kv3d_jax.files import write_atomically
from kv3d_jax.untrusted import escape, quote, regular_file

METADATA = "__kv3d__"
# The model name and config are a few hundred characters of JSON.
_MAX_METADATA = 1 << 16


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
    return write_atomically(path, lambda tmp: tmp.write_bytes(payload))


# What a params file may hold, checked while it is decoded: containers (maps and arrays) in all,
# nesting depth, array dimensions and dtypes. The largest zoo model has a few hundred tensors.
MAX_CONTAINERS = 100_000
MAX_DEPTH = 16
_MAX_NDIM = 32
_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                     "bfloat16", "float32", "float64", "complex64", "complex128"})
_CHUNKED = "__msgpack_chunked_array__"


class _Refusal(Exception):
    """Raised while a params file is decoded; :func:`read` turns it into a :class:`ParamsFileError`."""


def read(path) -> ParamsFile:
    """The params, model name and config saved at ``path``; params as nested dicts of numpy arrays.

    The file is untrusted: a non-regular file (a pipe, a device) is refused before it is opened,
    and while it is decoded it may hold at most :data:`MAX_CONTAINERS` maps and arrays, nested at
    most :data:`MAX_DEPTH` deep, whose arrays are numeric, of at most 32 dimensions, each with
    exactly the bytes its shape needs. Which values the weights hold is checked by the loader
    (:func:`kv3d_jax.zoo.check_params`). Raises :class:`ParamsFileError` saying what is wrong.
    """
    path = regular_file(path, "params file")
    try:
        tree = _unpack(path.read_bytes())
        if not isinstance(tree, dict) or not tree:
            raise _Refusal(f"it holds {_kind(tree)}, not a dict of arrays")
        model, config = _metadata(tree.pop(METADATA, None))
        params = _arrays(tree, ())
    except _Refusal as err:
        raise _not_params(path, str(err)) from None
    return ParamsFile(params, model, config)


def _unpack(data: bytes):
    """The msgpack object in ``data``, its arrays decoded, counting containers as they are built."""
    count = [0]

    def container(value):
        count[0] += 1
        if count[0] > MAX_CONTAINERS:
            raise _Refusal(f"it holds more than {MAX_CONTAINERS:,} maps and arrays")
        return value

    try:
        return msgpack.unpackb(data, ext_hook=_ext, raw=False, strict_map_key=False, object_hook=container,
                               list_hook=container)
    except _Refusal:
        raise
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as err:  # msgpack's errors on malformed data
        raise _Refusal(f"it is not valid msgpack ({escape(str(err), 100)})") from None


def _ext(code: int, data: bytes):
    """A msgpack extension of Flax's: an ndarray (code 1) or a numpy scalar (code 3) as a numpy array."""
    if code not in (1, 3):
        raise _Refusal(f"it holds a msgpack extension of type {code}, not an array")
    try:
        record = msgpack.unpackb(data, raw=True, object_hook=_no_container, list_hook=_flat)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData):
        record = None
    if not (isinstance(record, tuple) and len(record) == 3 and isinstance(record[1], bytes)
            and isinstance(record[2], bytes)):
        raise _Refusal("it holds an array record that is not (shape, dtype, bytes)")
    shape, name, raw = record
    if not (isinstance(shape, tuple) and len(shape) <= _MAX_NDIM
            and all(type(n) is int and 0 <= n < 2**63 for n in shape)):
        raise _Refusal(f"it holds an array of shape {quote(shape)}, not at most {_MAX_NDIM} sizes >= 0")
    dtype_name = name.decode("ascii", "replace")
    if dtype_name not in _DTYPES:
        raise _Refusal(f"it holds an array of dtype {quote(dtype_name, 30)}; kv3d reads numeric arrays only")
    dtype = np.dtype(jax.numpy.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise _Refusal(f"it holds an array of shape {shape} and dtype {dtype_name} in {len(raw):,} bytes, "
                       f"not {math.prod(shape) * dtype.itemsize:,}")
    array = np.frombuffer(raw, dtype).reshape(shape)
    return array if code == 1 else np.asarray(array[()])


def _no_container(value):
    raise _Refusal("it holds an array record with a map inside")


def _flat(value):
    return tuple(value)


def _arrays(tree: dict, where: tuple) -> dict:
    """``tree`` checked to be nested dicts (string keys) of numpy arrays, Flax's chunked arrays joined."""
    if len(where) >= MAX_DEPTH:
        raise _Refusal(f"it nests maps more than {MAX_DEPTH} deep")
    result = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise _Refusal(f"it has a key {quote(key)} where names belong")
        at = where + (key,)
        if isinstance(value, dict) and _CHUNKED in value:
            value = _unchunk(value, at)
        if isinstance(value, dict):
            result[key] = _arrays(value, at)
        elif isinstance(value, np.ndarray):
            result[key] = value
        else:
            raise _Refusal(f"it holds {_kind(value)} at {quote('/'.join(at))}, where arrays belong")
    return result


def _unchunk(record: dict, where: tuple) -> np.ndarray:
    """An array Flax stored in chunks: ``{"__msgpack_chunked_array__": True, "shape": {"0": n, ...},
    "chunks": {"0": array, ...}}``, checked and joined."""
    shape, chunks = record.get("shape"), record.get("chunks")
    if not (isinstance(shape, dict) and isinstance(chunks, dict) and len(shape) <= _MAX_NDIM and chunks
            and all(type(shape.get(str(i))) is int and 0 <= shape[str(i)] < 2**63 for i in range(len(shape)))
            and all(isinstance(chunks.get(str(i)), np.ndarray) and chunks[str(i)].ndim == 1
                    for i in range(len(chunks)))
            and len({chunks[str(i)].dtype for i in range(len(chunks))}) == 1):
        raise _Refusal(f"its chunked array at {quote('/'.join(where))} is not a shape and 1-d chunks of one dtype")
    dims = tuple(shape[str(i)] for i in range(len(shape)))
    parts = [chunks[str(i)] for i in range(len(chunks))]
    if sum(part.size for part in parts) != math.prod(dims):
        raise _Refusal(f"its chunked array at {quote('/'.join(where))} does not hold the {math.prod(dims):,} "
                       f"elements of shape {dims}")
    return np.concatenate(parts).reshape(dims)


def _kind(value) -> str:
    return f"a {type(value).__name__}" if not isinstance(value, np.generic) else f"a numpy {value.dtype} scalar"


def load(path) -> dict:
    """The params pytree saved at ``path``: nested dicts of (read-only) numpy arrays."""
    return read(path).params


def _metadata(entry) -> tuple[str | None, dict]:
    if entry is None:
        return None, {}
    try:
        meta = json.loads(entry) if isinstance(entry, str) and len(entry) <= _MAX_METADATA else None
    except (ValueError, RecursionError):
        meta = None
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), (str, type(None)))
            and isinstance(meta.get("config"), dict)):
        raise _Refusal(f"its {METADATA!r} entry is not the model name and config kv3d writes")
    return meta["model"], meta["config"]


def _not_params(path: Path, reason: str) -> ParamsFileError:
    return ParamsFileError(
        f"{path} is not a kv3d params file (Flax msgpack of arrays): {reason}; "
        "convert the model's checkpoint to write one"
    )
