"""Stage-2 pictures: the colour code, the files and their frame counts, and `kv3d decompose`."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
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


def _smooth_video(t, h, w, seed=0):
    """``(t, h, w, 3)`` in [0.1, 0.9]: a smooth texture whose colour changes from frame to frame, so that
    a lossy encoder keeps it close and frames out of order would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:h, :w] / max(h, w)
    phase = rng.uniform(0, 6, (t, 1, 1, 3))
    return (0.5 + 0.4 * np.sin(2.0 * x[..., None] + 3.0 * y[..., None] + phase)).astype(np.float32)


def _read_video(path):
    """Every frame of a video file as uint8 ``(T, H, W, 3)``, by imageio-ffmpeg's reader (GIF: imageio's).

    The reader starts ffmpeg in a new process group (``preexec_fn``), which JAX's fork hook warns about:
    the tests that read videos ignore that warning."""
    if Path(path).suffix == ".gif":
        return iio.imread(path, index=None)[..., :3]
    frames = imageio_ffmpeg.read_frames(str(path))
    width, height = next(frames)["size"]
    return np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in frames])


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
@pytest.mark.parametrize("media", writers.MEDIA)
@pytest.mark.parametrize("shape, encoded", [((4, 12, 12), (72, 72)), ((3, 13, 17), (66, 86)), ((2, 70, 71), (70, 72))])
def test_each_media_round_trips(tmp_path, media, shape, encoded):
    """Every frame comes back in order, near its colours; MP4 and WebM frames enlarged by a whole factor
    (12 px: 6×; 13 px: 5×, then padded from 65 to even by the last row; 70 px: not enlarged, 71 padded).
    kv3d's own reader (`kv3d decompose`, `--magnitude-from`) reads the frames an independent one does."""
    t, h, w = shape
    video = _smooth_video(t, h, w)
    path = writers.save_video(tmp_path / f"v.{media}", video, fps=8.0)
    assert path == tmp_path / f"v.{media}" and [p.name for p in tmp_path.iterdir()] == [path.name]
    frames = _read_video(path).astype(np.float32) / 255
    assert [(stem, clip.tolist()) for stem, clip in cli._decompose_inputs(str(path))] == [("v", frames.tolist())]
    size = (h, w) if media == "gif" else encoded
    assert writers.encoded_size(h, w) == encoded and frames.shape == (t, *size, 3)
    scale = size[0] // h
    blocks = frames[:, :h * scale, :w * scale].reshape(t, h, scale, w, scale, 3).mean(axis=(2, 4))
    # Each frame's mean colour within 1.5 % and each pixel within 2 % on average (measured, all three media:
    # at most 0.7 % and 0.9 %).
    np.testing.assert_allclose(blocks.mean(axis=(1, 2)), video.mean(axis=(1, 2)), atol=0.015)
    assert np.abs(blocks - video).mean() < 0.02
    if size[0] > h * scale:  # the padding row repeats the last one
        np.testing.assert_allclose(frames[:, -1], frames[:, -2], atol=0.03)


@pytest.mark.parametrize("media", ["mp4", "webm"])
def test_a_video_encodes_to_the_same_bytes_every_time_on_any_number_of_cores(tmp_path, media):
    # A kernel's files must not depend on the machine: x264 and libvpx decided differently with
    # another thread count, and WebM's container drew a random id on every run.
    video = np.random.default_rng(0).uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)
    script = ("import sys, os, numpy as np; from kv3d_jax import writers; os.sched_setaffinity(0, {0}); "
              "writers.save_video(sys.argv[1], np.load(sys.argv[2]))")
    np.save(tmp_path / "video.npy", video)
    first = writers.save_video(tmp_path / f"a.{media}", video).read_bytes()
    assert writers.save_video(tmp_path / f"b.{media}", video).read_bytes() == first
    subprocess.run([sys.executable, "-c", script, str(tmp_path / f"c.{media}"), str(tmp_path / "video.npy")],
                   check=True)
    assert (tmp_path / f"c.{media}").read_bytes() == first


def test_save_video_refuses_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"cannot write a video as 'v.avi': the name must end in one of "
                                         r"\.mp4, \.webm, \.gif$"):
        writers.save_video(tmp_path / "v.avi", np.zeros((2, 8, 8, 3)))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_encode_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    """An encoder that writes half a file and fails: the error says why, the half file is gone."""
    (tmp_path / "v.mp4").write_bytes(b"the previous video")
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor last; do :; done\nprintf partial > "$last"\n'
                    'echo "Conversion failed: disk full" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    with pytest.raises(OSError, match="^ffmpeg could not write v.mp4: Conversion failed: disk full$"):
        writers.save_video(tmp_path / "v.mp4", _smooth_video(2, 8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "v.mp4"]
    assert (tmp_path / "v.mp4").read_bytes() == b"the previous video"


def test_media_file_names_every_kind():
    assert writers.media_file("m_conv1_3", "motion", "mp4") == "m_conv1_3_motion.mp4"
    assert writers.media_file("m_conv1_3", "static", "mp4") == "m_conv1_3_static.png"
    assert writers.media_file("m_conv1_3", "refined_static", "webm") == "m_conv1_3_refined_static.png"
    assert writers.media_file("m_conv1_3", "refined_deform", "gif") == "m_conv1_3_refined_deform.gif"
    with pytest.raises(ValueError, match="media must be one of mp4, webm, gif; got 'avi'"):
        writers.media_file("m", "motion", "avi")
    with pytest.raises(ValueError, match="no picture of kind 'speed'"):
        writers.media_file("m", "speed", "mp4")


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
@pytest.mark.parametrize("media", ["mp4", "webm"])
def test_savers_write_every_moving_picture_in_the_media_asked_for(tmp_path, media):
    t, h, w = 4, 12, 16
    video, static, displacement, recon = _kernel(t, h, w)
    paths = writers.save_decomposition(tmp_path, "m_l_3", video, static, displacement, recon, media=media)
    paths.update(writers.save_refinement(tmp_path, "m_l_3", video, static, displacement, media=media))
    assert {kind: p.name for kind, p in paths.items()} == {
        kind: writers.media_file("m_l_3", kind, media)
        for kind in writers.DECOMPOSITION_FILES + writers.REFINEMENT_FILES}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    legend = max(8, min(h, w) // 2)
    frames = {"stage1": (t, h, w), "deform": (t, h, w), "motion": (t - 1, h, w + legend), "recon": (t, h, w),
              "panel": (t, h, 4 * w + 6 + legend), "refined_video": (t, h, w), "refined_deform": (t, h, w),
              "refined_motion": (t - 1, h, w + legend)}
    for kind, (count, height, width) in frames.items():
        assert _read_video(paths[kind]).shape == (count, *writers.encoded_size(height, width), 3), kind
    assert iio.imread(paths["static"]).shape == (h, w, 3)
    deform = _read_video(paths["deform"]).astype(float) / 255
    scale = writers.encoded_size(h, w)[0] // h
    assert (deform[-1, ::scale, ::scale, 0] > 0.85).all() and (deform[-1, ::scale, ::scale, 1:] < 0.15).all()  # red


def test_writing_pictures_imports_no_optimisation():
    """Importing the writers (to write a GIF, say) loads neither the models nor any stage."""
    code = "import sys, kv3d_jax.writers; print(' '.join(sorted(m for m in sys.modules if m.startswith('kv3d_jax'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert "kv3d_jax.writers" in loaded
    assert not {"kv3d_jax.maximization", "kv3d_jax.decomposition", "kv3d_jax.refinement", "kv3d_jax.models",
                "kv3d_jax.motion"} & set(loaded), loaded


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
