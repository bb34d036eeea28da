"""Saved KV states on disk: the two files, what makes one trusted, and the disk budget.
``localbot.kv_state`` saves and restores a live model's state through these; nothing here
touches llama.cpp.

Files, for a session ``<id>``, in its sidecar folder ``<sessions>/.sidecars/<id>/``
(``SessionStore.kv_state_path``), so renaming or deleting the session takes them along:

* ``kvstate``: llama.cpp's own session file (``llama_state_save_file``: magic, version, token
  list, then the context state with the KV cache). Binary, never decoded by Python: it is only
  handed to ``llama_state_load_file``, and only when it is the very file we wrote (below).
* ``kvstate.meta``: JSON saying what the state belongs to (model file, context settings, chat
  template, the token list) and which file we wrote.

Trust: only our own files. After writing the state we fsync it, rename it into place and record
its size, inode, mtime and ctime (nanoseconds) in the meta; a restore opens the file (no links,
no FIFOs: ``O_NOFOLLOW | O_NONBLOCK``) and requires all four to match. Any write to the file after
ours moves its ctime, which no program can set back (``utime`` sets only atime and mtime), and a
copy or a replacement is another inode, so flipped bits with a "re-signed" meta, a state from
another machine, or a restored backup are all refused (the prompt is re-read once) in O(1),
without hashing: a 10 GB sparse file whose size matches is refused as fast as a 1 KB one.
Chosen over a keyed MAC because the MAC's key would sit, readable, in the same user's files: it
adds a file to manage and protects against nobody the stat check does not. What neither catches
is a same-user program that edits the state and then rewrites the meta with the new stat values;
such a program can edit the session history just as well. Bit rot that the file system does not
report is not detected either (no content hash: that was 55 s per start for 10 GB).

Disk use is bounded by :func:`prune_states` (least recently written states go first).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localbot.atomic import (
    FileTypeError,
    fsync_directory,
    open_regular,
    read_file,
    remove_stale_temps,
    write_atomic,
)
from localbot.paths import KV_META_SUFFIX, KV_STATE_FILE, SIDECAR_ROOT

# One logger for everything about saved KV states (kv_state's restore decisions included).
log = logging.getLogger("localbot.kv_state")

__all__ = [
    "DEFAULT_MAX_TOTAL_BYTES",
    "Rejected",
    "check_identity",
    "fd_path",
    "meta_path",
    "model_identity",
    "open_verified",
    "prepare_folder",
    "prune_states",
    "read_meta",
    "remove_state",
    "sha256_hex",
    "stamp",
    "tokens_sha256",
    "write_meta",
]

FORMAT = "localbot-kvstate"
FORMAT_VERSION = 2  # 2: the state file is trusted by its stat stamp, not a sha256
DEFAULT_MAX_TOTAL_BYTES = 2 * 1024**3
"""Default disk budget for all saved states of one session store (see :func:`prune_states`)."""

_MAX_META_BYTES = 64 * 1024**2
_FINGERPRINT_BYTES = 1024**2
_STAMP_KEYS = ("size", "inode", "mtime_ns", "ctime_ns")

_fingerprints: dict[tuple[str, int, int, int], str] = {}


class Rejected(Exception):
    """A saved state that must not be used; the message says why (logged at DEBUG)."""


# --------------------------------------------------------------------------- paths


def meta_path(path: Path | str) -> Path:
    """The metadata file of the state file ``path`` (``kvstate`` -> ``kvstate.meta``)."""
    path = Path(path)
    return path.with_name(path.name + KV_META_SUFFIX)


def fd_path(fd: int, path: Path | str) -> str:
    """A name that opens exactly the file open as ``fd`` (``/proc/self/fd/N``, on Linux), else
    ``path``. Restoring through it means a concurrent replace cannot slip an unverified file in
    between our check and llama.cpp's own open. Saving through it means that if the process is
    interrupted mid-save and removes its temp name (``atomic.remove_own_temps``), llama.cpp's
    ``fopen`` cannot create the name again: it writes into the unlinked file, which goes when the
    process does."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def prepare_folder(path: Path) -> None:
    """Create the state's folder; refuse one that is a link; clear a killed save's old temps."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not stat.S_ISDIR(os.lstat(folder).st_mode):
        raise FileTypeError(errno.ELOOP, "is a link, which localbot does not follow", str(folder))
    remove_stale_temps(folder, path.name, meta_path(path).name)


# --------------------------------------------------------------------------- identity


def stamp(st: os.stat_result) -> dict[str, int]:
    """What identifies the exact file we wrote: any later write moves ctime; a copy is another
    inode (see the module docstring)."""
    return {
        "size": st.st_size,
        "inode": st.st_ino,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokens_sha256(tokens: Sequence[int]) -> str:
    return sha256_hex(json.dumps(list(tokens), separators=(",", ":")).encode())


def model_identity(model_path: Path) -> dict[str, Any]:
    """Which model file this is: path, size, mtime and a hash of its first and last MiB."""
    resolved = Path(model_path).resolve()
    st = os.stat(resolved)
    key = (str(resolved), st.st_size, st.st_mtime_ns, st.st_ino)
    fingerprint = _fingerprints.get(key)
    if fingerprint is None:
        digest = hashlib.sha256()
        with open(resolved, "rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
            if st.st_size > _FINGERPRINT_BYTES:
                f.seek(max(_FINGERPRINT_BYTES, st.st_size - _FINGERPRINT_BYTES))
                digest.update(f.read(_FINGERPRINT_BYTES))
        fingerprint = _fingerprints[key] = digest.hexdigest()
    return {
        "path": str(resolved),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "fingerprint_sha256": fingerprint,
    }


def check_identity(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`Rejected` naming the first setting that differs."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise Rejected(
                f"it was saved for {key}={saved.get(key)!r}, this model has {current.get(key)!r}"
            )


# --------------------------------------------------------------------------- meta


def write_meta(
    path: Path, identity: dict[str, Any], tokens: list[int], state: dict[str, int]
) -> int:
    """Write the meta of the state just renamed to ``path`` (atomically; the directory fsync
    covers both renames); return its size in bytes."""
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "identity": identity,
        "n_tokens": len(tokens),
        "tokens_sha256": tokens_sha256(tokens),
        "tokens": tokens,
        "state": state,
        "created": time.time(),
    }
    data = json.dumps(meta, separators=(",", ":")).encode()
    write_atomic(meta_path(path), data)
    return len(data)


def read_meta(path: Path) -> dict[str, Any]:
    """The parsed, structurally checked metadata of state ``path``; raises :class:`Rejected`."""
    mpath = meta_path(path)
    try:
        data = read_file(mpath, max_bytes=_MAX_META_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        raise Rejected(f"{mpath} does not exist") from None
    except OSError as err:
        raise Rejected(f"{mpath} {err.strerror or err}") from None
    try:
        meta = json.loads(data)  # JSON only: parsing it can never run code
    except (ValueError, RecursionError) as err:
        raise Rejected(f"{mpath} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise Rejected(f"{mpath} is not localbot KV state metadata")
    if meta.get("version") != FORMAT_VERSION:
        raise Rejected(f"{mpath} has format version {meta.get('version')!r}, not {FORMAT_VERSION}")
    tokens, n = meta.get("tokens"), meta.get("n_tokens")
    if (
        not isinstance(tokens, list)
        or not isinstance(n, int)
        or isinstance(n, bool)
        or n != len(tokens)
        or n <= 0
        or not all(type(t) is int and 0 <= t < 2**31 for t in tokens)
    ):
        raise Rejected(f"{mpath} has a malformed token list")
    if meta.get("tokens_sha256") != tokens_sha256(tokens):
        raise Rejected(f"{mpath}: the token list does not match its sha256")
    state = meta.get("state")
    if (
        not isinstance(state, dict)
        or not all(type(state.get(key)) is int for key in _STAMP_KEYS)
        or not isinstance(meta.get("identity"), dict)
    ):
        raise Rejected(f"{mpath} lacks the state file's stamp or identity")
    return meta


def open_verified(path: Path, meta: dict[str, Any]) -> int:
    """Open the state file (never through a link, never blocking on a FIFO) and check that it is
    the file we wrote: its stamp must equal the meta's. Returns the fd."""
    saved = {key: meta["state"][key] for key in _STAMP_KEYS}
    try:
        fd, st = open_regular(path, follow_symlinks=False)
    except FileTypeError as err:
        raise Rejected(f"{path} {err.strerror}") from None
    except OSError as err:
        reason = f"{err.strerror or err}; links are not followed"
        raise Rejected(f"cannot open {path} ({reason})") from None
    found = stamp(st)
    if found != saved:
        os.close(fd)
        changed = ", ".join(k for k in _STAMP_KEYS if found[k] != saved[k])
        raise Rejected(
            f"{path} is not the file localbot wrote ({changed} differ: written to, "
            "replaced or copied since)"
        )
    return fd


