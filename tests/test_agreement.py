"""The agreement report: grating-preferred vs stage-2 direction, read from a visualize run."""

from __future__ import annotations

import numpy as np
import pytest

from kv3d_jax import agreement, cli, tuning, zoo


@pytest.fixture(scope="module")
def default_model():
    return zoo.load("motionnet")


def test_a_channel_moving_its_preferred_way_agrees_exactly(default_model):
    model, params = default_model
    responses = tuning.grating_responses(model, params, "conv2", agreement.DIRECTIONS, agreement.SPATIAL_FREQS,
                                         agreement.TEMPORAL_FREQS)
    truth = tuning.direction_tuning(responses, agreement.DIRECTIONS)
    channels = [0, 5, 9]
    stage2 = {c: float(truth.preferred_deg[c]) + (180.0 if c == 9 else 0.0) for c in channels}
    stage2[11] = float("nan")  # no observable motion: left out
    reliable = {0: True, 5: False, 9: True, 11: False}
    rows, median = agreement.layer_agreement(model, params, "conv2", stage2, reliable, min_peak=0.0)
    selective = [c for c in channels if truth.dsi[c] >= tuning.DS_THRESHOLD]
    assert [r.channel for r in rows] == selective
    assert [r.reliable for r in rows] == [reliable[c] for c in selective]
    expected = {c: (180.0 if c == 9 else 0.0) for c in selective}
    np.testing.assert_allclose([r.difference_deg for r in rows], [expected[c] for c in selective], atol=1e-3)
    np.testing.assert_allclose([r.grating_deg for r in rows], truth.preferred_deg[selective])
    assert median == pytest.approx(np.median([expected[c] for c in selective]), abs=1e-3)


def test_only_channels_with_a_tenth_of_the_strongest_peak_count_as_selective(default_model):
    model, params = default_model
    responses = tuning.grating_responses(model, params, "conv3", agreement.DIRECTIONS, agreement.SPATIAL_FREQS,
                                         agreement.TEMPORAL_FREQS)
    truth = tuning.direction_tuning(responses, agreement.DIRECTIONS)
    stage2 = {c: float(truth.preferred_deg[c]) for c in range(len(truth.dsi))}
    strict, _ = agreement.layer_agreement(model, params, "conv3", stage2)
    loose, _ = agreement.layer_agreement(model, params, "conv3", stage2, min_peak=0.0)
    strong = truth.peak >= tuning.PEAK_FRACTION * truth.peak.max()
    assert [r.channel for r in strict] == [c for c in range(len(truth.dsi))
                                           if truth.dsi[c] >= tuning.DS_THRESHOLD and strong[c]]
    assert {r.channel for r in strict} < {r.channel for r in loose}
    assert all(r.reliable is None for r in strict)


def test_markdown_reports_reliable_and_unreliable_channels_apart():
    rows = [tuning.AgreementRow("conv3", c, 0.0, 0.5, d, d, ok)
            for c, (d, ok) in enumerate([(10.0, True), (20.0, True), (30.0, True), (90.0, False), (120.0, False)])]
    table = agreement.markdown(rows, {"conv3": 30.0, "conv4": float("nan")})
    assert "| conv3 | 5 | 30.0 | 3 | 20.0 | 2 | 105.0 |" in table
    assert "| conv4 | 0 | – | 0 | – | 0 | – |" in table
    assert table.count("| yes |") == 3 and table.count("| no |") == 2


def test_cli_reports_on_a_visualize_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["visualize", "--layer", "conv1", "--channels", "0-3", "--steps", "2",
                     "--decompose-steps", "3", "--rectify", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["agreement", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "agreement.md").read_text()
    assert printed.startswith(table)
    assert table.splitlines()[2].startswith("| conv1 |")
    assert "kernels are direction-selective" in printed and "of them reliable" in printed
    assert cli.main(["agreement", "--out", str(out), "--min-peak", "2"]) == 2
    assert "--min-peak must be a fraction" in capsys.readouterr().err


def test_cli_compares_refined_directions_of_a_refined_run(tmp_path, capsys):
    plain, refined = tmp_path / "plain", tmp_path / "refined"
    for out, extra in ((plain, []), (refined, ["--refine", "2"])):
        assert cli.main(["visualize", "--layer", "conv2", "--channels", "0-1", "--steps", "2",
                         "--decompose-steps", "3", "--out", str(out), *extra]) == 0
    capsys.readouterr()
    assert cli.main(["agreement", "--out", str(plain), "--stage", "refined"]) == 2
    assert "was run without the refinement" in capsys.readouterr().err
    assert cli.main(["agreement", "--out", str(refined)]) == 0
    assert cli.main(["agreement", "--out", str(refined), "--stage", "refined"]) == 0
    table = (refined / "agreement_refined.md").read_text()
    assert "| refined dominant (deg) |" in table and "stage-2" not in table
    assert (refined / "agreement.md").is_file()


def test_cli_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["agreement", "--out", str(tmp_path / "nothing")]) == 2
    assert "is not a `kv3d visualize` run folder" in capsys.readouterr().err
