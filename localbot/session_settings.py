"""Per-session settings (system prompt and template variables) in a small sidecar file,
``<id>.settings``, so that resuming a session brings back the prompt it was started with. The
session's own JSON stays exactly in LangChain's FileChatMessageHistory format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localbot.atomic import write_atomic
from localbot.errors import SessionError
from localbot.sessions import SessionStore


def settings_path(store: SessionStore, session_id: str) -> Path:
    return store.path_for(session_id).with_suffix(".settings")


def load_settings(store: SessionStore, session_id: str) -> dict[str, Any]:
    path = settings_path(store, session_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise SessionError(
            f"session settings file {path} is unreadable ({err}); move it aside to start the "
            "session with default settings"
        ) from None
    if not isinstance(data, dict):
        raise SessionError(f"session settings file {path} is not a JSON object; move it aside")
    return data


def save_settings(store: SessionStore, session_id: str, data: dict[str, Any]) -> None:
    path = settings_path(store, session_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"))
