"""Runs ``kv3d`` commands on hostile inputs cheaply: one interpreter imports kv3d once, then forks a
child per command and measures that child alone.

Starting a fresh interpreter per case cost about 2 s of CPU each, nearly all of it importing jax.
Here a server process (``python -c SERVER``) imports :mod:`kv3d_jax.cli`, checks that JAX has
started no backend and no thread (forking a process with threads, or with an XLA client, is not
safe; importing jax starts neither), and then, for each request, forks a child that runs
``cli.main(argv)`` in the case's folder with its stdout and stderr in files. The server waits for the
child with ``os.wait4``, which gives the child's own peak resident memory (``ru_maxrss``), and kills
it past a wall-clock limit. A forked child starts with the server's pages mapped, so its peak is
compared with that of a child that does nothing (:attr:`Runner.baseline_kb`); the child measures
its own CPU time around ``cli.main``. Each case therefore gets the same four measurements as in a
fresh interpreter: exit status, output, peak memory above the importing interpreter and CPU in
``cli.main``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r"""
import json, os, resource, signal, sys, threading, time
from kv3d_jax import cli
from jax._src import xla_bridge

if threading.active_count() != 1 or xla_bridge._backends:
    raise SystemExit("importing kv3d started threads or a JAX backend: forking is not safe")


def child(request):
    os.chdir(request["cwd"])
    logs = request["logs"]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(os.path.join(logs, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
    status = 0
    start = time.process_time()
    try:
        if request.get("exec"):  # the harness's own test: code whose memory and time are known
            exec(request["exec"], {})
        elif request["argv"] is not None:
            status = cli.main(request["argv"])
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        with open(os.path.join(logs, "cpu_seconds"), "w") as f:
            f.write(repr(time.process_time() - start))
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(request)
        finally:
            os._exit(70)
    deadline, timed_out = time.monotonic() + request["timeout"], False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status), "max_rss_kb": usage.ru_maxrss,
                      "timed_out": timed_out}), flush=True)
"""


@dataclasses.dataclass
class Run:
    """One command's exit status, output, peak memory above the baseline (MB) and CPU seconds in cli.main."""

    status: int
    stdout: str
    stderr: str
    extra_mb: float
    cpu_seconds: float | None
    timed_out: bool


class Runner:
    """A server interpreter that imported kv3d; :meth:`run` runs one ``kv3d`` command in a forked child."""

    def __init__(self, env: dict | None = None):
        env = dict(os.environ if env is None else env)
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
        self._server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        with tempfile.TemporaryDirectory(prefix="kv3d-baseline-") as logs:
            self.baseline_kb = self._request(None, ROOT, Path(logs), 60.0)["max_rss_kb"]

    def _request(self, argv, cwd: Path, logs: Path, timeout: float, code: str | None = None) -> dict:
        self._server.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "logs": str(logs),
                                             "timeout": timeout, "exec": code}) + "\n")
        self._server.stdin.flush()
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the kv3d test server exited with status {self._server.wait()}")
        return json.loads(line)

    def run(self, argv, cwd: Path, logs: Path, timeout: float = 120.0, code: str | None = None) -> Run:
        """``kv3d argv`` in a child started in ``cwd``; its stdout, stderr and CPU time go to folder ``logs``.
        ``code``, if given, is executed in the child instead (to test the harness itself)."""
        logs.mkdir(parents=True, exist_ok=True)
        reply = self._request([str(a) for a in argv], cwd, logs, timeout, code)
        timing = logs / "cpu_seconds"
        return Run(reply["status"], (logs / "stdout").read_text(errors="replace"),
                   (logs / "stderr").read_text(errors="replace"), (reply["max_rss_kb"] - self.baseline_kb) / 1024,
                   float(timing.read_text()) if timing.exists() else None, reply["timed_out"])

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=30)
