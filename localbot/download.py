"""Fetch a GGUF from the Hugging Face Hub into ``models/``, verify it, record it.

    python -m localbot.download NAME            # a catalogue model (see --list)
    python -m localbot.download REPO FILE       # any GGUF file on the Hub
    python -m localbot.download --list          # the catalogue, and what is downloaded
    python -m localbot.download --verify        # re-hash everything in manifest.json

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

import argparse
import glob
import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlparse

from localbot.catalogue import CATALOGUE, find, find_file
from localbot.errors import (
    ConfigError,
    DownloadError,
    LocalbotError,
    ManifestError,
    one_line,
    quoted,
)
from localbot.manifest import (
    MANIFEST_NAME,
    Manifest,
    ModelEntry,
    default_models_dir,
    fsync_dir,
    is_safe_relative,
    is_valid_name,
    load_manifest,
    verify_models,
)

__all__ = ["ModelSpec", "fetch", "main", "parse_spec", "render_list", "verify"]

Outcome = Literal["present", "adopted", "downloaded"]

# The Hub's own rule for repo ids (huggingface_hub's validate_repo_id), checked here so that a bad
# id is a usage error before any request, not an HFValidationError from deep inside the client.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
MAX_REPO_ID = 96


@dataclass(frozen=True)
class ModelSpec:
    """What to fetch, and the name to record it under."""

    name: str
    repo: str
    file: str
    revision: str = "main"

    @property
    def args(self) -> str:
        """The command-line arguments that ask for this model again."""
        known = find_file(self.repo, self.file)
        words = [known.name] if known else [self.repo, self.file]
        if self.revision != "main":
            words += ["--revision", self.revision]
        return " ".join(words)


def parse_spec(
    words: list[str], *, name: str | None = None, revision: str | None = None
) -> ModelSpec:
    """``NAME`` (from the catalogue) or ``REPO FILE`` (any ``.gguf`` on the Hub)."""
    revision = revision or "main"
    if not is_valid_name(revision):
        raise ConfigError(f"--revision {quoted(revision)} is not a branch, tag or commit")
    if name is not None and not is_valid_name(name):
        raise ConfigError(
            f"--name {quoted(name)} is not a usable name (printable characters, at most 200)"
        )
    if len(words) == 1:
        entry = find(words[0])
        if entry is None:
            raise ConfigError(
                f"Unknown model {words[0]!r}: choose one of {', '.join(e.name for e in CATALOGUE)} "
                "(see --list), or give a Hub repo and file: REPO FILE"
            )
        return ModelSpec(name or entry.name, entry.repo, entry.file, revision)
    if len(words) == 2:
        repo, file = words
        if not is_repo_id(repo):
            raise ConfigError(
                f"{quoted(repo)} is not a Hub repo id (expected OWNER/NAME: letters, digits, "
                "'-', '_', '.', at most 96 characters, no '..' or '--')"
            )
        if not file.lower().endswith(".gguf") or not is_safe_relative(file):
            raise ConfigError(f"{quoted(file)} is not a .gguf file name inside the repo")
        known = find_file(repo, file)
        default_name = known.name if known else Path(file).stem
        return ModelSpec(name or default_name, repo, file, revision)
    raise ConfigError("Give a model NAME (see --list), or REPO FILE, or use --list / --verify")


def is_repo_id(repo: str) -> bool:
    """Whether ``repo`` is a valid ``OWNER/NAME`` on the Hub."""
    return (
        len(repo) <= MAX_REPO_ID
        and _REPO_ID.fullmatch(repo) is not None
        and ".." not in repo
        and "--" not in repo
        and not repo.endswith(".git")
    )


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
        raise DownloadError(_offline(spec, models_dir, "HF_HUB_OFFLINE is set"))
    _check_writable(target.parent)  # before any request: a bad --dir fails at once
    remote = _resolve(spec, models_dir)
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


@dataclass(frozen=True)
class _Remote:
    url: str
    headers: dict[str, str]
    commit: str
    size: int
    digest: str
    """sha256 for LFS files (every GGUF); the git blob sha1 for small files kept in git."""


def _hub_failure(
    e: Exception, spec: ModelSpec, models_dir: Path, url: str | None
) -> LocalbotError | None:
    """The one-line error for what the Hub (or the network) answered, or None when ``e`` is not
    a Hub failure (a bug: let it through)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{spec.repo} at revision {spec.revision!r}"
    if isinstance(e, HFValidationError):  # parse_spec checks the same rules; this is the backstop
        return ConfigError(f"Not a valid Hub request: {_one_line(e)}")
    if isinstance(e, (OfflineModeIsEnabled, httpx2.TransportError)):
        reason = f"cannot reach {constants.ENDPOINT}: {_one_line(e)}"
        return DownloadError(_offline(spec, models_dir, reason))
    if isinstance(e, GatedRepoError):
        return DownloadError(
            f"{spec.repo} is gated: accept its terms on {constants.ENDPOINT}/{spec.repo} while "
            "logged in, then set HF_TOKEN (or run `hf auth login`) and try again"
        )
    if isinstance(e, RepositoryNotFoundError):
        return DownloadError(
            f"Repository {spec.repo} not found on {constants.ENDPOINT} (check the name; a "
            "private repo needs HF_TOKEN)"
        )
    if isinstance(e, RevisionNotFoundError):
        return DownloadError(f"Revision {spec.revision!r} not found in {spec.repo}")
    if isinstance(e, RemoteEntryNotFoundError):
        return DownloadError(f"{spec.file} is not in {where}{_other_ggufs(spec)}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return DownloadError(
                f"The Hub refused access to {spec.repo} (HTTP {status}): check HF_TOKEN"
            )
        return DownloadError(f"The Hub answered HTTP {status} for {url}; try again later")
    return None


