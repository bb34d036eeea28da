"""Every command-line setting, declared once: its flag, its ``LOCALBOT_*`` environment variable,
its default and its help all come from the table below (the shape of llama-cpp-python's
``server/settings.py``). Precedence: flag, then environment, then default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localbot.errors import ConfigError
from localbot.trimming import DEFAULT_WATERMARK


def gpu_layers(value: str) -> int | None:
    """``auto`` (all layers when the build can offload, else none) or a layer count."""
    if value.strip().lower() == "auto":
        return None
    number = int(value)
    if number < -1:
        raise ValueError(value)
    return number


DEFAULT_TEMPERATURE = 0.8
DEFAULT_MAX_TOKENS = 512
MAX_CTX = 1 << 24
"""No model has a trained context near this; larger values only wrap around inside llama.cpp."""
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))
"""Far past any speed-up; llama.cpp crashes on absurd thread counts."""


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An int parser accepting ``low..high``; the error names the range."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(value) from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{value!r} is out of range ({low}..{high})")
        return number

    parse.__name__ = "int"
    return parse


def temperature(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 100:  # also refuses nan and inf
        raise ValueError(value)
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise ValueError(value)
    return number


def variable(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not name.strip().isidentifier():
        raise ValueError(value)
    return name.strip(), text


CHAT, SERVE = "chat", "serve"
_COMMAND_NAMES = {CHAT: "the terminal chat", SERVE: "`python -m localbot serve`"}


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    metavar: str | None = None
    short: str | None = None
    env: bool = True
    flag_only: bool = False  # a store_true flag
    repeat: bool = False  # may be given several times (env: separated by ";")
    only: str | None = None  # the one command that uses it: CHAT or SERVE (None: both)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return "LOCALBOT_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "model",
        "GGUF file, or a name from models/manifest.json (default: the manifest's "
        "only/default model, else the bundled Gemma 3 270M test model)",
        metavar="PATH|NAME",
        short="-m",
    ),
    Setting(
        "session",
        "conversation to open or create; the same name later resumes it",
        default="default",
        metavar="NAME",
        short="-s",
    ),
    Setting(
        "system",
        "system prompt; may use {variables} filled by --var (default: the "
        "session's saved one, else 'You are a helpful assistant.')",
        metavar="TEXT",
    ),
    Setting(
        "var",
        "template variable for the system prompt, e.g. --var language=Spanish "
        "(repeatable; env: NAME=VALUE;NAME=VALUE)",
        type=variable,
        metavar="NAME=VALUE",
        repeat=True,
    ),
    Setting(
        "prompt",
        "ask one question, print the reply and exit (stdin, if piped, is appended)",
        metavar="TEXT",
        short="-p",
        env=False,
        only=CHAT,
    ),
    Setting(
        "json",
        "with -p or piped input: print the reply and its usage as JSON",
        flag_only=True,
        env=False,
        only=CHAT,
    ),
    Setting(
        "ctx",
        "context window in tokens, rounded up to a multiple of 256 (default: the model's "
        "trained context, capped at 8192; at most the trained context)",
        type=bounded_int(1, MAX_CTX),
        metavar="N",
    ),
    Setting(
        "max_tokens",
        f"longest reply in tokens (default: {DEFAULT_MAX_TOKENS}; 256 for the bundled SmolLM2)",
        type=bounded_int(1, MAX_CTX),
        metavar="N",
    ),
    Setting(
        "temperature",
        f"sampling temperature; 0 = greedy and deterministic (default: {DEFAULT_TEMPERATURE}; "
        "0.2 for the bundled SmolLM2)",
        type=temperature,
        metavar="T",
    ),
    Setting("seed", "random seed for sampling", type=bounded_int(0, 2**32 - 1), metavar="N"),
    Setting(
        "gpu_layers",
        "layers to offload to the GPU: auto (all when this llama.cpp build "
        "can, else 0) or a number (-1 = all)",
        type=gpu_layers,
        default=None,
        metavar="N|auto",
    ),
    Setting(
        "threads",
        f"CPU threads (default: llama.cpp's choice; at most {MAX_THREADS})",
        type=bounded_int(1, MAX_THREADS),
        metavar="N",
    ),
    Setting(
        "chat_format",
        "override the chat template: gemma, llama3, chatml, mistral, phi3",
        metavar="NAME",
    ),
    Setting(
        "sessions_dir",
        "where session files live (default: $LOCALBOT_HOME/sessions or the user data directory)",
        metavar="DIR",
    ),
    Setting(
        "trim_watermark",
        "after trimming, the history fills about this fraction of the "
        "context, so the cached prompt prefix survives many turns",
        type=fraction,
        default=DEFAULT_WATERMARK,
        metavar="F",
    ),
    Setting(
        "context_shift",
        "when old turns are dropped, shift the cached rest of the conversation instead of "
        "re-reading it: instant on slow machines but APPROXIMATE (replies may differ from an "
        "exact re-read); refused for models whose cache cannot shift",
        flag_only=True,
    ),
    Setting(
        "no_kv_cache",
        "do not save/restore llama.cpp's KV cache next to the session",
        flag_only=True,
    ),
    Setting(
        "verify_model",
        "check the model's sha256 against models/manifest.json at start",
        flag_only=True,
    ),
    Setting(
        "plain",
        "print replies as plain text, not rendered Markdown (piped output always is plain)",
        flag_only=True,
        only=CHAT,
    ),
    Setting("verbose", "show llama.cpp's log and debug messages", flag_only=True, short="-v"),
    Setting(
        "host",
        "address to listen on; anything but loopback needs --api-key",
        default="127.0.0.1",
        metavar="ADDR",
        only=SERVE,
    ),
    Setting(
        "port",
        "port to listen on; 0 picks a free one",
        type=bounded_int(0, 65535),
        default=8080,
        metavar="N",
        only=SERVE,
    ),
    Setting(
        "api_key",
        "require 'Authorization: Bearer KEY' on every API route (prefer the "
        "environment variable: a flag shows in `ps`)",
        metavar="KEY",
        only=SERVE,
    ),
    Setting(
        "cors_origin",
        "let pages from this origin call the API, e.g. http://localhost:3000 "
        "(repeatable; env: separated by ';')",
        repeat=True,
        metavar="ORIGIN",
        only=SERVE,
    ),
)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Every setting, as flags of ``command`` (CHAT or SERVE). The other command's own flags
    are accepted but not shown, so that :func:`refuse_other_commands_flags` can say where they
    belong instead of argparse's bare "unrecognized arguments"."""
    for s in SETTINGS:
        names = [s.short, s.flag] if s.short else [s.flag]
        help_text = s.help + (f" [env {s.env_var}]" if s.env else "")
        if s.default is not None and not s.flag_only and not s.repeat:
            help_text += f" (default: {s.default})"
        if s.only not in (None, command):
            help_text = argparse.SUPPRESS
        if s.flag_only:
            parser.add_argument(
                *names, dest=s.name, action="store_true", default=None, help=help_text
            )
        elif s.repeat:
            parser.add_argument(
                *names, dest=s.name, action="append", type=s.type, metavar=s.metavar, help=help_text
            )
        else:
            parser.add_argument(*names, dest=s.name, type=s.type, metavar=s.metavar, help=help_text)


def refuse_other_commands_flags(args: argparse.Namespace, command: str) -> None:
    """A flag of the other command, given on this one's command line, is an error (it would do
    nothing). Its environment variable is not: one environment serves both commands."""
    for s in SETTINGS:
        if s.only not in (None, command) and getattr(args, s.name, None) is not None:
            raise ConfigError(
                f"{s.flag} is for {_COMMAND_NAMES[s.only]}; {_COMMAND_NAMES[command]} does not "
                "use it"
            )


def resolve(args: argparse.Namespace, environ: os._Environ | dict | None = None) -> dict:
    """Flag, else ``LOCALBOT_*`` variable, else default, for every setting."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        value = getattr(args, s.name, None)
        if value is None and s.env and environ.get(s.env_var, "") != "":
            value = _from_env(s, environ[s.env_var])
        if value is None:
            value = [] if s.repeat else (False if s.flag_only else s.default)
        values[s.name] = value
    return values


def _from_env(s: Setting, raw: str) -> Any:
    try:
        if s.flag_only:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if s.repeat:
            return [s.type(part) for part in raw.split(";") if part.strip()]
        return s.type(raw)
    except (ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"{s.env_var}={raw!r} is not a valid value ({s.help})") from None
