"""The session store: one JSON file of chat history per session, safe against crashes and races.

Format: ``<root>/<session_id>.json`` holds a JSON list of ``messages_to_dict`` entries, exactly
what LangChain's ``FileChatMessageHistory`` reads and writes, so either can open the other's
files. We write UTF-8 with ``ensure_ascii=False`` so the files stay readable in an editor.

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
  than a minute are removed when that session is next written, and all of them on delete.

Other modules may keep sidecar files next to a session (``<id>.kv``, ``<id>.kv.json``);
:meth:`SessionStore.rename` and :meth:`SessionStore.delete` carry them along.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, messages_from_dict, messages_to_dict

from localbot.atomic import exclusive_lock, fsync_directory, remove_stale_temps, write_atomic
from localbot.errors import SessionError
from localbot.paths import default_sessions_dir

__all__ = ["SessionHistory", "SessionInfo", "SessionStore", "validate_session_id"]

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FIX = "move it aside or pick another session"


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
        self.root = Path(root) if root is not None else default_sessions_dir()

    def get(self, session_id: str) -> SessionHistory:
        """The history for ``session_id``; fits ``RunnableWithMessageHistory(chain, store.get)``."""
        return SessionHistory(self, session_id)

    def path_for(self, session_id: str) -> Path:
        """The file for ``session_id``, refusing bad ids and links that lead out of the store."""
        path = self.root / f"{validate_session_id(session_id)}.json"
        root = self.root.resolve()
        if not _resolve(path).is_relative_to(root):
            msg = f"Session file {path} is a link that leads outside {root}; remove the link."
            raise SessionError(msg)
        return path

    def exists(self, session_id: str) -> bool:
        return self.path_for(session_id).exists()

    def list(self) -> list[SessionInfo]:
        """Every session, newest first. Unreadable files are listed with ``corrupt`` set."""
        if not self.root.is_dir():
            return []
        infos = [info for path in self._session_files() if (info := self._info(path))]
        return sorted(infos, key=lambda info: (-info.updated.timestamp(), info.id))

    def sidecar_paths(self, session_id: str) -> list[Path]:
        """Files other modules keep for this session: ``<root>/<id>.*`` except its own JSON.

        Ids may contain dots, so ``notes.v2.json`` could be the session ``notes.v2`` rather than
        a sidecar of ``notes``. A ``.json`` file holding a list (a history, or something we cannot
        parse, to be safe) counts as its own session and is excluded with all of its sidecars.
        """
        sid = validate_session_id(session_id)
        if not self.root.is_dir():
            return []
        names = sorted(
            n for n in os.listdir(self.root) if n.startswith(f"{sid}.") and n != f"{sid}.json"
        )
        nested = [n[:-5] for n in names if self._is_nested_session(n)]
        return [
            self.root / n
            for n in names
            if not any(n == f"{other}.json" or n.startswith(f"{other}.") for other in nested)
        ]

    def rename(self, old: str, new: str) -> None:
        """Give a session a new id, with its sidecars; refuses to overwrite anything."""
        if validate_session_id(old) == validate_session_id(new):
            msg = f"Session {old!r} already has that name."
            raise SessionError(msg)
        with self._locked(old, new):
            src, dst = self.path_for(old), self.path_for(new)
            self._require(old, src)
            if os.path.lexists(dst) or self.sidecar_paths(new):
                msg = f"Session {new!r} already exists in {self.root}; pick another name."
                raise SessionError(msg)
            sidecars = self.sidecar_paths(old)
            os.rename(src, dst)  # the history first: it is what the user cares about
            for path in sidecars:
                os.rename(path, self.root / (new + path.name[len(old) :]))
            self._lock_path(old).unlink(missing_ok=True)
            fsync_directory(self.root)

    def delete(self, session_id: str) -> None:
        """Remove a session's file and its sidecars. Works on corrupt files too: it never reads."""
        with self._locked(session_id):
            path = self.path_for(session_id)
            sidecars = self.sidecar_paths(session_id)
            if not sidecars:
                self._require(session_id, path)
            path.unlink(missing_ok=True)
            for sidecar in sidecars:
                _remove(sidecar)
            # Our writers make temp files only while holding this lock, so any left are dead.
            remove_stale_temps(self.root, path.name, max_age_s=0)
            self._lock_path(session_id).unlink(missing_ok=True)
            fsync_directory(self.root)

    # -- used by SessionHistory -------------------------------------------------------------------

    def _write(self, path: Path, entries: list[dict[str, Any]]) -> None:
        data = _encode(entries)
        remove_stale_temps(self.root, path.name)
        write_atomic(path, data)

    @contextlib.contextmanager
    def _locked(self, *session_ids: str) -> Iterator[None]:
        """Hold the locks of these sessions, in sorted order so two callers cannot deadlock."""
        lock_paths = sorted({self._lock_path(sid) for sid in session_ids})  # validates first
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            for lock_path in lock_paths:
                stack.enter_context(exclusive_lock(lock_path))
            yield

    def _lock_path(self, session_id: str) -> Path:
        return self.root / f".{validate_session_id(session_id)}.lock"

    # -- listing helpers --------------------------------------------------------------------------

    def _session_files(self) -> list[Path]:
        return [
            self.root / name
            for name in os.listdir(self.root)
            if name.endswith(".json") and _is_valid_id(name[:-5]) and not self._is_sidecar(name)
        ]

    def _is_sidecar(self, name: str) -> bool:
        """``a.kv.json`` is a sidecar of ``a`` if ``a.json`` exists and it holds no list."""
        parts = name[:-5].split(".")
        owners = (".".join(parts[:i]) for i in range(1, len(parts)))
        has_owner = any((self.root / f"{owner}.json").exists() for owner in owners)
        return has_owner and not _may_hold_history(self.root / name)

    def _is_nested_session(self, name: str) -> bool:
        stem = name[:-5]
        return name.endswith(".json") and _is_valid_id(stem) and _may_hold_history(self.root / name)

    def _info(self, path: Path) -> SessionInfo | None:
        sid = path.name[:-5]
        try:
            updated = datetime.fromtimestamp(path.lstat().st_mtime, tz=timezone.utc)
        except FileNotFoundError:  # deleted while we were listing
            return None
        try:
            count: int | None = len(_read(self.path_for(sid))[0])
            problem = None
        except SessionError as err:
            count, problem = None, str(err)
        return SessionInfo(sid, count, updated, path, problem)

    def _require(self, session_id: str, path: Path) -> None:
        if not os.path.lexists(path):
            msg = f"No session {session_id!r} in {self.root}; list the sessions to see their ids."
            raise SessionError(msg)


