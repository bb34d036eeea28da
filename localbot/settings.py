"""Every command-line setting, declared once: its flag, its ``LOCALBOT_*`` environment variable,
its default and its help all come from the table below (the shape of llama-cpp-python's
``server/settings.py``). Precedence: flag, then environment, then default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localbot.errors import ConfigError


def gpu_layers(value: str) -> int | None:
    """``auto`` (all layers when the build can offload, else none) or a layer count."""
    if value.strip().lower() == "auto":
        return None
    number = int(value)
    if number < -1:
        raise ValueError(value)
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
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
    ),
    Setting(
        "json",
        "with -p or piped input: print the reply and its usage as JSON",
        flag_only=True,
        env=False,
    ),
    Setting(
        "ctx",
        "context window in tokens (default: the model's, capped at 8192)",
        type=positive_int,
        metavar="N",
    ),
    Setting("max_tokens", "longest reply in tokens", type=positive_int, default=512, metavar="N"),
    Setting(
        "temperature",
        "sampling temperature; 0 = greedy and deterministic",
        type=float,
        default=0.8,
        metavar="T",
    ),
    Setting("seed", "random seed for sampling", type=int, metavar="N"),
    Setting(
        "gpu_layers",
        "layers to offload to the GPU: auto (all when this llama.cpp build "
        "can, else 0) or a number (-1 = all)",
        type=gpu_layers,
        default=None,
        metavar="N|auto",
    ),
    Setting("threads", "CPU threads (default: llama.cpp's choice)", type=positive_int, metavar="N"),
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
        default=0.6,
        metavar="F",
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
    Setting("verbose", "show llama.cpp's log and debug messages", flag_only=True, short="-v"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for s in SETTINGS:
        names = [s.short, s.flag] if s.short else [s.flag]
        help_text = s.help + (f" [env {s.env_var}]" if s.env else "")
        if s.flag_only:
            parser.add_argument(
                *names, dest=s.name, action="store_true", default=None, help=help_text
            )
        elif s.repeat:
            parser.add_argument(
                *names, dest=s.name, action="append", type=s.type, metavar=s.metavar, help=help_text
            )
        else:
            if s.default is not None:
                help_text += f" (default: {s.default})"
            parser.add_argument(*names, dest=s.name, type=s.type, metavar=s.metavar, help=help_text)


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
    except ValueError:
        raise ConfigError(f"{s.env_var}={raw!r} is not a valid value ({s.help})") from None


def names(settings: Sequence[Setting] = SETTINGS) -> list[str]:
    return [s.name for s in settings]
