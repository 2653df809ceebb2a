"""Drifting-grating direction tuning: known answers from hand-built direction-selective filters."""

from __future__ import annotations

import math

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax import cli, stimuli, tuning
from kv3d_jax.models import motionnet
from kv3d_jax.models.base import VideoModel

DIRECTIONS = np.arange(8) * 45.0
SFS = (0.0625, 0.125, 0.25)
TFS = (0.0625, 0.125, 0.25)


def _gabor_apply(params, video, upto):
    """Valid cross-correlation of the luminance of ``video`` with ``params["kernel"]`` ``(t, h, w, 1, C)``."""
    luminance = video.mean(axis=-1, keepdims=True)
    return jax.lax.conv_general_dilated(
        luminance, params["kernel"], (1, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )


GABOR_MODEL = VideoModel(
    name="gabor", apply=_gabor_apply, layers=("gabor",), input_shape=(8, 20, 20),
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)


def _motion_gabor(direction_deg: float, sf: float = 0.125, tf: float = 0.125) -> np.ndarray:
    """A space-time Gabor ``(5, 9, 9)`` matched to a grating drifting towards ``direction_deg``."""
    t, y, x = np.meshgrid(np.arange(-2, 3), np.arange(-4, 5), np.arange(-4, 5), indexing="ij")
    rad = math.radians(direction_deg)
    along = x * math.cos(rad) - y * math.sin(rad)
    envelope = np.exp(-(x**2 + y**2) / (2 * 3.0**2) - t**2 / (2 * 2.0**2))
    return envelope * np.cos(2 * np.pi * (sf * along - tf * t))


def _gabor_params(*directions):
    kernel = np.stack([_motion_gabor(d) for d in directions], axis=-1)[:, :, :, None, :]
    return {"kernel": jnp.asarray(kernel, jnp.float32)}


@pytest.mark.parametrize("direction", [0.0, 45.0, 90.0, 180.0, 270.0])
def test_grating_moves_in_its_direction(direction):
    # at 2*sqrt(2) px/frame along a diagonal the displacement is a whole number of pixels
    speed = 2.0 * math.sqrt(2.0) if direction % 90 else 2.0
    vx, vy = (round(v) for v in stimuli.velocity_from_direction(direction, speed))
    sf = 0.1
    video = np.asarray(stimuli.drifting_grating(4, 24, 24, direction, sf, sf * speed))
    # content at p in frame k is at p + (vx, vy) in frame k + 1
    later = np.roll(video[1:], (-vy, -vx), axis=(1, 2))
    inner = (slice(None), slice(3, -3), slice(3, -3))
    np.testing.assert_allclose(later[inner], video[:-1][inner], atol=1e-4)


@pytest.mark.parametrize("direction", [0.0, 135.0, 270.0])
def test_tuning_of_motion_gabors_peaks_at_their_direction(direction):
    params = _gabor_params(direction, direction + 180.0)
    responses = tuning.grating_responses(GABOR_MODEL, params, "gabor", DIRECTIONS, SFS, TFS)
    result = tuning.direction_tuning(responses, DIRECTIONS)
    np.testing.assert_allclose(result.preferred_deg, [direction, (direction + 180.0) % 360.0])
    assert np.all(result.dsi > 0.5), result.dsi
    np.testing.assert_array_equal(result.best_sf, [1, 1])
    np.testing.assert_array_equal(result.best_tf, [1, 1])


def test_batched_responses_equal_a_loop_over_stimuli():
    model = motionnet.model()
    rng = np.random.default_rng(0)
    params = jax.tree.map(  # numpy draws: Flax's initialisers compile for seconds per shape
        lambda leaf: rng.normal(0.0, 0.3, leaf.shape).astype(np.float32),
        jax.eval_shape(motionnet.init_params, jax.random.key(0)),
    )
    shape, num_phases = (8, 16, 16), 3
    directions, sfs, tfs = (0.0, 90.0, 180.0, 270.0), (0.05, 0.15), (0.1,)
    batched = tuning.grating_responses(
        model, params, "conv2", directions, sfs, tfs, num_phases, input_shape=shape, chunk=5
    )
    mean, std = np.asarray(model.mean), np.asarray(model.std)
    features = jax.jit(lambda p, v: model.features(p, v, "conv2"))
    looped = np.zeros_like(batched)
    for d, direction in enumerate(directions):
        for s, sf in enumerate(sfs):
            for f, tf in enumerate(tfs):
                for phase in 2 * np.pi * np.arange(num_phases) / num_phases:
                    video = stimuli.drifting_grating(*shape, direction, sf, tf, phase)
                    act = features(params, ((video - mean) / std)[None])[0]
                    looped[d, s, f] += np.maximum(np.asarray(act), 0).mean(axis=(0, 1, 2)) / num_phases
    assert batched.shape == (4, 2, 1, model.num_channels(params, "conv2"))
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-6 * np.abs(looped).max())


