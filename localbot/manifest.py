"""Which model file ``--model`` means, and whether it is the file ``models/manifest.json``
recorded: the chat path's one entry point into the manifest (``localbot.manifest_file`` holds the
file's format).

The chat path imports this module on every start, so it uses the standard library only (no
huggingface_hub): finding the model and checking its size must stay cheap.
"""

from __future__ import annotations

import os
from pathlib import Path

from localbot.atomic import sha256_file
from localbot.catalogue import find
from localbot.errors import ConfigError, ManifestError
from localbot.manifest_file import (
    DOWNLOAD_HINT,
    ForeignManifestError,
    Manifest,
    ModelEntry,
    default_models_dir,
    load_manifest,
)

# load_manifest: the CLI reads the manifest through this module too (one entry point).
__all__ = ["check_model", "load_manifest", "resolve_model"]

VERIFY_HINT = "python -m localbot.download --verify"


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
    except ForeignManifestError:
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
