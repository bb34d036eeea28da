"""``python -m localbot.download`` against a real HTTP server speaking the Hub's protocol.

Commands that talk to the (fake) Hub run in a subprocess: huggingface_hub reads HF_ENDPOINT,
HF_HUB_OFFLINE and HF_HOME once, at import, so a fresh process per run is the honest test.
Commands that never touch the network (--list, --verify, argument errors) run in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hubserver import FakeHub

from localbot.download import main
from localbot.errors import DownloadError
from localbot.manifest import resolve_model
from localbot.manifest_file import Manifest, ModelEntry, load_manifest

pytestmark = pytest.mark.enable_socket  # the fake Hub listens on 127.0.0.1

ROOT = Path(__file__).resolve().parent.parent
REPO = "acme/Tiny-GGUF"
FILE = "tiny-q4_k_m.gguf"
MIB = 1 << 20
# huggingface_hub's http_get hands the body over in 10 MiB chunks, so a transfer interrupted
# after 21 MiB has 20 MiB on disk: the big file must be larger than that.
BIG_SIZE = 24 * MIB
STOP_AT = 21 * MIB

Cli = Callable[..., subprocess.CompletedProcess[str]]


def make_gguf(path: Path, n_floats: int) -> bytes:
    """A small but real GGUF file: llama metadata and one random f32 tensor."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("localbot download test")
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).random(n_floats, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="session")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf", 16_384)