def test_direction_tuning_reads_preference_and_dsi_at_the_best_frequencies():
    responses = np.zeros((8, 2, 2, 3))
    # channel 0: prefers 90° at (sf 1, tf 0), null 0.25; elsewhere weaker and opposite
    responses[:, 1, 0, 0] = 0.5
    responses[2, 1, 0, 0], responses[6, 1, 0, 0] = 1.0, 0.25
    responses[6, 0, 1, 0] = 0.9
    # channel 1: responds equally to every direction; channel 2: never responds
    responses[:, 0, 0, 1] = 0.7
    result = tuning.direction_tuning(responses, DIRECTIONS)
    assert result.preferred_deg[0] == 90.0
    assert (result.best_sf[0], result.best_tf[0]) == (1, 0)
    np.testing.assert_allclose(result.dsi, [(1.0 - 0.25) / (1.0 + 0.25), 0.0, 0.0])
    np.testing.assert_allclose(result.curve[0], responses[:, 1, 0, 0])
    np.testing.assert_allclose(result.peak, [1.0, 0.7, 0.0])


def test_direction_selective_needs_a_peak_response_of_a_tenth_of_the_layers_strongest():
    responses = np.zeros((8, 1, 1, 4))
    # Every channel responds 4x more to 0° than to 180°; their peaks are 1, 0.2, 0.05 and 0.
    for c, peak in enumerate((1.0, 0.2, 0.05, 0.0)):
        responses[:, 0, 0, c] = 0.25 * peak
        responses[0, 0, 0, c] = peak
    result = tuning.direction_tuning(responses, DIRECTIONS)
    np.testing.assert_allclose(result.dsi[:3], 0.6)
    np.testing.assert_array_equal(tuning.direction_selective(result), [True, True, False, False])
    np.testing.assert_array_equal(tuning.direction_selective(result, min_peak=0.0), [True, True, True, False])
    np.testing.assert_array_equal(tuning.direction_selective(result, min_peak=0.5), [True, False, False, False])


def test_direction_tuning_needs_opposite_directions():
    with pytest.raises(ValueError, match="opposite"):
        tuning.direction_tuning(np.ones((3, 1, 1, 2)), [0.0, 120.0, 240.0])
    with pytest.raises(ValueError, match="directions"):
        tuning.direction_tuning(np.ones((4, 1, 1, 2)), DIRECTIONS)


def test_grating_responses_rejects_bad_grids():
    model = motionnet.model()
    params = jax.eval_shape(motionnet.init_params, jax.random.key(0))
    with pytest.raises(ValueError, match="spatial_freqs"):
        tuning.grating_responses(model, params, "conv1", DIRECTIONS, [], TFS)
    with pytest.raises(ValueError, match="valid layers"):
        tuning.grating_responses(model, params, "conv9", DIRECTIONS, SFS, TFS)
    with pytest.raises(ValueError, match="num_phases"):
        tuning.grating_responses(model, params, "conv1", DIRECTIONS, SFS, TFS, num_phases=0)


def test_agreement_table_keeps_selective_channels_and_wraps_angles():
    rows, medians = tuning.agreement_table({
        "a": ([350.0, 90.0, 180.0, 0.0], [0.9, 0.1, 0.3, 0.5], [10.0, 270.0, 135.0, 180.0]),
        "b": ([0.0], [0.2], [0.0]),
    })
    assert [(r.layer, r.channel) for r in rows] == [("a", 0), ("a", 2), ("a", 3)]
    np.testing.assert_allclose([r.difference_deg for r in rows], [20.0, 45.0, 180.0])
    assert medians["a"] == 45.0
    assert math.isnan(medians["b"])
    with pytest.raises(ValueError, match="one entry per channel"):
        tuning.agreement_table({"a": ([0.0, 1.0], [0.5], [0.0])})


def test_polar_plot_writes_one_panel_per_channel(tmp_path):
    params = _gabor_params(0.0, 90.0, 180.0)
    responses = tuning.grating_responses(GABOR_MODEL, params, "gabor", DIRECTIONS, SFS, TFS, num_phases=2)
    result = tuning.direction_tuning(responses, DIRECTIONS)
    one = iio.imread(tuning.polar_plot(tmp_path / "one.png", result, DIRECTIONS, cols=1))
    three = iio.imread(tuning.polar_plot(tmp_path / "three.png", result, DIRECTIONS, title="gabor", cols=3))
    assert one.ndim == three.ndim == 3 and one.shape[-1] == three.shape[-1] == 3
    assert one.shape[0] > 2 * three.shape[0] and three.shape[1] > 2 * one.shape[1]


def test_cli_tuning_writes_plot_and_table(tmp_path, capsys):
    argv = ["tuning", "--layer", "conv1", "--out", str(tmp_path), "--directions", "4",
            "--sf", "0.1", "--tf", "0.1", "--phases", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == motionnet.CHANNELS[0] + 2
    assert f"of {motionnet.CHANNELS[0]} channels of motionnet conv1 are direction-selective" in out
    saved = np.load(tmp_path / "motionnet_conv1_tuning.npz")
    assert saved["responses"].shape == (4, 1, 1, motionnet.CHANNELS[0])
    assert iio.imread(tmp_path / "motionnet_conv1_tuning.png").ndim == 3


@pytest.mark.parametrize("extra, message", [
    (["--directions", "5"], "must be even"),
    (["--model", "c3d"], "--weights PARAMS"),
])
def test_cli_tuning_rejects_bad_arguments(tmp_path, capsys, extra, message):
    assert cli.main(["tuning", "--layer", "conv1", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
