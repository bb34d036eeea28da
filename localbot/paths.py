"""Where localbot keeps its data. ``LOCALBOT_HOME`` moves all of it."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """localbot's data directory: ``$LOCALBOT_HOME`` or the platform's user data dir."""
    override = os.environ.get("LOCALBOT_HOME")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_path

    return user_data_path("localbot", appauthor=False)


def default_sessions_dir() -> Path:
    return data_home() / "sessions"
