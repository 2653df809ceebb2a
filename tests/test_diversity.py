"""Diverse optima (kv3d_jax.diversity): N optima per kernel as one runner kernel, their batch
independence, the diversity term's effect, failures and the CLI."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import kv3d_jax
from kv3d_jax import diversity, maximization
from kv3d_jax.cli import main
from tiny_model import tiny

SHAPE = (4, 12, 12)
# Two-step unrolled chunks: the cheapest programs to compile (the chunk length changes rounding only).
CONFIG = maximization.preset("native", steps=4, chunk=2, max_shift=(2, 2, 1))


@pytest.fixture(scope="module")
def tiny_model():
    return tiny(SHAPE)


def off_diagonal(cosine) -> np.ndarray:
    """``(K, N·(N-1))``: each kernel's pairwise cosines without the diagonal."""
    cosine = np.asarray(cosine)
    return cosine[:, ~np.eye(cosine.shape[-1], dtype=bool)]


@pytest.mark.slow
def test_kernels_batched_equal_the_same_kernels_run_apart(tiny_model):
    model, params = tiny_model
    # per_device fixes the compiled shape (2 kernels of 3 optima), so a kernel runs in the same
    # program whichever kernels share its batch: its result must be bit for bit the same.
    together = diversity.maximize_diverse(model, params, "b", [0, 3, 5], 3, config=CONFIG, weight=2.0, per_device=2)
    assert together.videos.shape == (3, 3, *SHAPE, 3) and together.objective.shape == (3, 3)
    assert together.cosine.shape == (3, 3, 3) and not together.failed.any()
    for k, channel in enumerate([0, 3, 5]):
        alone = diversity.maximize_diverse(model, params, "b", [channel], 3, config=CONFIG, weight=2.0, per_device=2)
        np.testing.assert_array_equal(together.videos[k], alone.videos[0])
        np.testing.assert_array_equal(together.objective[k], alone.objective[0])
        np.testing.assert_array_equal(together.cosine[k], alone.cosine[0])
    # The N optima of a kernel start apart and stay apart.
    assert np.abs(np.diff(np.asarray(together.videos), axis=1)).max() > 0.1


@pytest.mark.slow
def test_diversity_term_lowers_the_pairwise_cosine(tiny_model):
    model, params = tiny_model
    config = maximization.preset(CONFIG, steps=8)
    # A given batch size: planning one from the memory analysis would compile several more programs.
    plain = diversity.maximize_diverse(model, params, "b", [0, 1], 4, config=config, weight=0.0, pattern="flat",
                                       batch_size=2)
    # No warm-up: 8 steps leave the ramped penalty too little time to act.
    diverse = diversity.maximize_diverse(model, params, "b", [0, 1], 4, config=config, pattern="flat", warmup=0.0,
                                         batch_size=2)
    assert off_diagonal(diverse.cosine).mean(axis=1).max() < off_diagonal(plain.cosine).mean(axis=1).min() - 0.2
    # Each result's cosines are those of its own optima: the public measure agrees on the raw
    # videos' min-max normalised copies to within what that normalisation changes.
    measured = diversity.similarity(model, params, "b", diverse.videos, config=config, pattern="flat")
    assert measured.shape == (2, 4, 4)
    np.testing.assert_allclose(np.diagonal(measured, axis1=1, axis2=2), 1, atol=1e-5)
    assert off_diagonal(measured).mean() < off_diagonal(plain.cosine).mean() - 0.2


def test_cosines_of_known_patterns():
    patterns = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    np.testing.assert_allclose(diversity.cosines(patterns), [[1, 0, -1], [0, 1, 0], [-1, 0, 1]], atol=1e-7)
    # The penalty counts each ordered pair's excess over the margin, squared: 4 of the 6 pairs exceed
    # -0.5 by 0.5.
    assert float(diversity.hinge(diversity.cosines(patterns), -0.5)) == pytest.approx(4 * 0.25 / 6)
    assert float(diversity.hinge(diversity.cosines(patterns), 0.0)) == 0
    act = np.arange(8.0).reshape(1, 2, 2, 2)
    flat = act.reshape(4, 2)
    np.testing.assert_allclose(diversity.gram(act), (flat.T @ flat).reshape(-1))


def test_soft_minimum_is_a_scale_free_smooth_minimum():
    values = np.array([3.0, 1.0, 2.0, 6.0], np.float32)
    tau = 0.1 * values.mean()
    soft = float(diversity.soft_minimum(values, 0.1))
    assert 1.0 - tau * np.log(4) <= soft <= 1.0
    assert float(diversity.soft_minimum(50 * values, 0.1)) == pytest.approx(50 * soft, rel=1e-6)
    # Its gradient is a softmax of -values / tau: weights summing to one, most on the smallest value.
    grad = np.asarray(jax.grad(diversity.soft_minimum)(values, 0.1))
    np.testing.assert_allclose(grad, np.exp(-values / tau) / np.exp(-values / tau).sum(), rtol=1e-5)
    assert grad.argmax() == 1 and grad.sum() == pytest.approx(1)
    # A large temperature approaches the mean less tau log N.
    assert float(diversity.soft_minimum(values, 1e3)) == pytest.approx(values.mean() - 1e3 * 3 * np.log(4), rel=1e-3)


