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
  ``{'blobs': {name: ndarray}}`` files written by Python 2 (Python 2 byte strings are read
  as latin-1 ``str``, as ``pickle.load(f, encoding='latin1')`` does).

Tensors become C-contiguous numpy arrays with the tensor's dtype, shape and values (views,
transposes and slices of shared storages included). ``bfloat16`` tensors become ``float32``
— exactly, since a bfloat16 is the upper 16 bits of a float32 — because numpy has no
bfloat16. ``nn.Parameter`` becomes its array; dicts, OrderedDicts, lists and tuples keep
their type; ``argparse.Namespace`` becomes a dict of its attributes.

The file is untrusted. Its pickles are not given to :mod:`pickle`: :class:`_Machine`
interprets their opcodes itself and builds only data — numbers, strings, bytes, lists,
tuples, dicts, sets — and, for the globals on its allow-list, placeholders it checks before
any array exists: torch tensors and storages, numpy arrays, scalars and dtypes of the numeric
dtypes bool, (u)int8/16/32/64, float16/32/64 (bfloat16 for torch storages), ``OrderedDict``,
``argparse.Namespace`` and ``_codecs.encode`` (Python 3 bytes at protocol 2). Any other global
raises :class:`UnsafeCheckpointError` when the pickle names it, and state (``BUILD``) is only
applied to an array, dtype or Namespace placeholder: kv3d never executes code from a checkpoint.
A tensor or array of another dtype (complex, datetime, string, object, structured) is refused
naming it.

Every size is checked before the work it would cost (:class:`CheckpointLimitError`):

