"""The MACO parameterization: a pure, differentiable function of its phase whose amplitude spectrum is
exactly the fixed one; the natural-video law and its estimate from clips; stage 1 and the CLI with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kv3d_jax import maximization, parameterizations, runner, spectrum, writers
from kv3d_jax.cli import main
from kv3d_jax.maximization import maximize, preset
from tiny_model import tiny

SHAPE = (4, 8, 8)
MACO = parameterizations.PARAMETERIZATIONS["maco"]


def _amplitude(x) -> np.ndarray:
    return np.abs(np.fft.rfftn(np.asarray(x, np.float64), axes=(0, 1, 2)))


def test_to_video_is_deterministic_and_in_range():
    phase = MACO.init(jax.random.PRNGKey(0), SHAPE)
    assert phase.shape == (4, 8, 5, 3)
    video = MACO.to_video(phase)
    assert video.shape == (*SHAPE, 3) and 0 < float(video.min()) and float(video.max()) < 1
    np.testing.assert_array_equal(video, MACO.to_video(phase))
    np.testing.assert_allclose(jax.jit(MACO.to_video)(phase), video, atol=1e-6)


def test_to_video_gradient_matches_finite_differences():
    phase = MACO.init(jax.random.PRNGKey(1), SHAPE)
    weights = jax.random.normal(jax.random.PRNGKey(2), (*SHAPE, 3))
    # A scalar of the video keeps the check to one reverse pass and a few directional differences;
    # float32 FFTs limit the agreement to about 1e-3.
    check_grads(lambda p: jnp.sum(MACO.to_video(p) * weights), (phase,), order=1, modes=["rev"], eps=1e-2,
                atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", [pytest.param("maco_static_displacement", marks=pytest.mark.slow),
                                  "maco_static_velocity"])
def test_a_maco_texture_video_gradient_matches_finite_differences(name):
    parameterization = parameterizations.PARAMETERIZATIONS[name]
    param = parameterization.init(jax.random.PRNGKey(5), SHAPE)
    assert param["static"].shape == (8, 5, 3) and param["displacement"].shape == (*SHAPE, 2)
    displacement = param["displacement"] + jax.random.normal(jax.random.PRNGKey(6), (*SHAPE, 2))
    weights = jax.random.normal(jax.random.PRNGKey(7), (*SHAPE, 3))
    # The phase only: the warp's gradient in the displacement is checked against grid_sample in
    # test_refine (finite differences would step across its bilinear kinks).
    video = lambda phase: parameterization.to_video({"static": phase, "displacement": displacement})
    check_grads(lambda phase: jnp.sum(video(phase) * weights), (param["static"],), order=1, modes=["rev"],
                eps=1e-2, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", [SHAPE, (5, 6, 10)])
def test_pre_sigmoid_spectrum_has_exactly_the_fixed_magnitude(shape):
    phase = MACO.init(jax.random.PRNGKey(3), shape) * 3.0
    magnitude = parameterizations.maco_magnitude(shape)
    colours = parameterizations.maco_colours(phase, magnitude, shape[2])
    # float32 transforms: every amplitude within 1e-5 of the largest (measured: about 1e-7).
    np.testing.assert_allclose(_amplitude(colours), magnitude, rtol=0, atol=1e-5 * magnitude.max())
    assert float(jnp.sqrt(jnp.mean(colours**2))) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(colours.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    stronger = parameterizations.maco_colours(phase, parameterizations.maco_magnitude(shape, contrast=2.5), shape[2])
    np.testing.assert_allclose(stronger, 2.5 * colours, rtol=0, atol=1e-5)


def test_an_optimiser_step_changes_the_phase_but_not_the_magnitude():
    phase = MACO.init(jax.random.PRNGKey(4), SHAPE)
    grad = jax.grad(lambda p: MACO.to_video(p)[:, :4].mean())(phase)
    moved = phase + 0.5 * grad / jnp.abs(grad).max()
    magnitude = parameterizations.maco_magnitude(SHAPE)
    before = parameterizations.maco_colours(phase, magnitude, SHAPE[2])
    after = parameterizations.maco_colours(moved, magnitude, SHAPE[2])
    assert float(jnp.abs(after - before).max()) > 0.05
    np.testing.assert_allclose(_amplitude(after), _amplitude(before), rtol=0, atol=1e-5 * magnitude.max())


def test_magnitude_from_clips_is_their_mean_decorrelated_amplitude():
    clips = jax.random.uniform(jax.random.PRNGKey(5), (3, *SHAPE, 3))
    estimate = spectrum.from_clips(clips, parameterizations.COLOR_DECORRELATION)
    colours = np.asarray(clips, np.float64) @ np.linalg.inv(parameterizations.COLOR_DECORRELATION.T.astype(np.float64))
    np.testing.assert_allclose(estimate, np.mean([_amplitude(c) for c in colours], axis=0), rtol=1e-10)
    fixed = parameterizations.maco_magnitude(SHAPE, estimate)
    ratio = fixed.ravel()[3:] / estimate.ravel()[3:]  # all but the three colours' mean, set to 0
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    video = parameterizations.maco(estimate).to_video(MACO.init(jax.random.PRNGKey(6), SHAPE))
    assert video.shape == (*SHAPE, 3)


@pytest.mark.parametrize("exponents", [(1.0, 1.0), (0.5, 1.5)])
def test_power_slopes_recover_the_law_of_a_random_phase_video(exponents):
    shape = (16, 32, 32)
    phase = MACO.init(jax.random.PRNGKey(7), shape)
    colours = parameterizations.maco_colours(phase, parameterizations.maco_magnitude(shape, exponents=exponents), 32)
    spatial, temporal = spectrum.power_slopes(np.asarray(colours)[None])
    assert spatial[0] == pytest.approx(-2 * exponents[0], abs=0.15)
    assert temporal[0] == pytest.approx(-2 * exponents[1], abs=0.15)


def test_natural_law_is_guarded_at_zero_frequency():
    law = spectrum.natural_law((4, 8, 8), (1.0, 1.0))
    assert np.all(np.isfinite(law))
    assert law[0, 0, 0] == law[1, 0, 1] == pytest.approx(4 * 8)  # f_t = 0 -> 1/4, f_s = 0 -> 1/8
    assert law[2, 0, 4] == pytest.approx(1 / (0.5 * 0.5))


def test_magnitude_is_a_value_so_configs_holding_it_are_cache_keys():
    array = np.ones((4, 8, 5, 3))
    a, b = spectrum.Magnitude(array), spectrum.Magnitude(array.copy())
    assert a == b and hash(a) == hash(b) and a != spectrum.Magnitude(2 * array)
    assert hash(preset("native", parameterization="maco", magnitude=a)) == hash(
        preset("native", parameterization="maco", magnitude=b))
    with pytest.raises(ValueError, match="finite and non-negative"):
        spectrum.Magnitude(-array)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny(SHAPE)


@pytest.mark.slow
def test_maximize_with_maco_raises_the_objective(tiny_model):
    model, params = tiny_model
    # Chunks of 2 steps: the runner unrolls a chunk, and short ones compile fastest.
    config = preset("native", parameterization="maco", rectify=True, max_shift=(2, 2, 1), steps=20, chunk=2)
    result = maximize(model, params, "b", [0, 1], config=config, batch_size=2)
    value = maximization.objective_value(model, "b", rectify=True)
    mean, std = maximization.mean_std(model, config)
    # The starting distribution: the objective of random phases, as the results measure it.
    starts = [[float(value(params, maximization.model_input(MACO.to_video(MACO.init(key, SHAPE)), None, None, mean,
                                                             std), channel)) for channel in (0, 1)]
              for key in jax.random.split(jax.random.PRNGKey(11), 4)]
    assert np.all(np.asarray(result.objective) > np.max(starts, axis=0) + 0.02)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(parameterization="pixel", magnitude=spectrum.Magnitude(np.ones((4, 8, 5, 3)))),
     "only used by parameterization='maco'"),
    (dict(parameterization="maco", magnitude=spectrum.Magnitude(np.ones((4, 8, 9, 3)))),
     r"does not fit a \(4, 8, 8\) video"),
    (dict(parameterization="maco", shape=(4, 8, 7)), "needs an even width"),
])
def test_maximize_refuses_a_magnitude_it_cannot_use(tiny_model, changes, message):
    model, params = tiny_model
    with pytest.raises(ValueError, match=message):
        maximize(model, params, "b", [0], config=preset("native", steps=1, **changes))


def test_attribution_is_zero_outside_the_receptive_field_of_a_neuron(tiny_model):
    model, params = tiny_model
    # No jitter: the centre neuron of layer b (t=2, y=x=4) sees frames 1-4 (its 2-frame kernel
    # over a 3-frame one, SAME padding) and rows/columns 2-6.
    config = preset("native", objective="neuron", rectify=False, max_shift=(1, 1, 1), scales=(1.0,))
    videos = jax.random.uniform(jax.random.PRNGKey(8), (2, *SHAPE, 3))
    maps = np.asarray(maximization.attribution(model, params, "b", config, videos, np.array([0, 3]),
                                               runner.kernel_keys(jax.random.PRNGKey(9), [0, 3]), samples=2))
    assert maps.shape == (2, *SHAPE) and np.all(maps >= 0)
    inside = np.zeros(SHAPE, bool)
    inside[1:, 2:7, 2:7] = True
    assert np.all(maps[:, ~inside] == 0) and np.all(maps[:, inside].sum(axis=1) > 0)


def test_cli_help_lists_maco_and_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["maximize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "maco" in text and "--magnitude-from FILE" in text and "--maco-exponents A B" in text
    assert "--maco-contrast" in text


def test_cli_magnitude_from_needs_maco(tmp_path, capsys):
    gif = writers.save_gif(tmp_path / "clip.gif", np.full((4, 8, 8, 3), 0.5, np.float32))
    assert main(["maximize", "--layer", "conv1", "--channels", "0", "--out", str(tmp_path / "out"),
                 "--magnitude-from", str(gif)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kv3d maximize: error: --magnitude-from" in err and "maco" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--magnitude-from", "{tmp}/missing.gif"], "no such file or folder: {tmp}/missing.gif"),
    (["--maco-contrast", "nan"], "--maco-contrast takes a number above 0"),
])
def test_cli_refuses_bad_maco_inputs_in_one_line(tmp_path, capsys, argv, message):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    assert main(["maximize", "--layer", "conv1", "--parameterization", "maco", "--out", str(tmp_path / "out"),
                 *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kv3d maximize: error: ") and message.format(tmp=tmp_path) in err


@pytest.mark.slow
def test_cli_maco_from_clips_writes_attribution(tmp_path, capsys):
    clip = np.asarray(jax.random.uniform(jax.random.PRNGKey(10), (6, 20, 24, 3)))
    gif = writers.save_gif(tmp_path / "clip.gif", clip)
    out = tmp_path / "out"
    assert main(["maximize", "--layer", "conv1", "--channels", "0,5", "--preset", "native", "--steps", "1",
                 "--parameterization", "maco", "--magnitude-from", str(gif), "--out", str(out)]) == 0
    saved = np.load(out / "motionnet_conv1_stage1.npz")
    assert saved["videos"].shape == (2, 16, 32, 32, 3)
    assert saved["attribution"].shape == (2, 16, 32, 32) and np.all(saved["attribution"] >= 0)
    assert np.all(saved["attribution"].sum(axis=(1, 2, 3)) > 0)
