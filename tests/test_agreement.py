"""The agreement report: grating-preferred vs stage-2 direction, read from a visualize run."""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from kv3d_jax import agreement, cli, tuning
from test_tuning import GABOR_MODEL, _motion_gabor


def _gabor_params(*channels) -> dict:
    """The hand-built filters of test_tuning, one per ``(kind, direction, gain)`` channel: ``"motion"``
    a space-time Gabor matched to a grating drifting towards ``direction`` (so that direction is
    its preferred one), ``"static"`` the same Gabor frozen in time (no preferred direction)."""
    kernels = []
    for kind, direction, gain in channels:
        gabor = _motion_gabor(direction)
        kernels.append(gain * (gabor if kind == "motion" else np.broadcast_to(gabor[2], gabor.shape)))
    return {"kernel": jnp.asarray(np.stack(kernels, axis=-1)[:, :, :, None, :], jnp.float32)}


# Channel c: its construction, and the stage-2 direction a test reports for it.
CHANNELS = [
    (("motion", 0.0, 1.0), 10.0),  # 10 degrees off
    (("motion", 90.0, 1.0), 270.0),  # the opposite way
    (("motion", 225.0, 1.0), 225.0),  # exactly
    (("static", 45.0, 1.0), 45.0),  # not direction-selective
    (("motion", 45.0, 0.05), 45.0),  # selective, but a twentieth of the others' peak
    (("motion", 135.0, 1.0), float("nan")),  # no observable motion in stage 2
]
GABOR_PARAMS = _gabor_params(*(construction for construction, _ in CHANNELS))
STAGE2 = {c: direction for c, (_, direction) in enumerate(CHANNELS)}


def test_agreement_compares_the_stage_2_direction_with_a_known_preferred_one():
    # Ground truth from the filters' construction, not from the tuning code under test.
    reliable = {0: True, 1: False, 2: True, 3: True, 4: True, 5: False}
    rows, median = agreement.layer_agreement(GABOR_MODEL, GABOR_PARAMS, "gabor", STAGE2, reliable, min_peak=0.0)
    assert [r.channel for r in rows] == [0, 1, 2, 4]
    assert [r.reliable for r in rows] == [True, False, True, True]
    np.testing.assert_allclose([r.grating_deg for r in rows], [0.0, 90.0, 225.0, 45.0])
    np.testing.assert_allclose([r.difference_deg for r in rows], [10.0, 180.0, 0.0, 0.0], atol=1e-6)
    assert median == pytest.approx(5.0)


def test_only_channels_with_a_tenth_of_the_strongest_peak_count_as_selective():
    strict, median = agreement.layer_agreement(GABOR_MODEL, GABOR_PARAMS, "gabor", STAGE2)
    loose, _ = agreement.layer_agreement(GABOR_MODEL, GABOR_PARAMS, "gabor", STAGE2, min_peak=0.0)
    assert [r.channel for r in strict] == [0, 1, 2]
    assert [r.channel for r in loose] == [0, 1, 2, 4]
    assert all(r.reliable is None for r in strict)
    assert median == pytest.approx(10.0)


def test_markdown_reports_reliable_and_unreliable_channels_apart():
    rows = [tuning.AgreementRow("conv3", c, 0.0, 0.5, d, d, ok)
            for c, (d, ok) in enumerate([(10.0, True), (20.0, True), (30.0, True), (90.0, False), (120.0, False)])]
    table = agreement.markdown(rows, {"conv3": 30.0, "conv4": float("nan")})
    assert "| conv3 | 5 | 30.0 | 3 | 20.0 | 2 | 105.0 |" in table
    assert "| conv4 | 0 | – | 0 | – | 0 | – |" in table
    assert table.count("| yes |") == 3 and table.count("| no |") == 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two ``kv3d visualize`` runs of MotionNet conv2 channels 0-1 with the same settings, without
    and with the refinement (the second compiles only the refinement): ``{"plain", "refined"}``."""
    folder = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in (("plain", []), ("refined", ["--refine", "2"])):
        made[name] = folder / name
        assert cli.main(["visualize", "--layer", "conv2", "--channels", "0-1", "--steps", "2",
                         "--decompose-steps", "3", "--out", str(made[name]), *extra]) == 0
    return made


def _copy(run, tmp_path):
    """A test's own copy of a shared run folder: reports are written into it."""
    return shutil.copytree(run, tmp_path / run.name)


@pytest.mark.slow
def test_cli_reports_on_a_visualize_run(runs, tmp_path, capsys):
    out = _copy(runs["plain"], tmp_path)
    capsys.readouterr()
    assert cli.main(["agreement", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "agreement.md").read_text()
    assert printed.startswith(table)
    assert table.splitlines()[2].startswith("| conv2 |")
    assert "kernels are direction-selective" in printed and "of them reliable" in printed
    assert cli.main(["agreement", "--out", str(out), "--min-peak", "2"]) == 2
    assert "--min-peak must be a fraction" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compares_refined_directions_of_a_refined_run(runs, tmp_path, capsys):
    plain, refined = _copy(runs["plain"], tmp_path), _copy(runs["refined"], tmp_path)
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


@pytest.mark.slow
def test_a_slowfast_run_adds_each_channels_index_and_preferred_tf():
    slowness = {c: 0.1 * (c + 1) for c in STAGE2}
    rows, _ = agreement.layer_agreement(GABOR_MODEL, GABOR_PARAMS, "gabor", STAGE2, slowness=slowness)
    assert [r.channel for r in rows] == [0, 1, 2]
    assert [r.slowness for r in rows] == pytest.approx([0.1, 0.2, 0.3])
    # Every motion filter is built for gratings at 0.125 cycles/frame.
    np.testing.assert_allclose([r.preferred_tf for r in rows], 0.125, rtol=0.1)
    table = agreement.markdown(rows, {"gabor": 5.0})
    assert "| slow/fast index | preferred TF (cycles/frame) |" in table and "| 0.100 | " in table
    assert "agree in sign" in table
    plain = [r._replace(slowness=float("nan"), preferred_tf=float("nan")) for r in rows]
    assert "slow/fast" not in agreement.markdown(plain, {"gabor": 5.0})


def test_markdown_counts_the_signs_that_agree():
    rows = [tuning.AgreementRow("conv3", c, 0.0, 0.5, 0.0, 0.0, True, s, tf)
            for c, (s, tf) in enumerate([(0.2, 0.3), (0.4, 0.2), (0.6, 0.1), (0.8, 0.25), (0.5, 0.15)])]
    # Medians 0.5 and 0.2: channel 4 and channel 1 sit on one; of 0, 2 and 3, channel 3 disagrees.
    assert agreement.slowfast_signs(rows, "conv3") == (2, 3)
    assert "| conv3 | 2 of 3 (67%) |" in agreement.markdown(rows, {"conv3": 0.0})
