"""The slow/fast read-out: the temporal-variation penalty, its effect on the optimum, the K×L batch,
the index and its agreement with grating TF preference, and `kv3d tuning --slowfast`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax import cli, maximization, runner, slowfast, tuning
from kv3d_jax.maximization import PRESETS

from tiny_model import tiny

SHAPE = (4, 8, 8)
TINY, TINY_PARAMS = tiny(SHAPE, features=3)
CONFIG = dataclasses.replace(PRESETS["native"], steps=8, chunk=4, max_shift=(2, 2, 2), rectify=True)
KEY = jax.random.PRNGKey(7)


@pytest.fixture(scope="module")
def grid():
    """Every channel of the tiny model's layer b at weights 0, 3 and 30, one kernel per device in a batch."""
    return slowfast.measure(TINY, TINY_PARAMS, "b", config=CONFIG, weights=(0.0, 3.0, 30.0), key=KEY, per_device=1)


def test_temporal_variation_is_the_sum_of_mean_squared_frame_differences():
    video = np.random.default_rng(0).random((5, 3, 4, 3)).astype(np.float32)
    expected = sum(np.mean((video[t].astype(np.float64) - video[t - 1]) ** 2) for t in range(1, 5))
    np.testing.assert_allclose(float(slowfast.temporal_variation(jnp.asarray(video))), expected, rtol=1e-6)
    static = np.broadcast_to(video[:1], video.shape)
    assert float(slowfast.temporal_variation(jnp.asarray(static))) == 0.0


def test_a_larger_weight_never_raises_the_optimums_temporal_variation(grid):
    assert not grid.failed.any()
    assert grid.objective.shape == grid.variation.shape == (3, 3)
    assert np.all(np.diff(grid.variation, axis=1) <= 0), grid.variation
    assert np.all(grid.variation[:, -1] < 0.8 * grid.variation[:, 0]), grid.variation


def test_weight_zero_is_stage_one(grid):
    stage1 = maximization.maximize(TINY, TINY_PARAMS, "b", config=CONFIG, key=KEY, per_device=1)
    np.testing.assert_allclose(grid.objective[:, 0], np.asarray(stage1.objective), rtol=1e-5, atol=1e-6)


def test_the_kxl_batch_equals_each_pair_run_apart(grid):
    problem = slowfast.problem(TINY, "b", CONFIG, SHAPE)
    for k, l in ((1, 1), (2, 2)):
        channel = int(grid.channels[k])
        target = (jnp.asarray([channel], jnp.int32), jnp.asarray([grid.weights[l]], jnp.float32))
        alone = runner.run(problem, TINY_PARAMS, target, [channel], CONFIG.steps, chunk=CONFIG.chunk, key=KEY,
                           per_device=1)
        np.testing.assert_allclose([alone.outputs[0][0], alone.outputs[1][0]],
                                   [grid.objective[k, l], grid.variation[k, l]], rtol=1e-5)


def test_the_index_is_the_fraction_kept_under_the_strongest_penalty(grid):
    np.testing.assert_allclose(grid.index, grid.objective[:, -1] / grid.objective[:, 0])
    objective = np.array([[10.0, 5.0, 2.0], [-1.0, -2.0, -3.0], [4.0, 3.0, np.nan], [8.0, 8.0, 6.0]])
    failed = np.array([[False] * 3, [False] * 3, [False] * 3, [False, True, False]])
    np.testing.assert_array_equal(slowfast.slowness(objective, failed), [0.2, np.nan, np.nan, np.nan])


def test_preferred_tf_weights_the_frequencies_at_the_preferred_direction_and_sf():
    # 2 directions x 2 SFs x 3 TFs x 2 channels: channel 0 answers only TF 0.1 and 0.4 equally at
    # direction 1, SF 0; channel 1 answers nothing.
    responses = np.zeros((2, 2, 3, 2))
    responses[1, 0, 0, 0] = responses[1, 0, 2, 0] = 1.0
    responses[0, 1, 1, 0] = 0.5
    result = tuning.direction_tuning(responses, [0.0, 180.0])
    tf = slowfast.preferred_tf(responses, [0.1, 0.2, 0.4], result)
    np.testing.assert_allclose(tf[0], 0.2)
    assert np.isnan(tf[1])
    with pytest.raises(ValueError, match="positive"):
        slowfast.preferred_tf(responses, [0.0, 0.2, 0.4], result)


def test_agreement_signs_both_measures_about_their_medians():
    index = np.array([0.1, 0.2, 0.3, 0.4, 0.5, np.nan, 0.05])
    tf = np.array([0.30, 0.10, 0.20, 0.05, 0.01, 0.2, 0.4])
    tuned = np.array([True, True, True, True, True, True, False])
    result = slowfast.agreement(index, tf, tuned)
    # Medians over channels 0-4: index 0.3, TF 0.1; channel 2 sits on one, channel 1 on the other.
    np.testing.assert_array_equal(result.compared, [True, False, False, True, True, False, False])
    np.testing.assert_array_equal(result.agree[result.compared], [True, True, True])
    assert result.share == 1.0
    flipped = slowfast.agreement(index, -tf, tuned)
    assert flipped.share == 0.0


@pytest.mark.parametrize("weights", [(1.0, 2.0), (0.0,), (0.0, 2.0, 1.0)])
def test_measure_rejects_a_bad_weight_grid(weights):
    with pytest.raises(ValueError, match="start at 0 and increase"):
        slowfast.measure(TINY, TINY_PARAMS, "b", config=CONFIG, weights=weights)


def test_cli_tuning_help_lists_the_slowfast_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tuning", "--help"])
    out = capsys.readouterr().out
    for flag in ("--slowfast", "--slowfast-steps", "--slowfast-weights"):
        assert flag in out


@pytest.mark.parametrize("extra, message", [
    (["--tf", "0", "0.1"], "positive --tf"),
    (["--slowfast-weights", "0.5", "1"], "--slowfast-weights must start at 0"),
])
def test_cli_slowfast_rejects_bad_arguments(tmp_path, capsys, extra, message):
    assert cli.main(["tuning", "--layer", "conv2", "--out", str(tmp_path), "--slowfast", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kv3d tuning: error:") and message in err and err.count("\n") == 1


def test_cli_tuning_slowfast_prints_each_tuned_channel_and_the_share(tmp_path, capsys, monkeypatch):
    # The tiny model's layer b has direction-selective channels at these gratings and compiles in a moment.
    monkeypatch.setattr(cli, "_load", lambda model, weights: (TINY, TINY_PARAMS))
    argv = ["tuning", "--layer", "b", "--out", str(tmp_path), "--directions", "4", "--sf", "0.1",
            "--tf", "0.0625", "0.25", "--phases", "1", "--slowfast", "--slowfast-steps", "2",
            "--slowfast-weights", "0", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    table = out.split("channel  preferred_tf  slowfast_index  agree\n")[1].splitlines()
    selective = [int(line.split()[0]) for line in out.splitlines() if line.endswith("  DS")]
    assert [int(line.split()[0]) for line in table[:-1]] == selective and selective
    assert "agree in sign" in table[-1] and "compared channels" in table[-1]