def test_a_failed_kernel_stays_alone(tiny_model):
    model, params = tiny_model
    config = maximization.preset(CONFIG, objective="weighted")
    weights = np.eye(6, dtype=np.float32)[[0, 2, 4]]
    bad = weights.copy()
    bad[1, 1] = np.nan
    clean = diversity.maximize_diverse(model, params, "b", None, 2, config=config, weights=weights, batch_size=3)
    broken = diversity.maximize_diverse(model, params, "b", None, 2, config=config, weights=bad, batch_size=3)
    np.testing.assert_array_equal(clean.failed, [False, False, False])
    np.testing.assert_array_equal(broken.failed, [False, True, False])
    for k in (0, 2):  # the same compiled batch: the other kernels bit for bit
        np.testing.assert_array_equal(broken.videos[k], clean.videos[k])
        np.testing.assert_array_equal(broken.objective[k], clean.objective[k])


@pytest.mark.slow
def test_maco_through_the_public_api(tiny_model):
    model, params = tiny_model
    config = maximization.preset(CONFIG, steps=2, parameterization="maco")
    result = kv3d_jax.maximize_diverse(model, params, "b", [1], 2, config=config, key=jax.random.key(4),
                                       batch_size=1)
    assert result.videos.shape == (1, 2, *SHAPE, 3) and not result.failed.any()
    assert float(np.abs(result.videos[0, 0] - result.videos[0, 1]).max()) > 0.1


@pytest.mark.parametrize("n, options, message", [
    (1, {}, "at least 2 optima"), (2, {"weight": -1.0}, "at least 0"), (2, {"weight": float("nan")}, "finite"),
    (2, {"margin": 1.5}, "margin is a cosine, from -1 to 1"), (2, {"temperature": 0.0}, "above 0"),
    (2, {"warmup": float("nan")}, "fraction of the steps, from 0 to 1"),
])
def test_bad_requests_are_refused_in_one_line(tiny_model, n, options, message):
    model, params = tiny_model
    with pytest.raises(ValueError, match=message):
        diversity.maximize_diverse(model, params, "b", [0], n, config=CONFIG, **options)


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["maximize", "--help"])
    out = capsys.readouterr().out
    assert "--diversity N" in out and "--diversity-weight W" in out and "_stage1_div{i}.{media}" in out
    assert "--media {mp4,webm,gif}" in out and "index.html" in out
    assert "--steps of at least 300" in " ".join(out.split())


@pytest.mark.slow
def test_cli_writes_each_optimum_and_a_page_of_them_side_by_side(tmp_path, capsys):
    argv = ["maximize", "--layer", "conv1", "--rectify", "--channels", "1,4", "--out", str(tmp_path), "--preset",
            "native", "--steps", "2", "--diversity", "2", "--diversity-weight", "5", "--batch-size", "2"]
    assert main(argv) == 0
    saved = np.load(tmp_path / "motionnet_conv1_stage1_div.npz")
    assert saved["videos"].shape == (2, 2, 16, 32, 32, 3) and saved["objective"].shape == (2, 2)
    assert saved["cosine"].shape == (2, 2, 2) and float(saved["diversity_weight"]) == 5
    np.testing.assert_array_equal(saved["channels"], [1, 4])
    printed = capsys.readouterr()
    assert "motionnet_conv1_stage1_div.npz" in printed.out
    assert ("kv3d maximize: warning: 2 steps may leave the 2 optima of a channel alike: MotionNet conv3's came out "
            "distinct from 300 (docs/diversity.md); raise --steps") in printed.err
    # MP4 by default, one per optimum, each played on the page in its channel's row with its objective,
    # its share of the best and the channel's largest pairwise cosine.
    page = (tmp_path / "index.html").read_text()
    rows = page.split("<article")[1:]
    assert len(rows) == 2
    for row, channel, objective, cosine in zip(rows, (1, 4), saved["objective"], saved["cosine"]):
        assert f'data-channel="{channel}"' in row
        files = [f"motionnet_conv1_{channel}_stage1_div{i}.mp4" for i in range(2)]
        assert re.findall(r'<video src="([^"]+)"', row) == files
        assert all((tmp_path / name).stat().st_size > 0 for name in files)
        assert re.findall(r'class="objective">([^<]*)<', row) == [f"{x:.3g}" for x in objective]
        shares = [f"{100 * x / objective.max():.3g} %" for x in objective]
        assert re.findall(r'class="fraction">([^<]*)<', row) == shares
        assert re.findall(r'class="cosine">([^<]*)<', row) == [f"{cosine[0, 1]:.2f}"]
    assert not list(tmp_path.glob("*.gif"))


@pytest.mark.parametrize("flags, message", [
    (["--diversity", "2", "--diversity-weight", "-1"], "--diversity-weight takes a finite number of at least 0"),
    (["--diversity-weight", "3"], "--diversity-weight weighs the diversity term of --diversity N; add --diversity"),
    (["--diversity", "65"], "--diversity takes 2 to 64 optima per channel, got 65"),
])
def test_cli_refuses_bad_diversity_flags(tmp_path, capsys, flags, message):
    assert main(["maximize", "--layer", "conv2", "--out", str(tmp_path), *flags]) == 2
    assert f"kv3d maximize: error: {message}" in capsys.readouterr().err


def test_a_linear_objective_warns_at_the_callers_line(tiny_model):
    model, params = tiny_model
    with pytest.warns(UserWarning, match="linear in the input.*flat colour") as caught:
        result = diversity.maximize_diverse(model, params, "a", [0], 2, config=maximization.preset(CONFIG, steps=1),
                                            batch_size=1)
    assert result.linear and caught[0].filename == __file__
