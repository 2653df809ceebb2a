"""``kv3d convert`` and ``kv3d layers``, and the params files they write and read."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import serialization

import converters
from kv3d_jax import models, params_io
from kv3d_jax.cli import main

# c3d-pytorch's conv modules, in forward order.
CONV_LAYERS = ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")


@pytest.mark.slow  # writes and converts full-size C3D checkpoints (320 MB)
@pytest.mark.parametrize("fmt, described", [("torch-zip", "PyTorch zip archive"),
                                             ("torch-legacy", "legacy PyTorch file")])
def test_convert_reports_format_tensor_and_parameter_counts(torch_c3d, c3d_params_files, fmt, described):
    conv = [p for name, p in torch_c3d.named_parameters() if name.startswith("conv")]
    path, stdout = c3d_params_files[fmt]
    assert described in stdout
    assert f"{len(conv)} tensors, {sum(p.numel() for p in conv):,} parameters -> {path}" in stdout


def test_layers_prints_the_conv_layers_with_their_channel_counts(torch_c3d, capsys):
    assert main(["layers", "c3d"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [[name, str(torch_c3d.get_submodule(name).out_channels), "channels"] for name in CONV_LAYERS]


@pytest.mark.slow  # converts a full-size C3D checkpoint (320 MB)
def test_layers_with_params_prints_channel_counts(torch_c3d, c3d_params_files, capsys):
    assert main(["layers", "c3d", str(c3d_params_files["torch-zip"][0])]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [[name, str(torch_c3d.get_submodule(name).out_channels), "channels"] for name in CONV_LAYERS]


def test_layers_with_params_of_another_model(tmp_path, capsys):
    other = params_io.save(tmp_path / "other.msgpack", {"params": {"stem": {"kernel": np.zeros((3, 3, 3, 3, 8))}}})
    assert main(["layers", "c3d", str(other)]) == 2
    assert "these are not c3d params; missing: " in capsys.readouterr().err


@pytest.mark.parametrize("command, registry", [(["convert", "resnet", "x.pt", "-o", "y.msgpack"], converters),
                                               (["layers", "resnet"], models)])
def test_unknown_model_lists_the_valid_ones(capsys, command, registry):
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "c3d" in registry.names()
    assert "'resnet'" in err and f"valid models are: {', '.join(registry.names())}" in err


def test_convert_missing_checkpoint(tmp_path, capsys):
    assert main(["convert", "c3d", str(tmp_path / "c3d.pickle"), "-o", str(tmp_path / "p.msgpack")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "p.msgpack").exists()


def test_convert_checkpoint_of_another_architecture(tmp_path, capsys):
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    checkpoint = tmp_path / "resnet.pt"
    torch.save({"state_dict": other.state_dict(), "epoch": 4}, checkpoint)
    assert main(["convert", "c3d", str(checkpoint), "-o", str(tmp_path / "p.msgpack")]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint}: the checkpoint does not match c3d; tensors: 22 missing, 4 unexpected" in err
    assert "missing: conv1.weight (64, 3, 3, 3, 3); conv1.bias (64,);" in err
    assert "unexpected: 0.weight (8, 3, 3, 3); 0.bias (8,); 2.weight (10, 8); 2.bias (10,)" in err
    assert "another architecture" in err
    assert not (tmp_path / "p.msgpack").exists()


def test_params_file_round_trip_is_bit_identical(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "conv1": {"kernel": rng.standard_normal((3, 3, 3, 3, 4)).astype(np.float32),
                      "bias": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32)},
            "head": {"scale": np.asarray(2.5, np.float16), "empty": np.zeros((0, 3), np.float32)},
        },
        "batch_stats": {"bn": {"count": np.arange(3, dtype=np.int32), "mask": np.array([True, False])}},
    }
    loaded = params_io.load(params_io.save(tmp_path / "deep" / "p.msgpack", params))
    ours, expected = jax.tree.leaves_with_path(loaded), jax.tree.leaves_with_path(params)
    assert [path for path, _ in ours] == [path for path, _ in expected]
    for (path, a), (_, b) in zip(ours, expected):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"conv1 64\n", b"",
                                     serialization.msgpack_serialize([np.ones(2)]),
                                     serialization.msgpack_serialize({"params": {"lr": "0.1"}})],
                         ids=["png", "text", "empty", "list", "string-leaf"])
def test_loading_something_else_than_a_params_file(tmp_path, content):
    path = tmp_path / "params.msgpack"
    path.write_bytes(content)
    with pytest.raises(params_io.ParamsFileError, match=r"is not a kv3d params file.*convert the model.s checkpoint"):
        params_io.load(path)


@pytest.mark.parametrize("zipfile", [True, False])
def test_loading_a_checkpoint_as_params(tmp_path, zipfile):
    checkpoint = tmp_path / "c3d.pt"
    torch.save({"conv1.weight": torch.ones(4, 3, 3, 3, 3)}, checkpoint, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(params_io.ParamsFileError, match="is not a kv3d params file"):
        params_io.load(checkpoint)
