"""MotionNet: converter parity with the PyTorch model it was trained as, and the shipped checkpoint's accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import converters
from converters.checkpoint import read_checkpoint
from converters.common import CheckpointMismatchError
from kv3d_jax import models, zoo
from kv3d_jax.models import motionnet

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_motionnet.py"
_spec = importlib.util.spec_from_file_location("train_motionnet", _SCRIPT)
train_motionnet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_motionnet)

# Neither the training seed nor the held-out seed the training script reports on.
TEST_SEED = 2


def _torch_taps(net: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every tappable layer's output, as forward hooks see it, channels-last."""
    taps = {}

    def hook(name):
        def save(module, inputs, output):
            out = output.detach().numpy()
            taps[name] = out.transpose(0, 2, 3, 4, 1) if out.ndim == 5 else out[:, None, None, None, :]
        return save

    for name in motionnet.LAYERS:
        getattr(net, name).register_forward_hook(hook(name))
    with torch.no_grad():
        net(x)
    return taps


def _assert_layerwise_parity(net, params, videos):
    model = models.get("motionnet")
    expected = _torch_taps(net.eval(), train_motionnet.to_torch(videos))
    normalised = (videos - np.asarray(motionnet.MEAN)) / np.asarray(motionnet.STD)
    for layer in motionnet.LAYERS:
        ours = np.asarray(model.features(params, jnp.asarray(normalised, jnp.float32), layer))
        assert ours.shape == expected[layer].shape, layer
        scale = np.abs(expected[layer]).max()
        np.testing.assert_allclose(ours, expected[layer], rtol=0, atol=1e-4 * scale, err_msg=layer)


def test_converted_random_motionnet_matches_pytorch_layer_by_layer(tmp_path):
    torch.manual_seed(0)
    net = train_motionnet.MotionNet()
    path = tmp_path / "motionnet.pt"
    torch.save(net.state_dict(), path)
    videos = np.random.default_rng(0).uniform(0, 1, (2, *motionnet.INPUT_SHAPE, 3)).astype(np.float32)
    _assert_layerwise_parity(net, converters.convert("motionnet", path)[0], videos)


def test_shipped_checkpoint_loads_without_torch_and_matches_pytorch():
    model, params = zoo.load("motionnet")
    assert model.name == "motionnet" and model.layers == motionnet.LAYERS
    net = train_motionnet.MotionNet()
    net.load_state_dict(torch.load(motionnet.checkpoint_path(), weights_only=True))
    videos, _ = train_motionnet.motion_clips(np.random.default_rng(TEST_SEED), 3)
    _assert_layerwise_parity(net, params, videos)


def test_shipped_checkpoint_is_small():
    state = read_checkpoint(motionnet.checkpoint_path())
    assert sum(v.size * 4 for v in state.values()) <= 1_000_000
    assert motionnet.checkpoint_path().stat().st_size <= 1_000_000


@pytest.mark.slow
def test_shipped_model_classifies_fresh_stimuli_at_90_percent():
    model, params = zoo.load("motionnet")
    videos, labels = train_motionnet.motion_clips(np.random.default_rng(TEST_SEED), 240)
    normalised = (videos - np.asarray(model.mean, np.float32)) / np.asarray(model.std, np.float32)
    logits = jax.jit(lambda p, v: model.features(p, v, "fc"))(params, jnp.asarray(normalised))
    predicted = np.asarray(logits).reshape(len(labels), -1).argmax(axis=1)
    accuracy = np.mean(predicted == labels)
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.3f}"


def test_converter_names_every_mismatched_tensor(tmp_path):
    state = train_motionnet.MotionNet().state_dict()
    del state["conv2.bias"]
    state["fc.weight"] = torch.zeros(10, motionnet.CHANNELS[-1])
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"conv2\.bias(.|\n)*fc\.weight expected \(8, 64\)"):
        converters.convert("motionnet", path)


def test_fc_is_a_tappable_layer_with_one_value_per_direction():
    model = models.get("motionnet")
    params = jax.eval_shape(motionnet.init_params, jax.random.key(0))
    assert model.output_shape(params, "fc") == (1, 1, 1, motionnet.NUM_DIRECTIONS)
    assert model.output_shape(params, "conv4") == (8, 4, 4, motionnet.CHANNELS[-1])
    with pytest.raises(ValueError, match="valid layers are: conv1, conv2, conv3, conv4, fc"):
        model.features(params, jnp.zeros((1, *motionnet.INPUT_SHAPE, 3)), "conv5")
