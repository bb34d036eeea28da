"""The session store under real processes: concurrent appenders, writers killed with SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from localbot.sessions import SessionStore

pytestmark = pytest.mark.skipif(os.name != "posix", reason="flock and SIGKILL are POSIX")

WRITER = Path(__file__).parent / "helpers" / "session_writer.py"
grown_message = runpy.run_path(str(WRITER))["grown_message"]


def start_writer(*args: str) -> subprocess.Popen[str]:
    """Start the helper and wait until its imports are done (it prints "ready")."""
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


@pytest.mark.timeout(60)
def test_two_processes_appending_keep_every_message_in_order(tmp_path: Path) -> None:
    root = tmp_path / "sessions"
    # 300 appends each (~0.2 s of writing alone): a window a writer started late still overlaps.
    writers = [start_writer("append", str(root), "shared", tag, "300") for tag in "AB"]
    for proc in writers:  # both are loaded; release them together so they really overlap
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in writers:
        out, _ = proc.communicate(timeout=50)
        assert proc.returncode == 0
        assert out == "done\n"

    contents = [m.content for m in SessionStore(root).get("shared").messages]
    assert len(contents) == 600
    switches = sum(a[0] != b[0] for a, b in itertools.pairwise(contents))
    assert switches > 1, "the writers never overlapped; the test proved nothing"
    for tag in "AB":
        own = [c for c in contents if c.startswith(f"{tag}-")]
        assert own == [f"{tag}-{i}" for i in range(300)], f"writer {tag} lost or reordered"


@pytest.mark.timeout(60)
def test_threads_appending_through_separate_stores_keep_every_message(tmp_path: Path) -> None:
    """flock locks are per open file, so threads of one process queue up like processes do."""
    root = tmp_path / "sessions"

    def append(tag: str) -> None:
        history = SessionStore(root).get("shared")
        for i in range(25):
            history.add_message(HumanMessage(f"{tag}-{i}"))

    threads = [threading.Thread(target=append, args=(tag,)) for tag in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    contents = [m.content for m in SessionStore(root).get("shared").messages]
    for tag in "AB":
        assert [c for c in contents if c.startswith(f"{tag}-")] == [f"{tag}-{i}" for i in range(25)]
    assert len(contents) == 50


@pytest.mark.timeout(90)
def test_writer_killed_at_random_points_never_leaves_a_torn_file(tmp_path: Path) -> None:
    """Each trial forks a fresh writer that continues the same session, then SIGKILLs it."""
    root, size, trials = tmp_path / "sessions", 2000, 60
    store = SessionStore(root)
    path, rng = store.path_for("grown"), random.Random()
    forker = start_writer("forker", str(root), "grown", str(size))
    previous = 0
    for trial in range(trials):
        pid = int(ask(forker, "fork"))
        time.sleep(rng.uniform(0, 0.05))
        os.kill(pid, signal.SIGKILL)
        assert int(ask(forker, "reap")) == -signal.SIGKILL
        if not path.exists():
            assert previous == 0, f"trial {trial}: the file vanished"
            continue
        json.loads(path.read_bytes())  # parses fully: not torn
        messages = store.get("grown").messages
        expected = [grown_message(i, size) for i in range(len(messages))]
        assert messages == expected, f"trial {trial}: history is not a prefix of the series"
        assert len(messages) % 2 == 0, f"trial {trial}: a turn was half-written"
        assert len(messages) >= previous, f"trial {trial}: committed messages were lost"
        previous = len(messages)
    forker.communicate(timeout=10)
    assert previous > 0, "no writer got as far as one write; the test proved nothing"
    assert [info.id for info in store.list()] == ["grown"]  # leftover temp files are not sessions


def ask(proc: subprocess.Popen[str], command: str) -> str:
    """Send one command line to the helper and return its one-line answer."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()
