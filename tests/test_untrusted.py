"""The helpers every door uses for untrusted input (quoting, output paths, weights checks, params files,
VideoGPT's bounds, held-back warnings), tested in this process: valid input is still accepted as
before, and each refusal names the problem."""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings

import jax
import msgpack
import numpy as np
import pytest
from flax import serialization

import hostile_inputs
from converters.checkpoint import CheckpointLimitError, CorruptCheckpointError, read_checkpoint
from kv3d_jax import cli, models, params_io, writers, zoo
from kv3d_jax.models import vqvae
from kv3d_jax.store import Store
from kv3d_jax.untrusted import output_path, printable, quote


def test_quote_is_short_escaped_and_never_writes_out_a_huge_integer():
    assert quote("conv1") == "'conv1'"
    assert quote("a\nb\x1b[31m\u2028") == r"'a\nb\x1b[31m\u2028'"
    long = quote("x" * 10**7)
    assert long.startswith("'xxx") and long.endswith("...'") and len(long) < 70
    assert quote(10**100_000) == "<an integer of 332,193 bits>"
    assert quote((4, 4, 4)) == "(4, 4, 4)" and quote([1] * 1000).endswith(", ...]")
    assert quote(np.zeros((2, 3))) == "<a float64 array of shape (2, 3)>"
    assert quote(b"\x00" * 1000).endswith("...") and len(quote(b"\x00" * 1000)) < 300


def test_printable_escapes_line_breaks_and_controls_but_not_backslashes():
    assert printable("a\nTraceback\r\x00 \\n é") == r"a\nTraceback\r\x00 \n é"


def test_output_paths_stay_inside_the_output_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert output_path(out, "conv1", "motionnet_conv1_0_static.png") == out / "conv1" / "motionnet_conv1_0_static.png"
    for names in (("..", "x.gif"), ("a/../../x.gif",), (str(tmp_path / "x.gif"),), ("x\n.gif",), ("",), (".",)):
        with pytest.raises(ValueError, match="kv3d will not write a file named"):
            output_path(out, *names)
    (out / "link").symlink_to(tmp_path)  # a folder inside --out that leads out of it
    with pytest.raises(ValueError, match="outside the output folder"):
        output_path(out, "link", "x.gif")


def test_writers_and_the_store_build_their_paths_through_the_check(tmp_path):
    video = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="will not write a file named"):
        writers.save_decomposition(tmp_path, "../escaped", video, video[0], np.zeros((2, 4, 4, 2)), video)
    with Store.open(tmp_path / "run", {"model": "m"}, "0" * 64) as store:
        with pytest.raises(ValueError, match="will not write a file named '\\.\\.'"):
            store.kernel_path("..", 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.fixture(scope="module")
def motionnet_params():
    return hostile_inputs.motionnet_params()


@pytest.mark.parametrize("change, problem", [
    (lambda p: p["conv2"].__setitem__("bias", np.full(32, np.nan, np.float32)), r"params/conv2/bias holds 32 NaN"),
    (lambda p: p["conv2"].__setitem__("bias", np.full(32, 1e300)), r"params/conv2/bias holds 32 inf in float32"),
    (lambda p: p["fc"].__setitem__("bias", p["fc"]["bias"].astype(np.complex64)), "params/fc/bias is complex64"),
    (lambda p: p["fc"].__setitem__("bias", p["fc"]["bias"].astype(np.int64)), "params/fc/bias is int64"),
], ids=["nan", "float64-overflow", "complex", "integer"])
def test_check_params_refuses_weights_the_model_cannot_use(motionnet_params, change, problem):
    params = jax.tree.map(np.array, motionnet_params)
    change(params["params"])
    with pytest.raises(ValueError, match=problem):
        zoo.check_params("motionnet", params)


def test_check_params_accepts_finite_float64_and_jax_arrays(motionnet_params):
    as_float64 = jax.tree.map(lambda x: np.asarray(x, np.float64), motionnet_params)
    assert zoo.check_params("motionnet", as_float64) is as_float64
    on_device = jax.tree.map(jax.numpy.asarray, motionnet_params)
    assert zoo.check_params("motionnet", on_device) is on_device


def test_a_negative_batchnorm_variance_is_refused_from_python():
    params = hostile_inputs.small_vqvae_params()
    config = hostile_inputs._config(hostile_inputs.SMALL_VQVAE)
    assert zoo.check_params("videogpt_vqvae", params, config) is params
    params["batch_stats"]["encoder_res_stack_0_block_0"]["var"][2] = -0.5
    with pytest.raises(ValueError, match="batch_stats/encoder_res_stack_0_block_0/var is a BatchNorm variance"):
        zoo.check_params("videogpt_vqvae", params, config)


def test_a_params_file_round_trips_including_flax_chunked_arrays(tmp_path, motionnet_params):
    path = params_io.save(tmp_path / "p.msgpack", motionnet_params, "motionnet")
    stored = params_io.read(path)
    assert stored.model == "motionnet" and stored.config == {}
    assert jax.tree.all(jax.tree.map(np.array_equal, stored.params, jax.tree.map(np.asarray, motionnet_params)))
    whole = np.arange(6, dtype=np.float32).reshape(2, 3)
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 3},
               "chunks": {"0": whole.ravel()[:4], "1": whole.ravel()[4:]}}
    (tmp_path / "c.msgpack").write_bytes(serialization.msgpack_serialize({"w": chunked}))
    np.testing.assert_array_equal(params_io.read(tmp_path / "c.msgpack").params["w"], whole)


