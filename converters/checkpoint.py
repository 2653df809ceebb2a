"""Reads PyTorch and Caffe2 checkpoints into plain Python containers of numpy arrays, without torch.

Three file formats are understood, told apart by their first bytes:

- ``torch-zip``: ``torch.save`` since PyTorch 1.6, a zip archive holding ``<prefix>/data.pkl``
  (the pickled object, tensors as persistent ids ``('storage', storage_type, key, location,
  numel)``) and each storage's raw bytes in ``<prefix>/data/<key>``, in the byte order named
  by ``<prefix>/byteorder`` (little if absent).
- ``torch-legacy``: ``torch.save`` before 1.6 (or ``_use_new_zipfile_serialization=False``),
  e.g. ``c3d.pickle``: consecutive pickles of the magic number, the protocol version, a
  ``sys_info`` dict and the object, then the pickled list of storage keys, then for each key
  an 8-byte little-endian element count followed by the storage's little-endian bytes.
- ``pickle``: any other pickle of containers and numpy arrays, e.g. the Caffe2/Detectron
  ``{'blobs': {name: ndarray}}`` files written by Python 2 (read with ``encoding='latin1'``,
  so Python 2 byte strings come back as ``str``).

Tensors become C-contiguous numpy arrays with the tensor's dtype, shape and values (views,
transposes and slices of shared storages included). ``bfloat16`` tensors become ``float32``
— exactly, since a bfloat16 is the upper 16 bits of a float32 — because numpy has no
bfloat16. ``nn.Parameter`` becomes its array; dicts, OrderedDicts, lists and tuples keep
their type.

Unpickling resolves globals through an allow-list: the tensor and storage rebuilders, the
torch storage types (mapped to numpy dtypes), ``collections.OrderedDict``, numpy's array,
dtype and scalar reconstructors, ``_codecs.encode`` (Python 3 pickles of bytes at protocol
2) and ``argparse.Namespace`` (read as a dict of its attributes). Any other global raises
:class:`UnsafeCheckpointError` when the pickle names it, before it could be called: kv3d
never executes code from a checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# What a pickle can start with: PROTO (protocol >= 2), or MARK / EMPTY_DICT / EMPTY_LIST,
# which open a protocol 0/1 container. Other first bytes mean the file is no pickle.
_PICKLE_FIRST_BYTES = frozenset(b"\x80(}]")

FORMATS = {
    "torch-zip": "PyTorch zip archive, torch.save since 1.6",
    "torch-legacy": "legacy PyTorch file, torch.save before 1.6",
    "pickle": "pickle of arrays, e.g. Caffe2/Detectron blobs",
}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not hold what a converter expects."""


class NotACheckpointError(CheckpointError):
    """The file is neither a PyTorch checkpoint nor a pickle."""


class CorruptCheckpointError(CheckpointError):
    """The file looks like a checkpoint but is truncated or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle refers to a global outside the allow-list (code kv3d will not run)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """A torch storage class (``torch.FloatStorage`` ...) as the numpy dtype of its elements."""

    name: str
    dtype: np.dtype
    bfloat16: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    """A placeholder for elements ``[offset, offset + numel)`` of stored storage ``key``."""

    key: str
    type: _StorageType
    offset: int
    numel: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
    """A placeholder for a strided view (in elements) of a storage, resolved once bytes are read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


# Element dtypes of torch storage classes; bfloat16 is read as its raw 16 bits.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "uint16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "UntypedStorage": "uint8",
}
# Files saved from a GPU before PyTorch 1.6 name torch.cuda.*Storage; the bytes are the same.
_STORAGE_TYPES = {
    f"{module}.{name}": _StorageType(f"{module}.{name}", np.dtype(dtype), name == "BFloat16Storage")
    for module in ("torch", "torch.cuda")
    for name, dtype in _STORAGE_DTYPES.items()
}


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor refers to {type(storage).__name__}, not a storage")
    return _Tensor(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data, *_):
    return data


class _Namespace(dict):
    """``argparse.Namespace`` (Lightning keeps a script's arguments so) as a dict of its attributes."""

    def __setstate__(self, state):
        self.update(state)