def _resolve(spec: ModelSpec, models_dir: Path) -> _Remote:
    """HEAD the file on the Hub: the commit ``spec.revision`` points at, size, hash, URL."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    where = f"{spec.repo} at revision {spec.revision!r}"
    url = None
    try:
        url = hf_hub_url(spec.repo, spec.file, revision=spec.revision)
        meta = get_hf_file_metadata(url)
    except Exception as e:
        failure = _hub_failure(e, spec, models_dir, url)
        if failure is None:
            raise
        raise failure from e

    if not meta.commit_hash:
        raise DownloadError(
            f"{constants.ENDPOINT} did not say which commit it served (no X-Repo-Commit header); "
            "is HF_ENDPOINT a Hugging Face Hub?"
        )
    digest = (meta.etag or "").lower()
    if len(digest) not in (40, 64) or any(c not in "0123456789abcdef" for c in digest):
        raise DownloadError(
            f"The Hub gave no checksum for {spec.file} in {where} (ETag {meta.etag!r}), so the "
            "download could not be verified; refusing it"
        )
    if meta.size is None or meta.size < 0:
        raise DownloadError(
            f"The Hub did not announce the size of {spec.file} in {where}, so the download could "
            "not be bounded; refusing it"
        )
    headers = build_hf_headers()
    download_url = meta.location
    if download_url == url:  # not redirected to a CDN: pin the commit we just resolved
        download_url = hf_hub_url(spec.repo, spec.file, revision=meta.commit_hash)
    if urlparse(download_url).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # never send the token to a CDN
    return _Remote(download_url, headers, meta.commit_hash, meta.size, digest)


def _other_ggufs(spec: ModelSpec) -> str:
    """``; its .gguf files are: ...`` (best effort: one more Hub request)."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(spec.repo, revision=spec.revision)
    except Exception:  # the error about the missing file matters more than this hint
        return ""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if not ggufs:
        return "; the repo has no .gguf files"
    shown = ", ".join(ggufs[:12]) + (f" and {len(ggufs) - 12} more" if len(ggufs) > 12 else "")
    return f"; its .gguf files are: {shown}"


def _part_path(target: Path, remote: _Remote) -> Path:
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


def _download(spec: ModelSpec, remote: _Remote, target: Path) -> str:
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
        print(f"Resuming {spec.file} from {_size(have)}", file=sys.stderr)
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
            f"({_one_line(e)}); run the same command again to resume"
        ) from e

    sha256, observed = _hash_file(part, remote)
    if observed != remote.digest:
        part.unlink()
        raise DownloadError(
            f"{spec.file} from {spec.repo}@{remote.commit[:12]} failed verification: its hash is "
            f"{_short(observed)} but the Hub's is {_short(remote.digest)}; the download was "
            "deleted and nothing was installed"
        )
    os.replace(part, target)
    fsync_dir(target.parent)
    return sha256


def _hash_file(path: Path, remote: _Remote) -> tuple[str, str]:
    """``(sha256, the hash comparable to the Hub's)``: a 40-hex Hub hash is a git blob sha1."""
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    use_git = len(remote.digest) == 40
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            if use_git:
                git.update(chunk)
    return sha256.hexdigest(), (git.hexdigest() if use_git else sha256.hexdigest())


def _offline(spec: ModelSpec, models_dir: Path, reason: str) -> str:
    return (
        f"Cannot download {spec.file} ({reason}): on a machine with internet access run "
        f"`python -m localbot.download {spec.args}`, then copy {spec.file} and {MANIFEST_NAME} "
        f"from its models folder into {models_dir}"
    )


def verify(models_dir: Path) -> int:
    """Re-hash every file in the manifest and print ok / changed / missing for each."""
    manifest = load_manifest(models_dir)
    if not manifest.path.is_file():
        raise ManifestError(
            f"No {MANIFEST_NAME} in {models_dir}, so nothing to verify: copy models/ together "
            "with its manifest.json, or download with python -m localbot.download NAME"
        )
    if not manifest.models:
        print(f"No models recorded in {manifest.path}")
        return 0
    bad = []
    for entry, status in verify_models(manifest):
        print(f"{status:<8} {entry.name:<20} {manifest.path_of(entry)}", flush=True)
        if status != "ok":
            bad.append(f"{entry.name} {status}")
    if bad:
        raise ManifestError(
            f"{len(bad)} of {len(manifest.models)} models failed verification ({', '.join(bad)}): "
            "download them again with python -m localbot.download NAME --force"
        )
    print(f"All {len(manifest.models)} models match {manifest.path}")
    return 0


