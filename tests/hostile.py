"""Shared pieces of the hostile-input tables: run many CLI calls in one interpreter under
``ulimit -v``, snapshot files, and the one-line checks.

A fresh interpreter per case costs ~0.6 s here; the tables have dozens of cases. So one subprocess
(under the memory limit) calls each entry point's ``main(argv)`` in turn, with stderr captured and
the environment set per call, and reports the exit code, stderr, seconds and any exception that
escaped ``main`` (a traceback the user would have seen).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMORY_KB = 3_000_000  # ulimit -v: ~3 GB of address space, far below any hostile 2^62 length

_DRIVER = r"""
import importlib, io, json, os, sys, time, traceback

results = []
for call in json.loads(sys.stdin.read()):
    main = importlib.import_module(call["module"]).main
    saved_env = dict(os.environ)
    os.environ.update(call["env"])
    err, real = io.StringIO(), sys.stderr
    sys.stderr = err
    start = time.perf_counter()
    try:
        code = main(call["argv"])
    except SystemExit as e:
        code = e.code
    except BaseException:
        code = "escaped: " + traceback.format_exc()
    finally:
        sys.stderr = real
        os.environ.clear()
        os.environ.update(saved_env)
    results.append({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - start})
print(json.dumps(results))
"""


@dataclass
class Call:
    module: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    code: int | str
    stderr: str
    seconds: float


def run_limited(
    args: list[str], *, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` with this checkout's localbot, under ``ulimit -v``."""
    return subprocess.run(
        ["bash", "-c", f'ulimit -v {MEMORY_KB}; exec "$0" "$@"', sys.executable, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=300,
    )


def run_calls(calls: list[Call]) -> list[Outcome]:
    """Each call's ``main(argv)`` in one interpreter under ``ulimit -v`` (stdin is not a tty)."""
    payload = json.dumps([{"module": c.module, "argv": c.argv, "env": c.env} for c in calls])
    result = run_limited(["-c", _DRIVER], stdin=payload)
    assert result.returncode == 0, result.stderr[-3000:]
    return [Outcome(**o) for o in json.loads(result.stdout)]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``roots`` with its size and modification time."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for root in roots
        if root.exists()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_one_line(message: str) -> None:
    """A message fit for ``localbot: error: ...``: one printable line of sensible length."""
    assert "\n" not in message
    assert "\r" not in message
    assert message.isprintable(), message
    assert len(message) < 500, message


def assert_one_line_error(outcome: Outcome, code: int, *needles: str) -> str:
    """The outcome of a refused call: ``code``, one ``localbot: error:`` line on stderr."""
    assert outcome.code == code, outcome
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, outcome.stderr
    assert lines[0].startswith("localbot: error: "), lines[0]
    assert_one_line(lines[0])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
