"""Answering one question (``-p`` or a question piped on stdin): stdin read safely, the reply
streamed to stdout (or printed as JSON), and a stdout that refuses it reported in one line. The
turn is saved like any other."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from localbot.errors import ConfigError, LocalbotError

log = logging.getLogger(__name__)

MAX_STDIN_BYTES = 4 << 20
"""A question piped on stdin larger than this is refused before it is read into memory (no
model's context holds anything near it)."""


def read_stdin(prompt_given: bool, stdin: Any = None) -> str | None:
    """The text piped on stdin, or None when stdin is a terminal (or, with ``-p``, when nothing
    is waiting there: ``sleep 100 | localbot -p hi`` must not wait for the pipe to close)."""
    stdin = stdin or sys.stdin
    if stdin is None or stdin.closed or stdin.isatty():
        return None
    if prompt_given:
        import select

        try:
            ready, _, _ = select.select([stdin], [], [], 0)
        except (OSError, ValueError):
            ready = [stdin]
        if not ready:
            return None
    data = stdin.buffer.read(MAX_STDIN_BYTES + 1)
    if len(data) > MAX_STDIN_BYTES:
        raise ConfigError(
            f"the text on stdin is larger than {MAX_STDIN_BYTES >> 20} MiB; "
            "no context window holds that much"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"the text on stdin is not valid UTF-8 (byte {err.start}); convert it first, "
            "e.g. with iconv"
        ) from None


def read_question(config: dict[str, Any], stdin_text: str | None) -> str:
    parts = [p for p in (config["prompt"], stdin_text) if p and p.strip()]
    if not parts:
        raise ConfigError("nothing to ask: give -p TEXT or pipe a question on stdin")
    return "\n\n".join(p.rstrip("\n") for p in parts)


def run_once(bot, session: str, question: str, as_json: bool) -> int:
    """Answer one question: the reply streams to stdout (or comes as JSON); saved as usual.

    Interrupted (Ctrl-C, SIGTERM, SIGHUP) mid-reply, the partial reply is saved and marked, the
    JSON still printed, and the signal re-raised for the exit code.
    """
    from langchain_core.messages import HumanMessage

    config = {"configurable": {"session_id": session}}
    chunks = []
    stream = bot.stream({"messages": [HumanMessage(question)]}, config)
    try:
        for chunk in stream:
            chunks.append(chunk)
            if not as_json and chunk.text:
                _write(chunk.text)
    except KeyboardInterrupt:
        stream.close()
        if as_json:
            _print_json(bot, session, chunks, "interrupted")
        raise
    finally:
        stream.close()
        _wait_for_saves(bot)
    if as_json:
        _print_json(bot, session, chunks, None)
    else:
        _write("\n")
    return 0


def _wait_for_saves(bot) -> None:
    """Let the KV-state save finish; a second signal here only skips it (the reply is saved,
    and a missing KV state costs a re-read, never a wrong reply)."""
    try:
        bot.wait_for_saves()
    except KeyboardInterrupt:
        log.debug("KV-state save skipped: interrupted")


def _print_json(bot, session: str, chunks: list, finish_reason: str | None) -> None:
    last = chunks[-1] if chunks else None
    meta = last.response_metadata if last else {}
    payload = {
        "session": session,
        "model": bot.model.model_name,
        "reply": "".join(c.text for c in chunks),
        "finish_reason": finish_reason or meta.get("finish_reason"),
        "usage": dict(last.usage_metadata or {}) if last else {},
        "timings": meta.get("timings", {}),
    }
    if finish_reason:
        payload["interrupted"] = True
    _write(json.dumps(payload, ensure_ascii=False) + "\n")


class OutputError(LocalbotError):
    """stdout refused the reply (a full disk, /dev/full, a terminal that went away)."""


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        raise OutputError(
            f"cannot write the reply to stdout: {err.strerror} (the session keeps it)"
        ) from None


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
