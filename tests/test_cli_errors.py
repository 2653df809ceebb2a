"""Every failure of every ``kv3d`` command is one ``kv3d <command>: error: ...`` line, a non-zero
exit and no traceback, and leaves no temporary file; input files are checked before they are
read whole (peak memory and CPU time are measured in a child forked from an interpreter that
imported kv3d: ``kv3d_runner``)."""

from __future__ import annotations

import contextlib
import errno
import io
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hostile_harness
from kv3d_jax import cli, models, writers, zoo

TEMP = re.compile(r"\..+\.tmp[0-9]+(\.[A-Za-z0-9]+)?")
# Extra memory (MB) and CPU time (s) a refused input may cost, beyond the interpreter's own.
MAX_MB, MAX_SECONDS = 300, 2.0


def run(argv) -> tuple[int, str]:
    """``kv3d argv`` in this process: exit status and everything written to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()


def assert_one_error_line(status, err: str, command: str, *fragments: str) -> None:
    assert status not in (0, None), err
    assert "Traceback" not in err
    lines = err.splitlines()
    errors = [line for line in lines if ": error: " in line]
    # Before a failure a long command may have drawn progress lines; the failure itself is one line, the last.
    assert len(errors) == 1 and lines[-1] == errors[0] and err.endswith("\n"), err
    assert errors[0].startswith(f"kv3d {command}: error: "), err
    assert all(not line.startswith(" ") for line in lines), err
    for fragment in fragments:
        assert fragment in errors[0], err


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP.fullmatch(p.name)]


def probe(kv3d_runner, argv, cwd) -> hostile_harness.Run:
    """``kv3d argv`` in a child forked from an interpreter that imported kv3d (``kv3d_runner``): its
    status, stderr, CPU seconds in ``cli.main`` and MB of peak memory above the interpreter's."""
    with tempfile.TemporaryDirectory(prefix="kv3d-logs-") as logs:
        result = kv3d_runner.run(argv, cwd, Path(logs), timeout=60)
    assert not result.timed_out and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


# ------------------------------------------------------------------ output paths


@pytest.fixture(scope="module")
def motionnet_checkpoint():
    return models.entry("motionnet").embedded()


