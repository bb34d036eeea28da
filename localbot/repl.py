"""The interactive chat: prompt_toolkit line editing and history, streamed replies; the slash
commands are ``localbot.repl_commands``. ``run_repl`` is a plain function over a Chatbot, so tests
can drive it directly or through a pseudo-terminal."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from langchain_core.messages import HumanMessage

from localbot.chatbot import Chatbot
from localbot.errors import LocalbotError, MissingVariableError, Terminated
from localbot.paths import input_history_path
from localbot.repl_commands import ReplState, run_command
from localbot.reply_view import make_view

# ReplState: what handle_line and chat_turn act on (built by run_repl; tests build their own).
__all__ = ["ReplState", "chat_turn", "handle_line", "run_repl"]


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
    bot.prepare(state.session)  # a resumed session gets ready while the user types
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
