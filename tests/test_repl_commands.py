"""Slash commands as plain functions (no terminal, no generation): session switching keeps each
session's own system prompt and variables."""

from __future__ import annotations

import io
from pathlib import Path

from localbot import ChatLlamaCpp, SessionStore, build_chatbot
from localbot.repl import ReplState, handle_line
from localbot.session_settings import save_settings


def test_switching_sessions_never_carries_variables_across(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    save_settings(
        store, "spanish", {"system": "Answer in {language}.", "vars": {"language": "Spanish"}}
    )
    model = ChatLlamaCpp(model_path="/not/loaded.gguf")  # never loaded by these commands
    bot = build_chatbot(model, store, None)
    state = ReplState(
        bot=bot,
        session="default",
        out=io.StringIO(),
        process_system="Be {tone}.",
        process_vars={"tone": "dry"},
    )

    handle_line(state, "/switch spanish")
    assert state.bot.system_prompt == "Answer in {language}."
    assert state.bot.variables == {"tone": "dry", "language": "Spanish"}

    handle_line(state, "/switch plain")
    assert state.bot.system_prompt == "Be {tone}."
    assert state.bot.variables == {"tone": "dry"}
    assert "session 'plain' (new)" in state.out.getvalue()
