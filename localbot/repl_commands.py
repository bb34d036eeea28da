"""The REPL's slash commands (``/help``, ``/new``, ``/switch``, ``/system``, ``/tokens``, ...) and
the state they act on. Each command is a plain function of a :class:`ReplState` and its argument,
so tests call them directly; ``localbot.repl`` reads the lines and runs them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from langchain_core.messages import HumanMessage

from localbot.chatbot import DEFAULT_SYSTEM_PROMPT, MAX_CHARS_PER_TOKEN, Chatbot
from localbot.errors import ContextOverflowError
from localbot.session_settings import save_settings, session_settings
from localbot.sessions import validate_session_id

__all__ = ["COMMANDS", "HELP", "ReplState", "run_command"]

HELP = """\
Type a message and press Enter. Alt-Enter (or Esc then Enter) adds a new line; a message that
starts with triple quotes \"\"\" continues until a line that ends with \"\"\".
Ctrl-C stops a reply (the partial text is kept); Ctrl-D or /exit quits.

  /help             this help
  /new [NAME]       start a new session (named NAME, or by date)
  /sessions         list sessions
  /switch NAME      switch to session NAME (created if new)
  /history          show this session's messages
  /system [TEXT]    show or set the system prompt (saved with the session)
  /clear            forget this session's messages
  /tokens           how full the context is and what the next trim drops
  /stats            last reply: time to first token, prompt and generation speed
  /exit             quit"""


@dataclass
class ReplState:
    """What the REPL is talking to: the chatbot (rebuilt on /switch and /system), the current
    session, where output goes, and the process's --system/--var defaults for new sessions."""

    bot: Chatbot
    session: str
    out: TextIO = sys.stdout
    markdown: bool = False  # render replies as Markdown (a terminal, without --plain)
    process_system: str | None = None  # --system, applies to sessions without their own
    process_vars: dict[str, str] = field(default_factory=dict)  # --var, likewise

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    @property
    def config(self) -> dict[str, Any]:
        return {"configurable": {"session_id": self.session}}

    def history(self):
        return self.bot.store.get(self.session)


def cmd_help(state: ReplState, arg: str) -> None:
    state.say(HELP)


def cmd_exit(state: ReplState, arg: str) -> bool:
    return True


def _switch(state: ReplState, name: str) -> None:
    """Make ``name`` the current session. Everything that can fail (a bad id, corrupt settings or
    history, a hostile file) is checked first: a refused switch leaves the REPL where it was."""
    store = state.bot.store
    default = DEFAULT_SYSTEM_PROMPT if state.process_system is None else state.process_system
    system, variables = session_settings(
        store, validate_session_id(name), system_default=default, var_defaults=state.process_vars
    )
    count = len(store.get(name).messages)
    status = f"resumed, {count} messages" if store.exists(name) else "new"
    # Not the previous session's settings: each session has its own, over the flags' defaults.
    state.bot = state.bot.with_settings(system, variables)
    state.session = name
    state.bot.prepare(name)  # its next turn gets ready while the user types
    state.say(f"session {name!r} ({status})")


def cmd_new(state: ReplState, arg: str) -> None:
    name = arg.strip() or datetime.now().strftime("chat-%Y%m%d-%H%M%S")
    validate_session_id(name)
    if state.bot.store.exists(name):
        state.say(f"session {name!r} already exists; use /switch {name}")
        return
    _switch(state, name)


def cmd_switch(state: ReplState, arg: str) -> None:
    if not arg.strip():
        state.say("usage: /switch NAME  (see /sessions)")
        return
    _switch(state, arg.strip())


def cmd_sessions(state: ReplState, arg: str) -> None:
    sessions = state.bot.store.list()
    if not any(info.id == state.session for info in sessions):
        state.say(f"* {state.session:<24} {'(new, not saved yet)':>14}")
    for info in sessions:
        mark = "*" if info.id == state.session else " "
        state.say(f"{mark} {info.describe()}")


def cmd_history(state: ReplState, arg: str) -> None:
    messages = state.history().messages
    if not messages:
        state.say("(no messages yet)")
    for m in messages:
        who = {"human": "you", "ai": "bot", "system": "system"}.get(m.type, m.type)
        mark = " [interrupted]" if m.response_metadata.get("interrupted") else ""
        state.say(f"{who}{mark}: {m.text}")


