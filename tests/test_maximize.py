"""Stage 1 end to end: that it works on C3D, errors, and the CLI (independence of kernels from
their batch and chunks: test_independence)."""

from __future__ import annotations

import dataclasses
import warnings

import imageio.v3 as iio
import jax
import numpy as np
import pytest

from kv3d_jax import models, parameterizations, params_io, transforms, zoo
from kv3d_jax.cli import main
from kv3d_jax.maximization import PRESETS, maximize, minmax_normalize, preset
from kv3d_jax.models import c3d

C3D = models.get("c3d")
SMALL = (8, 16, 16)  # the smallest clip that still reaches conv5b (1×1×1 there)
# The native jitter (up to 7 px, 3 frames) is sized for 16×112×112 clips; scaled to SMALL.
SMALL_PRESET = dataclasses.replace(PRESETS["native"], shape=SMALL, max_shift=(2, 2, 2))


@pytest.fixture(scope="module")
def c3d_params():
    # Under jit, XLA drops the forward pass that init runs only to fix shapes.
    return jax.jit(c3d.init_params)(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def c3d_shapes():
    """C3D's params as shapes and dtypes only (traced once, nothing computed)."""
    return jax.eval_shape(c3d.init_params, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_weighted_objective_with_one_hot_weights_is_the_channel_objective(c3d_params):
    by_channel = maximize(C3D, c3d_params, "conv2", [0, 1], config=preset(SMALL_PRESET, steps=3))
    by_weights = maximize(C3D, c3d_params, "conv2", weights=np.eye(128)[:2],
                          config=preset(SMALL_PRESET, steps=3, objective="weighted"))
    np.testing.assert_allclose(by_channel.videos, by_weights.videos, atol=1e-5, rtol=0)
    np.testing.assert_allclose(by_channel.objective, by_weights.objective, rtol=1e-5)


def layer_responses(params, layer, videos) -> np.ndarray:
    """``(N, C)``: mean activation of each channel of ``layer`` for ``videos`` ``(N, T, H, W, 3)``."""
    x = transforms.normalize(videos, C3D.mean, C3D.std)
    return np.asarray(C3D.features(params, x, layer).mean(axis=(1, 2, 3)))


@pytest.mark.filterwarnings("ignore:the channel objective on c3d conv1 is linear")
@pytest.mark.slow
@pytest.mark.parametrize("layer", C3D.layers)
def test_optimised_videos_excite_their_own_channel(c3d_params, layer):
    channels = [0, 1]
    # Unrolled chunks of 2 steps and one asked-for batch: the cheapest programs to compile (a
    # 10-step C3D chunk took 3 times as long); the chunk length changes rounding only (test_independence).
    result = maximize(C3D, c3d_params, layer, channels, config=preset(SMALL_PRESET, steps=20, chunk=2), batch_size=2)
    # Random videos: the starting distribution, min–max normalised like the results.
    init = parameterizations.get("pixel").init
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    random = minmax_normalize(jax.vmap(lambda k: parameterizations.pixel_to_video(init(k, SMALL)))(keys))
    noise = layer_responses(c3d_params, layer, random)[:, channels]
    act = layer_responses(c3d_params, layer, result.videos)[:, channels]  # [video, channel]
    # Pre-activations have channel-specific offsets, so a channel is measured against its
    # own response to random videos (in their standard deviations) and to the other
    # kernels' optimised videos, never against another channel's activation.
    z = (np.diag(act) - noise.mean(0)) / noise.std(0)
    for i in range(len(channels)):
        others = [j for j in range(len(channels)) if j != i]
        assert z[i] > 5, f"{layer}:{channels[i]} only {z[i]:.1f} sd above random videos"
        assert act[i, i] > act[others, i].max(), f"{layer}: another video excites channel {i} more"


@pytest.mark.slow
def test_linear_objective_warns_and_says_so(c3d_params):
    with pytest.warns(UserWarning, match="linear in the input.*flat colour"):
        result = maximize(C3D, c3d_params, "conv1", [0], config=preset(SMALL_PRESET, steps=1))
    assert result.linear
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not maximize(C3D, c3d_params, "conv1", [0], config=preset(SMALL_PRESET, steps=1, rectify=True)).linear
        # A single neuron is linear too, but its optimum is the kernel's own pattern: no warning.
        assert maximize(C3D, c3d_params, "conv1", [0], config=preset(SMALL_PRESET, steps=1, objective="neuron")).linear


def test_result_videos_are_minmax_normalised():
    result = maximize(*zoo.load("motionnet"), "conv1", [2, 9], config=preset(SMALL_PRESET, steps=2, rectify=True))
    videos = np.asarray(result.videos)
    assert videos.shape == (2, *SMALL, 3) and result.objective.shape == (2,)
    np.testing.assert_allclose(videos.min(axis=(1, 2, 3, 4)), 0, atol=1e-6)
    np.testing.assert_allclose(videos.max(axis=(1, 2, 3, 4)), 1, atol=1e-6)


@pytest.mark.slow
def test_fourier_parameterization_optimises(c3d_params):
    run = lambda steps: maximize(C3D, c3d_params, "conv2", [4], batch_size=1,
                                 config=preset(SMALL_PRESET, steps=steps, chunk=1, parameterization="fourier"))
    result, start = run(10), run(1)
    assert result.objective[0] > start.objective[0]
    with pytest.raises(ValueError, match="even width"):
        parameterizations.fourier_init(jax.random.PRNGKey(0), (4, 6, 7))


def test_random_jitter_draws_every_allowed_value():
    draws = jax.vmap(transforms.random_jitter)(jax.random.split(jax.random.PRNGKey(0), 2000))
    assert set(np.asarray(draws.dx).tolist()) == set(range(8))
    assert set(np.asarray(draws.dy).tolist()) == set(range(8))
    assert set(np.asarray(draws.dt).tolist()) == set(range(4))
    np.testing.assert_allclose(np.unique(np.asarray(draws.scale)), np.linspace(0.9, 1.1, 11), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer="conv9"), "valid layers are: conv1, conv2"),
    (dict(config="fast"), "valid presets are: paper, native"),
    (dict(config=preset(SMALL_PRESET, objective="max")), "valid objectives are: channel, neuron, weighted"),
    (dict(config=preset(SMALL_PRESET, parameterization="cppn")), "valid parameterizations are: pixel, fourier"),
    (dict(channels=[3, 64]), "conv1 has channels 0..63; got \\[64\\]"),
    (dict(config=preset(SMALL_PRESET, steps=0)), "steps must be at least 1"),
    (dict(config=preset(SMALL_PRESET, chunk=0)), "chunk must be at least 1"),
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(layer="conv5b", config=preset(SMALL_PRESET, shape=(4, 16, 16))), "too small to reach conv5b"),
    (dict(config=preset(SMALL_PRESET, objective="weighted")), "needs weights"),
    (dict(config=preset(SMALL_PRESET, objective="weighted"), weights=np.ones((2, 5))),
     "weights must have shape \\(K, 64\\)"),
    (dict(key=jax.random.split(jax.random.PRNGKey(0), 3)), "keys of shape \\(3, 2\\) for 1 kernels"),
])
def test_bad_arguments_are_named(c3d_shapes, kwargs, message):
    weighted = isinstance(kwargs.get("config"), type(SMALL_PRESET)) and kwargs["config"].objective == "weighted"
    args = dict(layer="conv1", channels=None if weighted else [0], config=preset(SMALL_PRESET, steps=1))
    # Each is refused before a number is computed: C3D's params need only their shapes.
    with pytest.raises(ValueError, match=message):
        maximize(C3D, c3d_shapes, **{**args, **kwargs})


