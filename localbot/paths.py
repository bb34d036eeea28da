"""Where localbot keeps its data, and how a session store lays out its files.

``LOCALBOT_HOME`` moves all of it. A sessions directory holds, for a session id ``<id>``:

* ``<id>.json``: the history, in LangChain's ``FileChatMessageHistory`` format and place.
* ``.<id>.lock``: the lock writers of that session hold.
* ``.sidecars/<id>/``: every other file localbot keeps for the session (``settings.json``,
  ``kvstate``, ``kvstate.meta``).

Ids never start with ``.``, so no hidden name can be an id's file, and a sidecar lives in a folder
named exactly after its id: no id's files can match another id's pattern, whatever dots the ids
contain (the older ``<id>.settings`` / ``<id>.kvstate`` names could: ``a.notes.settings`` read as
a sidecar of ``a``). :data:`LEGACY_SIDECARS` lists those older names for the store's migration.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from localbot.errors import ConfigError, LocalbotError

SIDECAR_ROOT = ".sidecars"
SETTINGS_FILE = "settings.json"
KV_STATE_FILE = "kvstate"
KV_META_SUFFIX = ".meta"
KV_META_FILE = KV_STATE_FILE + KV_META_SUFFIX

LEGACY_SIDECARS: dict[str, str] = {
    ".settings": SETTINGS_FILE,
    ".kvstate": KV_STATE_FILE,
    ".kvstate.meta": KV_META_FILE,
}
"""Older layout: ``<root>/<id><suffix>`` -> ``<root>/.sidecars/<id>/<name>``."""


def user_path(text: str | os.PathLike[str], what: str) -> Path:
    """``text`` as a path, with ``~`` and ``~user`` expanded.

    A ``~user`` that names no user is an error rather than a literal ``~nouser`` folder created
    in the current directory.
    """
    raw = os.fspath(text)
    expanded = os.path.expanduser(raw)
    if expanded.startswith("~"):
        head = expanded.split(os.sep, 1)[0]
        msg = f"{what} {raw!r} starts with {head!r}, but there is no such user; give a full path"
        raise ConfigError(msg)
    return Path(expanded)


def data_home() -> Path:
    """localbot's data directory: ``$LOCALBOT_HOME`` or the platform's user data dir."""
    override = os.environ.get("LOCALBOT_HOME")
    if override:
        return user_path(override, "LOCALBOT_HOME")
    from platformdirs import user_data_path

    return user_data_path("localbot", appauthor=False)


def default_sessions_dir() -> Path:
    return data_home() / "sessions"


def input_history_path() -> Path:
    """``$LOCALBOT_HOME/input_history`` (the REPL's up-arrow history), checked to be a regular
    file (a link to one is fine) or absent: prompt_toolkit opens it with a blocking ``open``,
    which hangs on a FIFO."""
    path = data_home() / "input_history"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as err:
        raise LocalbotError(f"input history {path} cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        msg = f"input history {path} is not a regular file (a FIFO, device or directory); remove it"
        raise LocalbotError(msg)
    return path
