"""converters.checkpoint reads torch.save files and Caffe2 pickles as torch.load does, without torch or running code."""

from __future__ import annotations

import argparse
import collections
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from converters import common
from converters.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    NotACheckpointError,
    UnsafeCheckpointError,
    checkpoint_format,
    read_checkpoint,
)

FORMATS = ("torch-zip", "torch-legacy")


def _save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "torch-zip"))
    return path


def _numpy(obj):
    """What read_checkpoint should return for ``obj``: tensors as numpy (bfloat16 as float32), Namespaces as dicts."""
    if isinstance(obj, argparse.Namespace):
        return _numpy(vars(obj))
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _numpy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy(v) for v in obj)
    return obj


def _assert_same(ours, expected):
    assert type(ours) is type(expected)
    if isinstance(expected, np.ndarray):
        assert ours.dtype == expected.dtype and ours.shape == expected.shape
        np.testing.assert_array_equal(ours, expected)
    elif isinstance(expected, dict):
        assert list(ours) == list(expected)
        for key in expected:
            _assert_same(ours[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(ours) == len(expected)
        for a, b in zip(ours, expected):
            _assert_same(a, b)
    else:
        assert ours == expected


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float32, np.float32), (torch.float16, np.float16), (torch.bfloat16, np.float32),
        (torch.float64, np.float64), (torch.int64, np.int64), (torch.int32, np.int32),
        (torch.int16, np.int16), (torch.int8, np.int8), (torch.uint8, np.uint8), (torch.bool, np.bool_),
    ],
)
def test_every_dtype_reads_back_exactly(tmp_path, fmt, dtype, expected):
    generator = torch.Generator().manual_seed(1)
    values = (torch.randn(3, 5, generator=generator) * 50).to(dtype)
    ours = read_checkpoint(_save({"x": values}, tmp_path / "ckpt", fmt))["x"]
    assert ours.dtype == expected
    _assert_same(ours, _numpy(values))


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_of_one_storage_keep_their_offsets_and_strides(tmp_path, fmt):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {"base": base, "transposed": base.t(), "slice": base[1:3, 2:5],
             "strided": base[::2, 1::3], "row": base[3], "scalar": base[2, 4]}
    path = _save(views, tmp_path / "ckpt", fmt)
    if fmt == "torch-zip":
        assert [n for n in zipfile.ZipFile(path).namelist() if "/data/" in n] == ["ckpt/data/0"]
    ours = read_checkpoint(path)
    _assert_same(ours, _numpy(views))
    assert all(a.flags.c_contiguous and a.flags.writeable for a in ours.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_lightning_style_checkpoint_matches_torch_load(tmp_path, fmt):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.BatchNorm3d(4))
    noted = torch.nn.Parameter(torch.ones(2))
    noted.note = "a Parameter with Python state"
    checkpoint = {
        "epoch": 3,
        "state_dict": net.state_dict(),
        "hyper_parameters": {"lr": 0.1, "name": "vqvae", "sizes": (4, 4), "flags": [True, None],
                             "args": argparse.Namespace(embedding_dim=256, n_codes=2048)},
        "extras": [torch.nn.Parameter(torch.zeros(3)), noted],
    }
    path = _save(checkpoint, tmp_path / "ckpt", fmt)
    ours = read_checkpoint(path)
    _assert_same(ours, _numpy(torch.load(path, weights_only=False)))
    assert isinstance(ours["state_dict"], collections.OrderedDict)
    assert ours["state_dict"]["1.num_batches_tracked"].dtype == np.int64


@pytest.fixture
def lightning_callback_class(monkeypatch):
    """A stand-in for Lightning's ModelCheckpoint, importable under Lightning's module path."""
    import types

    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)
    cls = type("ModelCheckpoint", (), {"__module__": name})
    module.ModelCheckpoint = cls
    for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.setitem(sys.modules, part, sys.modules.get(part, types.ModuleType(part)))
    monkeypatch.setitem(sys.modules, name, module)
    return cls


