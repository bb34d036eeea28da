"""models/manifest.json: reading and writing it, finding a model, checking a file against it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localbot import manifest_file as manifest_module
from localbot.atomic import sha256_file
from localbot.errors import ConfigError, ManifestError
from localbot.manifest import check_model, resolve_model
from localbot.manifest_file import (
    Manifest,
    ModelEntry,
    default_models_dir,
    load_manifest,
    verify_models,
)

ROOT = Path(__file__).resolve().parent.parent


def entry_for(
    models_dir: Path, name: str, content: bytes, *, file: str | None = None
) -> ModelEntry:
    file = file or f"{name}.gguf"
    (models_dir / file).write_bytes(content)
    return ModelEntry(
        name=name,
        repo=f"acme/{name}-GGUF",
        file=file,
        revision="a" * 40,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        downloaded_at="2025-01-01T00:00:00+00:00",
    )


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


def save(models_dir: Path, *entries: ModelEntry, default: str | None = None) -> Manifest:
    manifest = Manifest(models_dir, default=default)
    for entry in entries:
        manifest.add(entry)
    manifest.save()
    return manifest


# -- the file ----------------------------------------------------------------------------------


def test_round_trip(models_dir: Path) -> None:
    one = entry_for(models_dir, "one", b"GGUF one")
    two = entry_for(models_dir, "two", b"GGUF two")
    save(models_dir, one, two, default="two")

    loaded = load_manifest(models_dir)

    assert loaded.models == {"one": one, "two": two}
    assert loaded.default == "two"
    raw = json.loads((models_dir / "manifest.json").read_text())
    assert raw["format"] == "localbot-manifest"
    assert raw["models"]["one"] == {
        "repo": "acme/one-GGUF",
        "file": "one.gguf",
        "revision": "a" * 40,
        "size": 8,
        "sha256": hashlib.sha256(b"GGUF one").hexdigest(),
        "downloaded_at": "2025-01-01T00:00:00+00:00",
        "ref": "main",
    }


def test_save_is_atomic_and_leaves_no_temp_files(models_dir: Path) -> None:
    save(models_dir, entry_for(models_dir, "one", b"GGUF"))
    save(models_dir, entry_for(models_dir, "two", b"GGUF 2"))

    assert sorted(p.name for p in models_dir.iterdir()) == ["manifest.json", "one.gguf", "two.gguf"]


def test_adding_an_entry_for_the_same_file_replaces_the_old_name(models_dir: Path) -> None:
    manifest = save(models_dir, entry_for(models_dir, "old", b"GGUF", file="x.gguf"), default="old")
    manifest.add(entry_for(models_dir, "new", b"GGUF", file="x.gguf"))

    assert list(manifest.models) == ["new"]
    assert manifest.default == "new"


def test_missing_manifest_is_empty(tmp_path: Path) -> None:
    assert load_manifest(tmp_path / "nowhere").models == {}


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"format": "localbot-manifest", "version": 1, "models": []}',
        '{"format": "localbot-manifest", "version": 1, "models": {"x": {"repo": "a/b"}}}',
        '{"format": "localbot-manifest", "version": 1, "models": {"x": {"repo": "a/b", '
        '"file": "../../etc/passwd", "revision": "r", "size": 1, "sha256": "' + "0" * 64 + '", '
        '"downloaded_at": "d"}}}',
        '{"format": "something-else"}',
    ],
    ids=["not-json", "models-not-a-dict", "entry-incomplete", "file-escapes-the-dir", "foreign"],
)
def test_corrupt_manifest_names_the_file(models_dir: Path, text: str) -> None:
    (models_dir / "manifest.json").write_text(text)

    with pytest.raises(ManifestError, match=r"manifest\.json") as info:
        load_manifest(models_dir)
    assert str(models_dir / "manifest.json") in str(info.value)
    assert "\n" not in str(info.value)


def test_manifest_from_a_newer_localbot_asks_for_an_upgrade(models_dir: Path) -> None:
    (models_dir / "manifest.json").write_text('{"format": "localbot-manifest", "version": 99}')

    with pytest.raises(ManifestError, match="upgrade localbot"):
        load_manifest(models_dir)


def test_sha256_file_streams(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)

    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


def test_verify_models(models_dir: Path) -> None:
    ok = entry_for(models_dir, "ok", b"GGUF ok")
    changed = entry_for(models_dir, "changed", b"GGUF aaa")
    missing = entry_for(models_dir, "missing", b"GGUF gone")
    manifest = save(models_dir, ok, changed, missing)
    (models_dir / "changed.gguf").write_bytes(b"GGUF bbb")
    (models_dir / "missing.gguf").unlink()

    assert {e.name: s for e, s in verify_models(manifest)} == {
        "ok": "ok",
        "changed": "changed",
        "missing": "missing",
    }


# -- default_models_dir ------------------------------------------------------------------------


def test_models_dir_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOCALBOT_MODELS_DIR", str(tmp_path / "elsewhere"))

    assert default_models_dir() == tmp_path / "elsewhere"


def test_models_dir_is_the_checkouts_models_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCALBOT_MODELS_DIR", raising=False)

    assert default_models_dir() == ROOT / "models"


def test_models_dir_outside_a_checkout_is_under_localbot_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LOCALBOT_MODELS_DIR", raising=False)
    monkeypatch.setattr(manifest_module, "_CHECKOUT", tmp_path / "site-packages")

    assert default_models_dir() == Path(os.environ["LOCALBOT_HOME"]) / "models"


# -- resolve_model -----------------------------------------------------------------------------


def test_a_path_is_returned_as_is(models_dir: Path, tmp_path: Path) -> None:
    existing = tmp_path / "model.bin"
    existing.write_bytes(b"GGUF")

    assert resolve_model(str(existing), models_dir) == existing
    assert resolve_model("somewhere/else.gguf", models_dir) == Path("somewhere/else.gguf")


def test_a_bare_file_name_is_also_looked_up_in_the_models_dir(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (models_dir / "loose.gguf").write_bytes(b"GGUF")

    assert resolve_model("loose.gguf", models_dir) == models_dir / "loose.gguf"


def test_a_name_is_looked_up_in_the_manifest(models_dir: Path) -> None:
    save(
        models_dir,
        entry_for(models_dir, "qwen", b"GGUF q"),
        entry_for(models_dir, "llama", b"GGUF l"),
    )

    assert resolve_model("llama", models_dir) == models_dir / "llama.gguf"


def test_the_only_model_is_the_default(models_dir: Path) -> None:
    save(models_dir, entry_for(models_dir, "only", b"GGUF"))

    assert resolve_model(None, models_dir) == models_dir / "only.gguf"


def test_the_recorded_default_wins(models_dir: Path) -> None:
    save(
        models_dir,
        entry_for(models_dir, "a", b"GGUF a"),
        entry_for(models_dir, "b", b"GGUF b"),
        default="b",
    )

    assert resolve_model(None, models_dir) == models_dir / "b.gguf"


def test_several_models_and_no_default_lists_the_names(models_dir: Path) -> None:
    save(
        models_dir,
        entry_for(models_dir, "qwen", b"GGUF q"),
        entry_for(models_dir, "llama", b"GGUF l"),
    )

    with pytest.raises(ManifestError, match=r"\(llama, qwen\) and no default: pass --model NAME"):
        resolve_model(None, models_dir)


def test_no_models_says_how_to_download_one(models_dir: Path) -> None:
    with pytest.raises(
        ManifestError, match=r"No model downloaded in .*python -m localbot.download"
    ):
        resolve_model(None, models_dir)


def test_an_unknown_name_lists_the_downloaded_ones(models_dir: Path) -> None:
    save(models_dir, entry_for(models_dir, "qwen", b"GGUF q"))

    with pytest.raises(ConfigError, match=r"No model named 'mistral' .*downloaded: qwen"):
        resolve_model("mistral", models_dir)


def test_a_catalogue_name_not_yet_downloaded_says_which_command_fetches_it(
    models_dir: Path,
) -> None:
    with pytest.raises(ConfigError, match=r"run python -m localbot.download llama3.2-1b$"):
        resolve_model("llama3.2-1b", models_dir)


def test_a_recorded_but_missing_file_says_so(models_dir: Path) -> None:
    save(models_dir, entry_for(models_dir, "gone", b"GGUF"))
    (models_dir / "gone.gguf").unlink()

    with pytest.raises(ManifestError, match=r"records 'gone' but .*gone.gguf is missing"):
        resolve_model("gone", models_dir)


# -- check_model -------------------------------------------------------------------------------


def test_check_model_passes_a_matching_file(models_dir: Path) -> None:
    entry = entry_for(models_dir, "good", b"GGUF good")
    save(models_dir, entry)

    assert check_model(models_dir / "good.gguf") == entry
    assert check_model(models_dir / "good.gguf", full_hash=True) == entry


def test_check_model_catches_a_size_mismatch(models_dir: Path) -> None:
    save(models_dir, entry_for(models_dir, "cut", b"GGUF full length"))
    (models_dir / "cut.gguf").write_bytes(b"GGUF")

    with pytest.raises(ManifestError) as info:
        check_model(models_dir / "cut.gguf")
    message = str(info.value)
    assert "is 4 bytes but" in message
    assert "records 16 for 'cut'" in message
    assert "python -m localbot.download cut --force" in message
    assert "python -m localbot.download --verify" in message


def test_check_model_catches_changed_bytes_only_with_full_hash(models_dir: Path) -> None:
    entry = entry_for(models_dir, "flip", b"GGUF aaaa")
    save(models_dir, entry)
    (models_dir / "flip.gguf").write_bytes(b"GGUF aaab")

    assert check_model(models_dir / "flip.gguf") == entry  # the cheap check: sizes agree
    with pytest.raises(ManifestError, match=rf"sha256 .* records {entry.sha256[:16]}"):
        check_model(models_dir / "flip.gguf", full_hash=True)


def test_check_model_passes_unknown_files(models_dir: Path, tmp_path: Path) -> None:
    save(models_dir, entry_for(models_dir, "known", b"GGUF"))
    (models_dir / "stranger.gguf").write_bytes(b"GGUF stranger")
    (tmp_path / "loose.gguf").write_bytes(b"GGUF loose")

    assert check_model(models_dir / "stranger.gguf", full_hash=True) is None
    assert check_model(tmp_path / "loose.gguf") is None


def test_check_model_ignores_someone_elses_manifest_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"name": "some web app"}')
    (tmp_path / "model.gguf").write_bytes(b"GGUF")

    assert check_model(tmp_path / "model.gguf") is None


def test_check_model_reports_a_corrupt_localbot_manifest(models_dir: Path) -> None:
    (models_dir / "manifest.json").write_text('{"format": "localbot-manifest", "version": 1, "mod')
    (models_dir / "model.gguf").write_bytes(b"GGUF")

    with pytest.raises(ManifestError, match="is corrupt"):
        check_model(models_dir / "model.gguf")


def test_importing_manifest_stays_light() -> None:
    """The chat path imports this on every start: no huggingface_hub, no transformers."""
    code = (
        "import sys, localbot.manifest, localbot.catalogue\n"
        "heavy = {'huggingface_hub', 'transformers', 'httpx', 'httpx2', 'llama_cpp',"
        " 'langchain_core'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
