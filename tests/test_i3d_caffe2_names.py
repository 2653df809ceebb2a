"""PySlowFast's Caffe2 ``I3D_8x8_R50.pkl``: every blob the real file holds is read, and read right.

The real file cannot be downloaded here, so ``data/i3d_8x8_r50_blob_names.txt`` lists its
blob names as derived from the architecture and the Caffe2 code that wrote such files:

- weights: ``conv1_w`` and ``res_conv1_bn_{s,b,rm,riv}`` for the stem; for every
  bottleneck ``res{2..5}_{i}`` (3, 4, 6, 3 blocks) ``_branch2{a,b,c}_w`` and
  ``_branch2{a,b,c}_bn_{s,b,rm,riv}``, plus ``_branch1_w`` and ``_branch1_bn_*`` in block 0
  of each stage (video-nonlocal-net ``lib/models/resnet_helper.py`` names: ``Conv3dBN``
  adds ``<prefix>_w`` and ``<prefix>_bn_{s,b,rm,riv}``); ``pred_w``, ``pred_b`` (the FC);
- training state, as video-nonlocal-net's ``checkpoints.save_model_params`` writes it:
  ``model_iter``, ``lr`` and ``<param>_momentum`` for every trained param (convs, BN
  scale and shift, ``pred``), not for the running statistics.

The weight names are certain: they are exactly what PySlowFast's regular expressions
(``c2_model_loading.py``) turn into its module paths. Whether the published file keeps
the training state is not certain; PySlowFast's loader explicitly skips blobs named
``momentum``, ``lr`` and ``model_iter``, which suggests it does, and the converter accepts
the file either way.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import converters
import zoo_torch_models
from converters import i3d as i3d_converter
from converters.common import CheckpointMismatchError

NAMES = (Path(__file__).parent / "data" / "i3d_8x8_r50_blob_names.txt").read_text().split()
TRAINING_STATE = {"model_iter", "lr"} | {n for n in NAMES if n.endswith("_momentum")}
WEIGHT_NAMES = [n for n in NAMES if n not in TRAINING_STATE]


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    """State dict of PySlowFast's I3D_8x8_R50 with random weights and BN statistics."""
    torch.manual_seed(1)
    model = zoo_torch_models.SlowFastResNet().eval()
    zoo_torch_models.randomize_batch_norms(model, torch.Generator().manual_seed(1))
    return {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def blobs(state) -> dict:
    """A Caffe2 blob dict with every name of the list: the weights of ``state``, random momenta."""
    rng = np.random.default_rng(0)
    by_blob = {zoo_torch_models.caffe2_blob_name(k): v for k, v in state.items()}
    blobs = {"model_iter": 300000, "lr": np.array([1e-4], np.float32)}
    for name in NAMES:
        if name.endswith("_momentum"):
            blobs[name] = rng.normal(size=by_blob[name[: -len("_momentum")]].shape).astype(np.float32)
        elif name not in blobs:
            blobs[name] = by_blob[name]
    return blobs


def test_the_list_names_each_tensor_of_the_model_once(state):
    mapped = [i3d_converter.caffe2_name_to_pytorch(n) for n in WEIGHT_NAMES]
    assert sorted(mapped) == sorted(state)
    assert len(WEIGHT_NAMES) == 267  # 53 convs, 53 BNs x 4, pred_w, pred_b


def test_pyslowfast_renaming_of_sample_blobs():
    rename = i3d_converter.caffe2_name_to_pytorch
    assert rename("conv1_w") == "s1.pathway0_stem.conv.weight"
    assert rename("res_conv1_bn_riv") == "s1.pathway0_stem.bn.running_var"
    assert rename("res2_0_branch1_bn_s") == "s2.pathway0_res0.branch1_bn.weight"
    assert rename("res4_5_branch2b_bn_rm") == "s4.pathway0_res5.branch2.b_bn.running_mean"
    assert rename("res5_2_branch2c_w") == "s5.pathway0_res2.branch2.c.weight"
    assert rename("pred_b") == "head.projection.bias"


def test_caffe2_pickle_converts_like_the_pyslowfast_state_dict(blobs, state, tmp_path):
    path = tmp_path / "I3D_8x8_R50.pkl"
    with open(path, "wb") as f:
        # Python 2's byte-level pickle format is test_checkpoint.py's concern; this file is big.
        pickle.dump({"blobs": blobs}, f, protocol=4)
    from_caffe2 = converters.convert("i3d_r50", path)[0]
    from_pyth = i3d_converter.convert({"model_state": state, "epoch": 196})
    assert jax.tree.structure(from_caffe2) == jax.tree.structure(from_pyth)
    for a, b in zip(jax.tree.leaves(from_caffe2), jax.tree.leaves(from_pyth)):
        np.testing.assert_array_equal(a, b)


def test_converter_accepts_the_file_without_training_state(blobs):
    weights_only = {k: v for k, v in blobs.items() if k not in TRAINING_STATE}
    params = i3d_converter.convert({"blobs": weights_only})
    assert params["params"]["s5_pathway0_res2_branch2_c"]["kernel"].shape == (1, 1, 1, 512, 2048)


def test_missing_and_stray_blobs_are_all_named(blobs):
    broken = dict(blobs)
    del broken["res3_1_branch2b_w"]
    broken["res3_1_branch2d_w"] = broken["res3_1_branch2c_w"]
    broken["nonlocal_conv3_1_theta_w_momentum"] = np.zeros(1, np.float32)  # momentum of no blob
    with pytest.raises(CheckpointMismatchError) as err:
        i3d_converter.convert({"blobs": broken})
    message = str(err.value)
    assert "s3.pathway0_res1.branch2.b.weight" in message
    assert "s3.pathway0_res1.branch2.d.weight" in message
    assert "nonlocal_conv3_1_theta_w_momentum" in message


def test_wrong_shape_is_named(blobs):
    broken = dict(blobs, res2_0_branch2a_w=np.zeros((64, 64, 1, 1, 1), np.float32))
    with pytest.raises(CheckpointMismatchError, match=r"s2.pathway0_res0.branch2.a.weight expected \(64, 64, 3, 1, 1\)"):
        i3d_converter.convert({"blobs": broken})
