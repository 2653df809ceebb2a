"""Hostile and broken checkpoint files, generated at test time, for every format kv3d reads.

Each builder writes one file to ``path`` in format ``fmt`` — ``torch-zip`` (a bare state
dict saved by ``torch.save``), ``torch-legacy`` (the same, pre-1.6 format), ``caffe2`` (a
protocol-2 pickle ``{'blobs': {name: ndarray}}``) or ``lightning`` (a Lightning ``.ckpt``:
``torch.save`` of ``{'state_dict': ..., 'hyper_parameters': ...}``) — holding a MotionNet
state dict with one defect, and returns a regular expression the one-line refusal must match.
The files are small; what they claim is not.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from converters.motionnet import EXPECTED_SHAPES

FORMATS = ("torch-zip", "torch-legacy", "caffe2", "lightning")
# numpy's own reconstructor of a pickled ndarray, under the name its pickles use.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]


def motionnet_state(seed: int = 0) -> "collections.OrderedDict[str, torch.Tensor]":
    """A random MotionNet state dict, as ``scripts/train_motionnet.py`` saves it."""
    generator = torch.Generator().manual_seed(seed)
    return collections.OrderedDict(
        (name, torch.randn(shape, generator=generator) * 0.1) for name, shape in EXPECTED_SHAPES.items())


def tensor_name(fmt: str, name: str) -> str:
    """Where tensor ``name`` sits in a ``fmt`` file, as refusals name it."""
    return {"caffe2": f"blobs/{name}", "lightning": f"state_dict/{name}"}.get(fmt, name)


def save(fmt: str, path: Path, state: dict, **extra) -> Path:
    """Writes ``state`` (tensors, arrays or any picklable values) in format ``fmt``, with ``extra`` top-level keys."""
    if fmt == "caffe2":
        blobs = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        path.write_bytes(pickle.dumps({"blobs": blobs, **extra}, protocol=2))
        return path
    if fmt == "lightning":
        obj = {"epoch": 3, "global_step": 300, "pytorch-lightning_version": "1.3.3", "state_dict": state,
               "hyper_parameters": {"args": argparse.Namespace(lr=3e-4, batch_size=8)}, **extra}
    else:
        obj = {"model_state": state, **extra} if extra else state
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt != "torch-legacy"))
    return path


class Reduces:
    """Pickles as ``func(*args)`` followed by ``BUILD state`` (if ``state`` is not None)."""

    def __init__(self, func, args, state=None):
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


def _with(fmt, path, name, value, **extra):
    state = motionnet_state()
    state[name] = value
    return save(fmt, path, state, **extra)


# ---------------------------------------------------------------- dtypes


def forged_object_array(fmt, path):
    """conv1.bias as an object-dtype ndarray over raw bytes: numpy would take the bytes for object pointers."""
    forged = Reduces(_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (16,), np.dtype(object), False, b"\x41" * 128))
    _with(fmt, path, "conv1.bias", forged)
    return rf"tensor '{re.escape(tensor_name(fmt, 'conv1.bias'))}': it is a numpy array of object dtype"


def complex_weights(fmt, path):
    """conv1.bias complex: a torch complex tensor in torch files, a complex64 array in Caffe2 pickles."""
    if fmt == "caffe2":
        value = np.ones(16, np.complex64)
    else:
        value = torch.ones(16, dtype=torch.complex64)
    _with(fmt, path, "conv1.bias", value)
    name = re.escape(tensor_name(fmt, "conv1.bias"))
    return rf"tensor '{name}': it is (a numpy array of complex dtype|of type torch\.ComplexFloatStorage)"


def datetime_weights(fmt, path):
    _with(fmt, path, "fc.bias", np.arange(8).astype("datetime64[s]"))
    return rf"tensor '{re.escape(tensor_name(fmt, 'fc.bias'))}': it is a numpy array of datetime64 dtype"


def string_object_weights(fmt, path):
    _with(fmt, path, "fc.bias", np.array([f"w{i}" for i in range(8)], dtype=object))
    return rf"tensor '{re.escape(tensor_name(fmt, 'fc.bias'))}': it is a numpy array of object dtype"


def structured_weights(fmt, path):
    _with(fmt, path, "fc.bias", np.zeros(8, dtype=[("a", "<f4"), ("b", "<i4")]))
    return rf"tensor '{re.escape(tensor_name(fmt, 'fc.bias'))}': it is a numpy array of structured"


# ---------------------------------------------------------------- sizes


def expanded_tensor(fmt, path):
    """conv1.bias as one stored float expanded (stride 0) to 2**29 elements (2 GiB); in a Caffe2
    pickle, an array whose shape claims 2**40 elements over 64 bytes."""
    if fmt == "caffe2":
        value = Reduces(_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (2**40,), np.dtype("f4"), False, bytes(64)))
        expected = "has 64 bytes, not 4398046511104"
    else:
        value = torch.zeros(1).expand(2**29)
        expected = "expand 1 stored elements to 536,870,912"
    _with(fmt, path, "conv1.bias", value)
    return rf"tensor '{re.escape(tensor_name(fmt, 'conv1.bias'))}': .*{expected}"


def shared_lists(fmt, path):
    """40 levels of ``x = [x, x]``: a few hundred bytes standing for 2**40 lists."""
    x: list = []
    for _ in range(40):
        x = [x, x]
    save(fmt, path, motionnet_state(), history=x)
    return "shares references that expand to more than"


def cyclic_list(fmt, path):
    cycle: list = [1.0]
    cycle.append(cycle)
    save(fmt, path, motionnet_state(), history=cycle)
    return "'history/1' contains itself"


def deep_nesting(fmt, path):
    """5000 nested lists (deeper than any reader's recursion)."""
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)
    try:
        save(fmt, path, motionnet_state(), history=deep)
    finally:
        sys.setrecursionlimit(limit)
    return "nests containers more than 100 deep"


