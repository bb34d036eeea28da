"""The Hugging Face Hub, as the download command needs it: what a model spec names, where that
file is at which commit (with its size and hash), and every way the Hub or the network can fail,
each as one line that says what to do.

huggingface_hub (and its HTTP client) is imported only inside the functions that talk to the
Hub, so ``--list``, ``--verify`` and a usage error never load it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from localbot.catalogue import CATALOGUE, find, find_file
from localbot.errors import ConfigError, DownloadError, LocalbotError, one_line, quoted
from localbot.manifest_file import MANIFEST_NAME, is_safe_relative, is_valid_name

__all__ = [
    "ModelSpec",
    "Remote",
    "brief",
    "is_repo_id",
    "offline_message",
    "parse_spec",
    "resolve",
]

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


@dataclass(frozen=True)
class Remote:
    """The file as the Hub announced it: where to fetch it, at which commit, how big, its hash."""

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
        return ConfigError(f"Not a valid Hub request: {brief(e)}")
    if isinstance(e, (OfflineModeIsEnabled, httpx2.TransportError)):
        reason = f"cannot reach {constants.ENDPOINT}: {brief(e)}"
        return DownloadError(offline_message(spec, models_dir, reason))
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


def resolve(spec: ModelSpec, models_dir: Path) -> Remote:
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
    return Remote(download_url, headers, meta.commit_hash, meta.size, digest)


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


def offline_message(spec: ModelSpec, models_dir: Path, reason: str) -> str:
    """What to do when this machine cannot reach the Hub: fetch elsewhere, copy the files."""
    return (
        f"Cannot download {spec.file} ({reason}): on a machine with internet access run "
        f"`python -m localbot.download {spec.args}`, then copy {spec.file} and {MANIFEST_NAME} "
        f"from its models folder into {models_dir}"
    )


def brief(e: BaseException | str) -> str:
    """An exception (or a message) as one line, never empty."""
    return one_line(str(e), 1000) or type(e).__name__
