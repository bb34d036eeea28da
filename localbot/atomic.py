"""Crash-safe file primitives shared by everything localbot keeps on disk.

A file is replaced, never edited in place: the new bytes go to a temp file in the same directory,
are flushed and fsynced, then ``os.replace`` swaps it in and the directory is fsynced so the
rename itself survives a power cut. A reader therefore sees the old file or the new one, never a
mix, and needs no lock. Writers that read-modify-write take :func:`exclusive_lock` so concurrent
processes do not lose each other's updates.

Temp files this process creates are tracked until they are renamed or removed, so that
:func:`remove_own_temps` (registered with ``atexit``, and meant for signal handlers too) can delete
what an interrupted write leaves; ones left by a killed process go by :func:`remove_stale_temps`.

Data files are opened with :func:`open_regular` (``O_NONBLOCK``, then checked to be a regular file
before a byte is read, so a FIFO or device in their place is an error, never a hang) and read
whole with :func:`read_file`, or hashed with :func:`sha256_file`.

This module is the one implementation of each of these primitives: everything else imports them.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FileTypeError",
    "digest_file",
    "exclusive_lock",
    "forget_temp",
    "fsync_directory",
    "make_temp",
    "open_regular",
    "read_file",
    "remove_own_temps",
    "remove_stale_temps",
    "sha256_file",
    "write_atomic",
]

TEMP_MARKER = ".tmp-"
"""Temp files are named ``.<target name>.tmp-<random>``: hidden, and never mistaken for data."""

STALE_TEMP_AGE_S = 60.0
"""A temp file older than this belongs to a killed writer; a younger one may be a write in
progress (see :func:`remove_stale_temps`)."""

_CHUNK = 1 << 20
"""Reads of big files go in pieces of this size."""

_own_temps: set[str] = set()


class FileTypeError(OSError):
    """A data file that is not a regular file, is a link we do not follow, or is too large.
    ``strerror`` says which, in words that fit after the file's name."""


def make_temp(path: Path) -> str:
    """Create an empty temp file (0600) next to ``path`` for a write that will replace it; it is
    tracked until :func:`forget_temp`, so :func:`remove_own_temps` can clean it up."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARKER}", dir=path.parent)
    os.close(fd)
    _own_temps.add(tmp)
    return tmp


def forget_temp(tmp: str, *, remove: bool = False) -> None:
    """Stop tracking ``tmp`` (renamed into place, or about to be removed: ``remove=True``)."""
    if remove:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _own_temps.discard(tmp)


def remove_own_temps() -> None:
    """Delete every temp file this process created and has not yet renamed into place.

    Safe to call from a signal handler or at exit while a write is in flight: the writer's rename
    then fails (the temp is gone) and the target keeps its old contents.
    """
    for tmp in list(_own_temps):
        forget_temp(tmp, remove=True)


atexit.register(remove_own_temps)


def write_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that a crash at any point leaves old or new, not a mix.

    The new file is private (0600) unless ``mode`` says otherwise.
    """
    tmp = make_temp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        forget_temp(tmp, remove=True)
        raise
    forget_temp(tmp)
    fsync_directory(path.parent)


def open_regular(path: Path | str, *, follow_symlinks: bool = True) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without ever blocking on a FIFO or a device; return the descriptor
    (the caller closes it) and its ``fstat``.

    Raises ``FileNotFoundError`` when it is missing, :class:`FileTypeError` when it is not a
    regular file or is a link and ``follow_symlinks`` is false; any other ``OSError`` (and
    ``ValueError`` for a NUL in the path) as the system reports it.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_symlinks and os.path.islink(path):
            raise FileTypeError(
                errno.ELOOP, "is a symbolic link, which localbot does not follow", str(path)
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "is not a regular file (a FIFO, socket, device or directory)"
            raise FileTypeError(errno.EINVAL, kind, str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_file(path: Path, *, max_bytes: int, follow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file ``path`` (opened with :func:`open_regular`).

    Raises as :func:`open_regular` does, and :class:`FileTypeError` when the file holds more than
    ``max_bytes``.
    """
    fd, st = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        if st.st_size > max_bytes:
            raise FileTypeError(
                errno.EFBIG, f"is larger than {max_bytes:,} bytes ({st.st_size:,})", str(path)
            )
        chunks = []
        left = max_bytes + 1  # the size can grow while we read: never take more than allowed
        want = st.st_size + 1  # one read takes the whole file (no copy to join); the next, EOF
        while left > 0 and (chunk := os.read(fd, min(want, left))):
            chunks.append(chunk)
            left -= len(chunk)
            want = _CHUNK
    finally:
        os.close(fd)
    if left <= 0:
        raise FileTypeError(errno.EFBIG, f"is larger than {max_bytes:,} bytes", str(path))
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def digest_file(path: Path | str, *digests: Any, chunk_size: int = _CHUNK) -> None:
    """Feed the bytes of ``path`` to every ``hashlib`` object in ``digests``, in one pass read in
    chunks (models are GBs)."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            for digest in digests:
                digest.update(chunk)


def sha256_file(path: Path | str, *, chunk_size: int = _CHUNK) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    digest_file(path, digest, chunk_size=chunk_size)
    return digest.hexdigest()


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
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        fd = os.open(lock_path, flags, 0o600)  # a directory or a link fails here
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FileTypeError(errno.EINVAL, "is not a regular file", str(lock_path))
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


def remove_stale_temps(directory: Path, *names: str, max_age_s: float = STALE_TEMP_AGE_S) -> int:
    """Delete temp files a killed writer left behind in ``directory``: those of the files
    ``names``, or every temp file when no name is given. Returns the bytes freed.

    Only files older than ``max_age_s`` go (a younger one may belong to a write in progress);
    ``max_age_s <= 0`` removes them all (for a caller that holds the lock every writer takes).
    """
    prefixes = tuple(f".{name}{TEMP_MARKER}" for name in names) or (".",)
    cutoff = time.time() - max_age_s
    freed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if not (entry.name.startswith(prefixes) and TEMP_MARKER in entry.name):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if max_age_s <= 0 or st.st_mtime < cutoff:
                    os.unlink(entry.path)
                    freed += st.st_size
    return freed