@pytest.mark.parametrize("payload, problem", [
    (msgpack.packb([{}] * 200_000), "more than 100,000 maps and arrays"),
    (msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((2,), "object", b"")))}), "dtype 'object'"),
    (msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(((2**40,), "float32", b"")))}), "in 0 bytes"),
    (msgpack.packb({"a": msgpack.ExtType(2, msgpack.packb((1.0, 2.0)))}), "extension of type 2"),
    (msgpack.packb({"a": 1, params_io.METADATA: "{" * 100_000}), "not the model name and config"),
    (b"\x91" * 5000 + b"\x80", "not valid msgpack|nests maps"),
], ids=["flood", "object-dtype", "short-bytes", "complex-number", "deep-json", "deep-msgpack"])
def test_params_files_are_decoded_within_limits(tmp_path, payload, problem):
    path = tmp_path / "p.msgpack"
    path.write_bytes(payload)
    with pytest.raises(params_io.ParamsFileError, match=problem):
        params_io.read(path)


def test_videogpt_limits_admit_the_published_encoders_and_no_more():
    for downsample, resolution in (((4, 4, 4), 128), ((2, 4, 4), 64), ((4, 2, 2), 64)):
        vqvae.check_config(240, 4, downsample, (16, resolution, resolution))
    vqvae.check_config(vqvae.MAX_N_HIDDENS, vqvae.MAX_N_RES_LAYERS, (16, 16, 16), (64, 256, 256))
    for setting, problem in (({"n_hiddens": 1026}, "n_hiddens=1026"), ({"n_res_layers": 17}, "n_res_layers=17"),
                             ({"downsample": (32, 4, 4), "input_shape": (32, 128, 128)}, "at most 16"),
                             ({"input_shape": (128, 128, 128)}, "at most 64 frames"),
                             ({"input_shape": (16, 512, 512)}, "256x256"), ({"n_hiddens": True}, "n_hiddens=True")):
        with pytest.raises(ValueError, match=problem):
            vqvae.check_config(**setting)
    assert "encoder_res_stack_15" in models.layer_names("videogpt_vqvae")


def test_the_reader_counts_shared_buffers_and_bounds_keys(tmp_path):
    shared = np.arange(1000, dtype=np.float32)
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"a": shared, "b": shared, "step": {2**63 - 1: 1}}}, protocol=2))
    read = read_checkpoint(path)["blobs"]
    np.testing.assert_array_equal(read["b"], shared)
    assert read["step"] == {2**63 - 1: 1}
    path.write_bytes(pickle.dumps({"blobs": {2**64: 1}}, protocol=2))
    with pytest.raises(CorruptCheckpointError, match="a dict or set key is 18446744073709551616"):
        read_checkpoint(path)
    path.write_bytes(pickle.dumps({"blobs": {(1,) * 33: 1}}, protocol=2))
    with pytest.raises(CorruptCheckpointError, match="a dict or set key is"):
        read_checkpoint(path)
    raw = bytes(1 << 18)
    arrays = [hostile_inputs.hostile_checkpoints.Reduces(
        hostile_inputs.hostile_checkpoints._RECONSTRUCT, (np.ndarray, (0,), b"b"),
        (1, (1 << 16,), np.dtype("f4"), False, raw)) for _ in range(40)]
    path.write_bytes(pickle.dumps(arrays, protocol=4))
    with pytest.raises(CheckpointLimitError, match="add up to more than [0-9,]+ bytes, 4 times the pickle's size"):
        read_checkpoint(path)


def _run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(argv)
    return status, err.getvalue()


def test_warnings_follow_a_success_and_never_precede_a_failure(monkeypatch):
    real = models.get

    def warn(name, config=None):
        warnings.warn(f"{name}: something odd\n  at /some/file.py:12", UserWarning)
        return real(name, config)

    monkeypatch.setattr(models, "get", warn)
    status, err = _run(["layers", "motionnet"])
    assert status == 0 and err == "kv3d layers: warning: motionnet: something odd at /some/file.py:12\n"

    def warn_and_fail(name, config=None):
        warnings.warn("about to fail", UserWarning)
        raise ValueError("it failed")

    monkeypatch.setattr(models, "get", warn_and_fail)
    status, err = _run(["layers", "motionnet"])
    assert status == 2 and err == "kv3d layers: error: it failed\n"


def test_unexpected_errors_name_no_python_exception_first(monkeypatch):
    def overflow(name, config=None):
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(models, "get", overflow)
    status, err = _run(["layers", "motionnet"])
    assert status == 2 and err == ("kv3d layers: error: a number is too large to use (cannot convert float infinity "
                                   "to integer)\n")