@pytest.fixture(scope="session")
def big_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    data = make_gguf(tmp_path_factory.mktemp("gguf") / "big.gguf", BIG_SIZE // 4)
    assert len(data) > STOP_AT + MIB
    return data


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "models"
    monkeypatch.setenv("LOCALBOT_MODELS_DIR", str(path))
    return path


def closed_port_url() -> str:
    """An endpoint where nothing listens: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def cli_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        PYTHONPATH=str(ROOT),
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_XET="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.update(extra)
    return env


@pytest.fixture
def cli(hub: FakeHub, models_dir: Path, tmp_path: Path) -> Cli:
    """Run ``python -m localbot.download ARGS`` against the fake Hub (or ``endpoint``)."""

    def run(
        *args: str, endpoint: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localbot.download", *args],
            env=cli_env(endpoint or hub.endpoint, tmp_path / "hf-home", **env),
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("localbot: error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def part_files(models_dir: Path) -> list[Path]:
    return sorted(models_dir.glob("*.part")) if models_dir.exists() else []


# -- downloads ---------------------------------------------------------------------------------


def test_download_verifies_and_records_the_file(
    cli: Cli, hub: FakeHub, models_dir: Path, small_gguf: bytes
) -> None:
    hub.add_file(REPO, FILE, small_gguf)

    result = cli(REPO, FILE, TQDM_POSITION="-1")  # progress bars even without a terminal

    assert result.returncode == 0, result.stderr
    assert f"Downloaded tiny-q4_k_m: {models_dir / FILE}" in result.stdout
    assert "100%" in result.stderr  # huggingface_hub's progress bar
    assert (models_dir / FILE).read_bytes() == small_gguf
    assert part_files(models_dir) == []
    entry = load_manifest(models_dir).models["tiny-q4_k_m"]
    assert entry.repo == REPO
    assert entry.file == FILE
    assert entry.ref == "main"
    assert entry.revision == hub.commit  # "main" resolved to the commit, which is recorded
    assert entry.size == len(small_gguf)
    assert entry.sha256 == hashlib.sha256(small_gguf).hexdigest()
    when = datetime.fromisoformat(entry.downloaded_at)
    assert abs(datetime.now(timezone.utc) - when) < timedelta(minutes=5)
    # One HEAD to resolve main, one GET pinned to the commit it resolved to; no telemetry.
    assert [(r.method, r.path) for r in hub.requests] == [
        ("HEAD", f"/{REPO}/resolve/main/{FILE}"),
        ("GET", f"/{REPO}/resolve/{hub.commit}/{FILE}"),
    ]


def test_catalogue_name_downloads_its_file_and_can_become_the_default(
    cli: Cli, hub: FakeHub, models_dir: Path, small_gguf: bytes
) -> None:
    hub.add_file("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf", small_gguf)

    result = cli("qwen2.5-0.5b", "--default")

    assert result.returncode == 0, result.stderr
    manifest = load_manifest(models_dir)
    assert manifest.default == "qwen2.5-0.5b"
    assert manifest.models["qwen2.5-0.5b"].file == "qwen2.5-0.5b-instruct-q4_k_m.gguf"
    assert resolve_model(None, models_dir) == models_dir / "qwen2.5-0.5b-instruct-q4_k_m.gguf"
    assert resolve_model("qwen2.5-0.5b", models_dir).read_bytes() == small_gguf


def test_a_killed_download_resumes_where_it_stopped(
    cli: Cli, hub: FakeHub, models_dir: Path, tmp_path: Path, big_gguf: bytes
) -> None:
    hub_file = hub.add_file(REPO, FILE, big_gguf, stall_after=STOP_AT)
    first = subprocess.Popen(
        [sys.executable, "-m", "localbot.download", REPO, FILE],
        env=cli_env(hub.endpoint, tmp_path / "hf-home", HF_HUB_DISABLE_PROGRESS_BARS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (part_files(models_dir) and part_files(models_dir)[0].stat().st_size >= 20 * MIB):
            assert first.poll() is None, "the first download ended instead of stalling"
            assert time.monotonic() < deadline, "the first download never got 20 MiB on disk"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)  # like a power cut: no cleanup at all
        first.wait(timeout=30)
    hub.release()
    (part,) = part_files(models_dir)
    have = part.stat().st_size
    assert 0 < have < len(big_gguf)
    assert not (models_dir / FILE).exists()

    hub_file.stall_after = None
    result = cli(REPO, FILE)

    assert result.returncode == 0, result.stderr
    assert "Resuming" in result.stderr
    last = hub.gets(FILE)[-1]
    assert last.range == f"bytes={have}-"
    assert last.status == 206
    assert last.sent == len(big_gguf) - have  # only the rest came over the wire
    assert (
        hashlib.sha256((models_dir / FILE).read_bytes()).digest()
        == hashlib.sha256(big_gguf).digest()
    )
    assert part_files(models_dir) == []


def test_a_dropped_connection_is_resumed_with_a_range_request(
    cli: Cli, hub: FakeHub, models_dir: Path, big_gguf: bytes
) -> None:
    hub.add_file(REPO, FILE, big_gguf, cut_after=STOP_AT)

    result = cli(REPO, FILE, HF_HUB_DISABLE_PROGRESS_BARS="1")

    assert result.returncode == 0, result.stderr
    first, second = hub.gets(FILE)
    assert first.range is None
    assert first.sent == STOP_AT
    start = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= STOP_AT
    assert second.status == 206
    assert second.sent == len(big_gguf) - start
    assert (models_dir / FILE).read_bytes() == big_gguf
    assert (
        load_manifest(models_dir).models["tiny-q4_k_m"].sha256
        == hashlib.sha256(big_gguf).hexdigest()
    )


def test_a_partial_file_from_an_earlier_run_is_continued(
    cli: Cli, hub: FakeHub, models_dir: Path, small_gguf: bytes
) -> None:
    hub.add_file(REPO, FILE, small_gguf)
    sha = hashlib.sha256(small_gguf).hexdigest()
    models_dir.mkdir()
    half = len(small_gguf) // 2
    (models_dir / f"{FILE}.{sha[:16]}.part").write_bytes(small_gguf[:half])
    stale = models_dir / f"{FILE}.{'0' * 16}.part"  # left by an older version of the file
    stale.write_bytes(b"old")

    result = cli(REPO, FILE)

    assert result.returncode == 0, result.stderr
    (get,) = hub.gets(FILE)
    assert get.range == f"bytes={half}-"
    assert get.sent == len(small_gguf) - half
    assert (models_dir / FILE).read_bytes() == small_gguf
    assert part_files(models_dir) == []


def test_a_server_that_ignores_range_makes_the_download_start_over(
    cli: Cli, hub: FakeHub, models_dir: Path, small_gguf: bytes
) -> None:
    hub.add_file(REPO, FILE, small_gguf, ranges=False)
    sha = hashlib.sha256(small_gguf).hexdigest()
    models_dir.mkdir()
    (models_dir / f"{FILE}.{sha[:16]}.part").write_bytes(small_gguf[:1000])

    result = cli(REPO, FILE)

    assert result.returncode == 0, result.stderr
    (get,) = hub.gets(FILE)
    assert get.range == "bytes=1000-"
    assert get.status == 200
    assert (models_dir / FILE).read_bytes() == small_gguf


def test_bytes_that_do_not_match_the_hub_hash_are_rejected(
    cli: Cli, hub: FakeHub, models_dir: Path, small_gguf: bytes
) -> None:
    tampered = bytearray(small_gguf)
    tampered[len(tampered) // 2] ^= 0xFF  # same size, one byte flipped
    hub.add_file(REPO, FILE, small_gguf, serve=bytes(tampered))

    result = cli(REPO, FILE, HF_HUB_DISABLE_PROGRESS_BARS="1")

    assert result.returncode == DownloadError.exit_code
    line = assert_one_line_error(result, FILE, "failed verification", "nothing was installed")
    assert hashlib.sha256(small_gguf).hexdigest()[:16] in line
    assert not (models_dir / FILE).exists()
    assert part_files(models_dir) == []
    assert load_manifest(models_dir).models == {}


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            (REPO, "nope.gguf"),
            ["nope.gguf is not in acme/Tiny-GGUF", f"its .gguf files are: {FILE}"],
        ),
        (("acme/Missing-GGUF", FILE), ["Repository acme/Missing-GGUF not found"]),
        ((REPO, FILE, "--revision", "v9"), ["Revision 'v9' not found in acme/Tiny-GGUF"]),
    ],
)
def test_what_the_hub_does_not_have_is_one_clear_line(
    cli: Cli,
    hub: FakeHub,
    models_dir: Path,
    small_gguf: bytes,
    args: tuple[str, ...],
    needles: list[str],
) -> None:
    hub.add_file(REPO, FILE, small_gguf)

    result = cli(*args)

    assert result.returncode == DownloadError.exit_code
    assert_one_line_error(result, *needles)
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


# -- offline -----------------------------------------------------------------------------------


def test_offline_without_the_file_says_what_to_copy_where(
    cli: Cli, hub: FakeHub, models_dir: Path
) -> None:
    result = cli("qwen2.5-1.5b", HF_HUB_OFFLINE="1")

    line = assert_one_line_error(
        result,
        "HF_HUB_OFFLINE is set",
        "`python -m localbot.download qwen2.5-1.5b`",
        "copy qwen2.5-1.5b-instruct-q4_k_m.gguf and manifest.json",
        f"into {models_dir}",
    )
    assert result.returncode == DownloadError.exit_code
    assert line.count(". ") == 0  # one sentence
    assert hub.requests == []


def test_no_network_without_the_file_says_what_to_copy_where(cli: Cli, models_dir: Path) -> None:
    endpoint = closed_port_url()

    result = cli(REPO, FILE, endpoint=endpoint)

    assert result.returncode == DownloadError.exit_code
    assert_one_line_error(
        result,
        f"cannot reach {endpoint}",
        f"`python -m localbot.download {REPO} {FILE}`",
        f"into {models_dir}",
    )


def test_a_recorded_file_needs_no_network(
    cli: Cli, hub: FakeHub, models_dir: Path, small_gguf: bytes
) -> None:
    hub.add_file(REPO, FILE, small_gguf)
    assert cli(REPO, FILE).returncode == 0
    hub.requests.clear()

    offline = cli(REPO, FILE, HF_HUB_OFFLINE="1")
    unreachable = cli(REPO, FILE, endpoint=closed_port_url())
    online = cli(REPO, FILE)

    for result in (offline, unreachable, online):
        assert result.returncode == 0, result.stderr
        assert "already downloaded" in result.stdout
        assert result.stderr == ""
    assert hub.requests == []


def test_a_file_already_in_place_is_hashed_and_adopted_without_downloading(
    cli: Cli, hub: FakeHub, models_dir: Path, small_gguf: bytes
) -> None:
    hub.add_file(REPO, FILE, small_gguf)
    models_dir.mkdir()
    (models_dir / FILE).write_bytes(small_gguf)

    result = cli(REPO, FILE)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Found tiny-q4_k_m")
    assert hub.gets(FILE) == []
    assert load_manifest(models_dir).models["tiny-q4_k_m"].revision == hub.commit


def test_air_gapped_copy_verifies_and_resolves_offline(
    cli: Cli, hub: FakeHub, models_dir: Path, tmp_path: Path, small_gguf: bytes
) -> None:
    """The steps of the README's air-gapped section, in order (the chat step itself, with a real
    model found by manifest name and HF_HUB_OFFLINE=1, is tests/test_offline.py)."""
    hub.add_file("Qwen/Qwen2.5-1.5B-Instruct-GGUF", "qwen2.5-1.5b-instruct-q4_k_m.gguf", small_gguf)
    # On the connected machine.
    assert cli("qwen2.5-1.5b", "--default").returncode == 0
    assert cli("--verify").returncode == 0
    # The copy (a .part file left by an unfinished download does no harm).
    (models_dir / "other.gguf.0123456789abcdef.part").write_bytes(b"unfinished")
    usb = tmp_path / "air-gapped" / "models"
    shutil.copytree(models_dir, usb)
    hub.requests.clear()
    # On the air-gapped machine: no Hub, offline mode on.
    offline = {"LOCALBOT_MODELS_DIR": str(usb), "HF_HUB_OFFLINE": "1"}
    nowhere = closed_port_url()

    verified = cli("--verify", endpoint=nowhere, **offline)
    present = cli("qwen2.5-1.5b", endpoint=nowhere, **offline)

    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("ok       qwen2.5-1.5b")
    assert present.returncode == 0, present.stderr
    assert "already downloaded" in present.stdout
    # What `python -m localbot` does with --model NAME, and with no --model.
    expected = usb / "qwen2.5-1.5b-instruct-q4_k_m.gguf"
    assert resolve_model("qwen2.5-1.5b", usb) == expected
    assert resolve_model(None, usb) == expected
    assert hub.requests == []


# -- --verify, --list and argument errors (no network: in-process) -----------------------------


def record(models_dir: Path, name: str, content: bytes, **fields: str) -> ModelEntry:
    models_dir.mkdir(parents=True, exist_ok=True)
    file = fields.pop("file", f"{name}.gguf")
    (models_dir / file).write_bytes(content)
    entry = ModelEntry(
        name=name,
        repo=fields.pop("repo", f"acme/{name}-GGUF"),
        file=file,
        revision="0" * 40,
        size=len(content),
        sha256=hashlib.sha256(content).hexdigest(),
        downloaded_at="2025-01-01T00:00:00+00:00",
    )
    manifest = load_manifest(models_dir)
    manifest.add(entry)
    manifest.save()
    return entry


def test_verify_reports_ok_changed_and_missing(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record(models_dir, "good", b"GGUF good")
    record(models_dir, "tampered", b"GGUF same size")
    record(models_dir, "truncated", b"GGUF shorter soon")
    record(models_dir, "gone", b"GGUF gone")
    (models_dir / "tampered.gguf").write_bytes(b"GGUF SAME SIZE")
    (models_dir / "truncated.gguf").write_bytes(b"GGUF")
    (models_dir / "gone.gguf").unlink()

    code = main(["--verify"])

    out, err = capsys.readouterr()
    assert code == 6
    statuses = {line.split()[1]: line.split()[0] for line in out.splitlines()}
    assert statuses == {
        "gone": "missing",
        "good": "ok",
        "tampered": "changed",
        "truncated": "changed",
    }
    assert err.count("\n") == 1
    assert err.startswith("localbot: error: 3 of 4 models failed verification")
    assert "--force" in err


def test_verify_passes_when_everything_matches(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record(models_dir, "good", b"GGUF good")

    assert main(["--verify"]) == 0
    assert "All 1 models match" in capsys.readouterr().out


def test_verify_without_a_manifest_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--verify", "--dir", str(tmp_path / "empty")]) == 6
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "No manifest.json in" in err


def test_list_shows_the_catalogue_and_what_is_downloaded(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record(
        models_dir,
        "llama3.2-1b",
        b"GGUF",
        repo="bartowski/Llama-3.2-1B-Instruct-GGUF",
        file="Llama-3.2-1B-Instruct-Q4_K_M.gguf",
    )
    record(models_dir, "my-own", b"GGUF mine")

    assert main(["--list"]) == 0

    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    for name in (
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "gemma3-1b",
        "llama3.2-1b",
        "llama3.2-3b",
        "smollm2-1.7b",
    ):
        assert name in rows
    assert "downloaded" in rows["llama3.2-1b"]
    assert "downloaded" not in rows["qwen2.5-0.5b"]
    assert "Apache-2.0" in rows["qwen2.5-0.5b"]
    assert "acme/my-own-GGUF my-own.gguf" in rows["my-own"]


@pytest.mark.parametrize(
    ("argv", "needle", "code"),
    [
        (["no-such-model"], "Unknown model 'no-such-model': choose one of qwen2.5-0.5b", 2),
        (["acme/x", "weights.bin"], "is not a .gguf file", 2),
        (["a", "b", "c"], "Give a model NAME", 2),
        (["--list", "qwen2.5-0.5b"], "take no model", 2),
    ],
)
def test_user_errors_are_one_line(
    models_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str, code: int
) -> None:
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert needle in err


def test_bad_flags_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--list", "--verify"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("localbot: error: argument --verify: not allowed with argument --list")


def test_corrupt_manifest_is_one_line(models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models_dir.mkdir()
    (models_dir / "manifest.json").write_text("{not json")

    assert main(["--list"]) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(models_dir / "manifest.json") in err


def test_the_script_wrapper_runs_the_same_command(tmp_path: Path) -> None:
    models = tmp_path / "models"
    Manifest(models).save()

    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "download_model.py"),
            "--verify",
            "--dir",
            str(models),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )

    assert result.returncode == 0, result.stderr
    assert "No models recorded" in result.stdout
    assert json.loads((models / "manifest.json").read_text())["models"] == {}


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"{DownloadError.exit_code}    the download failed" in out
    assert "6    models/manifest.json is corrupt" in out
