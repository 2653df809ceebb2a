"""The slow/fast read-out: the temporal-variation penalty, its effect on the optimum, the K×L batch,
the index and its agreement with grating TF preference, `kv3d tuning --slowfast`, and the index in
`kv3d visualize --slowfast`'s kernel records and gallery."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax import cli, gallery, job, maximization, pipeline, runner, slowfast, tuning
from kv3d_jax.maximization import PRESETS
from kv3d_jax.models import energy

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
    # A penalty strong enough costs every kernel part of its objective (the same compiled batch).
    strong = slowfast.measure(TINY, TINY_PARAMS, "b", config=CONFIG, weights=(0.0, 1000.0), key=KEY, per_device=1)
    assert np.all((strong.index > 0) & (strong.index < 1)), strong.index
    objective = np.array([[10.0, 5.0, 2.0], [-1.0, -2.0, -3.0], [4.0, 3.0, np.nan], [8.0, 8.0, 6.0]])
    failed = np.array([[False] * 3, [False] * 3, [False] * 3, [False, True, False]])
    np.testing.assert_array_equal(slowfast.slowness(objective, failed), [0.2, np.nan, np.nan, np.nan])


def test_preferred_tf_is_the_peak_at_the_channels_direction_and_best_sf():
    # 2 directions x 2 SFs x 4 TFs x 3 channels, TFs a factor of 2 apart.
    tfs = [0.05, 0.1, 0.2, 0.4]
    responses = np.zeros((2, 2, 4, 3))
    # Channel 0 at direction 1, SF 0: a log-parabola over log TF peaking at 0.1 * 2**0.25 ...
    log_tf = np.log2(np.asarray(tfs) / 0.1)
    responses[1, 0, :, 0] = 2.0 ** (-(log_tf - 0.25) ** 2)
    # ... and weaker answers elsewhere, which do not count: another SF, another direction.
    responses[1, 1, 3, 0] = 0.5
    responses[0, 0, 0, 0] = 5.0
    # Channel 1 answers nothing; channel 2 is strongest at the grid's top.
    responses[1, 0, :, 2] = [0.1, 0.2, 0.3, 0.4]
    tf = slowfast.preferred_tf(responses, tfs, np.array([1, 1, 1]))
    np.testing.assert_allclose(tf[0], 0.1 * 2 ** 0.25, rtol=1e-9)
    assert np.isnan(tf[1]) and tf[2] == 0.4
    # At another direction the same channel prefers the grid's lowest TF.
    assert slowfast.preferred_tf(responses, tfs, np.array([0, 0, 0]))[0] == 0.05
    for bad in ([0.0, 0.1, 0.2, 0.4], [0.1, 0.05, 0.2, 0.4]):
        with pytest.raises(ValueError, match="positive and increasing"):
            slowfast.preferred_tf(responses, bad, np.array([1, 1, 1]))


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


@pytest.mark.slow  # 3 units x 2 weights x 80 steps of 7x7x7 filters, one compiled batch: about 10 s of CPU
def test_the_index_orders_units_of_known_temporal_frequency_as_their_gratings_do():
    # Motion-energy units at 0 (static), 1/8 and 1/4 cycles/frame: the gratings find those frequencies,
    # and the slower a unit, the more of its objective it keeps under the penalty.
    model, params = energy.bank((0.0, 0.125, 0.25), shape=(12, 16, 16))
    responses = tuning.grating_responses(model, params, energy.LAYER, [0.0], slowfast.SPATIAL_FREQS,
                                         slowfast.TEMPORAL_FREQS)
    tf = slowfast.preferred_tf(responses, slowfast.TEMPORAL_FREQS, np.zeros(3, int))
    np.testing.assert_allclose(tf, [slowfast.TEMPORAL_FREQS[0], 0.125, 0.25], rtol=0.03)
    measured = slowfast.measure(model, params, energy.LAYER, config=maximization.preset("native", steps=80),
                                key=KEY, per_device=6)
    assert np.all(np.diff(measured.index) < -0.15), measured.index
    agreement = slowfast.agreement(measured.index, tf, np.ones(3, bool))
    assert agreement.compared.sum() == 2 and agreement.share == 1.0


def test_the_energy_bank_refuses_an_empty_bank_and_names_its_one_layer():
    with pytest.raises(ValueError, match="the bank needs at least one temporal frequency"):
        energy.bank(())
    model, params = energy.bank((0.0,), shape=(8, 8, 8))
    video = jnp.zeros((1, 8, 8, 8, 3))
    assert model.features(params, video, energy.LAYER).shape == (1, 2, 2, 2, 1)
    with pytest.raises(ValueError, match="energy has no layer 'conv1'; valid layers are: energy"):
        model.features(params, video, "conv1")
    with pytest.raises(ValueError, match="the motion-energy bank has no layer 'conv1'; its one layer is 'energy'"):
        model.apply(params, video, "conv1")


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
    (["--slowfast-weights", "0.5", "1"], "--slowfast-weights must start at 0"),
    (["--directions", "64", "--sf", "0.1", "--tf", "0.1"], "--slowfast reads preferred TFs from up to "
     f"{64 * len(slowfast.SPATIAL_FREQS) * len(slowfast.TEMPORAL_FREQS) * 4:,} gratings"),
])
def test_cli_slowfast_rejects_bad_arguments(tmp_path, capsys, extra, message):
    assert cli.main(["tuning", "--layer", "conv2", "--out", str(tmp_path), "--slowfast", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kv3d tuning: error:") and message in err and err.count("\n") == 1


@pytest.mark.slow
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


# `kv3d visualize --slowfast`: the index in every kernel record and in the gallery.
SWEEP_JOB = job.Job(model="tiny", preset="native", steps=4, decompose_steps=2, seed=3, batch=2, media="gif",
                    rectify=True, slowfast=1000.0)


@pytest.fixture(scope="module")
def chunks():
    """The records of channels 0-2 of the tiny model's layer b with the slow/fast index and without it."""
    together = pipeline.compute_chunk(TINY, TINY_PARAMS, "b", [0, 1, 2], SWEEP_JOB)
    without = pipeline.compute_chunk(TINY, TINY_PARAMS, "b", [0, 1, 2], dataclasses.replace(SWEEP_JOB, slowfast=0.0))
    return together, without