class _ClassReference(str):
    """A class a checkpoint names but must never call: read as its qualified name.

    Lightning keys its callbacks' states by the callback class (``{ModelCheckpoint: {...}}``),
    so a VideoGPT ``.ckpt`` refers to such classes without instantiating them.
    """

    def __call__(self, *args, **kwargs):
        raise UnsafeCheckpointError(f"the checkpoint tries to instantiate {self}; kv3d never executes code from checkpoints")


_REFERENCED_CLASS_PREFIXES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol < 3; other codecs are refused."""
    if encoding != "latin1":
        raise ValueError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# numpy moved these reconstructors from numpy.core to numpy._core in 2.0; asking numpy for
# the functions its own pickles use gets them under either name without importing numpy.core.
_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

_ALLOWED_GLOBALS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
    "argparse.Namespace": _Namespace,
    "_codecs.encode": _latin1_bytes,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    **{
        f"{prefix}.{name}": fn
        for prefix in ("numpy.core", "numpy._core")
        for name, fn in (
            ("multiarray._reconstruct", _NP_RECONSTRUCT),
            ("multiarray.scalar", _NP_SCALAR),
            ("numeric._frombuffer", _NP_FROMBUFFER),
        )
    },
    **_STORAGE_TYPES,
}


class _Unpickler(pickle.Unpickler):
    """Unpickles through the allow-list; records torch storages as :class:`_Storage` placeholders."""

    def __init__(self, file, path: Path, storages: dict[str, _Storage] | None = None):
        super().__init__(file, encoding="latin1")
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[qualified]
        if module.startswith(_REFERENCED_CLASS_PREFIXES):
            return _ClassReference(qualified)
        if module in ("torch", "torch.cuda") and name.endswith("Storage"):
            raise CheckpointError(
                f"{self._path} holds tensors of type {qualified}, which kv3d cannot read; "
                "supported: float16/32/64, bfloat16, int8/16/32/64, uint8 and bool tensors"
            )
        raise UnsafeCheckpointError(
            f"{self._path} refers to {qualified}, which is not on kv3d's list of tensor and "
            "container types; kv3d never executes code from checkpoints. If the file holds a "
            "whole pickled model, re-save its weights with torch.save(model.state_dict(), path)"
        )

    def persistent_load(self, pid):
        if self._storages is None:
            raise ValueError("a plain pickle refers to external storages")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ValueError(f"unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        root = self._storages.setdefault(key, _Storage(key, storage_type, 0, numel))
        if root.type != storage_type:
            raise ValueError(f"storage {key} is read as both {root.type.name} and {storage_type.name}")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        # PyTorch < 0.4 stored storage views as (view key, offset, numel) into a root storage.
        _, offset, view_numel = view
        return _Storage(key, storage_type, int(offset), int(view_numel))


def checkpoint_format(path) -> str:
    """The format of the checkpoint file ``path``: a key of :data:`FORMATS`, from its first bytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(4)
        if head == _ZIP_MAGIC:
            return "torch-zip"
        if not head or head[0] not in _PICKLE_FIRST_BYTES or (head[0] == 0x80 and head[1:2] > b"\x05"):
            raise NotACheckpointError(
                f"{path} is not a PyTorch or Caffe2 checkpoint (expected a zip archive or a "
                f"pickle; the file starts with {head!r})"
            )
        f.seek(0)
        try:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name not in ("PROTO", "FRAME"):
                    return "torch-legacy" if arg == _LEGACY_MAGIC else "pickle"
        except ValueError as err:
            raise _corrupt(path, err) from None
    raise _corrupt(path, "no pickle opcodes")


def read_checkpoint(path) -> Any:
    """The object saved in checkpoint ``path`` (any of :data:`FORMATS`), tensors as numpy arrays."""
    path = Path(path)
    readers = {"torch-zip": _read_zip, "torch-legacy": _read_legacy, "pickle": _read_pickle}
    reader = readers[checkpoint_format(path)]
    try:
        return reader(path)
    except CheckpointError:
        raise
    # The readers' helpers signal an inconsistent file with ValueError; name the file here.
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, IndexError, KeyError, OverflowError, MemoryError) as err:
        raise _corrupt(path, err) from None


