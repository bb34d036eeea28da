"""Crash-safe file primitives shared by everything localbot keeps on disk.

A file is replaced, never edited in place: the new bytes go to a temp file in the same directory,
are flushed and fsynced, then ``os.replace`` swaps it in and the directory is fsynced so the
rename itself survives a power cut. A reader therefore sees the old file or the new one, never a
mix, and needs no lock. Writers that read-modify-write take :func:`exclusive_lock` so concurrent
processes do not lose each other's updates.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["exclusive_lock", "fsync_directory", "remove_stale_temps", "write_atomic"]

TEMP_MARKER = ".tmp-"
"""Temp files are named ``.<target name>.tmp-<random>``: hidden, and never mistaken for data."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash at any point leaves old or new, not a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARKER}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename/unlink in ``directory`` durable; file fsync alone does not cover the entry."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive cross-process lock on ``lock_path`` (created if missing).

    The holder may unlink ``lock_path`` (to clean up after deleting what it guarded): a waiter
    that then wakes up holding the lock on the unlinked file notices the inode changed and
    retries on the new file, so two processes can never both believe they hold the lock.
    The kernel drops an flock when its process dies, so a killed writer never leaves it held.
    """
    if fcntl is None:  # pragma: no cover - Windows: no flock; single-writer use only
        yield
        return
    fd = _acquire(lock_path)
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _acquire(lock_path: Path) -> int:
    """Open and flock ``lock_path``, retrying while another holder replaces it under us."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(lock_path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock_path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it may have been unlinked)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def remove_stale_temps(directory: Path, name: str = "", max_age_s: float = 60.0) -> None:
    """Delete temp files a killed writer left behind (those for ``name``, or all if empty).

    Only files older than ``max_age_s`` go: a younger one may belong to a write in progress.
    """
    cutoff = time.time() - max_age_s
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if not _is_temp_name(entry.name, name):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)


def _is_temp_name(entry: str, name: str) -> bool:
    prefix = f".{name}{TEMP_MARKER}" if name else "."
    return entry.startswith(prefix) and TEMP_MARKER in entry
