"""Layer-by-layer parity of the zoo models with their PyTorch definitions, through the real file formats.

Each PyTorch model (torchvision's own definitions; PySlowFast's I3D and VideoGPT's VQ-VAE
as written in ``zoo_torch_models``) gets random weights and random BN statistics, is
saved the way its weights are published, loaded with ``zoo.load`` (so converted) and run
on the same clip. Every tapped layer must agree to 1e-4 relative error
(max abs difference / max |activation|), float32 on CPU.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from typing import Callable, NamedTuple

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import zoo_torch_models
import converters
from converters import i3d as i3d_converter
from converters import torchvision_video as tv_converter
from converters import vqvae as vqvae_converter
from kv3d_jax import cli, distribute, maximization, models, params_io, runner, zoo
from kv3d_jax.maximization import preset
from kv3d_jax.models.layers import Conv3d, run_until
from torch_models import capture

TOLERANCE = 1e-4


class Case(NamedTuple):
    build: Callable[..., nn.Module]  # the PyTorch model
    file: str  # how its weights are published: "pth", "pyth" or "ckpt"
    torch_path: Callable[[str], str]  # Flax module name -> PyTorch module path
    clip: tuple[int, int, int]  # (T, H, W) of the parity clip
    stage1: tuple[str, tuple[int, int, int]]  # layer and clip of the stage-1 run
    not_trunk: tuple[str, ...]  # PyTorch modules outside the trunk
    hyper: dict = {}  # VideoGPT: the args its checkpoint records (beyond VideoGPT's defaults)


def model_name(case_name: str) -> str:
    """The registered model a case is of: the case's name up to an ``@variant``."""
    return case_name.split("@")[0]


# VideoGPT's argparse defaults (add_model_specific_args and the data args of scripts/train_vqvae.py).
VIDEOGPT_ARGS = dict(embedding_dim=256, n_codes=2048, n_hiddens=240, n_res_layers=4, downsample=[4, 4, 4],
                     sequence_length=16, resolution=128)


CASES = {
    "i3d_r50": Case(zoo_torch_models.SlowFastResNet, "pyth", i3d_converter.torch_path,
                    (8, 64, 64), ("s3_pathway0_res0_branch2_c", (8, 32, 32)), ("head",)),
    "r3d_18": Case(torchvision.models.video.r3d_18, "pth", tv_converter.torch_path,
                   (16, 32, 32), ("layer2_0_conv2_0", (8, 32, 32)), ("fc",)),
    "mc3_18": Case(torchvision.models.video.mc3_18, "pth", tv_converter.torch_path,
                   (16, 32, 32), ("layer2_0_conv2_0", (8, 32, 32)), ("fc",)),
    "r2plus1d_18": Case(torchvision.models.video.r2plus1d_18, "pth", tv_converter.torch_path,
                        (16, 32, 32), ("layer2_0_conv2_0_3", (8, 32, 32)), ("fc",)),
    "s3d": Case(torchvision.models.video.s3d, "pth", tv_converter.torch_path,
                (16, 64, 64), ("features_5_branch1_1_1_0", (8, 32, 32)), ("classifier",)),
    "videogpt_vqvae": Case(zoo_torch_models.VQVAE, "ckpt", vqvae_converter.torch_path,
                           (16, 32, 32), ("encoder_res_stack_0_block_5_conv", (8, 16, 16)),
                           ("decoder", "pre_vq_conv", "post_vq_conv")),
    # kinetics_stride2x4x4 and bair_stride4x2x2: the same tensor shapes as 4x4x4, other strides.
    "videogpt_vqvae@2x4x4": Case(zoo_torch_models.VQVAE, "ckpt", vqvae_converter.torch_path,
                                 (8, 32, 32), ("encoder_res_stack_0_block_5_conv", (8, 16, 16)),
                                 ("decoder", "pre_vq_conv", "post_vq_conv"),
                                 dict(n_hiddens=64, n_res_layers=2, downsample=[2, 4, 4], embedding_dim=32)),
    "videogpt_vqvae@4x2x2": Case(zoo_torch_models.VQVAE, "ckpt", vqvae_converter.torch_path,
                                 (16, 16, 16), ("encoder_res_stack_0_block_5_conv", (8, 16, 16)),
                                 ("decoder", "pre_vq_conv", "post_vq_conv"),
                                 dict(n_hiddens=64, n_res_layers=2, downsample=[4, 2, 2], resolution=64)),
}


