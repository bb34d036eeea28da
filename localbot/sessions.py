"""The session store: one JSON file of chat history per session, safe against crashes and races.

Layout (see ``localbot.paths``): ``<root>/<id>.json`` is the history, in LangChain's
``FileChatMessageHistory`` format (``localbot.session_file``); ``<root>/.<id>.lock`` is its lock;
every other file localbot keeps for the session lives in ``<root>/.sidecars/<id>/``
(``localbot.session_sidecars``, which also moves an older layout's files there). Ids never start
with ``.``, so listing, renaming and deleting are exact for any valid id: ``a``'s files are never
``a.notes``'s. One session's messages, as LangChain sees them, are ``localbot.session_history``.

Durability, because ``FileChatMessageHistory`` tears files on kill -9 and loses messages when two
processes append (see the field notes):

* Every write replaces the whole file atomically (:func:`localbot.atomic.write_atomic`: temp file
  ``.<id>.json.tmp-<random>`` in the same directory, fsync, ``os.replace``, fsync the directory).
  A reader sees the old history or the new one, never half of one, so reads take no lock.
* A read-modify-write (append, replace, clear) holds an exclusive ``flock`` on
  ``<root>/.<id>.lock`` from the read to the rename, so concurrent appenders queue instead of
  overwriting each other. One ``add_messages`` call is one write: a turn's messages land together.
* A file we cannot parse is never written over: every write first re-reads and validates what is
  there and raises :class:`SessionError` if it is corrupt or foreign, leaving the bytes as they are.
* Temp files left by a killed writer are hidden names that reads and listings skip; ones older
  than a minute are removed when that session is written (looked for at most once a minute),
  and all of them on delete.
* A file-system failure (read-only, full, a lock that is a directory or a link loop, a sessions
  directory that is a dangling link) is a one-line :class:`SessionError`; files stay as they were.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from localbot.atomic import (
    STALE_TEMP_AGE_S,
    FileTypeError,
    exclusive_lock,
    fsync_directory,
    remove_stale_temps,
    write_atomic,
)
from localbot.errors import SessionError
from localbot.paths import KV_STATE_FILE, default_sessions_dir, user_path
from localbot.session_file import encode_appended, encode_exactly, read_session, unusable
from localbot.session_history import SessionHistory
from localbot.session_sidecars import (
    checked_sidecar_dir,
    legacy_sidecars,
    migrate,
    remove_folder,
    sidecar_dir,
)

# SessionHistory: what ``SessionStore.get`` returns, importable from here as before.
__all__ = ["SessionHistory", "SessionInfo", "SessionStore", "validate_session_id"]

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is safe as a file name, else raise :class:`SessionError`.

    A whitelist rather than a blacklist: ids come from the command line and must never reach
    outside the store (``../x``, ``/etc/passwd``, ``a/b``, NUL all fail the pattern).
    """
    if not isinstance(session_id, str):
        msg = f"Session id must be a string, not {type(session_id).__name__}."
        raise SessionError(msg)
    if not _is_valid_id(session_id):
        shown = repr(session_id) if len(session_id) <= 40 else repr(session_id[:40]) + "..."
        msg = (
            f"Session id {shown} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'."
        )
        raise SessionError(msg)
    return session_id


def _is_valid_id(session_id: str) -> bool:
    return bool(_ID_PATTERN.fullmatch(session_id)) and ".." not in session_id


@dataclass(frozen=True)
class SessionInfo:
    """One row of :meth:`SessionStore.list`. ``message_count`` is None when the file is unusable,
    and ``problem`` then says why, so one bad file does not hide the others."""

    id: str
    message_count: int | None
    updated: datetime
    """Last modification time of the file, timezone-aware (UTC)."""
    path: Path
    problem: str | None = None

    @property
    def corrupt(self) -> bool:
        return self.message_count is None

    def describe(self) -> str:
        """One line for a listing: name, message count, last change (local time)."""
        count = "corrupt" if self.corrupt else f"{self.message_count} messages"
        when = self.updated.astimezone().strftime("%Y-%m-%d %H:%M")
        return f"{self.id:<24} {count:>14}  {when}"


