"""Hostile ``models/manifest.json`` files and download requests: one line, the documented exit
code, no traceback, fast, bounded memory, nothing changed on disk.

Manifest cases go through the three ways in: ``load_manifest`` in-process, and the two CLIs that
read it (``localbot --model NAME`` and ``localbot.download --list``), in one interpreter under
``ulimit -v`` (``hostile.run_calls``). Download cases run ``localbot.download`` against the fake Hub
on 127.0.0.1 (``hubserver.FakeHub``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile import Call, assert_one_line, assert_one_line_error, run_calls, run_limited, snapshot
from hubserver import FakeHub

from localbot.errors import ConfigError, DownloadError, ManifestError
from localbot.manifest import load_manifest, resolve_model

MANIFEST = ManifestError.exit_code  # 6
DOWNLOAD = DownloadError.exit_code  # 7
USAGE = ConfigError.exit_code  # 2
SECONDS = 5.0
CONTENT = b"GGUF tiny model"


def entry(**fields: object) -> dict[str, object]:
    good: dict[str, object] = {
        "repo": "acme/m-GGUF",
        "file": "m.gguf",
        "ref": "main",
        "revision": "a" * 40,
        "size": len(CONTENT),
        "sha256": hashlib.sha256(CONTENT).hexdigest(),
        "downloaded_at": "2025-01-01T00:00:00+00:00",
    }
    return {**good, **fields}


def manifest(models: dict[str, object] | None = None, **top: object) -> bytes:
    data = {"format": "localbot-manifest", "version": 1, "models": models or {"m": entry()}}
    return json.dumps({**data, **top}).encode()


@dataclass(frozen=True)
class Case:
    id: str
    content: bytes
    needle: str


CASES = [
    Case("100k-deep", b'{"format": "localbot-manifest", "x": ' + b"[" * 100_000, "corrupt"),
    Case("100k-deep-closed", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    Case("invalid-utf8", manifest()[:-2] + b', "\xff\xfe": 1}', "corrupt"),
    Case("5000-digit-number", manifest()[:-1] + b', "n": ' + b"7" * 5000 + b"}", "digits"),
    Case("nul-in-file", manifest({"m": entry(file="m\u0000.gguf")}), "entry 'm' is invalid"),
    Case("newline-in-name", manifest({"a\nb": entry()}), r"entry 'a\nb' is invalid"),
    Case("line-separator-in-name", manifest({"a\u2028b": entry()}), r"entry 'a\u2028b'"),
    Case("escape-in-repo", manifest({"m": entry(repo="acme/\x1b[2Jm")}), "entry 'm' is invalid"),
    Case("newline-in-default", manifest(default="m\n"), "bad 'models' or 'default'"),
    Case("newline-in-ref", manifest({"m": entry(ref="main\n")}), "entry 'm' is invalid"),
    Case("size-10^400", manifest({"m": entry(size=10**400)}), "entry 'm' is invalid"),
    Case("size-negative", manifest({"m": entry(size=-1)}), "entry 'm' is invalid"),
    Case("version-huge", manifest(version=10**100), "upgrade localbot"),
    Case("not-json", b"{not json", "corrupt"),
    Case("too-big", b" " * (16 * 1024 * 1024 + 1) + manifest(), "more than a manifest can be"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_load_manifest_refuses_in_one_line(tmp_path: Path, case: Case) -> None:
    (tmp_path / "manifest.json").write_bytes(case.content)
    start = time.perf_counter()
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path)
    assert time.perf_counter() - start < SECONDS
    assert_one_line(str(caught.value))
    assert case.needle in str(caught.value)


def test_every_cli_refuses_every_case_with_exit_6_and_changes_nothing(tmp_path: Path) -> None:
    calls, dirs = [], []
    for case in CASES:
        models = tmp_path / case.id
        models.mkdir()
        (models / "manifest.json").write_bytes(case.content)
        (models / "m.gguf").write_bytes(CONTENT)
        dirs.append(models)
        env = {"LOCALBOT_MODELS_DIR": str(models)}
        calls += [
            Call("localbot.cli", ["--model", "m", "-p", "hi"], env),
            Call("localbot.download", ["--list", "--dir", str(models)]),
            Call("localbot.download", ["--verify", "--dir", str(models)]),
        ]
    before = snapshot(tmp_path)

    outcomes = run_calls(calls)

    for i, outcome in enumerate(outcomes):
        case = CASES[i // 3]
        assert_one_line_error(outcome, MANIFEST, case.needle, str(dirs[i // 3]))
        assert outcome.seconds < SECONDS, (case.id, outcome)
    assert snapshot(tmp_path) == before


def test_a_manifest_with_a_bom_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b"\xef\xbb\xbf" + manifest())
    (tmp_path / "m.gguf").write_bytes(CONTENT)
    assert resolve_model("m", tmp_path) == tmp_path / "m.gguf"
    result = run_limited(["-m", "localbot.download", "--verify", "--dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert "All 1 models match" in result.stdout


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (os.mkfifo, "not a regular file"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: p.symlink_to(p), "Too many levels of symbolic links"),
    ],
    ids=["fifo", "directory", "symlink-loop"],
)
def test_a_manifest_that_is_not_a_file_is_refused_without_blocking(
    tmp_path: Path, make, needle: str
) -> None:
    make(tmp_path / "manifest.json")
    start = time.perf_counter()
    with pytest.raises(ManifestError, match=needle) as caught:
        load_manifest(tmp_path)
    assert time.perf_counter() - start < 1
    assert_one_line(str(caught.value))


# -- download requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["../x", "m.gguf"],
        ["o/%2e%2e", "m.gguf"],
        ["o o/n", "m.gguf"],
        ["o/n.git", "m.gguf"],
        ["o--x/n", "m.gguf"],
        ["o/.n", "m.gguf"],
        ["o/" + "n" * 95, "m.gguf"],
        ["o/n\nx", "m.gguf"],
        ["o/n", "a\nb.gguf"],
        ["o/n", "../m.gguf"],
        ["o/n", "m\u0000.gguf"],
        ["o/n", "m.gguf", "--name", "a\nb"],
        ["o/n", "m.gguf", "--revision", "main\n"],
    ],
    ids=[
        "dotdot",
        "percent-dotdot",
        "space",
        "dot-git",
        "double-dash",
        "leading-dot",
        "97-chars",
        "newline-in-repo",
        "newline-in-file",
        "dotdot-file",
        "nul-in-file",
        "newline-in-name",
        "newline-in-revision",
    ],
)
def test_bad_requests_are_usage_errors_before_any_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    from localbot.download import main

    assert main([*argv, "--dir", str(tmp_path)]) == USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("localbot: error: ")
    assert_one_line(err.rstrip("\n"))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def hub() -> FakeHub:
    with FakeHub() as fake:
        yield fake


def download(hub: FakeHub, tmp_path: Path, argv: list[str]):
    """``python -m localbot.download ARGV`` against the fake Hub, under ``ulimit -v``."""
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # stderr then holds only what localbot says
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    return run_limited(["-m", "localbot.download", *argv], env=env)


@pytest.mark.enable_socket
def test_a_hub_that_streams_past_the_announced_size_is_stopped(
    hub: FakeHub, tmp_path: Path
) -> None:
    """Issue 13 item 11: 1,000 bytes announced, then an endless body."""
    hub.add_file("acme/m-GGUF", "m.gguf", b"G" * 1000, endless=True)
    models = tmp_path / "models"

    start = time.perf_counter()
    result = download(hub, tmp_path, ["acme/m-GGUF", "m.gguf", "--dir", str(models)])

    assert time.perf_counter() - start < 30
    assert result.returncode == DOWNLOAD, result.stderr
    line = one_error_line(result.stderr)
    assert "more than the 1,000 bytes it announced" in line
    assert [p.name for p in models.iterdir()] == []  # the .part is gone, nothing recorded
    sent = sum(r.sent for r in hub.gets("m.gguf"))
    assert sent < 64 * 1024 * 1024  # the client hung up early


@pytest.mark.enable_socket
def test_an_announced_size_larger_than_the_free_space_fails_before_writing(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.add_file("acme/m-GGUF", "m.gguf", CONTENT, announced_size=10**18)
    models = tmp_path / "models"

    result = download(hub, tmp_path, ["acme/m-GGUF", "m.gguf", "--dir", str(models)])

    assert result.returncode == DOWNLOAD, result.stderr
    assert "needs 1,000,000,000,000,000,000 more bytes" in one_error_line(result.stderr)
    assert list(models.iterdir()) == []
    assert hub.gets("m.gguf") == []


@pytest.mark.enable_socket
def test_a_models_dir_that_cannot_be_created_fails_before_the_network(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.add_file("acme/m-GGUF", "m.gguf", CONTENT)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for where in ("/proc/localbot-test", str(blocker / "models")):
        result = download(hub, tmp_path, ["acme/m-GGUF", "m.gguf", "--dir", where])
        assert result.returncode == DOWNLOAD, result.stderr
        assert "Cannot write to the models directory" in one_error_line(result.stderr)
    assert hub.requests == []


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("localbot: error: ")
    assert_one_line(lines[0])
    return lines[0]