# --------------------------------------------------------------------------- cleanup


def _unlink(path: Path) -> int:
    """Remove a file; return its size (0 when it was already gone)."""
    try:
        size = os.stat(path, follow_symlinks=False).st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def remove_state(path: Path | str) -> int:
    """Delete a saved state, its meta and any temp files of theirs; return the bytes freed."""
    path = Path(path)
    freed = _unlink(path) + _unlink(meta_path(path))
    freed += remove_stale_temps(path.parent, path.name, meta_path(path).name, max_age_s=0)
    with contextlib.suppress(OSError):
        fsync_directory(path.parent)
    return freed


def prune_states(
    sessions_root: Path | str, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
) -> list[Path]:
    """Keep the saved states of the session store at ``sessions_root`` (every
    ``.sidecars/<id>/kvstate``) within ``max_total_bytes`` in all: delete the least recently
    written states (with their meta) until the rest fit. Also removes meta files whose state is
    gone and temp files a killed save left (older than a minute). Returns the state paths
    removed. Links are never followed."""
    base = Path(sessions_root) / SIDECAR_ROOT
    try:
        if not stat.S_ISDIR(os.lstat(base).st_mode):
            return []
        folders = [Path(e.path) for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    states = [found for folder in folders if (found := _saved_state(folder)) is not None]
    total = sum(size for _, _, size in states)
    removed: list[Path] = []
    for _, state_path, size in sorted(states, key=lambda s: (s[0], str(s[1]))):
        if total <= max_total_bytes:
            break
        try:
            _unlink(state_path)
            _unlink(meta_path(state_path))
        except OSError as err:
            log.debug("could not remove KV state %s: %s", state_path, err)
            continue
        total -= size
        removed.append(state_path)
        with contextlib.suppress(OSError):
            fsync_directory(state_path.parent)
    if removed:
        log.debug("pruned %d KV states from %s", len(removed), base)
    return removed


def _saved_state(folder: Path) -> tuple[int, Path, int] | None:
    """``(mtime_ns, path, bytes with its meta)`` of the state in a sidecar folder, if there is
    one; clears the folder's stale temps and a meta whose state is gone on the way."""
    state = folder / KV_STATE_FILE
    remove_stale_temps(folder, state.name, meta_path(state).name)
    try:
        st = os.lstat(state)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            _unlink(meta_path(state))  # its state is gone
        return None
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    size = st.st_size
    with contextlib.suppress(OSError):
        size += os.lstat(meta_path(state)).st_size
    return st.st_mtime_ns, state, size
