"""A session's sidecar folder, ``<root>/.sidecars/<id>/``: where every file localbot keeps for a
session besides its history lives (``settings.json``, ``kvstate``, ``kvstate.meta``), checked
never to be a link out of the store, and the move of an older layout's files into it.

Sidecars kept by an older localbot as ``<root>/<id>.settings``, ``<id>.kvstate`` and
``<id>.kvstate.meta`` are moved into the folder, one rename each, the first time the session's
sidecars are used (only when ``<id>.json`` exists, so the owner is certain; a file already in the
folder wins and the old one is left where it is). The caller (``SessionStore``) validates the id
and holds the session's lock while anything moves.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

from localbot.atomic import fsync_directory, remove_stale_temps
from localbot.errors import SessionError
from localbot.paths import LEGACY_SIDECARS, SIDECAR_ROOT

__all__ = ["checked_sidecar_dir", "legacy_sidecars", "migrate", "remove_folder", "sidecar_dir"]

log = logging.getLogger("localbot.sessions")


def sidecar_dir(root: Path, session_id: str) -> Path:
    """``<root>/.sidecars/<id>`` (for a valid id), whatever is there."""
    return root / SIDECAR_ROOT / session_id


def checked_sidecar_dir(root: Path, session_id: str) -> Path:
    """:func:`sidecar_dir`, after checking that neither it nor ``.sidecars`` is a link or a file
    (either may be missing: create it when writing)."""
    directory = sidecar_dir(root, session_id)
    for path in (directory.parent, directory):
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            break  # not there (NotADirectoryError: the root is a file; the store says so)
        except OSError as err:
            raise SessionError(f"{path} cannot be used ({err.strerror or err}).") from None
        if not stat.S_ISDIR(mode):
            msg = (
                f"{path} is not a directory (a link or a file); localbot keeps session files "
                "there and never follows links out of the store: move it aside."
            )
            raise SessionError(msg)
    return directory


def legacy_sidecars(root: Path, session_id: str) -> list[tuple[Path, str]]:
    """An older layout's sidecars of this session: (path, name in the sidecar folder)."""
    found = []
    for suffix, name in LEGACY_SIDECARS.items():
        path = root / f"{session_id}{suffix}"
        if os.path.lexists(path):
            found.append((path, name))
    return found


def migrate(root: Path, session_id: str) -> None:
    """Move ``<id>.settings`` & co. into the sidecar folder (the session's lock held)."""
    legacy = legacy_sidecars(root, session_id)
    if not legacy or not os.path.lexists(root / f"{session_id}.json"):
        return
    target = checked_sidecar_dir(root, session_id)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, name in legacy:
        if os.path.lexists(target / name):
            log.warning("not moving %s: %s already exists", path, target / name)
            continue
        os.rename(path, target / name)
    for suffix in LEGACY_SIDECARS:
        remove_stale_temps(root, f"{session_id}{suffix}")
    fsync_directory(target)
    fsync_directory(target.parent)
    fsync_directory(root)


def remove_folder(path: Path) -> None:
    """Remove a sidecar folder with everything in it (``rmtree`` never follows links inside a
    real folder; the caller checked that the folder and its parent are not links)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
