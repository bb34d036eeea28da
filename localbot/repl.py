"""The interactive chat: prompt_toolkit line editing and history, streamed replies, slash
commands. ``run_repl`` is a plain function over a Chatbot, so tests can drive it directly or
through a pseudo-terminal."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from langchain_core.messages import HumanMessage

from localbot.chatbot import DEFAULT_SYSTEM_PROMPT, Chatbot
from localbot.errors import ContextOverflowError, LocalbotError, MissingVariableError, Terminated
from localbot.reply_view import make_view
from localbot.sessions import validate_session_id

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
    bot: Chatbot
    session: str
    out: TextIO = sys.stdout
    markdown: bool = False  # render replies as Markdown (a terminal, without --plain)
    process_system: str | None = None  # --system, applies to sessions without their own
    process_vars: dict[str, str] = field(default_factory=dict)  # --var, likewise
    commands: dict[str, Callable[[ReplState, str], bool | None]] = field(default_factory=dict)

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    @property
    def config(self) -> dict[str, Any]:
        return {"configurable": {"session_id": self.session}}

    def history(self):
        return self.bot.store.get(self.session)


# ---------------------------------------------------------------------------- commands
def cmd_help(state: ReplState, arg: str) -> None:
    state.say(HELP)


def cmd_exit(state: ReplState, arg: str) -> bool:
    return True


def _switch(state: ReplState, name: str) -> None:
    """Make ``name`` the current session. Everything that can fail (a bad id, corrupt settings or
    history, a hostile file) is checked first: a refused switch leaves the REPL where it was."""
    from localbot.session_settings import session_settings

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
    from localbot.session_settings import save_settings

    if not arg.strip():
        state.say(f"system prompt: {state.bot.system_prompt or '(none)'}")
        return
    bot = state.bot.with_settings(arg.strip(), state.bot.variables)
    bot.check_variables(bot.variables)
    # Saved first (it refuses to write over a settings file it cannot read): until then the prompt
    # in use stays the one on disk.
    save_settings(bot.store, state.session, {"system": bot.system_prompt, "vars": bot.variables})
    state.bot = bot
    state.say("system prompt set for this session")


def cmd_clear(state: ReplState, arg: str) -> None:
    state.bot.forget(state.session)
    state.say(f"session {state.session!r} cleared")


def cmd_tokens(state: ReplState, arg: str) -> None:
    bot = state.bot
    history = state.history().messages
    values = bot.variables
    n_ctx, budget = bot.model.context_window, bot.prompt_budget()
    now = bot.model.get_num_tokens_from_messages(bot.prompt_messages(values, history))
    state.say(
        f"context window {n_ctx} tokens = prompt budget {budget} + reply {bot.reply_budget()}"
    )
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


# ---------------------------------------------------------------------------- chatting
def chat_turn(state: ReplState, text: str) -> None:
    """Stream one reply; Ctrl-C stops it and the partial reply stays in the session."""
    stream = state.bot.stream({"messages": [HumanMessage(text)]}, state.config)
    view = make_view(state.out, state.markdown)
    interrupted = False
    try:
        with _typing_hidden():
            for chunk in stream:
                if chunk.text:
                    view.write(chunk.text)
    except KeyboardInterrupt as err:
        interrupted = True
        if isinstance(err, Terminated):
            raise
    finally:
        stream.close()  # stops generation now (the partial reply is saved)
        view.finish(" [interrupted]" if interrupted else "")
    stats = state.bot.model.last_stats
    if interrupted and stats is not None:
        # Ctrl-C that lands between two tokens closes the stream from outside: the model saw an
        # abandoned stream, the user pressed Ctrl-C. /stats says what the user did.
        stats.finish_reason = "interrupted"


@contextlib.contextmanager
def _typing_hidden() -> Iterator[None]:
    """While a reply streams, keys typed are not echoed into it; they stay queued (no line
    editing yet) and appear at the next prompt. Ctrl-C still interrupts."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def handle_line(state: ReplState, line: str) -> bool:
    """One input from the user; True means quit."""
    text = line.strip()
    if not text:
        return False
    if not _is_valid_text(text):
        # prompt_toolkit hands over bytes that are not UTF-8 as lone surrogates.
        state.say(
            "error: that line is not valid UTF-8 (check the terminal's encoding); nothing was sent"
        )
        return False
    try:
        if text.startswith("/"):
            return run_command(state, text)
        chat_turn(state, line.strip("\n"))
    except MissingVariableError as err:
        state.say(f"error: {err.for_command_line()}")
    except LocalbotError as err:
        state.say(f"error: {err}")
    return False


def _is_valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _prompt_session():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    from localbot.paths import input_history_path

    bindings = KeyBindings()

    @bindings.add("enter")
    def _(event) -> None:
        buffer = event.current_buffer
        text = buffer.text
        if text.lstrip().startswith('"""') and not (
            len(text.strip()) > 3 and text.rstrip().endswith('"""')
        ):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _(event) -> None:
        event.current_buffer.insert_text("\n")

    class SafeFileHistory(FileHistory):
        """Input history that survives a line with bytes that are not UTF-8 (prompt_toolkit
        passes them on as lone surrogates, which ``FileHistory`` cannot write)."""

        def store_string(self, string: str) -> None:
            fixed = string.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            super().store_string(fixed)

    history_path = input_history_path()  # refuses a FIFO, which would hang the open
    history_path.parent.mkdir(parents=True, exist_ok=True)
    return PromptSession(
        history=SafeFileHistory(str(history_path)),
        key_bindings=bindings,
        multiline=True,
        prompt_continuation="... ",
    )


def _unquote(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith('"""') and stripped.endswith('"""') and len(stripped) >= 6:
        return stripped[3:-3].strip("\n")
    return text


def run_repl(bot: Chatbot, config: dict[str, Any]) -> int:
    state = ReplState(
        bot=bot,
        session=config["session"],
        markdown=not config["plain"],
        process_system=config["system"],
        process_vars=dict(config["var"]),
    )
    model = bot.model
    sys.stderr.write(f"loading {model.model_name} ...\r")
    sys.stderr.flush()
    start = time.perf_counter()
    model.load()
    template = model.template_description()  # resolved now: a "no chat template" warning first
    bot.check_fits()
    where = "GPU" if model.gpu_layers != 0 else "CPU"
    sys.stderr.write(" " * 60 + "\r")
    count = len(state.history().messages)
    status = f"resumed, {count} messages" if count else "new"
    state.say(
        f"localbot · {model.model_name} ({model.context_window} ctx, {where}, loaded in "
        f"{time.perf_counter() - start:.1f} s) · session {state.session!r} ({status})"
    )
    state.say(f"chat template: {template}")
    state.say("Type /help for commands, Ctrl-D to quit.")
    prompt = _prompt_session()
    try:
        while True:
            try:
                line = prompt.prompt(">>> ")
            except Terminated:
                raise
            except KeyboardInterrupt:
                state.say("(Ctrl-C at the prompt does not quit: use /exit or Ctrl-D)")
                continue
            except EOFError:
                break
            if handle_line(state, _unquote(line)):
                break
    finally:
        bot.wait_for_saves()
    return 0
