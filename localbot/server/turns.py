"""Session turns for the server: the chatbot with a session's own settings, and the figures the
REPL shows as ``/tokens`` and ``/stats``, as data.

Functions that count tokens run on the model thread (``localbot.server.engine``): the tokenizer
is the loaded model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage

from localbot.chat_model import TurnStats
from localbot.chatbot import DEFAULT_SYSTEM_PROMPT, Chatbot
from localbot.errors import ContextOverflowError
from localbot.session_settings import session_settings
from localbot.turn_timings import TurnTimings


@dataclass(frozen=True)
class Defaults:
    """The server's ``--system`` and ``--var``: what a session without its own settings gets."""

    system: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    session: str = "default"
    """The session the page opens first when there is none yet (``--session``)."""

    def settings(self, bot: Chatbot, session: str) -> tuple[str | None, dict[str, str]]:
        """The system prompt and variables ``session`` runs with (the REPL's ``/switch`` rule)."""
        default = DEFAULT_SYSTEM_PROMPT if self.system is None else self.system
        return session_settings(
            bot.store, session, system_default=default, var_defaults=self.variables
        )

    def bot_for(self, bot: Chatbot, session: str) -> Chatbot:
        """``bot`` (same model, store and KV caches) with the session's own settings."""
        return bot.with_settings(*self.settings(bot, session))


def check_turn(bot: Chatbot, session: str, new: list[BaseMessage], max_tokens: int | None) -> int:
    """Raise now (ContextOverflowError, MissingVariableError) if this turn of ``bot`` (already
    set up for ``session``) cannot run; else the prompt tokens it will take."""
    bot.check_variables(bot.variables)
    history = bot.store.get(session).messages
    return bot.plan(bot.variables, [*history, *new], max_tokens).prompt_tokens


def meter(bot: Chatbot, session: str) -> dict[str, Any]:
    """The REPL's ``/tokens``, as data: how full the context is and what the next turn drops."""
    history = bot.store.get(session).messages
    values = bot.variables
    budget = bot.prompt_budget()
    now = bot.model.get_num_tokens_from_messages(bot.prompt_messages(values, history))
    figures: dict[str, Any] = {
        "context_window": bot.model.context_window,
        "prompt_budget": budget,
        "reply_budget": bot.reply_budget(),
        "messages": len(history),
        "prompt_tokens": now,
        "percent": round(100 * now / budget) if budget > 0 else 100,
    }
    try:
        plan = bot.plan(values, [*history, HumanMessage("")])
    except ContextOverflowError as err:
        figures["next_turn"] = {"error": str(err)}
    else:
        figures["next_turn"] = {"dropped": plan.dropped, "prompt_tokens": plan.prompt_tokens}
    return figures


def stats_figures(stats: TurnStats | None, turn: TurnTimings) -> dict[str, Any]:
    """The REPL's ``/stats`` for one reply, as data."""
    if stats is None:
        return {}
    return {
        **stats.as_dict(),
        "finish_reason": stats.finish_reason,
        "kv_restored_tokens": turn.restored_tokens,
        "kv_restore_ms": round(turn.restore_kv * 1000),
    }


def history_entries(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """A session's messages as the page shows them."""
    role = {"human": "user", "ai": "assistant", "system": "system"}
    return [
        {
            "role": role.get(m.type, m.type),
            "content": m.text,
            "interrupted": bool(m.response_metadata.get("interrupted")),
        }
        for m in messages
    ]
