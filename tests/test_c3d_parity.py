"""c3d-pytorch checkpoints, in both torch.save formats, convert to params that reproduce every conv activation.

Tolerance: float32 on CPU, max |ours - PyTorch| <= 1e-4 x max |PyTorch activation| per layer.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import torch_models
from converters import c3d as c3d_converter
from converters.common import CheckpointMismatchError
from kv3d_jax import models, params_io
from kv3d_jax.models.c3d import C3D, init_params

# c3d-pytorch's conv modules, in forward order.
CONV_LAYERS = ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
RELATIVE_TOLERANCE = 1e-4
# Full-size C3D: writing and converting its 320 MB checkpoints is most of this file's time.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def params(c3d_params_files):
    return {fmt: params_io.load(path) for fmt, (path, _) in c3d_params_files.items()}


def test_zip_and_legacy_checkpoints_give_identical_params(params):
    zipped, legacy = jax.tree.leaves_with_path(params["torch-zip"]), jax.tree.leaves_with_path(params["torch-legacy"])
    assert [path for path, _ in zipped] == [path for path, _ in legacy]
    for (path, a), (_, b) in zip(zipped, legacy):
        assert a.dtype == b.dtype == np.float32, path
        np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_params_have_the_structure_of_the_flax_trunk(params):
    expected = jax.eval_shape(init_params, jax.random.key(0))
    ours = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["torch-zip"])
    assert ours == expected


def test_every_conv_activation_matches_pytorch(torch_c3d, params):
    for name in CONV_LAYERS:
        assert np.all(torch_c3d.get_submodule(name).bias.detach().numpy() != 0), name
    clip = np.random.default_rng(0).random((1, 3, 16, 112, 112), dtype=np.float32)
    reference = torch_models.capture(torch_c3d, torch.from_numpy(clip), CONV_LAYERS)
    video = clip.transpose(0, 2, 3, 4, 1)  # NCDHW -> NTHWC
    # One forward records every conv module's output (what features(upto=name) returns).
    _, state = C3D().apply(params["torch-zip"], video, CONV_LAYERS[-1],
                           capture_intermediates=True, mutable=["intermediates"])
    for name in CONV_LAYERS:
        expected = reference[name].numpy().transpose(0, 2, 3, 4, 1)
        ours = np.asarray(state["intermediates"][name]["__call__"][0])
        assert ours.shape == expected.shape, name
        error, scale = np.abs(ours - expected).max(), np.abs(expected).max()
        assert error <= RELATIVE_TOLERANCE * scale, f"{name}: max error {error:.3g}, max |activation| {scale:.3g}"
    tapped = np.asarray(models.get("c3d").features(params["torch-legacy"], video, "conv2"))
    expected = reference["conv2"].numpy().transpose(0, 2, 3, 4, 1)
    assert np.abs(tapped - expected).max() <= RELATIVE_TOLERANCE * np.abs(expected).max()


def _state(changes: dict) -> dict:
    """A c3d-pytorch state dict of zero-stride views (no memory), with ``changes`` {name: shape or None to drop}."""
    shapes = {**c3d_converter.EXPECTED_SHAPES, **changes}
    return {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items() if shape is not None}


def test_mismatch_lists_every_missing_unexpected_and_misshaped_tensor():
    state = _state({"conv5b.bias": None, "fc8.weight": (101, 4096), "fc8.bias": (101,), "fc9.weight": (10, 101)})
    with pytest.raises(CheckpointMismatchError) as err:
        c3d_converter.convert({"state_dict": state})
    message = str(err.value)
    assert "does not match c3d; tensors: 1 missing, 1 unexpected, 2 with the wrong shape\n" in message
    assert "missing: conv5b.bias (512,)" in message
    assert "unexpected: fc9.weight (10, 101)" in message
    assert "fc8.weight expected (487, 4096), found (101, 4096)" in message
    assert "fc8.bias expected (487,), found (101,)" in message
    assert "another architecture" in message


def test_a_c3d_with_other_classes_is_called_a_variant():
    with pytest.raises(CheckpointMismatchError, match="variant of c3d"):
        c3d_converter.convert(_state({"fc8.weight": (101, 4096), "fc8.bias": (101,)}))
