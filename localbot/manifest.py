"""``models/manifest.json``: the record of every verified download, and how a model is found.

The chat path imports this module on every start, so it uses the standard library only (no
huggingface_hub): reading the manifest and checking a file's size must stay cheap.

The file looks like this (written by ``python -m localbot.download``, atomically)::

    {
      "format": "localbot-manifest",
      "version": 1,
      "default": "qwen2.5-0.5b",
      "models": {
        "qwen2.5-0.5b": {
          "repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
          "file": "qwen2.5-0.5b-instruct-q4_k_m.gguf",
          "ref": "main",
          "revision": "<the 40-hex commit the file came from>",
          "size": 491400032,
          "sha256": "<64 hex>",
          "downloaded_at": "2025-01-01T12:00:00+00:00"
        }
      }
    }

``file`` is relative to the manifest's directory, so the folder can be copied anywhere (an
air-gapped machine included) and still verify. ``"default"`` is optional.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from localbot.errors import ConfigError, ManifestError, one_line, quoted
from localbot.paths import data_home

MANIFEST_NAME = "manifest.json"
FORMAT = "localbot-manifest"
VERSION = 1
DOWNLOAD_HINT = "python -m localbot.download NAME (see --list for the names)"
VERIFY_HINT = "python -m localbot.download --verify"

# A source checkout keeps its weights in <checkout>/models (with a README and a .gitignore rule).
_CHECKOUT = Path(__file__).resolve().parent.parent
_SHA256 = re.compile(r"[0-9a-f]{64}")

Status = Literal["ok", "changed", "missing"]


class _ForeignManifest(ManifestError):
    """A ``manifest.json`` that is valid JSON but was not written by localbot."""


def default_models_dir() -> Path:
    """Where models live: ``$LOCALBOT_MODELS_DIR``, else the checkout's ``models/``, else
    ``<data home>/models`` (``$LOCALBOT_HOME`` or the platform's user data dir).

    ``--dir`` on the download command overrides all of these.
    """
    override = os.environ.get("LOCALBOT_MODELS_DIR")
    if override:
        return Path(override).expanduser()
    checkout_models = _CHECKOUT / "models"
    if checkout_models.is_dir() and (_CHECKOUT / "pyproject.toml").is_file():
        return checkout_models
    return data_home() / "models"


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks (models are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be fsynced)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ModelEntry:
    """One verified download."""

    name: str
    repo: str
    file: str
    """Path of the GGUF relative to the models directory (the file's name in the repo)."""
    revision: str
    """The commit the file was downloaded from (``ref`` resolved by the Hub)."""
    size: int
    sha256: str
    downloaded_at: str
    """ISO 8601, UTC."""
    ref: str = "main"
    """What was asked for: a branch, a tag or a commit."""


@dataclass
class Manifest:
    """The models recorded in ``<models_dir>/manifest.json`` (empty when there is no file yet)."""

    models_dir: Path
    models: dict[str, ModelEntry] = field(default_factory=dict)
    default: str | None = None

    @property
    def path(self) -> Path:
        return self.models_dir / MANIFEST_NAME

    def path_of(self, entry: ModelEntry) -> Path:
        return self.models_dir / entry.file

    def find_file(self, path: str | os.PathLike[str]) -> ModelEntry | None:
        """The entry recording ``path``, if any."""
        target = _same_file_key(Path(path))
        for entry in self.models.values():
            if _same_file_key(self.path_of(entry)) == target:
                return entry
        return None

    def add(self, entry: ModelEntry) -> None:
        """Record ``entry``, replacing an entry of the same name or for the same file."""
        for name, old in list(self.models.items()):
            if old.file == entry.file and name != entry.name:
                del self.models[name]
                if self.default == name:
                    self.default = entry.name
        self.models[entry.name] = entry

    def save(self) -> None:
        """Write the manifest atomically: temp file, fsync, rename, fsync the directory."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        data: dict[str, object] = {"format": FORMAT, "version": VERSION}
        if self.default is not None:
            data["default"] = self.default
        data["models"] = {
            name: {k: v for k, v in asdict(entry).items() if k != "name"}
            for name, entry in sorted(self.models.items())
        }
        fd, tmp = tempfile.mkstemp(dir=self.models_dir, prefix=".manifest.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.models_dir)

    def names(self) -> str:
        return ", ".join(sorted(self.models)) or "none"


def load_manifest(models_dir: str | os.PathLike[str] | None = None) -> Manifest:
    """Read ``<models_dir>/manifest.json``; a missing file is an empty manifest.

    Raises:
        ManifestError: the file is unreadable, not JSON, or not a valid localbot manifest.
    """
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    manifest = Manifest(models_dir)
    try:
        raw = _read_small_file(manifest.path)
    except (FileNotFoundError, NotADirectoryError):  # no such file (or no such directory)
        return manifest
    except OSError as e:
        raise ManifestError(f"Cannot read {manifest.path}: {e.strerror or e}") from e
    try:
        # utf-8-sig: a BOM (an editor on Windows) is accepted, as for session files.
        data = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, 100k-deep nesting, huge ints
        reason = "nested too deeply" if isinstance(e, RecursionError) else one_line(str(e), 200)
        raise ManifestError(f"{manifest.path} is corrupt ({reason}); {_REPAIR}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _ForeignManifest(f"{manifest.path} is not a localbot manifest; {_REPAIR}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise ManifestError(
            f"{manifest.path} has version {one_line(repr(version), 40)}, this localbot reads "
            f"version {VERSION}: upgrade localbot"
        )
    models = data.get("models", {})
    default = data.get("default")
    if not isinstance(models, dict) or not (default is None or is_valid_name(default)):
        raise ManifestError(f"{manifest.path} is corrupt (bad 'models' or 'default'); {_REPAIR}")
    for name, raw_entry in models.items():
        manifest.models[name] = _entry(manifest.path, name, raw_entry)
    manifest.default = default
    return manifest


MAX_MANIFEST_BYTES = 16 << 20
"""Far more than any real manifest (~300 bytes per model); a bigger file is not ours."""


def _read_small_file(path: Path) -> bytes:
    """The bytes of ``path``, refusing a FIFO or device (no blocking open) and huge files."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise OSError(errno.EFBIG, f"{info.st_size:,} bytes, more than a manifest can be")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise OSError(errno.EFBIG, "it grew past the size a manifest can be")
        return data
    finally:
        os.close(fd)


def is_valid_name(value: object) -> bool:
    """A model name or text field that prints on one line: no control or separator characters."""
    return isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable()


_REPAIR = f"restore it from a copy, or delete it and download again with {DOWNLOAD_HINT}"


def _entry(manifest_path: Path, name: str, raw: object) -> ModelEntry:
    texts = ("repo", "file", "revision", "sha256", "downloaded_at")
    bad = (
        not is_valid_name(name)
        or not isinstance(raw, dict)
        or any(not is_valid_name(raw.get(key)) for key in texts)
        or not is_valid_name(raw.get("ref", "main"))
        or not isinstance(raw.get("size"), int)
        or isinstance(raw["size"], bool)
        or not 0 <= raw["size"] <= MAX_MODEL_BYTES
        or not _SHA256.fullmatch(raw["sha256"])
        or not is_safe_relative(raw["file"])
    )
    if bad:
        raise ManifestError(
            f"{manifest_path} is corrupt (entry {quoted(name, 60)} is invalid); {_REPAIR}"
        )
    assert isinstance(raw, dict)
    return ModelEntry(
        name=name,
        repo=raw["repo"],
        file=raw["file"],
        revision=raw["revision"],
        size=raw["size"],
        sha256=raw["sha256"],
        downloaded_at=raw["downloaded_at"],
        ref=raw.get("ref", "main"),
    )


MAX_MODEL_BYTES = (1 << 63) - 1
"""What a file size can be (off_t); a bigger recorded size is corruption, not a model."""


def is_safe_relative(file: str) -> bool:
    """Whether ``file`` stays inside the models directory: relative, no ``..``, no drive."""
    pure = PurePosixPath(file)
    return (
        bool(file)
        and file.isprintable()  # no NUL (a ValueError in every path call), no newline
        and "\\" not in file
        and ":" not in file
        and not pure.is_absolute()
        and ".." not in pure.parts
    )


def _same_file_key(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _looks_like_path(spec: str) -> bool:
    seps = [os.sep, "/"] + ([os.altsep] if os.altsep else [])
    return (
        any(sep in spec for sep in seps)
        or spec.lower().endswith(".gguf")
        or spec.startswith(("~", "."))
    )


def resolve_model(spec: str | None, models_dir: Path | None = None) -> Path:
    """The GGUF file to load for ``--model SPEC``.

    ``spec`` is a path (returned as is when it exists or looks like a path; a bare ``x.gguf``
    that is not in the current directory is also looked up in the models directory), or the
    name of a model in the manifest. ``None`` means the manifest's ``"default"``, or its only
    model.

    Raises:
        ConfigError: ``spec`` is neither a path nor a recorded name.
        ManifestError: nothing (or more than one thing, with no default) to choose from, the
            recorded file is missing, or the manifest is corrupt.
    """
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    if spec is not None:
        candidate = Path(spec).expanduser()
        if candidate.is_file():
            return candidate
        if _looks_like_path(spec):
            in_models = models_dir / spec
            if not candidate.is_absolute() and in_models.is_file():
                return in_models
            return candidate
    manifest = load_manifest(models_dir)
    if spec is not None:
        entry = manifest.models.get(spec)
        if entry is None:
            raise ConfigError(_unknown_name(spec, manifest))
        return _recorded_file(manifest, entry)
    if manifest.default is not None:
        entry = manifest.models.get(manifest.default)
        if entry is None:
            raise ManifestError(
                f"{manifest.path} names {manifest.default!r} as the default but does not record "
                f'it (recorded: {manifest.names()}); fix "default" or pass --model NAME'
            )
        return _recorded_file(manifest, entry)
    if not manifest.models:
        raise ManifestError(
            f"No model downloaded in {models_dir}: download one with {DOWNLOAD_HINT}, "
            "or pass --model PATH.gguf"
        )
    if len(manifest.models) > 1:
        raise ManifestError(
            f"Several models in {models_dir} ({manifest.names()}) and no default: pass "
            f'--model NAME, or set "default" in {manifest.path}'
        )
    (entry,) = manifest.models.values()
    return _recorded_file(manifest, entry)


def _unknown_name(spec: str, manifest: Manifest) -> str:
    from localbot.catalogue import find

    known = f"downloaded: {manifest.names()}"
    if find(spec) is not None:
        return (
            f"Model {spec!r} is not downloaded in {manifest.models_dir} ({known}): "
            f"run python -m localbot.download {spec}"
        )
    return (
        f"No model named {spec!r} in {manifest.models_dir} ({known}); pass one of those, a path "
        f"to a .gguf file, or download one with {DOWNLOAD_HINT}"
    )


def _recorded_file(manifest: Manifest, entry: ModelEntry) -> Path:
    path = manifest.path_of(entry)
    if not path.is_file():
        raise ManifestError(
            f"{manifest.path} records {entry.name!r} but {path} is missing: download it again "
            f"with python -m localbot.download {entry.name}, or copy it there"
        )
    return path


def check_model(path: str | os.PathLike[str], *, full_hash: bool = False) -> ModelEntry | None:
    """Check ``path`` against the manifest in its directory, if that manifest records it.

    The size is always checked (cheap enough for every start); the sha256 only with
    ``full_hash``. Files the manifest does not know (or with no localbot manifest beside them)
    pass and return ``None``.

    Raises:
        ManifestError: the file does not match its record, or the manifest is corrupt.
    """
    path = Path(path)
    try:
        manifest = load_manifest(path.parent)
    except _ForeignManifest:
        return None
    entry = manifest.find_file(path)
    if entry is None:
        return None
    fix = (
        f"download it again with python -m localbot.download {entry.name} --force, "
        f"or check every model with {VERIFY_HINT}"
    )
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing ({manifest.path} records it); {fix}") from None
    if size != entry.size:
        raise ManifestError(
            f"{path} is {size:,} bytes but {manifest.path} records {entry.size:,} for "
            f"{entry.name!r} (truncated or changed); {fix}"
        )
    if full_hash:
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise ManifestError(
                f"{path} has sha256 {digest[:16]}… but {manifest.path} records "
                f"{entry.sha256[:16]}… for {entry.name!r} (corrupt or replaced); {fix}"
            )
    return entry


def verify_models(manifest: Manifest) -> Iterator[tuple[ModelEntry, Status]]:
    """Re-hash every recorded file: ``ok``, ``changed`` (size or sha256 differ) or ``missing``."""
    for name in sorted(manifest.models):
        entry = manifest.models[name]
        path = manifest.path_of(entry)
        if not path.is_file():
            yield entry, "missing"
        elif path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            yield entry, "changed"
        else:
            yield entry, "ok"
