"""``kv3d`` keeps its compiled programs in JAX's persistent compilation cache (``$KV3D_CACHE``):
running a job again compiles nothing and gives the same results; a cache that cannot be made,
or one the user turned off, leaves the job to compile as before. Each run is a fresh interpreter,
as a user's would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# main(argv) in a fresh interpreter, counting the compile requests JAX sends to the cache and its hits.
_PROBE = """
import collections, json, sys
import jax
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
from kv3d_jax import cli
status = cli.main(sys.argv[1:])
print(json.dumps({"status": status, "requests": events["/jax/compilation_cache/compile_requests_use_cache"],
                  "hits": events["/jax/compilation_cache/cache_hits"]}))
"""
JOB = ["visualize", "--layer", "conv2", "--channels", "0-1", "--steps", "2", "--decompose-steps", "2"]
# Where only what turns the cache on or off is tested, the cheapest job that compiles (every command
# turns the cache on).
SMALL_JOB = ["maximize", "--layer", "conv1", "--rectify", "--channels", "0", "--steps", "1", "--preset", "native"]


def kv3d(argv, **env) -> tuple[dict, str]:
    """``kv3d argv`` in a fresh interpreter with ``env`` added: its cache counts and its stderr."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def kernel_files(out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {str(p.relative_to(out)): dict(np.load(p)) for p in sorted((out / "kernels").rglob("*.npz"))}


@pytest.mark.slow
def test_a_second_run_reads_every_program_back_and_gives_the_same_results(tmp_path):
    cache = tmp_path / "cache"
    first, _ = kv3d([*JOB, "--out", tmp_path / "first"], KV3D_CACHE=str(cache))
    second, _ = kv3d([*JOB, "--out", tmp_path / "second"], KV3D_CACHE=str(cache))
    assert first["status"] == second["status"] == 0
    assert first["requests"] > 10 and first["hits"] < first["requests"]
    assert second == {**first, "hits": first["requests"]}, (first, second)
    a, b = kernel_files(tmp_path / "first"), kernel_files(tmp_path / "second")
    assert a.keys() == b.keys() and len(a) == 2
    for name in a:
        assert a[name].keys() == b[name].keys()
        for array in a[name]:
            np.testing.assert_array_equal(a[name][array], b[name][array], err_msg=f"{name}: {array}")


@pytest.mark.slow
def test_a_cache_folder_that_cannot_be_made_is_reported_and_the_job_compiles(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    counts, err = kv3d([*SMALL_JOB, "--out", tmp_path / "out"], KV3D_CACHE=str(blocker / "cache"))
    assert counts["status"] == 0
    warnings = [line for line in err.splitlines() if "compilation cache" in line]
    assert len(warnings) == 1 and warnings[0].startswith("kv3d: warning: no compilation cache"), err
    assert str(blocker) in warnings[0] and "KV3D_CACHE" in warnings[0], err
    assert counts["hits"] == 0 and (tmp_path / "out" / "motionnet_conv1_stage1.npz").is_file()


@pytest.mark.slow
def test_jax_own_switch_turns_the_cache_off(tmp_path):
    cache = tmp_path / "cache"
    counts, _ = kv3d([*SMALL_JOB, "--out", tmp_path / "out"], KV3D_CACHE=str(cache),
                     JAX_ENABLE_COMPILATION_CACHE="false")
    assert counts == {"status": 0, "requests": 0, "hits": 0}
    assert not any(cache.iterdir())
