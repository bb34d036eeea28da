"""``models/manifest.json``, the record of every verified download: its format, reading it
(every field checked: the file may be damaged or hostile), writing it atomically, re-hashing
what it records, and where the models directory is.

The chat path imports this module on every start, so it uses the standard library only (no
huggingface_hub): reading the manifest must stay cheap.

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
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from localbot.atomic import FileTypeError, read_file, sha256_file, write_atomic
from localbot.errors import ManifestError, one_line, quoted
from localbot.paths import data_home

__all__ = [
    "DOWNLOAD_HINT",
    "MANIFEST_NAME",
    "ForeignManifestError",
    "Manifest",
    "ModelEntry",
    "default_models_dir",
    "is_safe_relative",
    "is_valid_name",
    "load_manifest",
    "verify_models",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "localbot-manifest"
VERSION = 1
DOWNLOAD_HINT = "python -m localbot.download NAME (see --list for the names)"
_REPAIR = f"restore it from a copy, or delete it and download again with {DOWNLOAD_HINT}"

# A source checkout keeps its weights in <checkout>/models (with a README and a .gitignore rule).
_CHECKOUT = Path(__file__).resolve().parent.parent
_SHA256 = re.compile(r"[0-9a-f]{64}")

MAX_MANIFEST_BYTES = 16 << 20
"""Far more than any real manifest (~300 bytes per model); a bigger file is not ours."""

MAX_MODEL_BYTES = (1 << 63) - 1
"""What a file size can be (off_t); a bigger recorded size is corruption, not a model."""

Status = Literal["ok", "changed", "missing"]


class ForeignManifestError(ManifestError):
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
        text = json.dumps(data, indent=2) + "\n"
        write_atomic(self.path, text.encode("utf-8"), mode=0o644)

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
        raw = read_file(manifest.path, max_bytes=MAX_MANIFEST_BYTES)
    except (FileNotFoundError, NotADirectoryError):  # no such file (or no such directory)
        return manifest
    except FileTypeError as e:  # a FIFO, a device, a directory, or far too big to be ours
        too_big = ", more than a manifest can be" if e.errno == errno.EFBIG else ""
        raise ManifestError(f"Cannot read {manifest.path}: it {e.strerror}{too_big}") from e
    except OSError as e:
        raise ManifestError(f"Cannot read {manifest.path}: {e.strerror or e}") from e
    try:
        # utf-8-sig: a BOM (an editor on Windows) is accepted, as for session files.
        data = json.loads(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, 100k-deep nesting, huge ints
        reason = "nested too deeply" if isinstance(e, RecursionError) else one_line(str(e), 200)
        raise ManifestError(f"{manifest.path} is corrupt ({reason}); {_REPAIR}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ForeignManifestError(f"{manifest.path} is not a localbot manifest; {_REPAIR}")
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


def is_valid_name(value: object) -> bool:
    """A model name or text field that prints on one line: no control or separator characters."""
    return isinstance(value, str) and 0 < len(value) <= 200 and value.isprintable()


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
