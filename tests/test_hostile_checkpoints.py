"""``kv3d convert`` refuses every hostile or broken checkpoint in one line, cheaply, and leaves nothing behind.

Each case of :mod:`hostile_checkpoints` is written at test time and converted by ``cli.main`` in a
child forked from one interpreter that imported kv3d (``kv3d_runner``, :mod:`hostile_harness`),
which must exit with status 2 after printing exactly one line, ``kv3d convert: error: <file>...``,
naming the problem (no traceback, no crash by signal), leave no file next to the checkpoint (no
params, no temporary file), peak at less than 300 MB above an interpreter that only imports the CLI
(the child's own ru_maxrss, from ``os.wait4``, against a child that does nothing), and spend under
2 s of CPU in ``cli.main`` (the import of jax is not the command's work). One format per case runs
by default; the other formats are marked slow.
"""

from __future__ import annotations

import re

import pytest

import hostile_checkpoints

MEMORY_MARGIN_MB = 300
CPU_SECONDS = 2.0
# The format each case runs in by default; the others are slow.
DEFAULT_FORMAT = {
    "forged-object-array": "torch-zip", "complex": "caffe2", "datetime": "lightning",
    "string-objects": "torch-legacy", "structured": "caffe2", "expanded-tensor": "torch-zip",
    "shared-lists": "torch-legacy", "cyclic": "caffe2", "deep": "lightning", "many-opcodes": "caffe2",
    "storage-claim": "torch-legacy", "zip-bomb": "torch-zip", "lying-member": "lightning",
    "encrypted": "lightning", "lzma": "torch-zip", "corrupt-deflate": "torch-zip", "non-finite": "torch-legacy",
}


def _cases():
    for case, (_, formats) in hostile_checkpoints.CASES.items():
        for fmt in formats:
            marks = () if DEFAULT_FORMAT[case] == fmt else (pytest.mark.slow,)
            yield pytest.param(case, fmt, id=f"{case}-{fmt}", marks=marks)


@pytest.mark.parametrize("case, fmt", list(_cases()))
def test_kv3d_convert_refuses_in_one_line(tmp_path, kv3d_runner, case, fmt):
    folder = tmp_path / "files"
    folder.mkdir()
    checkpoint = folder / "weights.ckpt"
    build, _ = hostile_checkpoints.CASES[case]
    problem = build(fmt, checkpoint)
    before = sorted(folder.iterdir())

    run = kv3d_runner.run(["convert", "motionnet", checkpoint, "-o", folder / "params.msgpack"], folder,
                          tmp_path / "logs")

    print(f"{case}-{fmt}: {run.extra_mb:.0f} MB above the interpreter, {run.cpu_seconds} s CPU in cli.main")
    assert run.status == 2, f"exit status {run.status}; stderr: {run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith("kv3d convert: error: ") and str(checkpoint) in lines[0]
    assert re.search(problem, lines[0]), lines[0]
    assert run.stdout == ""
    assert sorted(folder.iterdir()) == before
    assert run.extra_mb < MEMORY_MARGIN_MB, f"peak memory {run.extra_mb:.0f} MB above the interpreter's"
    assert run.cpu_seconds < CPU_SECONDS, f"{run.cpu_seconds:.2f} s"


def test_a_valid_checkpoint_converts_in_the_same_harness(tmp_path, kv3d_runner):
    """The harness itself: the same command on the intact file succeeds and writes only the params."""
    folder = tmp_path / "files"
    folder.mkdir()
    checkpoint = hostile_checkpoints.save("torch-zip", folder / "weights.ckpt", hostile_checkpoints.motionnet_state())
    run = kv3d_runner.run(["convert", "motionnet", checkpoint, "-o", folder / "params.msgpack"], folder,
                          tmp_path / "logs")
    assert run.status == 0, run.stderr
    assert "converted" in run.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["params.msgpack", "weights.ckpt"]


def test_the_harness_measures_each_child_alone(tmp_path, kv3d_runner):
    """A child's peak memory and CPU are its own: 400 MB touched and 0.3 s of work after it show as
    such, and the next child, which does nothing, starts again from the baseline.

    Touching 400 MB costs page faults whose CPU time grows with the machine's memory pressure (0.2 s
    idle, 4 s seen under a loaded CI run), so the child reports that cost itself and the bound is
    on the rest."""
    grow = ("import time\nstart = time.process_time()\nblock = bytearray(400 << 20)\n"
            "print(time.process_time() - start)\n"
            "end = time.process_time() + 0.3\nwhile time.process_time() < end: pass")
    big = kv3d_runner.run([], tmp_path, tmp_path / "big", code=grow)
    idle = kv3d_runner.run([], tmp_path, tmp_path / "idle", code="pass")
    assert big.status == 0 and idle.status == 0, big.stderr + idle.stderr
    assert 390 < big.extra_mb < 450, big.extra_mb
    work = big.cpu_seconds - float(big.stdout)
    assert 0.3 <= work < 0.5, (big.cpu_seconds, big.stdout)
    assert idle.extra_mb < 20 and idle.cpu_seconds < 0.1, idle