def test_preset_names_unknown_settings():
    with pytest.raises(ValueError, match="unknown stage-1 setting.*'stepz'.*valid ones are: shape"):
        preset("native", stepz=3)


@pytest.mark.slow
def test_cli_writes_a_gif_per_kernel_and_an_npz(c3d_params, tmp_path, capsys):
    # C3D's params saved directly: converting its checkpoint is test_c3d_parity's and test_cli_convert's.
    params_file = params_io.save(tmp_path / "c3d.msgpack", c3d_params, model="c3d")
    argv = ["maximize", "--model", "c3d", "--weights", str(params_file), "--layer", "conv1",
            "--channels", "3,7", "--out", str(tmp_path), "--preset", "native", "--steps", "2", "--rectify"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "objective=" in captured.err
    for channel in (3, 7):
        gif = iio.imread(tmp_path / f"c3d_conv1_{channel}_stage1.gif", index=None)
        assert gif.shape[:3] == (16, 112, 112)
    saved = np.load(tmp_path / "c3d_conv1_stage1.npz")
    assert saved["videos"].shape == (2, 16, 112, 112, 3)
    np.testing.assert_array_equal(saved["channels"], [3, 7])
    assert saved["objective"].shape == (2,) and str(saved["layer"]) == "conv1" and str(saved["model"]) == "c3d"
    assert "c3d_conv1_stage1.npz" in captured.out


def test_cli_without_weights_says_how_to_make_them(tmp_path, capsys):
    assert main(["maximize", "--model", "c3d", "--layer", "conv1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "kv3d convert c3d CHECKPOINT -o PARAMS" in err


def test_cli_rejects_bad_channels(c3d_shapes, tmp_path, capsys):
    # A params file of C3D's shapes, zeros saved directly: converting a checkpoint is not what is tested.
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), c3d_shapes)
    params_file = str(params_io.save(tmp_path / "c3d.msgpack", zeros, model="c3d"))
    assert main(["maximize", "--model", "c3d", "--weights", params_file, "--layer", "conv1", "--channels", "60-70",
                 "--out", str(tmp_path)]) == 2
    assert "conv1 has channels 0..63; got '60-70'" in capsys.readouterr().err