def test_lightning_callback_classes_are_read_as_names_never_called(tmp_path, lightning_callback_class):
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "callbacks": {lightning_callback_class: {"best": 1.0}}}
    ours = read_checkpoint(_save(checkpoint, tmp_path / "vqvae.ckpt", "torch-zip"))
    assert ours["callbacks"] == {"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": {"best": 1.0}}

    class Instantiates:
        def __reduce__(self):
            return (lightning_callback_class, ())

    path = _save({"callback": Instantiates()}, tmp_path / "calls.ckpt", "torch-zip")
    with pytest.raises(UnsafeCheckpointError, match="tries to instantiate .*ModelCheckpoint"):
        read_checkpoint(path)


def _py2_str(data: bytes) -> bytes:
    """A Python 2 ``str`` as cPickle writes it: SHORT_BINSTRING or BINSTRING."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _py2_array(array: np.ndarray, core: str) -> bytes:
    """``array`` as Python 2's cPickle.dump(..., protocol=2) writes an ndarray (numpy 1.x)."""
    shape = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in array.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + _py2_str(array.dtype.str[1:].encode()) + b"K\x00K\x01\x87R"
             + b"(K\x03" + _py2_str(array.dtype.str[:1].encode())
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    return (f"c{core}.multiarray\n_reconstruct\n".encode() + b"cnumpy\nndarray\n"
            + b"K\x00\x85" + _py2_str(b"b") + b"\x87R"
            + b"(K\x01" + shape + dtype + b"\x89" + _py2_str(array.tobytes()) + b"tb")


def _py2_caffe2_pickle(blobs: dict, core: str) -> bytes:
    """A Detectron-style ``{'blobs': {name: ndarray}}`` as written by Python 2."""
    items = b"".join(_py2_str(name.encode()) + _py2_array(a, core) for name, a in blobs.items())
    return b"\x80\x02}" + _py2_str(b"blobs") + b"}(" + items + b"us."


def _caffe2_blobs() -> dict:
    rng = np.random.default_rng(0)
    return {
        "res_conv1_bn_s": rng.standard_normal(64).astype(np.float32),
        "res2_0_branch2a_w": rng.standard_normal((64, 64, 3, 1, 1)).astype(np.float32),
        "pred_b": np.arange(400, dtype=np.float64),
        "iteration": np.array([7], dtype=np.int64),
        "mask": np.array([1, 0, 1], dtype=np.uint8),
    }


@pytest.mark.parametrize("core", ["numpy.core", "numpy._core"])
def test_python2_caffe2_pickle(tmp_path, core):
    blobs = _caffe2_blobs()
    data = _py2_caffe2_pickle(blobs, core)
    if core == "numpy._core":  # the hand-written bytes are a pickle numpy itself reads
        _assert_same(pickle.loads(data, encoding="latin1"), {"blobs": blobs})
    path = tmp_path / "I3D_8x8_R50.pkl"
    path.write_bytes(data)
    assert checkpoint_format(path) == "pickle"
    _assert_same(read_checkpoint(path), {"blobs": blobs})


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_pickle_of_arrays(tmp_path, protocol):
    obj = {"blobs": _caffe2_blobs(), "lr": np.float32(0.01), "step": np.int64(3)}
    path = tmp_path / "blobs.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    ours = read_checkpoint(path)
    _assert_same(ours["blobs"], obj["blobs"])
    assert ours["lr"] == obj["lr"] and ours["lr"].dtype == np.float32 and ours["step"] == 3


def test_big_endian_zip_checkpoint(tmp_path):
    values = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    little = _save(values, tmp_path / "ckpt", "torch-zip")
    itemsize = {"0": 4, "1": 8}  # storage keys are numbered in pickling order
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:
                key = name.rsplit("/", 1)[1]
                data = np.frombuffer(data, f"<u{itemsize[key]}").byteswap().tobytes()
            dst.writestr(name, data)
    _assert_same(_numpy(torch.load(big, weights_only=True)), _numpy(values))
    _assert_same(read_checkpoint(big), _numpy(values))