def many_opcodes(fmt, path):
    """A pickle of 1.2 million opcodes (push None, pop) before its state dict."""
    data = path.with_suffix(".tmp-src")
    save(fmt, data, motionnet_state())
    payload = b"N0" * 600_000
    if fmt == "caffe2":
        raw = data.read_bytes()
        path.write_bytes(raw[:2] + payload + raw[2:])
    elif fmt == "torch-legacy":
        raw = data.read_bytes()
        path.write_bytes(raw[:2] + payload + raw[2:])
    else:
        members = read_zip_members(data)
        pkl = next(n for n in members if n.endswith("data.pkl"))
        members[pkl] = (members[pkl][0][:2] + payload + members[pkl][0][2:], zipfile.ZIP_STORED, None, 0)
        write_zip(path, members)
    data.unlink()
    return "the pickles run more than 500,000 opcodes"


def legacy_storage_claim(fmt, path):
    """A storage that claims 2**40 floats (4 TiB); the file holds 64 bytes of them."""
    if fmt != "torch-legacy":
        raise ValueError("a legacy-format case")
    storage = object()

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (16,), (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 2**40) if obj is storage else None

    state = {name: value.numpy() for name, value in motionnet_state().items()}
    state["conv1.bias"] = Tensor()
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(state)
        pickle.dump(["0"], f, protocol=2)
        f.write((2**40).to_bytes(8, "little") + bytes(64))
    return "its storages claim 4,398,046,511,104 bytes, more than the file's"


# ---------------------------------------------------------------- zip archives


