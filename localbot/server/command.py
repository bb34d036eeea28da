"""``python -m localbot serve``: the OpenAI-compatible API and the browser chat, over the same
sessions as the terminal chat.

Same settings as the chat (``--model``, ``--ctx``, ``LOCALBOT_*`` ...) plus ``--host``, ``--port``,
``--api-key`` and ``--cors-origin``. It takes the port, loads the model, prints the URL to open,
and serves until Ctrl-C or SIGTERM: then running replies stop (saved and marked interrupted, as in
the REPL), the KV-state saves finish, and it exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from localbot import settings as settings_mod
from localbot.cli import OneLineParser, fail, make_chatbot, setup_logging
from localbot.errors import ConfigError, LocalbotError, MissingVariableError, Terminated
from localbot.server.security import is_loopback
from localbot.server.turns import Defaults


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m localbot serve",
        description="Serve the model: an OpenAI-compatible API under /v1 and a chat page at /, "
        "on the same sessions as the terminal chat. Loopback only unless --api-key is given. "
        "--system and --var are the defaults of sessions that have no settings of their own "
        "(and, as in the chat, are saved with the --session one, which the page opens first).",
        epilog="exit codes: 0 stopped (Ctrl-C, SIGTERM); 1 the server extra is not installed; "
        "2 bad settings, --host without --api-key, or the port is taken; 3 model problem; "
        "5 session problem; 6 manifest problem",
    )
    settings_mod.add_arguments(parser, settings_mod.SERVE)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings_mod.refuse_other_commands_flags(args, settings_mod.SERVE)
        return serve(settings_mod.resolve(args))
    except MissingVariableError as err:
        return fail(err.for_command_line(), err.exit_code)
    except LocalbotError as err:
        return fail(str(err), err.exit_code)
    except KeyboardInterrupt:  # Ctrl-C while loading: nothing was served yet
        print("\nlocalbot: stopped", file=sys.stderr)
        return 0


def serve(config: dict[str, Any]) -> int:
    setup_logging(config["verbose"])
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise LocalbotError(
            f"`serve` needs {' and '.join(missing)}: install the server extra, "
            'pip install -e ".[server]"'
        )
    host = config["host"]
    if not is_loopback(host) and not config["api_key"]:
        raise ConfigError(
            f"refusing to serve on {host} without --api-key: anyone who can reach this machine "
            "could use the model and read every session; pass --api-key KEY (or set "
            "LOCALBOT_API_KEY), or serve on 127.0.0.1"
        )
    listener = _listen(host, config["port"])  # before the slow part: a taken port fails fast
    try:
        bot = make_chatbot(config)
        sys.stderr.write(f"localbot: loading {bot.model.model_name} ...\n")
        bot.model.load()
        bot.model.template_description()  # resolve the template now: its warning, if any, first
        bot.check_fits()
    except BaseException:
        listener.close()
        raise
    defaults = Defaults(config["system"], dict(config["var"]), config["session"])
    return _run(bot, listener, config, defaults)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before printing the URL, so the URL is right (``--port 0`` picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=128)
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port"
        ) from None


def _run(bot, listener: socket.socket, config: dict[str, Any], defaults: Defaults) -> int:
    import uvicorn

    from localbot.server.app import create_app

    app = create_app(
        bot,
        bind_host=config["host"],
        api_key=config["api_key"],
        cors_origins=config["cors_origin"],
        defaults=defaults,
    )
    engine = app.engine  # type: ignore[attr-defined]

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.abandon_all()  # running replies end now, so their connections close quickly
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            log_level="info" if config["verbose"] else "warning",
            access_log=config["verbose"],
            ws="none",
            lifespan="on",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
    )
    host, port = listener.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"localbot: serving {bot.model.model_name} at {url}", flush=True)
    print(f"localbot: open {url} in a browser; OpenAI API at {url}v1; Ctrl-C stops", flush=True)
    # uvicorn re-raises the signal it caught once it has shut down: make SIGTERM, like Ctrl-C,
    # an exception here rather than the default instant death, so this function ends normally.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        bot.wait_for_saves()
    print("localbot: stopped", file=sys.stderr, flush=True)
    return 0


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated(signum)