def _write_old_legacy_file(path, storage_class=torch.FloatStorage, location="cpu", view=None,
                           shape=(2,), recorded_numel=6):
    """A legacy torch.save file as PyTorch 0.3 wrote it: OrderedDict(w=tensor), the tensor at
    offset 1 of a storage (or storage view) of the 6 floats 0..5."""
    storage_ref = object()

    class OldTensor:  # what torch 0.3's Tensor.__reduce__ returned
        def __reduce__(self):
            return (torch._utils._rebuild_tensor, (storage_ref, 1, shape, (1,)))

    class LegacyPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage_ref:
                return ("storage", storage_class, "root", location, 6, view)
            return None

    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        LegacyPickler(f, protocol=2).dump(collections.OrderedDict(w=OldTensor()))
        pickle.dump(["root"], f, protocol=2)
        f.write(recorded_numel.to_bytes(8, "little") + np.arange(6, dtype="<f4").tobytes())
    return path


@pytest.mark.parametrize(
    "storage_class, location, view, expected",
    [
        (torch.FloatStorage, "cpu", None, [1.0, 2.0]),
        # PyTorch < 0.4 could save a view (key, offset, numel) of a root storage: here [2, 5).
        (torch.FloatStorage, "cpu", ("view", 2, 3), [3.0, 4.0]),
        # Saved from a GPU before PyTorch 1.6.
        (torch.cuda.FloatStorage, "cuda:0", None, [1.0, 2.0]),
    ],
    ids=["cpu", "storage-view", "cuda"],
)
def test_legacy_files_of_old_pytorch_versions(tmp_path, storage_class, location, view, expected):
    path = _write_old_legacy_file(tmp_path / "old.pt", storage_class, location, view)
    expected = collections.OrderedDict(w=np.array(expected, np.float32))
    # The hand-written file is one torch.load reads.
    _assert_same(_numpy(torch.load(path, map_location="cpu", weights_only=False)), expected)
    _assert_same(read_checkpoint(path), expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"shape": (6,)}, "tensor 'w': its shape (6,) reads element 6 of a 6-element storage"),
        ({"view": ("view", 4, 3)}, "a view of storage root lies outside it"),
        ({"recorded_numel": 5}, "storage root has 5 elements, its tensors expect 6"),
    ],
    ids=["tensor-past-storage", "view-past-storage", "wrong-storage-size"],
)
def test_inconsistent_legacy_files(tmp_path, change, message):
    path = _write_old_legacy_file(tmp_path / "old.pt", **change)
    with pytest.raises(CorruptCheckpointError, match=r"old\.pt is truncated or corrupt: " + re.escape(message)):
        read_checkpoint(path)


class _Shell:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _Eval:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (eval, (f"open({str(self.sentinel)!r}, 'w').close()",))


@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "pickle"])
# Protocol-2 pickles name builtins by their Python 2 module, __builtin__.
@pytest.mark.parametrize("payload, global_name", [(_Shell, rf"refers to {os.system.__module__}\.system,"),
                                                  (_Eval, r"refers to (__builtin__|builtins)\.eval,")])
def test_code_in_a_checkpoint_is_refused_not_run(tmp_path, container, payload, global_name):
    sentinel = tmp_path / "SENTINEL"
    obj = {"weight": torch.ones(2), "payload": payload(sentinel)}
    path = tmp_path / "evil.ckpt"
    if container == "pickle":
        obj["weight"] = np.ones(2)
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        _save(obj, path, container)
    with pytest.raises(UnsafeCheckpointError, match="never executes code") as err:
        read_checkpoint(path)
    assert re.search(global_name, str(err.value))
    assert not sentinel.exists()
    # The payload is live: an ordinary unpickler runs it.
    if container == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert sentinel.exists()


