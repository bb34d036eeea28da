"""Per-session settings (system prompt and template variables) in a small sidecar file,
``<sessions>/.sidecars/<id>/settings.json``, so that resuming a session brings back the prompt it
was started with. The session's own JSON stays exactly in LangChain's FileChatMessageHistory
format.

The file is ``{"system": TEXT or null, "vars": {NAME: TEXT}}``. Anything else (another type, a
FIFO, a link, JSON nested 100k deep, a file over 16 MiB) is one :class:`SessionError` naming the
file, and the file is never written over: move it aside to start with the default settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localbot.atomic import FileTypeError, read_file, write_atomic
from localbot.errors import SessionError
from localbot.paths import SETTINGS_FILE
from localbot.session_file import repair_surrogates
from localbot.sessions import SessionStore

__all__ = [
    "load_settings",
    "remember_flags",
    "save_settings",
    "session_settings",
    "settings_path",
]

MAX_SETTINGS_BYTES = 16 * 1024**2
_FIX = "move it aside to start the session with default settings"


def settings_path(store: SessionStore, session_id: str) -> Path:
    return store.sidecar_path(session_id, SETTINGS_FILE)


def load_settings(store: SessionStore, session_id: str) -> dict[str, Any]:
    """The saved settings: ``{}``, or a dict with ``"system"`` (str or None) and/or ``"vars"``
    (dict of str to str)."""
    return _load(settings_path(store, session_id))


def session_settings(
    store: SessionStore,
    session_id: str,
    *,
    system_default: str | None,
    var_defaults: dict[str, str],
) -> tuple[str | None, dict[str, str]]:
    """The system prompt and variables a session runs with: its saved ones over the defaults
    (the process's ``--system``, else the built-in prompt, and its ``--var`` values).

    The one rule for the command line and the REPL's ``/switch``. Flags given at start are first
    saved into the starting session (:func:`remember_flags`), so there they win; other sessions
    keep their own settings and take the flags only for what they do not set.
    """
    saved = load_settings(store, session_id)
    system = saved.get("system", system_default)
    return system, {**var_defaults, **saved.get("vars", {})}


def remember_flags(
    store: SessionStore, session_id: str, system: str | None, variables: dict[str, str]
) -> None:
    """Save ``--system`` / ``--var`` given for ``session_id`` with it (variables merged over the
    saved ones), so the session resumes with them."""
    saved = load_settings(store, session_id)
    data = {
        "system": system if system is not None else saved.get("system"),
        "vars": {**saved.get("vars", {}), **variables},
    }
    if data["system"] is None and "system" not in saved:
        del data["system"]
    save_settings(store, session_id, data)


def save_settings(store: SessionStore, session_id: str, data: dict[str, Any]) -> None:
    """Replace the session's settings with ``data`` (checked like a file we read)."""
    path = settings_path(store, session_id)
    text = repair_surrogates(json.dumps(data, ensure_ascii=False, indent=1))
    _check(path, json.loads(text))  # what we write must load back
    with store.locked(session_id):
        _load(path)  # never write over a file we cannot read: it may hold the user's prompt
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, text.encode("utf-8"))


def _load(path: Path) -> dict[str, Any]:
    try:
        data = read_file(path, max_bytes=MAX_SETTINGS_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return {}
    except FileTypeError as err:
        raise _unusable(path, str(err.strerror)) from None
    except OSError as err:
        raise _unusable(path, f"cannot be read ({err.strerror or err})") from None
    try:
        settings = json.loads(data)
    except (ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise _unusable(path, f"is not valid JSON ({reason})") from None
    return _check(path, settings)


def _check(path: Path, settings: object) -> dict[str, Any]:
    if not isinstance(settings, dict):
        raise _unusable(path, f"holds {_json_type(settings)}, not a JSON object")
    system = settings.get("system")
    if system is not None and not isinstance(system, str):
        raise _unusable(path, f'has {_json_type(system)} as "system", not text')
    variables = settings.get("vars", {})
    if not isinstance(variables, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in variables.items()
    ):
        raise _unusable(path, 'has "vars" that are not a {"name": "text"} object')
    return {key: settings[key] for key in ("system", "vars") if key in settings}


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
    return names.get(type(value), "an object" if isinstance(value, dict) else "null")


def _unusable(path: Path, reason: str) -> SessionError:
    return SessionError(f"Session settings file {path} {reason}; {_FIX}.")