def cmd_system(state: ReplState, arg: str) -> None:
    if not arg.strip():
        state.say(f"system prompt: {state.bot.system_prompt or '(none)'}")
        return
    bot = state.bot.with_settings(arg.strip(), state.bot.variables)
    bot.check_variables(bot.variables)
    # Saved first (it refuses to write over a settings file it cannot read): until then the prompt
    # in use stays the one on disk.
    save_settings(bot.store, state.session, {"system": bot.system_prompt, "vars": bot.variables})
    state.bot = bot
    bot.prepare(state.session)  # the prompt's start changed: read it while the user types
    state.say("system prompt set for this session")


def cmd_clear(state: ReplState, arg: str) -> None:
    state.bot.forget(state.session)
    state.say(f"session {state.session!r} cleared")


def cmd_tokens(state: ReplState, arg: str) -> None:
    bot = state.bot
    history = state.history().messages
    values = bot.variables
    n_ctx, budget = bot.model.context_window, bot.prompt_budget()
    state.say(
        f"context window {n_ctx} tokens = prompt budget {budget} + reply {bot.reply_budget()}"
    )
    if sum(len(m.text) for m in history) > budget * MAX_CHARS_PER_TOKEN:
        state.say(f"this session: {len(history)} messages, far more than the budget holds")
    else:
        now = bot.model.get_num_tokens_from_messages(bot.prompt_messages(values, history))
        state.say(
            f"this session: {len(history)} messages, {now} prompt tokens "
            f"({100 * now / budget:.0f}% of the budget)"
        )
    try:
        plan = bot.plan(values, [*history, HumanMessage("")])
    except ContextOverflowError as err:
        state.say(f"next turn: {err}")
        return
    if plan.dropped:
        state.say(
            f"next turn: the oldest {plan.dropped} messages are left out of the prompt "
            f"({plan.prompt_tokens} tokens kept; the file keeps everything)"
        )
    else:
        state.say("next turn: nothing is trimmed")


def cmd_stats(state: ReplState, arg: str) -> None:
    stats = state.bot.model.last_stats
    if stats is None:
        state.say("no reply yet")
        return
    state.say(
        f"time to first token {stats.time_to_first_token:.2f} s; prompt "
        f"{stats.prompt_tokens} tokens ({stats.cached_tokens} from cache, "
        f"{stats.evaluated_tokens} evaluated at {stats.prompt_tokens_per_second:.0f} tok/s)"
    )
    turn = state.bot.last_turn
    if turn.restored_tokens:
        state.say(
            f"resumed from the saved KV state: {turn.restored_tokens} tokens in "
            f"{turn.restore_kv * 1000:.0f} ms"
        )
    state.say(
        f"reply {stats.output_tokens} tokens at "
        f"{stats.generation_tokens_per_second:.1f} tok/s ({stats.finish_reason})"
    )
    work = state.bot.kv.background if state.bot.kv else None
    if work is not None and work.evaluated:
        seconds = sum(end - start for start, end in work.chunks)
        state.say(
            f"next turn: {work.prefilled} tokens of its prompt ready ({work.evaluated} read in "
            f"the background, {seconds:.2f} s while you typed)"
        )
    state.say(f"chat template: {state.bot.model.template_description()}")


COMMANDS: dict[str, Callable[[ReplState, str], bool | None]] = {
    "/help": cmd_help,
    "/?": cmd_help,
    "/exit": cmd_exit,
    "/quit": cmd_exit,
    "/bye": cmd_exit,
    "/new": cmd_new,
    "/sessions": cmd_sessions,
    "/switch": cmd_switch,
    "/history": cmd_history,
    "/system": cmd_system,
    "/clear": cmd_clear,
    "/tokens": cmd_tokens,
    "/stats": cmd_stats,
}


def run_command(state: ReplState, line: str) -> bool:
    """Run a slash command; True means quit."""
    name, _, arg = line.partition(" ")
    command = COMMANDS.get(name.lower())
    if command is None:
        state.say(f"unknown command {name} (type /help)")
        return False
    return bool(command(state, arg))
