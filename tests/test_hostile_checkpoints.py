"""``kv3d convert`` refuses every hostile or broken checkpoint in one line, cheaply, and leaves nothing behind.

Each case of :mod:`hostile_checkpoints` is written at test time and converted by the
``kv3d`` entry point in a subprocess, which must exit with status 2 after printing exactly
one line, ``kv3d convert: error: <file>...``, naming the problem (no traceback, no crash by
signal), leave no file next to the checkpoint (no params, no temporary file), peak at less
than 300 MB above an interpreter that only imports the CLI (the child's own ru_maxrss, from
``os.wait4``), and spend under 2 s of CPU in ``cli.main`` (the import of jax is not the
command's work). One format per case runs by default; the other formats are marked slow.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hostile_checkpoints

ROOT = Path(__file__).resolve().parents[1]
MEMORY_MARGIN_KB = 300 * 1024
CPU_SECONDS = 2.0
# The format each case runs in by default; the others are slow.
DEFAULT_FORMAT = {
    "forged-object-array": "torch-zip", "complex": "caffe2", "datetime": "lightning",
    "string-objects": "torch-legacy", "structured": "caffe2", "expanded-tensor": "torch-zip",
    "shared-lists": "torch-legacy", "cyclic": "caffe2", "deep": "lightning", "many-opcodes": "caffe2",
    "storage-claim": "torch-legacy", "zip-bomb": "torch-zip", "lying-member": "lightning",
    "encrypted": "lightning", "lzma": "torch-zip", "corrupt-deflate": "torch-zip", "non-finite": "torch-legacy",
}
_MAIN = """
import os, sys, time
from kv3d_jax import cli
start = time.process_time()
try:
    status = cli.main(sys.argv[1:])
finally:
    with open(os.environ["KV3D_TEST_CPU_SECONDS"], "w") as f:
        f.write(repr(time.process_time() - start))
sys.exit(status)
"""


@dataclasses.dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    max_rss_kb: int
    cpu_seconds: float | None


def run_python(code: str, args: list[str], logs: Path, cwd: Path) -> Run:
    """``python -c code *args`` in ``cwd``, with its exit status, output and peak resident memory."""
    logs.mkdir(parents=True, exist_ok=True)
    timing = logs / "cpu_seconds"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               KV3D_TEST_CPU_SECONDS=str(timing), JAX_PLATFORMS="cpu")
    with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, cwd=cwd, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return Run(child.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text(),
               usage.ru_maxrss, float(timing.read_text()) if timing.exists() else None)


@pytest.fixture(scope="module")
def baseline_rss_kb(tmp_path_factory) -> int:
    """Peak resident memory of an interpreter that imports the CLI and does nothing."""
    folder = tmp_path_factory.mktemp("baseline")
    run = run_python("from kv3d_jax import cli", [], folder / "logs", folder)
    assert run.status == 0, run.stderr
    return run.max_rss_kb


def _cases():
    for case, (_, formats) in hostile_checkpoints.CASES.items():
        for fmt in formats:
            marks = () if DEFAULT_FORMAT[case] == fmt else (pytest.mark.slow,)
            yield pytest.param(case, fmt, id=f"{case}-{fmt}", marks=marks)


@pytest.mark.parametrize("case, fmt", list(_cases()))
def test_kv3d_convert_refuses_in_one_line(tmp_path, baseline_rss_kb, case, fmt):
    folder = tmp_path / "files"
    folder.mkdir()
    checkpoint = folder / "weights.ckpt"
    build, _ = hostile_checkpoints.CASES[case]
    problem = build(fmt, checkpoint)
    before = sorted(folder.iterdir())

    run = run_python(_MAIN, ["convert", "motionnet", str(checkpoint), "-o", str(folder / "params.msgpack")],
                     tmp_path / "logs", folder)

    print(f"{case}-{fmt}: {(run.max_rss_kb - baseline_rss_kb) / 1024:.0f} MB above the interpreter, "
          f"{run.cpu_seconds} s CPU in cli.main")
    assert run.status == 2, f"exit status {run.status}; stderr: {run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith("kv3d convert: error: ") and str(checkpoint) in lines[0]
    assert re.search(problem, lines[0]), lines[0]
    assert run.stdout == ""
    assert sorted(folder.iterdir()) == before
    assert run.max_rss_kb - baseline_rss_kb < MEMORY_MARGIN_KB, (
        f"peak memory {(run.max_rss_kb - baseline_rss_kb) / 1024:.0f} MB above the interpreter's")
    assert run.cpu_seconds < CPU_SECONDS, f"{run.cpu_seconds:.2f} s"


def test_a_valid_checkpoint_converts_in_the_same_harness(tmp_path, baseline_rss_kb):
    """The harness itself: the same command on the intact file succeeds and writes only the params."""
    folder = tmp_path / "files"
    folder.mkdir()
    checkpoint = hostile_checkpoints.save("torch-zip", folder / "weights.ckpt", hostile_checkpoints.motionnet_state())
    run = run_python(_MAIN, ["convert", "motionnet", str(checkpoint), "-o", str(folder / "params.msgpack")],
                     tmp_path / "logs", folder)
    assert run.status == 0, run.stderr
    assert "converted" in run.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["params.msgpack", "weights.ckpt"]