def render_list(models_dir: Path) -> str:
    """The catalogue and any other recorded downloads, marking what is in ``models_dir``."""
    manifest = load_manifest(models_dir)
    by_file = {(e.repo, e.file): e for e in manifest.models.values()}

    def state(entry: ModelEntry | None) -> str:
        if entry is None:
            return ""
        return "downloaded" if manifest.path_of(entry).is_file() else "missing"

    rows = [("NAME", "SIZE", "STATUS", "LICENCE", "REPO FILE")]
    for c in CATALOGUE:
        recorded = by_file.get((c.repo, c.file))
        rows.append((c.name, f"~{_size(c.size)}", state(recorded), c.licence, f"{c.repo} {c.file}"))
    catalogued = {(c.repo, c.file) for c in CATALOGUE}
    for e in sorted(manifest.models.values(), key=lambda e: e.name):
        if (e.repo, e.file) not in catalogued:
            rows.append((e.name, _size(e.size), state(e), "see model card", f"{e.repo} {e.file}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[4]])
        for row in rows
    ]
    lines += [
        "",
        f"Models directory: {models_dir}",
        "Download one with: python -m localbot.download NAME  (or REPO FILE for any GGUF)",
    ]
    return "\n".join(line.rstrip() for line in lines)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _short(digest: str) -> str:
    return f"{digest[:16]}…"


def _one_line(e: BaseException | str) -> str:
    return one_line(str(e), 1000) or type(e).__name__


EXIT_CODES = f"""exit codes:
  0    success (--verify: every model matches)
  1    other error (a file that cannot be written)
  {ConfigError.exit_code}    bad usage: unknown flag or model name, bad repo id or file name
  {ManifestError.exit_code}    models/manifest.json is corrupt, or --verify found a changed or
       missing model
  {DownloadError.exit_code}    the download failed: the Hub is unreachable or refuses, or the bytes
       do not match its hash
  130  interrupted (run the same command again to resume)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ConfigError.exit_code, f"localbot: error: {_one_line(message)} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m localbot.download",
        description="Download a GGUF model from the Hugging Face Hub into models/, verify its "
        "sha256 against the Hub's, and record it in models/manifest.json.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="*",
        metavar="NAME | REPO FILE",
        help="a catalogue name (see --list), or a Hub repo id and a .gguf file in it",
    )
    p.add_argument(
        "--revision",
        help="branch, tag or commit (default: main); the commit it resolves to is recorded",
    )
    p.add_argument(
        "--dir",
        help="models directory (default: $LOCALBOT_MODELS_DIR, else models/ in a source "
        "checkout, else models/ in $LOCALBOT_HOME or the user data directory)",
    )
    p.add_argument(
        "--name", help="record it under this name (default: the catalogue name or file name)"
    )
    p.add_argument("--force", action="store_true", help="download again even if recorded")
    p.add_argument(
        "--default",
        action="store_true",
        dest="make_default",
        help="make it the model used when --model is not given",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="show the catalogue and the downloads")
    mode.add_argument(
        "--verify", action="store_true", help="re-hash every recorded model: ok/changed/missing"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # huggingface_hub 2.4 otherwise adds telemetry to its user agent and fetches
    # {HF_ENDPOINT}/api/agent-harnesses once a day; a local, offline chatbot has no use for it.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    models_dir = Path(args.dir).expanduser() if args.dir else default_models_dir()
    try:
        if args.list or args.verify:
            if args.model:
                raise ConfigError("--list and --verify take no model")
            if args.list:
                print(render_list(models_dir))
                return 0
            return verify(models_dir)
        spec = parse_spec(args.model, name=args.name, revision=args.revision)
        entry, outcome = fetch(spec, models_dir, force=args.force)
        path = models_dir / entry.file
        if outcome == "present":
            print(f"{entry.name} is already downloaded: {path} (no network used)")
        else:
            verb = "Found" if outcome == "adopted" else "Downloaded"
            print(
                f"{verb} {entry.name}: {path} ({entry.size:,} bytes, sha256 {_short(entry.sha256)} "
                f"matches {entry.repo}@{entry.revision[:12]})"
            )
        if args.make_default:
            manifest = load_manifest(models_dir)
            manifest.default = entry.name
            manifest.save()
            print(f"{entry.name} is now the default model")
        return 0
    except LocalbotError as e:
        print(f"localbot: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file that cannot be written after all (a full or read-only disk)
        where = f"{e.filename}: " if e.filename else ""
        print(f"localbot: error: {_one_line(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlocalbot: interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