class SessionHistory(BaseChatMessageHistory):
    """The chat history of one session, read from disk on every access.

    Reading each time (no cache) means another process's appends are always seen, and the file
    stays the single source of truth.
    """

    def __init__(self, store: SessionStore, session_id: str) -> None:
        super().__init__()
        self.store = store
        self.session_id = validate_session_id(session_id)
        self.path = store.path_for(session_id)

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The stored messages; an empty list if the session has no file yet."""
        return _read(self._checked_path())[1]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append ``messages`` in one atomic write, so a turn's messages land together."""
        new = messages_to_dict(list(messages))
        if not new:
            return
        with self.store._locked(self.session_id):
            path = self._checked_path()
            self.store._write(path, _read(path)[0] + new)

    def add_message(self, message: BaseMessage) -> None:
        self.add_messages([message])

    def replace_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Rewrite the whole history atomically (e.g. to replace a partial reply)."""
        new = messages_to_dict(list(messages))
        with self.store._locked(self.session_id):
            path = self._checked_path()
            _read(path)  # refuse to write over a file we cannot read: it may be the user's data
            self.store._write(path, new)

    def clear(self) -> None:
        """Leave the session in place with no messages."""
        self.replace_messages([])

    def _checked_path(self) -> Path:
        """Re-check the path on each use: a link could have appeared since ``__init__``."""
        return self.store.path_for(self.session_id)


def _read(path: Path) -> tuple[list[dict[str, Any]], list[BaseMessage]]:
    """The raw entries and the messages in ``path`` (both empty if it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as err:
        raise _unusable(path, f"cannot be read ({err.strerror})") from err
    entries = _parse(path, data)
    try:
        return entries, messages_from_dict(entries)
    except (ValueError, TypeError, KeyError) as err:
        reason = f"holds a message LangChain cannot load ({_first_line(err)})"
        raise _unusable(path, reason) from err


def _parse(path: Path, data: bytes) -> list[dict[str, Any]]:
    """Decode ``data`` and check that it is a list of ``{"type": ..., "data": {...}}`` entries."""
    if not data.strip():
        raise _unusable(path, f"is empty ({len(data)} bytes)")
    try:
        entries = json.loads(data)  # from bytes: UTF-8, a BOM allowed
    except (ValueError, RecursionError) as err:
        raise _unusable(path, f"is not valid JSON ({_first_line(err)})") from err
    if not isinstance(entries, list):
        raise _unusable(path, f"holds a JSON {type(entries).__name__}, not a list of messages")
    for index, entry in enumerate(entries):
        if not _looks_like_message(entry):
            raise _unusable(path, f"entry {index} is not a {{'type', 'data'}} chat message")
    return entries


def _looks_like_message(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("type"), str)
        and isinstance(entry.get("data"), dict)
    )


def _may_hold_history(path: Path) -> bool:
    """False only for a file that parses as JSON but is not a list (e.g. a sidecar's metadata)."""
    try:
        return isinstance(json.loads(path.read_bytes()), list)
    except (OSError, ValueError, RecursionError):
        return True


def _encode(entries: list[dict[str, Any]]) -> bytes:
    """UTF-8 JSON, characters unescaped and one message per line, so it reads well in an editor.

    Not ``indent=``: that switches ``json`` to its pure-Python encoder, ~10x slower per append.
    """
    try:
        return _json_lines(entries, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (e.g. an emoji split mid-stream) has no UTF-8 form; \u escapes keep it.
        return _json_lines(entries, ensure_ascii=True).encode("ascii")


def _json_lines(entries: list[dict[str, Any]], *, ensure_ascii: bool) -> str:
    if not entries:
        return "[]\n"
    lines = (json.dumps(entry, ensure_ascii=ensure_ascii) for entry in entries)
    return "[\n" + ",\n".join(lines) + "\n]\n"


def _unusable(path: Path, reason: str) -> SessionError:
    return SessionError(f"Session file {path} {reason}; {_FIX}.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else type(err).__name__


def _resolve(path: Path) -> Path:
    """``path`` with every link followed; a link loop counts as leading nowhere safe."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: link loop on Python < 3.13
        raise _unusable(path, f"is a link that cannot be followed ({err})") from err


def _remove(path: Path) -> None:
    """Remove a sidecar, which another module may have made a directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