def read_zip_members(path: Path) -> dict:
    """``{name: (bytes, compress_type, declared size or None, flag bits)}`` of a stored zip."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename: (archive.read(info), zipfile.ZIP_STORED, None, 0) for info in archive.infolist()}


def write_zip(path: Path, members: dict) -> Path:
    """A zip of ``members``: payloads written as given (already compressed for method 8 ...).

    Each value is ``(payload, method, (file_size, crc) or None, flag bits)``; None means the
    payload is the member's data (stored), so its size and CRC are computed.
    """
    local, central = bytearray(), bytearray()
    for name, (payload, method, declared, flags) in members.items():
        size, crc = declared if declared is not None else (len(payload), zlib.crc32(payload))
        encoded = name.encode()
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(payload),
                             size, len(encoded), 0)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0x21, crc,
                               len(payload), size, len(encoded), 0, 0, 0, 0, 0, len(local)) + encoded
        local += header + encoded + payload
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def _zip_case(fmt, path, change):
    if fmt not in ("torch-zip", "lightning"):
        raise ValueError("a zip-format case")
    source = path.with_suffix(".tmp-src")
    save(fmt, source, motionnet_state())
    members = read_zip_members(source)
    source.unlink()
    data = sorted(n for n in members if "/data/" in n)[0]
    change(members, data)
    write_zip(path, members)


_BOMB_CHUNK = 64 << 20


def _bomb_stream(chunks: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``chunks`` x 64 MiB of zeros (about 64 KiB each), and its CRC."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(_BOMB_CHUNK)
    chunk = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(chunks):
        crc = zlib.crc32(zeros, crc)
    return chunk * chunks + compressor.flush(zlib.Z_FINISH), crc


def zip_bomb(fmt, path):
    """The first storage member replaced by 2 MiB of deflate that inflates to 2 GiB (size and CRC honest)."""
    stream, crc = _bomb_stream(32)
    _zip_case(fmt, path, lambda members, name: members.__setitem__(
        name, (stream, zipfile.ZIP_DEFLATED, (32 * _BOMB_CHUNK, crc), 0)))
    return "declares 2,147,483,648 bytes from .* compressed ones, more than 16 times as many"


def lying_member(fmt, path):
    """A storage member that declares its true size but whose deflate stream inflates to 64 MiB."""
    stream, _ = _bomb_stream(1)

    def change(members, name):
        payload = members[name][0]
        members[name] = (stream, zipfile.ZIP_DEFLATED, (len(payload), zlib.crc32(payload)), 0)

    _zip_case(fmt, path, change)
    return r"truncated or corrupt: Bad CRC-32 for file '.*/data/0'"


def encrypted_member(fmt, path):
    def change(members, name):
        payload = members[name][0]
        members[name] = (payload, zipfile.ZIP_STORED, None, 0x1)

    _zip_case(fmt, path, change)
    return "is encrypted"


def unsupported_compression(fmt, path):
    """A member compressed with LZMA (method 14), which torch.save never writes."""
    def change(members, name):
        payload = members[name][0]
        members[name] = (payload, zipfile.ZIP_LZMA, (len(payload), zlib.crc32(payload)), 0)

    _zip_case(fmt, path, change)
    return "uses compression method 14"


def corrupt_deflate(fmt, path):
    """A deflated member whose stream is garbage."""
    def change(members, name):
        payload = members[name][0]
        members[name] = (bytes(range(7, 7 + 64)), zipfile.ZIP_DEFLATED, (len(payload), zlib.crc32(payload)), 0)

    _zip_case(fmt, path, change)
    return "truncated or corrupt"


# ---------------------------------------------------------------- values


def non_finite_weights(fmt, path):
    """A NaN in one output channel of conv1 and two infinities in the read-out."""
    state = motionnet_state()
    state["conv1.bias"][3] = float("nan")
    state["fc.weight"][0, :2] = float("inf")
    save(fmt, path, state)
    return r"2 tensors of motionnet hold non-finite values: conv1\.bias \(1 NaN\); fc\.weight \(2 inf\)"


CASES = {
    "forged-object-array": (forged_object_array, FORMATS),
    "complex": (complex_weights, FORMATS),
    "datetime": (datetime_weights, FORMATS),
    "string-objects": (string_object_weights, FORMATS),
    "structured": (structured_weights, FORMATS),
    "expanded-tensor": (expanded_tensor, FORMATS),
    "shared-lists": (shared_lists, FORMATS),
    "cyclic": (cyclic_list, FORMATS),
    "deep": (deep_nesting, FORMATS),
    "many-opcodes": (many_opcodes, FORMATS),
    "storage-claim": (legacy_storage_claim, ("torch-legacy",)),
    "zip-bomb": (zip_bomb, ("torch-zip", "lightning")),
    "lying-member": (lying_member, ("torch-zip", "lightning")),
    "encrypted": (encrypted_member, ("torch-zip", "lightning")),
    "lzma": (unsupported_compression, ("torch-zip", "lightning")),
    "corrupt-deflate": (corrupt_deflate, ("torch-zip", "lightning")),
    "non-finite": (non_finite_weights, FORMATS),
}
