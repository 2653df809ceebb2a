"""Stage-2 pictures: the colour code, the files and their frame counts, and `kv3d decompose`."""

from __future__ import annotations

import contextlib
import io

import imageio.v3 as iio
import numpy as np
import pytest

from kv3d_jax import cli, render, writers
from kv3d_jax.stimuli import translating_texture, velocity_from_direction


def test_motion_colours_follow_the_screen_direction_and_speed():
    v = np.array([[1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.0]], np.float32)
    rgb = render.motion_colours(v, max_speed=1.0)
    np.testing.assert_allclose(rgb[0], [1, 0, 0], atol=1e-6)  # right: red
    np.testing.assert_allclose(rgb[1], [0.5, 1, 0], atol=1e-6)  # up: hue 90°
    np.testing.assert_allclose(rgb[2], [0, 1, 1], atol=1e-6)  # left: cyan
    np.testing.assert_allclose(rgb[3], [0.5, 0, 1], atol=1e-6)  # down: hue 270°
    np.testing.assert_allclose(rgb[4], [0.5, 0, 0], atol=1e-6)  # half speed: half brightness
    np.testing.assert_allclose(rgb[5], [0, 0, 0], atol=1e-6)  # still: black
    grey = render.motion_colours(v, max_speed=1.0, valid=np.array([True] * 5 + [False]))
    np.testing.assert_allclose(grey[5], [render.GREY] * 3)


def test_colour_wheel_agrees_with_the_motion_colours():
    wheel = render.colour_wheel(21)
    np.testing.assert_allclose(wheel[10, 20], render.motion_colours(np.array([1.0, 0.0]), 1.0), atol=1e-6)
    np.testing.assert_allclose(wheel[0, 10], render.motion_colours(np.array([0.0, -1.0]), 1.0), atol=1e-6)
    np.testing.assert_allclose(wheel[10, 10], 0.0)
    np.testing.assert_allclose(wheel[0, 0], 0.0)


def test_still_motion_stays_dark():
    noise = np.random.default_rng(0).standard_normal((3, 8, 8, 2)).astype(np.float32) * 1e-4
    assert render.default_max_speed(noise) == render.MIN_MAX_SPEED
    assert render.motion_colours(noise).max() < 0.01


def _kernel(t=5, h=12, w=16):
    """A video and a rightward displacement that speeds up, so no two motion frames are
    equal (a GIF encoder merges equal consecutive frames)."""
    video = translating_texture(np.random.default_rng(0), t, h, w, (1.0, 0.0))
    travel = np.cumsum(np.linspace(0.0, 1.0, t), dtype=np.float32)
    displacement = np.zeros((t, h, w, 2), np.float32)
    displacement[..., 0] = -travel[:, None, None]
    return video, video[0], displacement, video


def test_save_decomposition_writes_the_documented_files(tmp_path):
    t, h, w = 5, 12, 16
    video, static, displacement, recon = _kernel(t, h, w)
    paths = writers.save_decomposition(tmp_path, "m_l_3", video, static, displacement, recon)
    legend = max(8, min(h, w) // 2)
    expected = {
        "stage1": (t, h, w, 3),
        "static": (h, w, 3),
        "deform": (t, h, w, 3),
        "motion": (t - 1, h, w + legend, 3),
        "recon": (t, h, w, 3),
        "panel": (t, h, 4 * w + 6 + legend, 3),
    }
    assert set(paths) == set(writers.DECOMPOSITION_FILES) == set(expected)
    for kind, shape in expected.items():
        assert paths[kind].name == f"m_l_3_{kind}.{'png' if kind == 'static' else 'gif'}"
        pixels = iio.imread(paths[kind], index=None) if kind != "static" else iio.imread(paths[kind])
        assert pixels[..., :3].shape == shape, kind
    deform = iio.imread(paths["deform"], index=None)[..., :3].astype(float) / 255
    np.testing.assert_allclose(deform[0], static, atol=2 / 255 + 0.035)  # a 256-colour octree palette per frame
    assert (deform[-1, :, :, 0] > 0.9).all() and (deform[-1, :, :, 1:] < 0.1).all()  # fastest rightward: red


def test_panel_and_legend_shapes_and_errors():
    video, static, displacement, recon = _kernel()
    velocity = -np.diff(displacement, axis=0)
    assert render.panel(video, static, velocity, recon).shape == (5, 12, 4 * 16 + 6 + 8, 3)
    assert render.with_legend(np.zeros((2, 30, 40, 3)), 10).shape == (2, 30, 50, 3)
    with pytest.raises(ValueError, match="panel needs"):
        render.panel(video, static, velocity[:-1], recon)
    with pytest.raises(ValueError, match="velocity \\(..., 2\\)"):
        render.motion_colours(np.zeros((4, 3)))


def _run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_cli_decomposes_a_folder_of_gifs(tmp_path):
    source = tmp_path / "in"
    for name, direction in (("left_stage1", 180.0), ("up", 90.0)):
        video = translating_texture(np.random.default_rng(1), 6, 24, 24, velocity_from_direction(direction, 1.0))
        writers.save_gif(source / f"{name}.gif", video)
    status, out, err = _run_cli("decompose", str(source), "--out", str(tmp_path / "out"), "--steps", "4")
    assert status == 0, err
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert set(lines) == {"left", "up"}
    for stem, direction in (("left", 180.0), ("up", 90.0)):
        got = float(lines[stem].split("direction ")[1].split(" deg")[0])
        assert abs((got - direction + 180) % 360 - 180) < 10, lines[stem]
        for kind in writers.DECOMPOSITION_FILES:
            assert (tmp_path / "out" / f"{stem}_{kind}.{'png' if kind == 'static' else 'gif'}").exists()
    # A second run on the output folder skips the outputs and decomposes the stage-1 GIFs only.
    status, out, _ = _run_cli("decompose", str(tmp_path / "out"), "--out", str(tmp_path / "again"), "--steps", "0")
    assert status == 0 and "2 videos decomposed" in out


@pytest.mark.slow
def test_cli_reads_a_stage1_npz(tmp_path):
    videos = np.stack([translating_texture(np.random.default_rng(k), 4, 16, 16, (0.5, 0.0)) for k in range(2)])
    writers.save_npz(tmp_path / "c3d_conv2_stage1.npz", videos=videos, channels=np.array([4, 9]),
                     model="c3d", layer="conv2")
    status, out, err = _run_cli("decompose", str(tmp_path / "c3d_conv2_stage1.npz"), "--out", str(tmp_path), "--steps", "0")
    assert status == 0, err
    assert (tmp_path / "c3d_conv2_9_panel.gif").exists() and "c3d_conv2_4: direction" in out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.gif", "no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no GIFs"),
        (lambda p: np.savez(p / "x.npz", other=np.zeros(3)) or p / "x.npz", "has no 'videos' array"),
        (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "neither a GIF"),
    ],
)
def test_cli_bad_sources_name_the_problem(tmp_path, make, message):
    status, _, err = _run_cli("decompose", str(make(tmp_path)), "--out", str(tmp_path / "out"), "--steps", "1")
    assert status == 2 and message in err