- a pickle runs at most :data:`MAX_PICKLE_OPCODES` opcodes, and the object it builds nests
  at most :data:`MAX_NESTING` containers deep, holds no container inside itself, and does
  not expand through shared references (the pickle memo) to more than
  :data:`MAX_EXPANDED_OBJECTS` objects — a few hundred bytes can otherwise stand for an
  exponential tree; kv3d resolves each shared object once, and the items that calls and states
  copy from shared objects (``OrderedDict(pairs)``, a Namespace's state) count against the same
  limit;
- nothing may follow the end of a checkpoint (a pickle's STOP, a legacy file's last storage);
- every storage a tensor claims must be in the file with exactly its bytes (a zip member's
  declared size, a legacy file's remaining bytes), every tensor must lie inside its storage
  and hold no more elements than it (no zero-stride expansion), and all tensors together at
  most :data:`MAX_VIEW_FACTOR` times the stored elements;
- zip members must be stored or deflated, unencrypted, and inflate to at most
  :data:`MAX_INFLATION` times their compressed size (members of at most 1 MiB may inflate
  more, but all members together to at most :data:`MAX_INFLATION` times the file's size plus
  1 MiB); their declared sizes are checked before any member is read, and no read goes past them;
- the bytes a pickle builds from its own data (numpy arrays, ``_codecs.encode`` results) add up
  to at most :data:`MAX_VIEW_FACTOR` times the pickle's size plus 1 MiB, counting every copy of
  a shared buffer;
- integers used as shapes, strides, offsets or element counts are below 2^63, and dict and set
  keys are strings, bytes, floats, None, integers of at most 64 bits or tuples of at most 32 of
  them, so that no key costs more to hash than to read.

Errors quote at most a short, escaped prefix of any value from the file
(:func:`kv3d_jax.untrusted.quote`), and a file that is not a regular file (a pipe, a device) is
refused before it is opened.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import mmap
import pickle
import pickletools
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from kv3d_jax.untrusted import quote, regular_file

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

# A state dict takes about 25 opcodes a tensor, a Lightning checkpoint with its Adam state
# about 80: this is thousands of tensors, and is interpreted in under a second.
MAX_PICKLE_OPCODES = 500_000
MAX_NESTING = 100
MAX_EXPANDED_OBJECTS = 10 * MAX_PICKLE_OPCODES
MAX_VIEW_FACTOR = 4
MAX_INFLATION = 16
# Members this small are never a threat, whatever their compression ratio.
_SMALL_MEMBER = 1 << 20
_MAX_NDIM = 32
# Shapes, strides, offsets and element counts are checked below this before any arithmetic on them.
_MAX_INDEX = 2**63
# Dict and set keys: integers of at most this many bits, tuples of at most this many items.
_MAX_KEY_BITS = 64
_MAX_KEY_ITEMS = 32
# The longest module or name of a global a pickle may name.
_MAX_GLOBAL_NAME = 200
# Bytes a pickle may build beyond MAX_VIEW_FACTOR times its own size (small files' arrays).
_BUILT_BYTES_SLACK = 1 << 20

_SUPPORTED_DTYPES = "bool, int8/16/32/64, uint8/16/32/64, float16, bfloat16, float32 and float64"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not hold what a converter expects."""


class NotACheckpointError(CheckpointError):
    """The file is neither a PyTorch checkpoint nor a pickle."""


class CorruptCheckpointError(CheckpointError):
    """The file looks like a checkpoint but is truncated or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle refers to a global outside the allow-list (code kv3d will not run)."""


class UnsupportedTensorError(CheckpointError):
    """A tensor or array has a dtype kv3d does not read (complex, string, object, datetime ...)."""


class CheckpointLimitError(CheckpointError):
    """The file claims more objects, nesting, elements or bytes than kv3d will spend on it."""


class _Refusal(Exception):
    """Raised inside the readers; read_checkpoint turns it into ``kind`` naming the file."""

    def __init__(self, kind: type[CheckpointError], message: str):
        super().__init__(message)
        self.kind = kind


def _corrupt(message: str) -> _Refusal:
    return _Refusal(CorruptCheckpointError, message)


def _limit(message: str) -> _Refusal:
    return _Refusal(CheckpointLimitError, message)


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    """A torch storage class (``torch.FloatStorage`` ...) as the numpy dtype of its elements."""

    name: str
    dtype: np.dtype | None  # None: a torch storage type kv3d does not read (complex, quantized ...)
    bfloat16: bool = False


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Storage:
    """A placeholder for elements ``[offset, offset + numel)`` of stored storage ``key``."""

    key: str
    type: _StorageType
    offset: int
    numel: int


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Tensor:
    """A placeholder for a strided view (in elements) of a storage, resolved once bytes are read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Refused:
    """A tensor or array kv3d will not read; the error names it once its place is known."""

    kind: type[CheckpointError]
    reason: str


@dataclasses.dataclass(slots=True, eq=False)
class _DType:
    """A pickled ``numpy.dtype``: its type string (``'f4'``) and, after BUILD, its byte order."""

    code: str
    byteorder: str = "="
    built: bool = False

    def numpy(self) -> np.dtype | None:
        """The numpy dtype, or None when it is not one of the numeric dtypes kv3d reads."""
        if self.code not in _NUMPY_CODES:
            return None
        return np.dtype(_NUMPY_CODES[self.code]).newbyteorder("=" if self.byteorder == "|" else self.byteorder)

    def describe(self) -> str:
        name = _DTYPE_KINDS.get(self.code[:1], "unknown")
        return f"{name} dtype {self.code[:16]!r}"


# numpy's type strings of the dtypes kv3d reads, and names of the kinds it refuses.
_NUMPY_CODES = {
    code: code for code in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
}
_DTYPE_KINDS = {
    "c": "complex", "O": "object", "M": "datetime64", "m": "timedelta64", "U": "unicode string",
    "S": "byte string", "a": "byte string", "V": "structured (void)", "f": "float", "i": "integer",
    "u": "unsigned integer", "b": "bool",
}


@dataclasses.dataclass(slots=True, eq=False)
class _Array:
    """A pickled ``numpy.ndarray``: empty after ``_reconstruct``, the array (or a refusal) after BUILD."""

    value: np.ndarray | _Refused | None = None


class _Namespace(dict):
    """``argparse.Namespace`` (Lightning keeps a script's arguments so) as a dict of its attributes."""


class _ClassReference(str):
    """A class a checkpoint names but must never call: read as its qualified name.

    Lightning keys its callbacks' states by the callback class (``{ModelCheckpoint: {...}}``),
    so a VideoGPT ``.ckpt`` refers to such classes without instantiating them.
    """


_REFERENCED_CLASS_PREFIXES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")


@dataclasses.dataclass(frozen=True, slots=True)
class _Global:
    """A global on the allow-list, as the pickle names it."""

    name: str


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
# numpy moved its reconstructors from numpy.core to numpy._core in 2.0; pickles name either.
_NUMPY_FUNCTIONS = {
    f"{prefix}.{name}": name.rsplit(".", 1)[1]
    for prefix in ("numpy.core", "numpy._core")
    for name in ("multiarray._reconstruct", "multiarray.scalar", "numeric._frombuffer")
}
_CALLABLES = {
    "torch._utils._rebuild_tensor": "tensor",
    "torch._utils._rebuild_tensor_v2": "tensor",
    "torch._utils._rebuild_parameter": "parameter",
    "torch._utils._rebuild_parameter_with_state": "parameter",
    "collections.OrderedDict": "OrderedDict",
    "_codecs.encode": "encode",
    "builtins.bytes": "bytes",
    "__builtin__.bytes": "bytes",
    "numpy.dtype": "dtype",
    **_NUMPY_FUNCTIONS,
}
_CLASSES = {"numpy.ndarray": "ndarray", "argparse.Namespace": "Namespace"}
_HASHABLE = (str, int, float, bytes, type(None))
_ATOMS = _HASHABLE + (np.ndarray, np.generic)


def _ints(value, what: str, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > _MAX_NDIM or not all(
            type(v) is int and minimum <= v < _MAX_INDEX for v in value):
        raise _corrupt(f"{what} {_short(value)} is not a tuple of at most {_MAX_NDIM} integers >= {minimum}")
    return value


def _text(text: str, limit: int = 100) -> str:
    """``text`` cut to ``limit`` characters, non-ASCII and control characters escaped (one line)."""
    return ascii(text[:limit])[1:-1] + ("..." if len(text) > limit else "")


def _short(value) -> str:
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return quote(value, 57)
    return f"a {type(value).__name__.lstrip('_')}"


class _Machine:
    """A pickle interpreter that builds data and allow-listed placeholders, never calling the file's globals.

    ``reader`` has ``read(n)``, ``readline()`` and ``tell()``; ``persistent(pid)`` resolves
    a torch storage reference (None: the pickle may hold none); ``budget`` is a one-element
    list of opcodes left, shared by the pickles of one file; ``counts["view_elements"]``
    adds up the elements of the tensors built, ``counts["built_bytes"]`` the bytes of the arrays
    and byte strings built from the pickle's data, every copy counted.
    """

    def __init__(self, reader, persistent, budget: list[int], counts: dict):
        self._reader = reader
        self._persistent = persistent
        self._budget = budget
        self._counts = counts
        self._built_limit = MAX_VIEW_FACTOR * reader.size() + _BUILT_BYTES_SLACK

    def charge(self, items: int) -> None:
        """Counts ``items`` copied by a call or state the pickle can repeat on shared (memo) objects,
        refusing past :data:`MAX_EXPANDED_OBJECTS` in all: such work is not bounded by the opcodes."""
        self._counts["items"] += items
        if self._counts["items"] > MAX_EXPANDED_OBJECTS:
            raise _limit(f"its calls and states copy more than {MAX_EXPANDED_OBJECTS:,} items in all")

    def spend(self, nbytes: int) -> None:
        """Counts ``nbytes`` built from the pickle's data, refusing past the pickle's share."""
        self._counts["built_bytes"] += nbytes
        if self._counts["built_bytes"] > self._built_limit:
            raise _limit(f"its arrays and byte strings add up to more than {self._built_limit:,} bytes, "
                         f"{MAX_VIEW_FACTOR} times the pickle's size (a buffer shared by many arrays counts once "
                         "for each)")

    def load(self) -> Any:
        stack: list = []
        marks: list[list] = []
        memo: dict[int, Any] = {}
        steps = _STEPS
        left = self._budget[0]
        try:
            for opcode, arg, _ in pickletools.genops(self._reader):
                left -= 1
                if left < 0:
                    raise _limit(f"the pickles run more than {MAX_PICKLE_OPCODES:,} opcodes")
                step = steps.get(opcode.name)
                if step is None:
                    if opcode.name == "STOP":
                        if len(stack) != 1 or marks:
                            raise _corrupt("a pickle ends with a malformed stack")
                        self._budget[0] = left
                        return stack[0]
                    raise _corrupt(f"the pickle uses opcode {opcode.name}, which no checkpoint needs")
                stack = step(self, stack, marks, memo, arg)
        except (IndexError, KeyError):
            raise _corrupt("a pickle opcode finds too few items on the stack or an unknown memo entry") from None
        except (ValueError, TypeError, OverflowError) as err:
            raise _corrupt(f"the pickle is malformed ({str(err)[:200]})") from None
        raise _corrupt("a pickle ends before its STOP opcode")

    def call(self, func, args) -> Any:
        if isinstance(func, _ClassReference):
            raise _Refusal(UnsafeCheckpointError,
                           f"the checkpoint tries to instantiate {func}; kv3d never executes code from checkpoints")
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            raise _corrupt(f"the pickle calls {_short(func)}, which is not a global")
        kind = _CALLABLES.get(func.name)
        if kind is None:
            raise _Refusal(UnsafeCheckpointError,
                           f"the checkpoint calls {func.name}, which kv3d never does")
        return getattr(self, f"_call_{kind}")(*args)

    def new(self, cls, args) -> Any:
        if isinstance(cls, _ClassReference):
            return self.call(cls, args)
        if isinstance(cls, _Global) and _CLASSES.get(cls.name) == "Namespace" and args == ():
            return _Namespace()
        raise _Refusal(UnsafeCheckpointError,
                       f"the checkpoint creates an object of class {_short(getattr(cls, 'name', cls))}, "
                       "which kv3d never does")

    def build(self, obj, state) -> None:
        if isinstance(obj, _Array) and obj.value is None:
            obj.value = _array_from_state(state, self)
        elif isinstance(obj, _DType) and not obj.built:
            obj.built = True
            if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
                raise _corrupt(f"a numpy dtype has the state {_short(state)}")
            if len(state) >= 5 and any(part is not None for part in state[2:5]):
                obj.code = "V" + obj.code  # a subarray or fields: a structured dtype
            elif obj.code in _NUMPY_CODES and not (
                    len(state) == 8 and state[0] == 3 and state[5:7] == (-1, -1) and type(state[7]) is int):
                raise _corrupt(f"a numpy {obj.code} dtype has the state {_short(state)}")
            obj.byteorder = state[1]
        elif isinstance(obj, _Namespace) and isinstance(state, dict):
            self.charge(len(state))
            obj.update(state)
        elif type(obj) is collections.OrderedDict and isinstance(state, dict):
            pass  # a state dict's _metadata (module versions): not weights, dropped
        else:
            raise _Refusal(UnsafeCheckpointError,
                           f"the checkpoint sets the state of {_short(obj)}, which kv3d never does")

    # --- the allow-listed callables

    def _call_tensor(self, storage=None, offset=None, shape=None, stride=None, *rest):
        if isinstance(storage, _Refused):
            return storage
        if not (isinstance(storage, _Storage) and type(offset) is int and offset < _MAX_INDEX
                and _autograd_state(rest)):
            raise _corrupt("a tensor is rebuilt from something other than a storage, offset, shape, stride "
                           "and autograd flags")
        shape, stride = _ints(shape, "a tensor's shape"), _ints(stride, "a tensor's stride")
        if len(shape) != len(stride) or offset < 0:
            raise _corrupt(f"a tensor has shape {shape}, stride {stride} and offset {offset}")
        numel = math.prod(shape)
        if numel == 0:
            return _Tensor(storage, offset, shape, stride)
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if last >= storage.numel:
            return _Refused(CorruptCheckpointError,
                            f"its shape {shape} reads element {last} of a {storage.numel}-element storage")
        if numel > storage.numel:
            return _Refused(CheckpointLimitError,
                            f"its shape {shape} and stride {stride} expand {storage.numel} stored elements "
                            f"to {numel:,}; kv3d reads only tensors that hold their own data")
        self._counts["view_elements"] += numel
        return _Tensor(storage, offset, shape, stride)

    def _call_parameter(self, data=None, *rest):
        if not (isinstance(data, (_Tensor, _Refused)) and _autograd_state(rest)):
            raise _corrupt("a parameter wraps something other than a tensor and autograd flags")
        return data

    def _call_OrderedDict(self, items=None):
        items = [] if items is None else items
        if not isinstance(items, list):
            raise _corrupt("OrderedDict is called with something other than a list of pairs")
        self.charge(len(items))
        result = collections.OrderedDict()
        for pair in items:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise _corrupt("OrderedDict is called with something other than a list of pairs")
            result[_key(pair[0])] = pair[1]
        return result

    def _call_encode(self, text=None, encoding=None):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _corrupt(f"_codecs.encode is called with encoding {_short(encoding)}")
        self.spend(len(text))
        return text.encode("latin1")

    def _call_bytes(self, *args):
        if args:
            raise _corrupt("bytes is called with arguments")
        return b""

    def _call_dtype(self, code=None, align=False, copy=True):
        if not isinstance(code, str):
            raise _corrupt(f"a numpy dtype is made from {_short(code)}")
        return _DType(code)

    def _call__reconstruct(self, cls=None, shape=None, typecode=None):
        if not (isinstance(cls, _Global) and _CLASSES.get(cls.name) == "ndarray"):
            raise _Refusal(UnsafeCheckpointError,
                           f"the checkpoint reconstructs an array of class {_short(getattr(cls, 'name', cls))}; "
                           "kv3d reads plain numpy arrays only")
        _ints(shape, "an empty array's shape")
        if not isinstance(typecode, (str, bytes)):
            raise _corrupt(f"an empty array has the type code {_short(typecode)}")
        return _Array()

    def _call_scalar(self, dtype=None, raw=None):
        if not isinstance(dtype, _DType):
            raise _corrupt("a numpy scalar has no dtype")
        numpy_dtype = dtype.numpy()
        if numpy_dtype is None:
            return _Refused(UnsupportedTensorError, f"it is a numpy scalar of {dtype.describe()}; "
                                                    f"kv3d reads {_SUPPORTED_DTYPES} values only")
        raw = _raw_bytes(raw, self)
        if len(raw) != numpy_dtype.itemsize:
            raise _corrupt(f"a numpy {numpy_dtype} scalar has {len(raw)} bytes")
        return np.frombuffer(raw, numpy_dtype)[0]

    def _call__frombuffer(self, raw=None, dtype=None, shape=None, order="C"):
        if order not in ("C", "F"):
            raise _corrupt(f"an array has order {_short(order)}")
        return _array_from_state((shape, dtype, order == "F", raw), self)


def _autograd_state(rest: tuple) -> bool:
    """Whether ``rest`` is what torch pickles after a tensor or parameter: nothing (PyTorch < 0.4), or
    ``requires_grad``, the backward hooks and maybe metadata or the parameter's Python state."""
    return not rest or (len(rest) in (2, 3) and type(rest[0]) is bool and isinstance(rest[1], dict)
                        and (len(rest) == 2 or rest[2] is None or isinstance(rest[2], (dict, tuple))))


def _atom_key(key) -> bool:
    return isinstance(key, _HASHABLE) and not (isinstance(key, int) and key.bit_length() > _MAX_KEY_BITS)


def _key(key):
    """``key`` if it may key a dict: a string, bytes, float, None, an integer of at most 64 bits or a
    flat tuple of at most 32 of those (Python does not cache the hash of an integer or a tuple, so a
    huge one used as a key many times would cost far more than its bytes)."""
    if _atom_key(key) or (isinstance(key, tuple) and len(key) <= _MAX_KEY_ITEMS and all(map(_atom_key, key))):
        return key
    raise _corrupt(f"a dict or set key is {_short(key)}; kv3d reads keys that are strings, numbers of at most "
                   f"{_MAX_KEY_BITS} bits or short tuples of them")


def _raw_bytes(raw, machine: _Machine) -> bytes:
    if isinstance(raw, str):  # a Python 2 str, read as latin-1
        machine.spend(len(raw))
        return raw.encode("latin1")
    if isinstance(raw, bytes):
        return raw
    raise _corrupt(f"array data is {_short(raw)}, not bytes")


def _array_from_state(state, machine: _Machine) -> np.ndarray | _Refused:
    """The array of a numpy ``__setstate__`` state ``([version,] shape, dtype, is_fortran, data)``;
    its bytes are counted by ``machine.spend``."""
    if not (isinstance(state, tuple) and (len(state) == 4 or (len(state) == 5 and state[0] in (0, 1)))
            and type(state[-2]) in (int, bool)):
        raise _corrupt(f"a numpy array has the state {_short(state)}")
    shape, dtype, fortran, raw = state[-4:]
    shape = _ints(shape, "an array's shape")
    if not isinstance(dtype, _DType):
        raise _corrupt("a numpy array has no dtype")
    numpy_dtype = dtype.numpy()
    if numpy_dtype is None:
        return _Refused(UnsupportedTensorError,
                        f"it is a numpy array of {dtype.describe()}; kv3d reads {_SUPPORTED_DTYPES} arrays only")
    raw = _raw_bytes(raw, machine)
    expected = math.prod(shape) * numpy_dtype.itemsize
    if len(raw) != expected:
        return _Refused(CorruptCheckpointError,
                        f"a numpy array of shape {shape} and dtype {numpy_dtype} has {len(raw)} bytes, not {expected}")
    machine.spend(expected)
    flat = np.frombuffer(raw, numpy_dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def _mark(machine, stack, marks, memo, arg):
    marks.append(stack)
    return []


def _push(value):
    def step(machine, stack, marks, memo, arg):
        stack.append(value)
        return stack
    return step


def _push_new(kind):
    def step(machine, stack, marks, memo, arg):
        stack.append(kind())
        return stack
    return step


def _push_arg(machine, stack, marks, memo, arg):
    stack.append(arg)
    return stack


def _push_bytes(machine, stack, marks, memo, arg):
    stack.append(bytes(arg))
    return stack


def _pop(machine, stack, marks, memo, arg):
    if stack:
        stack.pop()
        return stack
    return marks.pop()


def _pop_mark(machine, stack, marks, memo, arg):
    return marks.pop()


def _dup(machine, stack, marks, memo, arg):
    stack.append(stack[-1])
    return stack


def _memo_get(machine, stack, marks, memo, arg):
    stack.append(memo[arg])
    return stack


def _memo_put(machine, stack, marks, memo, arg):
    memo[arg] = stack[-1]
    return stack


def _memoize(machine, stack, marks, memo, arg):
    memo[len(memo)] = stack[-1]
    return stack


def _tuple_n(n):
    def step(machine, stack, marks, memo, arg):
        items = tuple(stack[len(stack) - n:]) if n else ()
        if len(items) != n:
            raise _corrupt("a pickle opcode finds too few items on the stack")
        del stack[len(stack) - n:]
        stack.append(items)
        return stack
    return step


def _tuple(machine, stack, marks, memo, arg):
    items = tuple(stack)
    stack = marks.pop()
    stack.append(items)
    return stack


def _list(machine, stack, marks, memo, arg):
    items = list(stack)
    stack = marks.pop()
    stack.append(items)
    return stack


def _dict(machine, stack, marks, memo, arg):
    items = stack
    stack = marks.pop()
    stack.append(_setitems({}, items))
    return stack


def _setitems(target, items) -> dict:
    if not isinstance(target, dict) or len(items) % 2:
        raise _corrupt(f"a pickle sets items of {_short(target)}")
    for i in range(0, len(items), 2):
        target[_key(items[i])] = items[i + 1]
    return target


def _setitem(machine, stack, marks, memo, arg):
    value, key = stack.pop(), stack.pop()
    _setitems(stack[-1], [key, value])
    return stack


def _setitems_step(machine, stack, marks, memo, arg):
    items = stack
    stack = marks.pop()
    _setitems(stack[-1], items)
    return stack


def _append(machine, stack, marks, memo, arg):
    value = stack.pop()
    if not isinstance(stack[-1], list):
        raise _corrupt(f"a pickle appends to {_short(stack[-1])}")
    stack[-1].append(value)
    return stack


def _appends(machine, stack, marks, memo, arg):
    items = stack
    stack = marks.pop()
    if not isinstance(stack[-1], list):
        raise _corrupt(f"a pickle appends to {_short(stack[-1])}")
    stack[-1].extend(items)
    return stack


def _additems(machine, stack, marks, memo, arg):
    items = stack
    stack = marks.pop()
    if not isinstance(stack[-1], set):
        raise _corrupt(f"a pickle adds set items to {_short(stack[-1])}")
    stack[-1].update(_key(item) for item in items)
    return stack


def _frozenset(machine, stack, marks, memo, arg):
    items = frozenset(_key(item) for item in stack)
    stack = marks.pop()
    stack.append(items)
    return stack


def _global(machine, stack, marks, memo, arg):
    module, _, name = arg.partition(" ")
    stack.append(_find_global(module, name))
    return stack


def _stack_global(machine, stack, marks, memo, arg):
    name, module = stack.pop(), stack.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
        raise _corrupt("STACK_GLOBAL names a global with something other than strings")
    stack.append(_find_global(module, name))
    return stack


def _find_global(module: str, name: str):
    if len(module) > _MAX_GLOBAL_NAME or len(name) > _MAX_GLOBAL_NAME:
        raise _Refusal(UnsafeCheckpointError, f"refers to a global named {_text(module, 60)}.{_text(name, 60)}, "
                       f"longer than any kv3d reads ({_MAX_GLOBAL_NAME} characters)")
    qualified = f"{module}.{name}"
    if qualified in _STORAGE_TYPES:
        return _STORAGE_TYPES[qualified]
    if qualified in _CALLABLES or qualified in _CLASSES:
        return _Global(qualified)
    if module.startswith(_REFERENCED_CLASS_PREFIXES):
        return _ClassReference(qualified)
    if module in ("torch", "torch.cuda") and name.endswith("Storage"):
        return _StorageType(_text(qualified), None)
    raise _Refusal(UnsafeCheckpointError,
                   f"refers to {_text(qualified)}, which is not on kv3d's list of tensor and container "
                   "types; kv3d never executes code from checkpoints. If the file holds a whole pickled "
                   "model, re-save its weights with torch.save(model.state_dict(), path)")


def _protocol(stack, version: int) -> list:
    if not 2 <= version <= pickle.HIGHEST_PROTOCOL:
        raise _corrupt(f"the pickle declares protocol {version}")
    return stack


def _reduce(machine, stack, marks, memo, arg):
    args, func = stack.pop(), stack.pop()
    stack.append(machine.call(func, args))
    return stack


def _newobj(machine, stack, marks, memo, arg):
    args, cls = stack.pop(), stack.pop()
    stack.append(machine.new(cls, args))
    return stack


def _newobj_ex(machine, stack, marks, memo, arg):
    kwargs, args, cls = stack.pop(), stack.pop(), stack.pop()
    if kwargs:
        raise _corrupt("NEWOBJ_EX with keyword arguments")
    stack.append(machine.new(cls, args))
    return stack


def _inst(machine, stack, marks, memo, arg):
    args = tuple(stack)
    stack = marks.pop()
    module, _, name = arg.partition(" ")
    stack.append(machine.call(_find_global(module, name), args))
    return stack


def _obj(machine, stack, marks, memo, arg):
    if not stack:
        raise _corrupt("OBJ without a class")
    cls, args = stack[0], tuple(stack[1:])
    stack = marks.pop()
    stack.append(machine.call(cls, args))
    return stack


def _build(machine, stack, marks, memo, arg):
    state = stack.pop()
    machine.build(stack[-1], state)
    return stack


def _binpersid(machine, stack, marks, memo, arg):
    pid = stack.pop()
    if machine._persistent is None:
        raise _corrupt("a plain pickle refers to external storages")
    stack.append(machine._persistent(pid))
    return stack


_STEPS = {
    "PROTO": lambda m, stack, marks, memo, arg: _protocol(stack, arg),
    "FRAME": lambda m, stack, marks, memo, arg: stack,
    "MARK": _mark, "POP": _pop, "POP_MARK": _pop_mark, "DUP": _dup,
    "NONE": _push(None), "NEWTRUE": _push(True), "NEWFALSE": _push(False),
    **{name: _push_arg for name in (
        "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
        "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
        "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8")},
    "BYTEARRAY8": _push_bytes,
    "EMPTY_LIST": _push_new(list), "EMPTY_DICT": _push_new(dict), "EMPTY_SET": _push_new(set),
    "EMPTY_TUPLE": _tuple_n(0), "TUPLE1": _tuple_n(1), "TUPLE2": _tuple_n(2), "TUPLE3": _tuple_n(3),
    "TUPLE": _tuple, "LIST": _list, "DICT": _dict, "FROZENSET": _frozenset,
    "APPEND": _append, "APPENDS": _appends, "SETITEM": _setitem, "SETITEMS": _setitems_step,
    "ADDITEMS": _additems,
    "GET": _memo_get, "BINGET": _memo_get, "LONG_BINGET": _memo_get,
    "PUT": _memo_put, "BINPUT": _memo_put, "LONG_BINPUT": _memo_put, "MEMOIZE": _memoize,
    "GLOBAL": _global, "STACK_GLOBAL": _stack_global, "REDUCE": _reduce, "BUILD": _build,
    "NEWOBJ": _newobj, "NEWOBJ_EX": _newobj_ex, "INST": _inst, "OBJ": _obj,
    "BINPERSID": _binpersid,
}


class _Reader:
    """``read``, ``readline`` and ``tell`` over bytes or an mmap; reads never go past its end."""

    def __init__(self, data):
        self._data = data
        self.position = 0

    def tell(self) -> int:
        return self.position

    def read(self, n: int) -> bytes:
        start = self.position
        chunk = self._data[start:start + n]
        self.position = start + len(chunk)
        return chunk

    def readline(self) -> bytes:
        end = self._data.find(b"\n", self.position, self.position + (1 << 20))
        return self.read((1 << 20) if end < 0 else end + 1 - self.position)

    def left(self) -> int:
        return len(self._data) - self.position

    def size(self) -> int:
        return len(self._data)


class _Storages:
    """Resolves the persistent ids of torch storages and checks what each claims against the file.

    ``available(key, nbytes)`` raises unless the file can hold storage ``key`` with
    ``nbytes`` bytes; ``views`` admits the storage views of PyTorch < 0.4 (legacy files).
    """

    def __init__(self, available, views: bool):
        self.roots: dict[str, _Storage] = {}
        self._available = available
        self._lengths = (5, 6) if views else (5,)

    def __call__(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) in self._lengths and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and _atom_key(pid[2]) and isinstance(pid[2], (str, int))
                and type(pid[4]) is int and 0 <= pid[4] < _MAX_INDEX):
            raise _corrupt(f"unknown persistent id {_short(pid)}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if storage_type.dtype is None:
            return _Refused(UnsupportedTensorError, f"it is of type {storage_type.name}, which kv3d cannot read; "
                                                    f"supported: {_SUPPORTED_DTYPES} tensors")
        root = self.roots.get(key)
        if root is None:
            self._available(key, numel * storage_type.dtype.itemsize)
            root = self.roots[key] = _Storage(key, storage_type, 0, numel)
        if root.type != storage_type or root.numel != numel:
            raise _corrupt(f"storage {_text(key)} is read as both {root.numel} x {root.type.name} "
                           f"and {numel} x {storage_type.name}")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        # PyTorch < 0.4 stored storage views as (view key, offset, numel) into a root storage.
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int and type(view[2]) is int
                and 0 <= view[1] < _MAX_INDEX and 0 <= view[2] < _MAX_INDEX and view[1] + view[2] <= numel):
            raise _corrupt(f"a view of storage {_text(key)} lies outside it")
        return _Storage(key, storage_type, view[1], view[2])

    def check_views(self, counts: dict) -> None:
        stored = sum(root.numel for root in self.roots.values())
        if counts["view_elements"] > MAX_VIEW_FACTOR * stored + 4096:
            raise _limit(f"its tensors claim {counts['view_elements']:,} elements of {stored:,} stored ones "
                         f"(more than {MAX_VIEW_FACTOR} views of each)")


def checkpoint_format(path) -> str:
    """The format of the checkpoint file ``path``: a key of :data:`FORMATS`, from its first bytes."""
    path = regular_file(path, "checkpoint")
    try:
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
            for opcode, arg, _ in pickletools.genops(_Reader(f.read(64))):
                if opcode.name not in ("PROTO", "FRAME"):
                    return "torch-legacy" if arg == _LEGACY_MAGIC else "pickle"
    except (ValueError, OverflowError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CorruptCheckpointError(f"file {path} is truncated or corrupt: {err}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    raise CorruptCheckpointError(f"file {path} is truncated or corrupt: no pickle opcodes")


def read_checkpoint(path) -> Any:
    """The object saved in checkpoint ``path`` (any of :data:`FORMATS`), tensors as numpy arrays.

    Raises:
      FileNotFoundError: nothing is at ``path``.
      CheckpointError: one line naming the file, the tensor where there is one, and what is wrong;
        the subclass says which kind of problem it is.
    """
    path = Path(path)
    readers = {"torch-zip": _read_zip, "torch-legacy": _read_legacy, "pickle": _read_pickle}
    reader = readers[checkpoint_format(path)]
    try:
        return reader(path)
    except _Refusal as refusal:
        kind, message = refusal.kind, str(refusal)
    # What zipfile and zlib raise on a damaged archive (ValueError: e.g. a member name that is no UTF-8).
    except (zipfile.BadZipFile, zlib.error, struct.error, EOFError, NotImplementedError, RuntimeError,
            ValueError, OverflowError, LookupError) as err:
        kind, message = CorruptCheckpointError, str(err)[:200]
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    if kind is CorruptCheckpointError:
        raise CorruptCheckpointError(f"file {path} is truncated or corrupt: {message}") from None
    raise kind(f"{path} {message}" if message.startswith(("refers to", "is a zip")) else f"{path}: {message}") from None


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _load(reader, persistent, budget: list[int], counts: dict) -> Any:
    return _Machine(reader, persistent, budget, counts).load()


def _new_budget() -> tuple[list[int], dict]:
    return [MAX_PICKLE_OPCODES], {"view_elements": 0, "built_bytes": 0, "items": 0}


def _check_members(archive: zipfile.ZipFile, file_size: int) -> None:
    """Refuses a zip whose members are encrypted, compressed unusually, or claim too many bytes."""
    total = inflated = 0
    for info in archive.infolist():
        name = _text(info.filename)
        if info.flag_bits & 0x1:
            raise _Refusal(CheckpointError, f"zip member {name} is encrypted; torch.save never encrypts")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Refusal(CheckpointError,
                           f"zip member {name} uses compression method {info.compress_type}; kv3d reads "
                           "stored (torch.save) or deflated members only")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise _corrupt(f"stored zip member {name} declares {info.file_size} bytes but holds {info.compress_size}")
        if info.file_size > max(MAX_INFLATION * info.compress_size, _SMALL_MEMBER):
            raise _limit(f"zip member {name} declares {info.file_size:,} bytes from {info.compress_size:,} "
                         f"compressed ones, more than {MAX_INFLATION} times as many")
        inflated += info.file_size
        if inflated > MAX_INFLATION * file_size + _SMALL_MEMBER:
            raise _limit(f"its zip members declare {inflated:,} bytes in all from a {file_size:,}-byte file, more "
                         f"than {MAX_INFLATION} times as many")
        total += info.compress_size
        if info.header_offset + info.compress_size > file_size or total > file_size:
            raise _corrupt(f"zip member {name} lies past the end of the file")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes, reading no more than its declared size (checked against the zip's CRC)."""
    with archive.open(info) as member:
        data = member.read(info.file_size)
        if len(data) != info.file_size or member.read(1):
            raise _corrupt(f"zip member {_text(info.filename)} does not hold its declared {info.file_size} bytes")
    return data


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        _check_members(archive, path.stat().st_size)
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pickles:
            raise _Refusal(NotACheckpointError, "is a zip archive without data.pkl, so not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        stray = [n for n in infos if not n.startswith(prefix)]
        if len(pickles) > 1 or stray:
            raise _corrupt(f"zip member {_text((pickles[1:] + stray)[0])} is outside the checkpoint's folder {_text(prefix)}")
        byteorder = "little"
        if f"{prefix}byteorder" in infos:
            byteorder = _read_member(archive, infos[f"{prefix}byteorder"]).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise _corrupt(f"unknown byte order {byteorder[:20]!r}")

        def available(key: str, nbytes: int) -> None:
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise _corrupt(f"storage {_text(key)} is not in the archive")
            if info.file_size != nbytes:
                raise _corrupt(f"storage {_text(key)} holds {info.file_size} bytes, its tensors claim {nbytes}")

        storages = _Storages(available, views=False)
        budget, counts = _new_budget()
        reader = _Reader(_read_member(archive, infos[pickles[0]]))
        obj = _load(reader, storages, budget, counts)
        _check_end(reader)
        _check(obj)
        storages.check_views(counts)
        arrays = {
            key: _decode(_read_member(archive, infos[f"{prefix}data/{key}"]), storage, byteorder)
            for key, storage in storages.roots.items()
        }
    return _resolve(obj, arrays)


def _read_legacy(path: Path) -> Any:
    data = _map(path)
    reader = _Reader(data)
    try:
        budget, counts = _new_budget()
        claimed = [0]

        def available(key: str, nbytes: int) -> None:
            claimed[0] += nbytes
            if claimed[0] > len(data):
                raise _corrupt(f"its storages claim {claimed[0]:,} bytes, more than the file's {len(data):,}")

        magic = _load(reader, None, budget, counts)
        protocol = _load(reader, None, budget, counts)
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise _corrupt(f"unknown legacy PyTorch protocol {_short(protocol)}")
        _load(reader, None, budget, counts)  # sys_info: storages are little-endian whatever it says
        storages = _Storages(available, views=True)
        obj = _load(reader, storages, budget, counts)
        keys = _load(reader, None, budget, counts)
        _check(obj)
        if not (isinstance(keys, list) and all(isinstance(k, (str, int)) for k in keys)
                and sorted(map(str, keys)) == sorted(storages.roots)):
            raise _corrupt("the list of storages does not match the tensors")
        storages.check_views(counts)
        arrays = {}
        for key in map(str, keys):
            storage = storages.roots[key]
            numel = int.from_bytes(_take(reader, 8), "little")
            if numel != storage.numel:
                raise _corrupt(f"storage {_text(key)} has {numel} elements, its tensors expect {storage.numel}")
            arrays[key] = _decode(_take(reader, numel * storage.type.dtype.itemsize), storage, "little")
        _check_end(reader)
        return _resolve(obj, arrays)
    finally:
        data.close()


def _read_pickle(path: Path) -> Any:
    data = _map(path)
    reader = _Reader(data)
    try:
        budget, counts = _new_budget()
        obj = _load(reader, None, budget, counts)
        _check_end(reader)
        _check(obj)
        return _resolve(obj, {})
    finally:
        data.close()


def _check_end(reader: _Reader) -> None:
    if reader.left():
        raise _corrupt(f"{reader.left()} bytes follow the end of the checkpoint")


def _take(reader: _Reader, nbytes: int) -> bytes:
    if nbytes > reader.left():
        raise _corrupt(f"expected {nbytes} more bytes, found {reader.left()}")
    return reader.read(nbytes)


def _decode(raw: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
    """A root storage's bytes as a 1-D native-endian array (bfloat16 widened to float32), maybe read-only."""
    dtype = storage.type.dtype.newbyteorder("<" if byteorder == "little" else ">")
    if len(raw) != storage.numel * dtype.itemsize:
        raise _corrupt(f"storage {_text(storage.key)} holds {len(raw)} bytes, expected {storage.numel} x {dtype.itemsize}")
    values = np.frombuffer(raw, dtype)
    if storage.type.bfloat16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values if dtype.isnative else values.astype(dtype.newbyteorder("="))


def _check(obj) -> None:
    """Raises unless every placeholder in ``obj`` can be read, before any storage is.

    Each object is visited once (shared ones through a memo), so the work is linear in the
    pickle. Refused: a refused tensor or array (named by where it is), a container inside
    itself or nested deeper than :data:`MAX_NESTING`, and an object whose shared references
    expand to more than :data:`MAX_EXPANDED_OBJECTS` objects (a few hundred bytes of pickle
    can stand for an exponential tree, which any reader that copies it would build).
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def visit(value, where: tuple) -> int:
        if isinstance(value, _ATOMS):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _limit(f"the object at {_where(where)} contains itself")
        if len(where) > MAX_NESTING:
            raise _limit(f"the object nests containers more than {MAX_NESTING} deep")
        active.add(key)
        size = 1
        if isinstance(value, _Refused):
            raise _Refusal(value.kind, f"tensor {_where(where)}: {value.reason}")
        if isinstance(value, _Array):
            if value.value is None:
                raise _corrupt(f"the numpy array at {_where(where)} has no data")
            size = visit(value.value, where)
        elif isinstance(value, dict):
            size += sum(visit(v, where + (k,)) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            size += sum(visit(v, where + (i,)) for i, v in enumerate(value))
        elif isinstance(value, (set, frozenset)):
            size += len(value)
        elif isinstance(value, _Global):
            raise _Refusal(UnsafeCheckpointError, f"holds the global {value.name} itself, which kv3d never reads")
        elif not isinstance(value, (_Tensor, _Storage)):
            raise _corrupt(f"the object at {_where(where)} is {_short(value)}")
        active.discard(key)
        if size > MAX_EXPANDED_OBJECTS:
            raise _limit(f"the object at {_where(where)} shares references that expand to more than "
                         f"{MAX_EXPANDED_OBJECTS:,} objects")
        sizes[key] = size
        return size

    visit(obj, ())


def _resolve(obj, arrays: dict[str, np.ndarray]):
    """``obj``, checked by :func:`_check`, with every placeholder replaced by its array.

    What the pickle shares stays shared; each object is converted once.
    """
    memo: dict[int, Any] = {}

    def visit(value):
        if isinstance(value, _ATOMS):
            return value
        key = id(value)
        if key not in memo:
            memo[key] = convert(value)
        return memo[key]

    def convert(value):
        if isinstance(value, _Array):
            return value.value
        if isinstance(value, _Tensor):
            return _tensor(value, arrays)
        if isinstance(value, _Storage):  # a view of its root's buffer: many views cost no copies
            return _storage(value, arrays)
        if isinstance(value, dict):
            kind = collections.OrderedDict if isinstance(value, collections.OrderedDict) else dict
            return kind((k, visit(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(visit(v) for v in value)
        return value

    return visit(obj)


def _where(where: tuple) -> str:
    text = "/".join(_text(part, 80) if isinstance(part, str) else quote(part, 40) for part in where) or "(top level)"
    return repr(text if len(text) <= 200 else "..." + text[-197:])


def _storage(storage: _Storage, arrays: dict[str, np.ndarray]) -> np.ndarray:
    root = arrays[storage.key]
    return root[storage.offset:storage.offset + storage.numel]


def _tensor(tensor: _Tensor, arrays: dict[str, np.ndarray]) -> np.ndarray:
    data = _storage(tensor.storage, arrays)
    if 0 in tensor.shape:
        return np.zeros(tensor.shape, data.dtype)
    view = np.lib.stride_tricks.as_strided(
        data[tensor.offset:], tensor.shape, tuple(s * data.itemsize for s in tensor.stride), writeable=False
    )
    return np.array(view, order="C")