def test_reading_does_not_import_torch(tmp_path):
    zip_path = _save({"w": torch.ones(2, 3).t()}, tmp_path / "z.pt", "torch-zip")
    legacy_path = _save({"w": torch.ones(2)}, tmp_path / "l.pt", "torch-legacy")
    blobs_path = tmp_path / "b.pkl"
    blobs_path.write_bytes(_py2_caffe2_pickle(_caffe2_blobs(), "numpy.core"))
    code = (
        "import sys, converters\n"
        "from converters.checkpoint import read_checkpoint\n"
        "for path in sys.argv[1:]:\n"
        "    read_checkpoint(path)\n"
        "try:\n"
        "    converters.convert('c3d', sys.argv[1])\n"
        "except converters.CheckpointMismatchError:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(zip_path), str(legacy_path), str(blobs_path)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


def _truncations(tmp_path):
    weights = {"w": torch.arange(64, dtype=torch.float32)}
    zip_bytes = _save(weights, tmp_path / "z.pt", "torch-zip").read_bytes()
    legacy = _save(weights, tmp_path / "l.pt", "torch-legacy").read_bytes()
    plain = pickle.dumps({"blobs": {"w": np.arange(64.0)}}, protocol=2)
    return {
        "zip cut in half": zip_bytes[: len(zip_bytes) // 2],
        "legacy cut in the tensor pickle": legacy[: legacy.index(b"_rebuild_tensor_v2")],
        "legacy cut in the storage bytes": legacy[:-10],
        "pickle cut short": plain[:-20],
        "zip with a damaged record": zip_bytes.replace(struct.pack("<f", 63.0), b"\x00\x00\x00\x00"),
    }


@pytest.mark.parametrize("case", ["zip cut in half", "legacy cut in the tensor pickle",
                                  "legacy cut in the storage bytes", "pickle cut short",
                                  "zip with a damaged record"])
def test_truncated_or_corrupt_files(tmp_path, case):
    path = tmp_path / "bad.pt"
    path.write_bytes(_truncations(tmp_path)[case])
    with pytest.raises(CorruptCheckpointError, match=r"bad\.pt is truncated or corrupt"):
        read_checkpoint(path)


def test_files_that_are_not_checkpoints(tmp_path):
    png = tmp_path / "picture.png"
    iio.imwrite(png, np.zeros((4, 4, 3), np.uint8))
    text = tmp_path / "notes.txt"
    text.write_text("conv1.weight is what I want\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (png, text, empty):
        with pytest.raises(NotACheckpointError, match="is not a PyTorch or Caffe2 checkpoint"):
            read_checkpoint(path)
    npz = tmp_path / "arrays.npz"
    np.savez(npz, w=np.ones(3))
    with pytest.raises(NotACheckpointError, match="zip archive without data.pkl"):
        read_checkpoint(npz)


def test_unsupported_tensor_type(tmp_path):
    path = _save({"z": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.pt", "torch-zip")
    with pytest.raises(CheckpointError, match=r"torch\.ComplexFloatStorage, which kv3d cannot read"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"epoch": 1, "state_dict": sd},
        lambda sd: {"model_state": sd, "optimizer_state": {"lr": 0.1}},
        lambda sd: {"model": {"state_dict": sd}},
        lambda sd: {"blobs": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["plain", "lightning", "pyslowfast", "nested", "caffe2", "dataparallel"],
)
def test_find_state_dict_unwraps_containers(wrap):
    state = {"conv.weight": np.ones((2, 3)), "conv.bias": np.zeros(2)}
    found = common.find_state_dict(wrap(state))
    assert list(found) == list(state) and all(found[k] is state[k] for k in state)


def test_find_state_dict_says_what_it_found_instead():
    with pytest.raises(CheckpointError, match="holds a list, not a dict of tensors"):
        common.find_state_dict([np.ones(2)])
    with pytest.raises(CheckpointError, match="keys 'epoch', 'optimizer'.*'state_dict'"):
        common.find_state_dict({"epoch": 1, "optimizer": {"lr": 0.1}})


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_objects_are_read_once_and_stay_shared(tmp_path, fmt):
    weight = torch.randn(3, 2)
    shared = [weight, {"lr": 0.1}]
    ours = read_checkpoint(_save({"a": shared, "b": shared, "c": (shared, shared)}, tmp_path / "ckpt", fmt))
    _assert_same(ours["a"], _numpy(shared))
    assert ours["a"] is ours["b"] is ours["c"][0] is ours["c"][1]


def test_a_deflated_torch_zip_reads_like_the_stored_one(tmp_path):
    """Re-zipping a checkpoint with deflate (zip -r) is no zip bomb: its members are small or inflate <= 16x."""
    values = {"w": torch.zeros(4096), "b": torch.randn(7)}
    stored = _save(values, tmp_path / "ckpt", "torch-zip")
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    assert {i.compress_type for i in zipfile.ZipFile(deflated).infolist()} == {zipfile.ZIP_DEFLATED}
    _assert_same(read_checkpoint(deflated), _numpy(values))
