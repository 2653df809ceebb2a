"""`kv3d visualize` on several processes (jax.distributed on localhost, CPU): the run folder they
write together is the one a single process writes, file by file and bit for bit, and a run whose
process was killed resumes on another number of processes to the same files."""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kv3d_jax import cli

# Eight kernels in units of two (one device per process): each process gets two units.
ARGS = ["visualize", "--layer", "conv1", "--channels", "0-7", "--steps", "2", "--decompose-steps", "3",
        "--batch", "2", "--media", "gif"]
KV3D = [sys.executable, "-c", "import sys; from kv3d_jax.cli import main; sys.exit(main())"]


def _env() -> dict:
    # One CPU device per process, as on a cluster of CPU hosts, each reading back the programs the
    # worker's earlier runs compiled (KV3D_CACHE), as processes on a shared file system do. Only
    # process 0 writes new ones; with a size limit JAX takes a file lock around every read and
    # write, so that process 1 never reads an entry that process 0 is still writing.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_MAX_SIZE": str(2**40)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(out: Path, processes: int) -> list[subprocess.Popen]:
    """``processes`` kv3d processes of one run into ``out`` (one plain process if 1)."""
    if processes == 1:
        return [subprocess.Popen(KV3D + ARGS + ["--out", str(out)], env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)]
    where = ["--coordinator", f"localhost:{_free_port()}", "--num-processes", str(processes)]
    return [subprocess.Popen(KV3D + ARGS + ["--out", str(out)] + where + ["--process-id", str(i)], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(processes)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def _files(root: Path) -> dict[str, Path]:
    """Every file of run folder ``root`` but its lock, by path relative to it."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _assert_same_folder(a: Path, b: Path) -> None:
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    different = [name for name in files_a if not filecmp.cmp(files_a[name], files_b[name], shallow=False)]
    assert different == [], f"{len(different)} of {len(files_a)} files differ: {different[:8]}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The run folder of one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    _finish(_start(out, 1))
    return out


@pytest.mark.slow
def test_two_processes_write_the_run_folder_of_one(single, tmp_path):
    out = tmp_path / "run"
    stdouts = _finish(_start(out, 2))
    assert "results:" in stdouts[0] and "process 1: share done; process 0 writes the gallery" in stdouts[1]
    # Kernel files, every picture, the pages and run.json: the same bytes.
    _assert_same_folder(single, out)
    assert len(list((out / "kernels" / "conv1").glob("*.npz"))) == 8


@pytest.mark.slow
def test_a_run_killed_on_two_processes_resumes_on_one_to_the_same_files(single, tmp_path):
    out = tmp_path / "run"
    kernels = out / "kernels" / "conv1"
    procs = _start(out, 2)
    try:
        deadline = time.monotonic() + 600
        while not (kernels.is_dir() and any(kernels.glob("[0-9]*.npz"))):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run wrote no kernel within 600 s"
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGKILL)
        assert procs[1].wait() == -signal.SIGKILL
        # Process 0 finishes its own share, finds process 1 gone and says so in one line, without
        # waiting out JAX's heartbeat timeout.
        _, stderr = procs[0].communicate(timeout=300)
        assert procs[0].returncode == 1, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith(
            "kv3d visualize: error: another process of this run stopped before 'kv3d visualize: every share done'")
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kernels.glob("[0-9]*.npz")}
    assert 1 <= len(survivors) < 8, f"the kill came too late to test anything: {sorted(survivors)}"
    assert not (out / "index.html").exists()

    _finish(_start(out, 1))
    # Finished kernels were kept as they were; the rest computed again; every file as one process made it.
    assert {name: survivors[name] for name in survivors} == {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kernels.glob("[0-9]*.npz") if p.name in survivors}
    _assert_same_folder(single, out)


@pytest.mark.parametrize("flags, message", [
    (["--num-processes", "2", "--process-id", "0"], "--num-processes and --process-id need --coordinator HOST:PORT"),
    (["--coordinator", "localhost:1", "--num-processes", "2"], "--coordinator needs --num-processes N and --process-id I"),
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
     r"--process-id must be below --num-processes \(2\), got 2"),
    (["--distributed", "--coordinator", "localhost:1"], "use either --distributed .* or --coordinator"),
])
def test_process_flags_that_cannot_work_are_refused_before_anything_starts(flags, message, tmp_path, capsys):
    assert cli.main(["visualize", "--out", str(tmp_path / "run")] + flags) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_gallery_is_rebuilt_from_the_kernels_at_any_time(single, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(single, out)
    (out / "index.html").unlink()
    (out / "conv1.html").unlink()
    (out / "conv1" / "motionnet_conv1_3_panel.gif").unlink()
    assert cli.main(["gallery", str(out)]) == 0
    assert f"results: {(out / 'index.html').resolve()}" in capsys.readouterr().out
    _assert_same_folder(single, out)
    assert cli.main(["gallery", str(tmp_path / "nothing")]) == 2
    assert "is not a `kv3d visualize` run folder" in capsys.readouterr().err
