"""Fetch a GGUF from the Hugging Face Hub into ``models/``, verify it, record it in the manifest
(``python -m localbot.download`` is the command line over :func:`fetch`).

Why not ``hf_hub_download``: in huggingface_hub 2.4 it writes to a temporary file with a random
name and deletes it when the download fails (huggingface_hub PR #4228), so a download that is
interrupted (Ctrl-C, a lost connection, a closed laptop) starts over from zero next time; it only
resumes transient errors within one call. It also moves the file into place before anything can
check its hash. So this module uses the same client pieces, ``get_hf_file_metadata`` (resolves
the revision to a commit, and gives the file's size and sha256) and ``file_download.http_get``
(the transfer, with its retries, ``Range`` resume and progress bar), but keeps the partial
download as ``<file>.<sha256 prefix>.part`` next to the target across runs, and renames it into
place only once its sha256 equals the Hub's.

Nothing touches the network when the model is already downloaded and recorded.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

from localbot.atomic import digest_file, fsync_directory
from localbot.errors import DownloadError
from localbot.hub import ModelSpec, Remote, brief, offline_message, resolve
from localbot.manifest_file import Manifest, ModelEntry, load_manifest

__all__ = ["Outcome", "fetch", "human_size", "short_hash"]

Outcome = Literal["present", "adopted", "downloaded"]


def fetch(spec: ModelSpec, models_dir: Path, *, force: bool = False) -> tuple[ModelEntry, Outcome]:
    """Make sure ``spec`` is in ``models_dir``, verified and recorded; say how it got there.

    ``present``: already recorded (no network used). ``adopted``: the file was already there
    and matched the Hub's sha256. ``downloaded``: fetched, or resumed from a ``.part`` file.

    Raises:
        DownloadError: the Hub cannot be reached, refuses, or the bytes do not match its hash.
    """
    target = models_dir / spec.file
    if not force:
        recorded = _recorded(load_manifest(models_dir), spec)
        if recorded is not None:
            return recorded, "present"

    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise DownloadError(offline_message(spec, models_dir, "HF_HUB_OFFLINE is set"))
    _check_writable(target.parent)  # before any request: a bad --dir fails at once
    remote = resolve(spec, models_dir)
    outcome: Outcome = "downloaded"
    sha256 = None
    if not force and target.is_file() and remote.size == target.stat().st_size:
        sha256, observed = _hash_file(target, remote)
        outcome = "adopted" if observed == remote.digest else "downloaded"
    if outcome == "downloaded":
        sha256 = _download(spec, remote, target)
    assert sha256 is not None
    entry = ModelEntry(
        name=spec.name,
        repo=spec.repo,
        file=spec.file,
        revision=remote.commit,
        size=target.stat().st_size,
        sha256=sha256,
        downloaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ref=spec.revision,
    )
    manifest = load_manifest(models_dir)  # re-read: another download may have finished meanwhile
    manifest.add(entry)
    manifest.save()
    return entry, outcome


def _check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and make sure a file can be written in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".localbot-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DownloadError(
            f"Cannot write to the models directory {directory}: {e.strerror or e} (pass --dir "
            "DIR or set LOCALBOT_MODELS_DIR to a folder you can write to)"
        ) from e


def _recorded(manifest: Manifest, spec: ModelSpec) -> ModelEntry | None:
    """The manifest's entry for this repo, file and revision, if its file is there (size only)."""
    for entry in (manifest.models.get(spec.name), *manifest.models.values()):
        if (
            entry is not None
            and (entry.repo, entry.file) == (spec.repo, spec.file)
            and spec.revision in (entry.ref, entry.revision)
        ):
            path = manifest.path_of(entry)
            if path.is_file() and path.stat().st_size == entry.size:
                return entry
    return None


def _part_path(target: Path, remote: Remote) -> Path:
    return target.with_name(f"{target.name}.{remote.digest[:16]}.part")


class _Oversize(Exception):
    """The server sent more bytes than it announced."""


class _BoundedFile:
    """The ``.part`` file as ``http_get`` sees it: a write that would take the file past the
    announced size raises instead (a server that announces 1,000 bytes and then streams forever
    must not fill the disk)."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self._f, self._limit = f, limit

    def write(self, chunk: bytes) -> int:
        if self._f.tell() + len(chunk) > self._limit:
            raise _Oversize
        return self._f.write(chunk)

    def __getattr__(self, name: str) -> Any:  # seek, tell, truncate, flush: the real file's
        return getattr(self._f, name)


def _download(spec: ModelSpec, remote: Remote, target: Path) -> str:
    """Fetch into the ``.part`` file (resuming it), check its hash, move it into place."""
    import httpx2
    from huggingface_hub.file_download import http_get

    _check_writable(target.parent)
    part = _part_path(target, remote)
    for stale in target.parent.glob(glob.escape(target.name) + ".*.part"):
        if stale != part:  # from an older version of the file
            stale.unlink()
    have = part.stat().st_size if part.is_file() else 0
    if have > remote.size:
        part.unlink()
        have = 0
    free = shutil.disk_usage(target.parent).free
    if remote.size - have > free:
        raise DownloadError(
            f"{spec.file} needs {remote.size - have:,} more bytes but {target.parent} has "
            f"{free:,} free; free some space or pass --dir DIR on a bigger disk"
        )
    if have:
        print(f"Resuming {spec.file} from {human_size(have)}", file=sys.stderr)
    try:
        with open(part, "ab") as f:
            http_get(
                remote.url,
                _BoundedFile(f, remote.size),  # type: ignore[arg-type]
                resume_size=have,
                headers=remote.headers,
                expected_size=remote.size,
                displayed_filename=spec.file,
            )
    except _Oversize:
        part.unlink()
        raise DownloadError(
            f"The server sent more than the {remote.size:,} bytes it announced for {spec.file}; "
            "the download was stopped and deleted (a broken proxy or mirror?)"
        ) from None
    except (httpx2.HTTPError, OSError, ValueError) as e:  # ValueError: http_get's size limit
        got = part.stat().st_size if part.is_file() else 0
        raise DownloadError(
            f"Download of {spec.file} stopped at {got:,} of {remote.size:,} bytes "
            f"({brief(e)}); run the same command again to resume"
        ) from e

    sha256, observed = _hash_file(part, remote)
    if observed != remote.digest:
        part.unlink()
        raise DownloadError(
            f"{spec.file} from {spec.repo}@{remote.commit[:12]} failed verification: its hash is "
            f"{short_hash(observed)} but the Hub's is {short_hash(remote.digest)}; the download "
            "was deleted and nothing was installed"
        )
    # The data on disk before the name: after a power cut the manifest must never record a file
    # whose bytes are not there.
    with open(part, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(part, target)
    fsync_directory(target.parent)
    return sha256


def _hash_file(path: Path, remote: Remote) -> tuple[str, str]:
    """``(sha256, the hash comparable to the Hub's)``: a 40-hex Hub hash is a git blob sha1."""
    sha256 = hashlib.sha256()
    if len(remote.digest) != 40:
        digest_file(path, sha256)
        return sha256.hexdigest(), sha256.hexdigest()
    git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    digest_file(path, sha256, git)
    return sha256.hexdigest(), git.hexdigest()


def human_size(n: int) -> str:
    """``1.23 GB`` or ``491 MB``."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def short_hash(digest: str) -> str:
    """The first 16 hex digits of a hash, for messages."""
    return f"{digest[:16]}…"