class SessionStore:
    """A directory of session files. Cheap to create; touches the disk only when used."""

    def __init__(self, root: Path | str | None = None) -> None:
        if root is None:
            self.root = default_sessions_dir()
        else:
            self.root = user_path(root, "sessions directory")
        self._temps_checked: dict[str, float] = {}  # file name -> when its temps were checked

    def get(self, session_id: str) -> SessionHistory:
        """The history for ``session_id``; fits ``RunnableWithMessageHistory(chain, store.get)``."""
        return SessionHistory(self, session_id)

    def path_for(self, session_id: str) -> Path:
        """The file for ``session_id``, refusing bad ids and links that lead out of the store."""
        path = self.root / f"{validate_session_id(session_id)}.json"
        with contextlib.suppress(OSError):
            # The common case, checked in one system call: no link, so inside the store (an id
            # has no "/"). Resolving every component costs ~0.1 ms per access.
            if not stat.S_ISLNK(os.lstat(path).st_mode):
                return path
        root = _resolve(self.root)
        if not _resolve(path).is_relative_to(root):
            msg = f"Session file {path} is a link that leads outside {root}; remove the link."
            raise SessionError(msg)
        return path

    def exists(self, session_id: str) -> bool:
        return self.path_for(session_id).exists()

    def list(self) -> list[SessionInfo]:
        """Every session, newest first. Unreadable files are listed with ``corrupt`` set."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            if os.path.islink(self.root):
                self._make_root()  # explains the dangling link
            return []
        except NotADirectoryError:
            raise SessionError(f"Sessions directory {self.root} is not a directory.") from None
        except OSError as err:
            msg = f"Sessions directory {self.root} cannot be listed ({_reason(err)})."
            raise SessionError(msg) from None
        ids = [name[:-5] for name in names if name.endswith(".json") and _is_valid_id(name[:-5])]
        infos = [info for sid in ids if (info := self._info(sid))]
        return sorted(infos, key=lambda info: (-info.updated.timestamp(), info.id))

    # -- sidecars ---------------------------------------------------------------------------------

    def sidecar_dir(self, session_id: str) -> Path:
        """``<root>/.sidecars/<id>``, the folder for every other file kept for this session (it may
        not exist yet: create it when writing). Moves an older layout's files into it first.

        Raises :class:`SessionError` when the folder (or ``.sidecars``) is a link or not a
        directory: sidecars never lead out of the store.
        """
        sid = validate_session_id(session_id)
        if legacy_sidecars(self.root, sid) and os.path.lexists(self.root / f"{sid}.json"):
            with self.locked(sid):
                migrate(self.root, sid)
        return self._checked_sidecar_dir(sid)

    def sidecar_path(self, session_id: str, name: str) -> Path:
        """A file in :meth:`sidecar_dir` (``settings.json``, ``kvstate``, ...)."""
        return self.sidecar_dir(session_id) / name

    def kv_state_path(self, session_id: str) -> Path:
        """Where ``localbot.kv_state`` saves this session's llama.cpp state."""
        return self.sidecar_path(session_id, KV_STATE_FILE)

    def sidecar_paths(self, session_id: str) -> list[Path]:
        """The files in :meth:`sidecar_dir`, sorted (empty when it does not exist)."""
        directory = self.sidecar_dir(session_id)
        try:
            return sorted(directory / name for name in os.listdir(directory))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise SessionError(f"{directory} cannot be listed ({err.strerror or err}).") from None

    # -- rename and delete ------------------------------------------------------------------------

    def rename(self, old: str, new: str) -> None:
        """Give a session a new id, with its sidecars; refuses to overwrite anything."""
        if validate_session_id(old) == validate_session_id(new):
            msg = f"Session {old!r} already has that name."
            raise SessionError(msg)
        # Checked before locking too, so that a refused rename leaves not even a lock file.
        self._check_rename(old, new)
        with self.locked(old, new):
            src, dst = self.path_for(old), self.path_for(new)
            migrate(self.root, old)
            migrate(self.root, new)
            self._check_rename(old, new)
            src_side, dst_side = self._sidecar_dir(old), self._sidecar_dir(new)
            os.rename(src, dst)  # the history first: it is what the user cares about
            if os.path.lexists(src_side):
                os.rename(src_side, dst_side)  # one rename moves every sidecar
                fsync_directory(src_side.parent)
            self._lock_path(old).unlink(missing_ok=True)
            fsync_directory(self.root)

    def delete(self, session_id: str) -> None:
        """Remove a session's file and its sidecars. Works on corrupt files too: it never reads."""
        if not os.path.lexists(self._checked_sidecar_dir(session_id)):  # as in rename
            self._require(session_id, self.path_for(session_id))
        with self.locked(session_id):
            path = self.path_for(session_id)
            migrate(self.root, session_id)
            sidecars = self._checked_sidecar_dir(session_id)
            if not os.path.lexists(sidecars):
                self._require(session_id, path)
            path.unlink(missing_ok=True)
            remove_folder(sidecars)
            # Our writers make temp files only while holding this lock, so any left are dead.
            remove_stale_temps(self.root, path.name, max_age_s=0)
            self._lock_path(session_id).unlink(missing_ok=True)
            fsync_directory(self.root)

    def _check_rename(self, old: str, new: str) -> None:
        self._require(old, self.path_for(old))
        self._checked_sidecar_dir(old)
        legacy = [path for path, _ in legacy_sidecars(self.root, new)]
        for path in (self.path_for(new), self._checked_sidecar_dir(new), *legacy):
            if os.path.lexists(path):
                msg = f"Session {new!r} already exists ({path}); pick another name."
                raise SessionError(msg)

    # -- locking ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, *session_ids: str) -> Iterator[None]:
        """Hold the locks of these sessions (in sorted order, so two callers cannot deadlock)
        while changing their files. Creates the store's directory. Any ``OSError`` raised inside
        becomes a one-line :class:`SessionError`. Not reentrant: never nest it for one session.
        """
        lock_paths = sorted({self._lock_path(sid) for sid in session_ids})  # validates first
        self._make_root()
        try:
            with contextlib.ExitStack() as stack:
                for lock_path in lock_paths:
                    try:
                        stack.enter_context(exclusive_lock(lock_path))
                    except OSError as err:
                        if not _is_bad_lock(err):
                            raise  # read-only, full, no permission: said below
                        msg = (
                            f"Cannot lock the session with {lock_path} ({_reason(err)}); "
                            "remove it if no localbot is running."
                        )
                        raise SessionError(msg) from None
                yield
        except OSError as err:
            where = f" ({err.filename})" if err.filename else ""
            msg = (
                f"Could not change the session store {self.root}: {_reason(err)}{where}; "
                "no file was overwritten."
            )
            raise SessionError(msg) from None

    # -- used by SessionHistory -------------------------------------------------------------------

    def write_entries(
        self, path: Path, entries: list[dict], appended: list[dict] | None = None
    ) -> bytes | None:
        """Replace a session file with ``entries``, or with ``entries + appended`` where
        ``entries`` are what was just read from it (hold the session's lock: ``locked``);
        returns the bytes written when they hold the entries exactly (None when some text had
        to be repaired)."""
        if appended is None:
            data, exact = encode_exactly(entries)
        else:
            data, exact = encode_appended(path, entries, appended)
        self._remove_stale_temps(path)
        write_atomic(path, data)
        return data if exact else None

    def _remove_stale_temps(self, path: Path) -> None:
        """Remove the temp files a killed writer left for ``path``: at most once a minute per
        file, as the directory scan costs more than the write with many sessions."""
        now = time.monotonic()
        if now - self._temps_checked.get(path.name, -STALE_TEMP_AGE_S) >= STALE_TEMP_AGE_S:
            remove_stale_temps(self.root, path.name)
            self._temps_checked[path.name] = now

    def _lock_path(self, session_id: str) -> Path:
        return self.root / f".{validate_session_id(session_id)}.lock"

    def _make_root(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            if os.path.islink(self.root) and not self.root.exists():
                reason = f"is a link to {os.readlink(self.root)}, which does not exist"
            elif os.path.lexists(self.root) and not self.root.is_dir():
                reason = "is not a directory"
            else:
                reason = f"cannot be created ({_reason(err)})"
            raise SessionError(f"Sessions directory {self.root} {reason}.") from None

    # -- sidecar helpers (the id validated: it becomes a path) ------------------------------------

    def _sidecar_dir(self, session_id: str) -> Path:
        return sidecar_dir(self.root, validate_session_id(session_id))

    def _checked_sidecar_dir(self, session_id: str) -> Path:
        return checked_sidecar_dir(self.root, validate_session_id(session_id))

    # -- listing helpers --------------------------------------------------------------------------

    def _info(self, session_id: str) -> SessionInfo | None:
        path = self.root / f"{session_id}.json"
        try:
            updated = datetime.fromtimestamp(path.lstat().st_mtime, tz=timezone.utc)
        except FileNotFoundError:  # deleted while we were listing
            return None
        except OSError as err:
            updated = datetime.fromtimestamp(0, tz=timezone.utc)
            return SessionInfo(session_id, None, updated, path, _reason(err))
        try:
            count: int | None = len(read_session(self.path_for(session_id))[0])
            problem = None
        except SessionError as err:
            count, problem = None, str(err)
        return SessionInfo(session_id, count, updated, path, problem)

    def _require(self, session_id: str, path: Path) -> None:
        if os.path.lexists(self.root) and not self.root.is_dir():
            raise SessionError(f"Sessions directory {self.root} is not a directory.")
        if not os.path.lexists(path):
            msg = f"No session {session_id!r} in {self.root}; list the sessions to see their ids."
            raise SessionError(msg)


def _is_bad_lock(err: OSError) -> bool:
    """A lock file that is a directory, a link (a loop or not) or another special file."""
    return isinstance(err, FileTypeError) or err.errno in (errno.EISDIR, errno.ELOOP)


def _reason(err: OSError) -> str:
    """The system's words for ``err`` (``err.filename`` is left to the caller)."""
    return str(err.strerror or err)


def _resolve(path: Path) -> Path:
    """``path`` with every link followed; a link loop counts as leading nowhere safe."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: link loop on Python < 3.13
        raise unusable(path, f"is a link that cannot be followed ({err})") from None