def build_torch(case: Case) -> nn.Module:
    """The case's PyTorch model, built from its hyper-parameters for VideoGPT."""
    if case.file != "ckpt":
        return case.build()
    args = {**VIDEOGPT_ARGS, **case.hyper}
    return case.build(args["embedding_dim"], args["n_codes"], args["n_hiddens"], args["n_res_layers"],
                      tuple(args["downsample"]))


def _save(torch_model: nn.Module, fmt: str, path, hyper: dict | None = None) -> None:
    """Saves ``torch_model`` the way its published weights are stored (VideoGPT: with ``hyper`` as the
    args beyond VideoGPT's defaults)."""
    state = torch_model.state_dict()
    if fmt == "pth":  # torchvision: torch.save of the state dict
        torch.save(state, path)
    elif fmt == "pyth":  # PySlowFast's checkpoint.save_checkpoint
        torch.save({"epoch": 196, "model_state": state, "optimizer_state": {}, "cfg": "MODEL:\n  ARCH: i3d\n"}, path)
    else:  # PyTorch Lightning 1.3's dump_checkpoint of VideoGPT's VQVAE (callback states left out)
        adam = {"state": {0: {"step": 1000, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                "param_groups": [{"lr": 7e-4, "betas": (0.9, 0.999), "params": [0]}]}
        args = argparse.Namespace(**{**VIDEOGPT_ARGS, **(hyper or {})})
        torch.save({"epoch": 10, "global_step": 1000, "pytorch-lightning_version": "1.3.3",
                    "optimizer_states": [adam], "lr_schedulers": [], "state_dict": state,
                    "hparams_name": "args", "hyper_parameters": {"args": args}}, path)


def relative_error(ours: jax.Array, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|, ``ours`` NTHWC against ``theirs`` NCTHW."""
    theirs = theirs.numpy().transpose(0, 2, 3, 4, 1)
    assert ours.shape == theirs.shape
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


# The quick loop compares one model per checkpoint format that a test elsewhere does not: R3D-18
# (torchvision's) and VideoGPT's VQ-VAE (Lightning's); I3D-R50's PySlowFast checkpoint is also
# compared in test_i3d_pytorchvideo. The rest, S3D the costliest (about 7 s), run in the full suite.
QUICK = ("r3d_18", "videogpt_vqvae")


@pytest.fixture(scope="module", params=[n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def case(request, tmp_path_factory):
    """One zoo model: its PyTorch twin, the converted params and both sides' activations."""
    name = model_name(request.param)
    spec = CASES[request.param]
    torch.manual_seed(0)
    torch_model = build_torch(spec).eval()
    zoo_torch_models.randomize_batch_norms(torch_model, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp(name) / f"weights.{spec.file}"
    _save(torch_model, spec.file, path, spec.hyper)
    model, params = zoo.load(name, path)
    video = np.random.default_rng(0).normal(size=(1, *spec.clip, 3)).astype(np.float32)
    ours = jax.jit(lambda p, v: model.apply(p, v, model.layers))(params, video)
    # S3D's classifier pools 2x7x7, more than a small clip has: run its trunk alone, with the same module paths.
    trunk = nn.Sequential(OrderedDict(features=torch_model.features)) if name == "s3d" else torch_model
    theirs = capture(trunk, torch.from_numpy(video.transpose(0, 4, 1, 2, 3)),
                     [spec.torch_path(layer) for layer in model.layers])
    return dict(name=name, case=request.param, torch_model=torch_model, model=model, params=params, video=video,
                ours=ours, theirs=theirs, torch_path=spec.torch_path, checkpoint=path)


def test_every_layer_matches_pytorch(case):
    errors = {layer: relative_error(case["ours"][layer], case["theirs"][case["torch_path"](layer)])
              for layer in case["model"].layers}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{case['case']} {worst}: relative error {errors[worst]:.2e}"


def test_every_conv_is_a_layer(case):
    not_trunk = CASES[case["case"]].not_trunk
    convs = {name.replace(".", "_") for name, m in case["torch_model"].named_modules()
             if isinstance(m, nn.Conv3d) and not name.startswith(not_trunk)}
    assert convs <= set(case["model"].layers)


def test_stage1_traces_on_converted_params(case):
    # The runner's own stage-1 programs (two kernels, a 2-step chunk) traced for the converted
    # model, not compiled: tracing is where a model fails to fit stage 1 (its taps, its gradient,
    # the clip reaching the layer), and compiling a chunk per architecture cost most of this file.
    # The numbers are the model's, checked by test_every_layer_matches_pytorch; stage 1's by
    # test_maximize and test_stage1_parity.
    layer, shape = CASES[case["case"]].stage1
    model, params = case["model"], case["params"]
    config = preset("native", steps=2, chunk=2, shape=shape)
    assert maximization.check_reachable(model, params, layer, config, shape) >= 2
    mesh = distribute.kernel_mesh(jax.devices()[:1])
    init, advance, finish = runner._programs(maximization.problem(model, layer, config, shape), mesh, 2)
    keys = runner.kernel_keys(jax.random.PRNGKey(1), [0, 1])
    state = init.eval_shape(keys, jnp.arange(2, dtype=jnp.int32))
    state, metrics = advance.eval_shape(params, state, keys, jax.ShapeDtypeStruct((), jnp.uint32))
    (videos, objective), failed = finish.eval_shape(params, state)
    assert videos.shape == (2, *shape, 3) and objective.shape == (2,) and failed.shape == (2,)
    assert metrics.shape == (2, 2) and metrics.dtype == jnp.float32


def _conv_count(model, params, video, layer) -> int:
    """How many conv modules ``features(..., layer)`` calls."""
    calls = []

    def count(call, args, kwargs, context):
        if isinstance(context.module, Conv3d) and context.method_name == "__call__":
            calls.append(context.module.name)
        return call(*args, **kwargs)

    # Traced, not run: the modules are called while tracing, and running S3D op by op took a minute.
    with flax.linen.intercept_methods(count):
        jax.eval_shape(lambda p, v: model.features(p, v, layer), params, video)
    return len(calls)


def test_features_stops_at_the_layer(case):
    """``features(..., upto)`` equals the all-layer pass at ``upto`` and runs no conv after it."""
    model, params, video = case["model"], case["params"], case["video"]
    modules = dict(case["torch_model"].named_modules())
    convs = [layer for layer in model.layers if isinstance(modules.get(case["torch_path"](layer)), nn.Conv3d)]
    layer = convs[2]
    np.testing.assert_allclose(jax.jit(model.features, static_argnums=2)(params, video, layer), case["ours"][layer],
                               rtol=1e-5, atol=1e-5)
    assert _conv_count(model, params, video, layer) == 3
    assert _conv_count(model, params, video, model.layers[-1]) == len(convs)


def test_run_until_names_the_missing_and_the_valid_layers():
    taps = iter([("conv1", jnp.zeros(1)), ("conv2", jnp.ones(1))])
    with pytest.raises(ValueError, match=r"no layer named 'conv9'; valid layers are: conv1, conv2"):
        run_until(taps, ("conv1", "conv9"), ("conv1", "conv2"))


def test_run_until_returns_each_requested_layer():
    taps = iter([("conv1", jnp.zeros(1)), ("conv2", jnp.ones(1)), ("conv3", 2 * jnp.ones(1))])
    found = run_until(taps, ("conv2", "conv1"), ("conv1", "conv2", "conv3"))
    assert set(found) == {"conv1", "conv2"} and float(found["conv2"][0]) == 1.0
    assert next(taps)[0] == "conv3"  # stopped after conv2: nothing later was computed


def test_params_file_loads_like_the_checkpoint(case, tmp_path):
    path = tmp_path / "params.msgpack"
    assert cli.main(["convert", case["name"], str(case["checkpoint"]), "-o", str(path)]) == 0
    model, params = zoo.load(case["name"], path)
    assert model.name == case["name"] and model.config == case["model"].config
    assert model.layers == case["model"].layers and model.input_shape == case["model"].input_shape
    assert jax.tree.structure(params) == jax.tree.structure(case["params"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(case["params"])):
        np.testing.assert_array_equal(a, b)


def test_params_of_another_model_are_refused(case, tmp_path):
    other = "mc3_18" if case["name"] == "r3d_18" else "r3d_18"
    path = params_io.save(tmp_path / "params.msgpack", case["params"])
    with pytest.raises(ValueError, match=rf"not {other} params; .*{other}'s checkpoint, or a params file"):
        zoo.load(other, path)
    named = params_io.save(tmp_path / "named.msgpack", case["params"], case["name"], dict(case["model"].config))
    with pytest.raises(ValueError, match=rf"holds params of {case['name']}, not {other}"):
        zoo.load(other, named)


@pytest.mark.parametrize("name", models.names())
def test_zoo_checks_params_of_every_registered_model(name):
    with pytest.raises(ValueError, match=rf"these are not {name} params; missing: \['(params|batch_stats)'\]"):
        zoo.check_params(name, {})


def _small_videogpt(tmp_path, hyper: dict | None, downsample=(4, 4, 4), name="small.ckpt"):
    """A small VideoGPT VQ-VAE (8 hidden channels, 1 residual block) saved as a Lightning checkpoint
    whose args are ``hyper`` (None: no hyper-parameters at all)."""
    torch.manual_seed(0)
    state = zoo_torch_models.VQVAE(8, 16, 8, 1, downsample).state_dict()
    path = tmp_path / name
    saved = {"epoch": 1, "state_dict": state}
    if hyper is not None:
        saved.update(hparams_name="args", hyper_parameters={"args": argparse.Namespace(**hyper)})
    torch.save(saved, path)
    return path


SMALL = dict(embedding_dim=8, n_codes=16, n_hiddens=8, n_res_layers=1, downsample=[4, 4, 4],
             sequence_length=16, resolution=64)


@pytest.mark.parametrize("hyper, downsample, message", [
    (None, (4, 4, 4), r"records no hyper-parameters .*downsample \(4, 4, 4\), \(2, 4, 4\) and \(4, 2, 2\)"),
    ({k: v for k, v in SMALL.items() if k != "downsample"}, (4, 4, 4), "hyper-parameters lack downsample"),
    ({**SMALL, "downsample": [2, 2, 2]}, (2, 2, 2), r"downsample=\(2, 2, 2\): VideoGPT's encoder needs a factor"),
    ({**SMALL, "downsample": [3, 4, 4]}, (3, 4, 4), r"downsample=\(3, 4, 4\): kv3d builds three powers of two"),
    ({**SMALL, "n_hiddens": 7}, (4, 4, 4), "n_hiddens=7: kv3d builds an even number"),
    ({**SMALL, "resolution": 66}, (4, 4, 4), r"clips of \(16, 66, 66\)"),
])
def test_videogpt_checkpoints_kv3d_cannot_build_are_refused_naming_why(tmp_path, capsys, hyper, downsample, message):
    path = _small_videogpt(tmp_path, hyper, downsample)
    with pytest.raises(converters.CheckpointMismatchError, match=message):
        zoo.load("videogpt_vqvae", path)
    out = tmp_path / "params.msgpack"
    assert cli.main(["convert", "videogpt_vqvae", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kv3d convert: error: ") and str(path) in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.slow
def test_videogpt_strides_come_from_the_checkpoint_not_the_tensor_shapes(tmp_path):
    """Checkpoints of 4x4x4 and 2x4x4 encoders with the same tensors give different models."""
    same = _small_videogpt(tmp_path, SMALL, name="a.ckpt")
    other = _small_videogpt(tmp_path, {**SMALL, "downsample": [2, 4, 4]}, name="b.ckpt")
    (model_a, params_a), (model_b, params_b) = zoo.load("videogpt_vqvae", same), zoo.load("videogpt_vqvae", other)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)
    assert dict(model_a.config)["downsample"] == (4, 4, 4) and dict(model_b.config)["downsample"] == (2, 4, 4)
    assert model_a.input_shape == model_b.input_shape == (16, 64, 64)
    video = np.zeros((1, 8, 16, 16, 3), np.float32)
    assert model_a.features(params_a, video, "encoder").shape == (1, 2, 4, 4, 8)
    assert model_b.features(params_b, video, "encoder").shape == (1, 4, 4, 4, 8)