def _corrupt(path: Path, reason) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"file {path} is truncated or corrupt: {reason}")


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pickles:
            raise NotACheckpointError(
                f"{path} is a zip archive without data.pkl, so not a PyTorch checkpoint"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
        if byteorder not in ("little", "big"):
            raise _corrupt(path, f"unknown byte order {byteorder!r}")
        storages: dict[str, _Storage] = {}
        with archive.open(pickles[0]) as f:
            obj = _Unpickler(f, path, storages).load()
        arrays = {
            key: _decode(archive.read(f"{prefix}data/{key}"), storage, byteorder)
            for key, storage in storages.items()
        }
    return _resolve(obj, arrays, {})


def _read_legacy(path: Path) -> Any:
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        magic = _Unpickler(f, path).load()
        protocol = _Unpickler(f, path).load()
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise _corrupt(path, f"unknown legacy PyTorch protocol {protocol!r}")
        _Unpickler(f, path).load()  # sys_info: storages are little-endian whatever it says
        obj = _Unpickler(f, path, storages).load()
        keys = _Unpickler(f, path).load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise _corrupt(path, "the list of storages does not match the tensors")
        arrays = {}
        for key in map(str, keys):
            storage = storages[key]
            numel = int.from_bytes(_read_exactly(f, 8, path), "little")
            if numel != storage.numel:
                raise _corrupt(path, f"storage {key} has {numel} elements, its tensors expect {storage.numel}")
            nbytes = numel * storage.type.dtype.itemsize
            arrays[key] = _decode(_read_exactly(f, nbytes, path), storage, "little")
    return _resolve(obj, arrays, {})


def _read_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return _resolve(_Unpickler(f, path).load(), {}, {})


def _read_exactly(f, nbytes: int, path: Path) -> bytes:
    left = os.fstat(f.fileno()).st_size - f.tell()
    if nbytes > left:
        raise _corrupt(path, f"expected {nbytes} more bytes, found {left}")
    return f.read(nbytes)


def _decode(raw: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
    """A root storage's bytes as a 1-D native-endian array (bfloat16 widened to float32), maybe read-only."""
    dtype = storage.type.dtype.newbyteorder("<" if byteorder == "little" else ">")
    if len(raw) != storage.numel * dtype.itemsize:
        raise ValueError(
            f"storage {storage.key} holds {len(raw)} bytes, expected {storage.numel} x {dtype.itemsize}"
        )
    values = np.frombuffer(raw, dtype)
    if storage.type.bfloat16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values if dtype.isnative else values.astype(dtype.newbyteorder("="))


def _resolve(obj, arrays: dict[str, np.ndarray], memo: dict[int, Any]):
    """``obj`` with every placeholder replaced by its array; shared tensors stay shared."""
    if isinstance(obj, (_Tensor, _Storage)):
        if id(obj) not in memo:
            memo[id(obj)] = _tensor(obj, arrays) if isinstance(obj, _Tensor) else _storage(obj, arrays).copy()
        return memo[id(obj)]
    if isinstance(obj, dict):
        kind = collections.OrderedDict if isinstance(obj, collections.OrderedDict) else dict
        return kind((key, _resolve(value, arrays, memo)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(value, arrays, memo) for value in obj)
    return obj


def _storage(storage: _Storage, arrays: dict[str, np.ndarray]) -> np.ndarray:
    root = arrays[storage.key]
    if storage.offset < 0 or storage.offset + storage.numel > root.size:
        raise ValueError(f"a view of storage {storage.key} lies outside it")
    return root[storage.offset:storage.offset + storage.numel]


def _tensor(tensor: _Tensor, arrays: dict[str, np.ndarray]) -> np.ndarray:
    data = _storage(tensor.storage, arrays)
    shape, stride = tensor.shape, tensor.stride
    if len(shape) != len(stride) or min(shape + stride, default=0) < 0 or tensor.offset < 0:
        raise ValueError(f"a tensor has shape {shape} and stride {stride}")
    if 0 in shape:
        return np.zeros(shape, data.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if last >= data.size:
        raise ValueError(
            f"a tensor of shape {shape} reads element {last} of a {data.size}-element storage"
        )
    view = np.lib.stride_tricks.as_strided(
        data[tensor.offset:], shape, tuple(s * data.itemsize for s in stride), writeable=False
    )
    return np.array(view, order="C")