def _penalised(channels):
    """``slowfast.penalised`` of ``channels`` as compute_chunk runs it for SWEEP_JOB."""
    key = jax.random.fold_in(pipeline.layer_key(SWEEP_JOB.seed, "b"), 1)
    return slowfast.penalised(TINY, TINY_PARAMS, "b", channels, SWEEP_JOB.slowfast, config=SWEEP_JOB.stage1(TINY, "b"),
                              key=key, per_device=SWEEP_JOB.batch)


@pytest.mark.slow  # stage 1, stage 2, the read-out and the penalised stage 1 compile: about 30 s of CPU
def test_a_slowfast_job_stores_a_finite_index_of_at_most_one_per_kernel(chunks):
    together, without = chunks
    assert SWEEP_JOB.record(TINY).arrays()["slowness"] == ((), "float32")
    assert "slowness" not in dataclasses.replace(SWEEP_JOB, slowfast=0.0).record(TINY).arrays()
    for channel, arrays in together.items():
        value = arrays["slowness"]
        assert not arrays["failed"]
        assert value.dtype == np.float32 and value.shape == () and np.isfinite(value), (channel, value)
        # A penalty this strong on change between frames costs the objective something.
        assert 0 < value < 1, (channel, value)
        # The index is added to the record; every other array is the job's without it.
        assert sorted(without[channel]) == sorted(set(arrays) - {"slowness"})
        for name, array in without[channel].items():
            assert np.array_equal(array, arrays[name], equal_nan=True), (channel, name)
    # It is the penalised run over stage 1's own objective (not recomputed), paired by the keys.
    penalised, _, failed = _penalised([0, 1, 2])
    assert not failed.any()
    stage1 = np.asarray([together[c]["objective"] for c in (0, 1, 2)], np.float64)
    np.testing.assert_array_equal([together[c]["slowness"] for c in (0, 1, 2)],
                                  (penalised / stage1).astype(np.float32))


def test_a_kernels_penalised_run_does_not_depend_on_its_batch_mates():
    together = _penalised([0, 1, 2])
    for channels in ([2], [2, 0]):
        alone = _penalised(channels)
        for a, b in zip(together, alone):
            assert np.array_equal(a[2], b[0], equal_nan=True), channels


def test_penalised_at_a_grid_weight_is_measures_column_bit_for_bit(grid):
    objective, variation, failed = slowfast.penalised(TINY, TINY_PARAMS, "b", grid.channels, 30.0, config=CONFIG,
                                                      key=KEY, per_device=1)
    np.testing.assert_array_equal(objective, grid.objective[:, 2])
    np.testing.assert_array_equal(variation, grid.variation[:, 2])
    assert not failed.any()
    with pytest.raises(ValueError, match="must be a positive number"):
        slowfast.penalised(TINY, TINY_PARAMS, "b", [0], 0.0, config=CONFIG)


def test_the_setting_is_described_counted_and_checked():
    # That run.json records it only when used, and old folders open: test_store.py, test_a_later_setting_*.
    off = dataclasses.replace(SWEEP_JOB, slowfast=0.0)
    assert "slow/fast index at λ = 1000" in SWEEP_JOB.describe(TINY, "b")
    assert SWEEP_JOB.steps_per_kernel() == off.steps_per_kernel() + SWEEP_JOB.steps
    for bad in (-1.0, math.inf, math.nan, True, "3"):
        with pytest.raises(ValueError, match="slowfast must be a penalty weight of at least 0"):
            dataclasses.replace(SWEEP_JOB, slowfast=bad)


def test_the_gallery_shows_and_sorts_by_the_index_only_where_there_is_one():
    media = {"static": "b/k_static.png"}
    with_index = [gallery.KernelView(c, 1.0, 0.0, 1.0, 30.0, media, slowness=s) for c, s in ((0, 0.25), (1, math.nan))]
    page = gallery.layer_page("t", with_index)
    assert 'data-slowness="0.25"' in page and 'data-slowness="NaN"' in page
    assert page.count("slow/fast 0.25</span>") == 1 and '<option value="slowness">' in page
    plain = gallery.layer_page("t", [gallery.KernelView(0, 1.0, 0.0, 1.0, 30.0, media)])
    assert '<option value="slowness">' not in plain and "slow/fast" not in plain
    layers = [gallery.LayerView("b", "b.html", {}, 2, 2, 30.0, 1.0, median_slowness=0.25)]
    assert "<th>median slow/fast index</th>" in gallery.index_page("run", layers)
    assert "slow/fast" not in gallery.index_page("run", [dataclasses.replace(layers[0], median_slowness=math.nan)])


def test_cli_visualize_help_lists_the_slowfast_flag_and_bad_weights_are_one_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["visualize", "--help"])
    assert "--slowfast [LAMBDA]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["visualize", "--slowfast", "-1"])
    err = capsys.readouterr().err
    assert "kv3d visualize: error: argument --slowfast: the penalty weight must be a finite number of at least 0" in err
