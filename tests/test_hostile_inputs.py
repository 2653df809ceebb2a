"""Every door through which untrusted input enters kv3d refuses the hostile inputs of issue #27 in one
clean line, cheaply, and writes nothing anywhere.

Each case of :mod:`hostile_inputs` (``kv3d convert``, ``decompose``, ``visualize --weights``,
``layers``, ``tuning`` and bad arguments) is built at test time and run by ``cli.main`` in a child
forked from one interpreter that imported kv3d (``kv3d_runner``, :mod:`hostile_harness`). It must
exit with status 2 after exactly one line ``kv3d COMMAND: error: ...`` matching the case's problem
(no traceback, no warning, no Python exception name, no raw control character), print nothing on
stdout, leave no new file anywhere under the test's folder (inside ``--out`` or out of it), peak
at less than 300 MB above the interpreter and spend under 2 s of CPU in ``cli.main``.
"""

from __future__ import annotations

import re

import pytest

import hostile_inputs

MEMORY_MARGIN_MB = 300
CPU_SECONDS = 2.0
# Exception names kv3d must not show instead of saying what is wrong.
_PYTHON_NAMES = re.compile(r"\b(OverflowError|TypeError|AttributeError|KeyError|IndexError|UserWarning|"
                           r"RuntimeWarning|UnicodeDecodeError|ZeroDivisionError|RecursionError)\b")


def _files(folder):
    return sorted(p for p in folder.rglob("*") if p.parts[len(folder.parts)] != "logs")


@pytest.mark.parametrize("case", list(hostile_inputs.CASES))
def test_a_hostile_input_is_refused_in_one_line(tmp_path, kv3d_runner, case):
    folder = tmp_path / "files"
    folder.mkdir()
    argv, problem = hostile_inputs.CASES[case](folder)
    before = _files(tmp_path)

    run = kv3d_runner.run(argv, folder, tmp_path / "logs", timeout=60)

    print(f"{case}: {run.extra_mb:.0f} MB above the interpreter, {run.cpu_seconds} s CPU in cli.main")
    assert not run.timed_out, f"still running after 60 s; stderr: {run.stderr[-2000:]}"
    assert run.status == 2, f"exit status {run.status}; stderr: {run.stderr[-2000:]}"
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and run.stderr.endswith("\n"), run.stderr[-2000:]
    command = argv[0] if "unrecognized" not in problem else None
    assert lines[0].startswith(f"kv3d {command}: error: " if command else "kv3d: error: "), lines[0][:500]
    assert re.search(problem, lines[0]), lines[0][:2000]
    assert len(lines[0]) < 2000 and lines[0].isprintable(), lines[0][:2000]
    assert not _PYTHON_NAMES.search(lines[0]) and "Traceback" not in lines[0].split(": error: ")[0], lines[0]
    assert run.stdout == ""
    assert _files(tmp_path) == before
    assert run.extra_mb < MEMORY_MARGIN_MB, f"peak memory {run.extra_mb:.0f} MB above the interpreter's"
    assert run.cpu_seconds < CPU_SECONDS, f"{run.cpu_seconds:.2f} s"