def test_convert_to_a_folder_or_under_a_file(tmp_path, motionnet_checkpoint):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for output, fragment in ((tmp_path / "folder", "is a folder; name the file"),
                             (tmp_path / "file" / "p.msgpack", "is a file, not a folder")):
        status, err = run(["convert", "motionnet", motionnet_checkpoint, "-o", output])
        assert_one_error_line(status, err, "convert", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    assert not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("command", [
    ["visualize", "--layer", "conv1", "--channels", "0"],
    ["maximize", "--layer", "conv1", "--channels", "0", "--steps", "1"],
    ["tuning", "--layer", "conv1"],
])
def test_an_output_folder_under_a_file(tmp_path, command):
    (tmp_path / "file").write_text("x")
    status, err = run([*command, "--out", tmp_path / "file" / "out"])
    assert_one_error_line(status, err, command[0], "is a file, not a folder")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_failed_params_write_leaves_no_temporary_file(tmp_path, motionnet_checkpoint, monkeypatch):
    def full(self, data):
        Path.write_text(self, "half")
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    status, err = run(["convert", "motionnet", motionnet_checkpoint, "-o", tmp_path / "p.msgpack"])
    assert_one_error_line(status, err, "convert", "No space left on device", "free some space")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("seed", [str(2**64), str(2**63), "-1", "1" * 5000, "x"])
def test_a_seed_beyond_64_bits(tmp_path, seed):
    for command in (["visualize"], ["maximize", "--layer", "conv1"]):
        status, err = run([*command, "--seed", seed, "--out", tmp_path / "out"])
        assert status == 2
        assert_one_error_line(status, err, command[0], "--seed")
    assert list(tmp_path.iterdir()) == []


def test_a_huge_channel_range_is_refused_before_it_is_built(tmp_path, kv3d_runner):
    result = probe(kv3d_runner, ["visualize", "--layer", "conv1", "--channels", "0-300000000", "--out", tmp_path / "out"],
                   tmp_path)
    assert_one_error_line(result.status, result.stderr, "visualize", "conv1 has channels 0..15; got '0-300000000'")
    assert result.extra_mb < MAX_MB and result.cpu_seconds < MAX_SECONDS, result
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("raised", [RecursionError("maximum recursion depth exceeded"), MemoryError(),
                                    OSError(errno.EIO, "Input/output error"), KeyError("x"), KeyboardInterrupt()])
def test_anything_raised_is_one_line(tmp_path, monkeypatch, raised):
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(zoo, "load", fail)
    status, err = run(["tuning", "--layer", "conv1", "--out", tmp_path])
    assert_one_error_line(status, err, "tuning")
    assert status == (130 if isinstance(raised, KeyboardInterrupt) else 1)


# ------------------------------------------------------------------ inputs of kv3d decompose


def _bomb_gif(path: Path) -> Path:
    frames = [Image.new("P", (6000, 6000), i) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def _long_gif(path: Path) -> Path:
    frames = [Image.new("P", (256, 256), i % 2) for i in range(300)]
    frames[0].save(path, save_all=True, append_images=frames[1:], optimize=False)
    return path


def _npz_bomb(path: Path) -> Path:
    """A compressed .npz whose 'videos' array claims 2 GB and inflates to it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (32, 16, 1024, 1024, 3)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("videos.npy", "w") as member:
        member.write(header.getvalue())
        zeros = bytes(1 << 24)
        for _ in range(4):  # 64 MB of zeros is enough to be refused; the header claims 6 GB
            member.write(zeros)
    return path


def _wide_mp4(path: Path) -> Path:
    """One grey frame of 2100x2100 pixels (4.4 M, over the budget of one video) as an MP4."""
    return writers.save_video(path, np.full((1, 2100, 2100, 3), 0.5, np.float32))


def _long_mp4(path: Path) -> Path:
    """1,100 frames of 64x64 pixels (over the frame budget) as an MP4."""
    return writers.save_video(path, np.full((1100, 64, 64, 3), 0.5, np.float32))


@pytest.mark.parametrize("make, fragment", [
    (lambda p: _bomb_gif(p / "bomb.gif"), "holds 3 frames of 6000x6000 pixels"),
    (lambda p: _long_gif(p / "long.gif"), "holds 300 frames of 256x256 pixels"),
    (lambda p: _npz_bomb(p / "bomb.npz"), "holds 512 frames of 1024x1024 pixels"),
    (lambda p: (p / "notes.gif").write_text("not a gif") and p / "notes.gif", "is not a readable GIF"),
    (lambda p: (p / "random.gif").write_bytes(bytes(range(256)) * 40) and p / "random.gif", "is not a readable GIF"),
    (lambda p: (p / "notes.npz").write_text("not a zip") and p / "notes.npz", "is not an .npz archive"),
    (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "is neither a GIF"),
    (lambda p: _wide_mp4(p / "wide.mp4"), "holds 1 frames of 2100x2100 pixels"),
    (lambda p: _long_mp4(p / "long.mp4"), "holds 1,025 frames, more than the 1,024"),
    (lambda p: (p / "notes.mp4").write_text("not a movie") and p / "notes.mp4", "is not a readable MP4"),
], ids=["gif-bomb", "long-gif", "npz-bomb", "text-as-gif", "noise-as-gif", "text-as-npz", "text", "wide-mp4",
        "long-mp4", "text-as-mp4"])
def test_decompose_refuses_inputs_before_reading_them(tmp_path, kv3d_runner, make, fragment):
    source = make(tmp_path)
    before = sorted(tmp_path.iterdir())
    result = probe(kv3d_runner, ["decompose", source, "--out", tmp_path / "out", "--steps", "1"], tmp_path)
    assert_one_error_line(result.status, result.stderr, "decompose", str(source), fragment)
    assert result.extra_mb < MAX_MB and result.cpu_seconds < MAX_SECONDS, result
    assert sorted(tmp_path.iterdir()) == before


# ------------------------------------------------------------------ writes during visualize

SMALL_RUN = ["visualize", "--layer", "conv1", "--channels", "0-1", "--steps", "2", "--decompose-steps", "2",
             "--chunk", "2"]


@pytest.mark.slow
def test_a_full_disk_during_visualize_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    # Every picture, GIF or PNG, is written by Pillow.
    real = writers.Image.Image.save
    calls = []

    def fill_disk(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # the disk fills up during the first kernel's pictures
            Path(path).write_bytes(b"GIF89a")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(writers.Image.Image, "save", fill_disk)
    status, err = run([*SMALL_RUN, "--out", tmp_path / "run"])
    assert_one_error_line(status, err, "visualize", "No space left on device", "free some space")
    assert temp_files(tmp_path) == []


@pytest.mark.slow
def test_a_resumed_run_removes_what_a_killed_run_left_in_every_folder(tmp_path):
    out = tmp_path / "run"
    assert run([*SMALL_RUN, "--out", out])[0] == 0
    left = [out / ".index.html.tmp4242", out / "conv1" / ".motionnet_conv1_2_stage1.mp4.tmp4242.mp4",
            out / "conv1" / ".motionnet_conv1_statics.png.tmp4242.png", out / "kernels" / "conv1" / ".2.npz.tmp4242"]
    for path in left:
        path.write_bytes(b"")
    status, err = run([*SMALL_RUN[:4], "0-2", *SMALL_RUN[5:], "--out", out])
    assert status == 0, err
    for path in left:
        assert f"warning: {path}: an unfinished write of a killed run (removed)" in err
    assert temp_files(out) == []
    assert (out / "conv1" / "motionnet_conv1_2_stage1.mp4").is_file()
