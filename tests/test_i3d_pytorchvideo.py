"""PyTorchVideo's hub I3D-R50 checkpoint converts to ``i3d_r50`` with layer-by-layer parity.

The PyTorch side is PyTorchVideo's own model definition, ``pytorchvideo.models.hub.i3d_r50``
(``create_resnet`` with the hub's I3D settings; pytorchvideo==0.1.5, a test dependency),
with random weights and random BN statistics, saved as the hub file is
(``{'model_state': state_dict}``). Every kv3d layer — named as PySlowFast names it — must
match the PyTorchVideo module it stands for to 1e-4 relative error (max abs difference /
max |activation|), float32 on CPU.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch
from pytorchvideo.models import hub

import zoo_torch_models
from converters import i3d as i3d_converter
from kv3d_jax import zoo

TOLERANCE = 1e-4
_STAGE_BLOCKS = {"s2": 1, "s3": 3, "s4": 4, "s5": 5}


def pytorchvideo_module(layer: str) -> str:
    """The PyTorchVideo module whose output kv3d layer ``layer`` is (``s2_pathway0_res0_branch2_a`` ->
    ``blocks.1.res_blocks.0.branch2.conv_a``), written from PyTorchVideo's module tree."""
    if layer == "s1_pathway0_stem_conv":
        return "blocks.0.conv"
    if layer == "s1_pathway0_stem":
        return "blocks.0"
    m = re.fullmatch(r"(s\d)_pathway0_res(\d+)(?:_(branch1|branch2_[abc]))?", layer)
    block = f"blocks.{_STAGE_BLOCKS[m[1]]}.res_blocks.{m[2]}"
    if m[3] is None:
        return block
    return f"{block}.{'branch1_conv' if m[3] == 'branch1' else 'branch2.conv_' + m[3][-1]}"


class _Stop(Exception):
    pass


def capture_until(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of modules ``names`` for ``model(x)``, stopping once all are seen (the head's pool
    needs a full-size clip)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = output.detach()
            if len(seen) == len(names):
                raise _Stop
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.fixture(scope="module")
def hub_model_and_file(tmp_path_factory):
    torch.manual_seed(0)
    model = hub.i3d_r50(pretrained=False).eval()
    zoo_torch_models.randomize_batch_norms(model, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("pytorchvideo") / "I3D_8x8_R50.pyth"
    torch.save({"model_state": model.state_dict()}, path)
    return model, path


def test_every_tensor_is_renamed_to_pyslowfast(hub_model_and_file):
    model, _ = hub_model_and_file
    theirs = {name: tuple(t.shape) for name, t in zoo_torch_models.SlowFastResNet().state_dict().items()}
    renamed = {i3d_converter.pytorchvideo_name_to_pytorch(name): tuple(t.shape)
               for name, t in model.state_dict().items()}
    assert renamed == theirs


def test_hub_checkpoint_matches_pytorchvideo_layer_by_layer(hub_model_and_file):
    torch_model, path = hub_model_and_file
    model, params = zoo.load("i3d_r50", path)
    video = np.random.default_rng(0).normal(size=(1, 8, 64, 64, 3)).astype(np.float32)
    ours = jax.jit(lambda p, v: model.apply(p, v, model.layers))(params, video)
    modules = [pytorchvideo_module(layer) for layer in model.layers]
    theirs = capture_until(torch_model, torch.from_numpy(video.transpose(0, 4, 1, 2, 3)), modules)
    errors = {}
    for layer, module in zip(model.layers, modules):
        reference = theirs[module].numpy().transpose(0, 2, 3, 4, 1)
        assert ours[layer].shape == reference.shape, layer
        errors[layer] = float(np.abs(np.asarray(ours[layer]) - reference).max() / np.abs(reference).max())
    worst = max(errors, key=errors.get)
    print(f"worst relative error {errors[worst]:.2e} at {worst}")
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"
