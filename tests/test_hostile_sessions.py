"""Hostile inputs and faults at the session store and its sidecars (issue 13).

Every case runs the real CLI (``python -m localbot``) on a crafted sessions directory and asserts
the documented exit code, one line on stderr, no traceback, no hang, and that no file changed
except the intended ones (the whole data home is hashed before and after). Only ``-p`` cases need
a model, and only its path: the failures come before llama.cpp loads it (the two tests that load
it are marked ``model``). File-system faults use a small tmpfs where this process may mount one.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage

from localbot import atomic, kv_files
from localbot.errors import LocalbotError, SessionError
from localbot.paths import input_history_path
from localbot.session_settings import load_settings, save_settings
from localbot.sessions import SessionStore

pytestmark = pytest.mark.skipif(os.name != "posix", reason="FIFOs, links and flock are POSIX")

REPO = Path(__file__).resolve().parents[1]
HUMAN = {"type": "human", "data": {"content": "hi", "type": "human"}}


# --------------------------------------------------------------------------- helpers


def cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m localbot`` on this checkout, data in ``home``, run from ``home`` (so a stray
    relative folder such as a literal ``~nouser`` shows up in the snapshot)."""
    full_env = {**os.environ, "LOCALBOT_HOME": str(home), "PYTHONPATH": str(REPO), **(env or {})}
    for name in ("LOCALBOT_SESSIONS_DIR", "LOCALBOT_SESSION", "LOCALBOT_SYSTEM"):
        if name not in (env or {}):
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "localbot", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=home,
        timeout=60,  # a FIFO opened with a blocking open would hang here
    )


def snapshot(top: Path) -> dict[str, tuple]:
    """Every entry under ``top`` (links not followed, FIFOs never opened) and its content."""
    entries: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            mode = info.st_mode
            if stat.S_ISREG(mode) and info.st_size > 64 * 1024**2:  # the sparse giants
                kind: tuple = ("big file", info.st_size, info.st_mtime_ns, info.st_ino)
            elif stat.S_ISREG(mode):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                kind = ("file", digest.hexdigest())
            elif stat.S_ISLNK(mode):
                kind = ("link", os.readlink(path))
            else:
                kind = (stat.S_IFMT(mode),)
            entries[str(path.relative_to(top))] = kind
    return entries


def changed(before: dict[str, tuple], after: dict[str, tuple]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("localbot: error: "), lines[0]
    assert text in lines[0], lines[0]


def history(*contents: str) -> bytes:
    return json.dumps([{"type": "human", "data": {"content": c}} for c in contents]).encode()


def put(root: Path, rel: str, data: bytes | str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def fifo(root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(root / rel)


def link(root: Path, rel: str, target: str | Path) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, root / rel)


def deep(n: int = 100_000) -> bytes:
    return b"[" * n + b"]" * n


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    """A sessions directory (``setup(sessions, home)``), a command, and what must happen."""

    setup: Callable[[Path, Path], object]
    args: tuple[str, ...]
    code: int
    text: str  # in the one stderr line (code != 0) or in stdout (code == 0)
    changes: set[str] = field(default_factory=set)  # paths under home that may change
    env: dict[str, str] = field(default_factory=dict)
    absent: str | None = None  # must not appear in stdout or stderr (e.g. a secret)


def _dotted(s: Path, h: Path) -> None:
    put(s, "a.json", history("x"))
    put(s, "a.v2.json", history("x", "y"))
    put(s, "a.notes.json", '{"not": "a list"}')  # was taken for a sidecar of a, and hidden


def _fifo_session(s: Path, h: Path) -> None:
    put(s, "good.json", history("x"))
    fifo(s, "x.json")


def _tool_calls(s: Path, h: Path) -> None:
    put(s, "good.json", history("x"))
    bad = [HUMAN, {"type": "ai", "data": {"content": "x", "tool_calls": "zzz"}}]
    put(s, "bad.json", json.dumps(bad))


def _foreign_files(s: Path, h: Path) -> None:
    put(s, "good.json", history("x"))
    put(s, "deep.json", deep())
    put(s, "digits.json", b"[" + b"7" * 5000 + b"]")
    put(s, "utf8.json", b'[{"type": "human", "data": {"content": "\xff"}}]')
    (s / "dir.json").mkdir()
    link(s, "loop.json", "loop.json")
    put(h, "outside.json", history("secret"))
    link(s, "out.json", h / "outside.json")
    with open(s / "huge.json", "wb") as f:  # sparse: 600 MB of nothing, over the size limit
        f.truncate(600 * 1024**2)


def _session_with_sidecars(sid: str, *legacy: str) -> Callable[[Path, Path], None]:
    def setup(s: Path, h: Path) -> None:
        put(s, f"{sid}.json", history("x"))
        for suffix in legacy:
            put(s, f"{sid}{suffix}", b'{"system": "old"}' if suffix == ".settings" else b"kv")

    return setup


def _project_notes(s: Path, h: Path) -> None:
    put(s, "project.notes.json", history("keep me"))
    put(s, "project.notes.settings", '{"system": "legacy"}')
    put(s, ".sidecars/project.notes/kvstate", b"kv")


def _a_and_neighbours(s: Path, h: Path) -> None:
    put(s, "a.json", history("x"))
    put(s, ".sidecars/a/settings.json", '{"system": "A"}')
    put(s, "a.notes.json", history("keep"))
    put(s, "a.notes.settings", '{"system": "keep"}')
    put(s, "a.d/part", b"keep")


def _lock(kind: str) -> Callable[[Path, Path], None]:
    def setup(s: Path, h: Path) -> None:
        put(s, "a.json", history("x"))
        if kind == "dir":
            (s / ".a.lock").mkdir()
        else:
            link(s, ".a.lock", ".a.lock")

    return setup


def _sidecars_link_out(s: Path, h: Path) -> None:
    put(s, "a.json", history("x"))
    put(h, "outside/a/settings.json", '{"system": "secret"}')
    link(s, ".sidecars", h / "outside")


def _settings(data: bytes | None = None, *, kind: str = "file") -> Callable[[Path, Path], None]:
    def setup(s: Path, h: Path) -> None:
        put(s, "a.json", history("x"))
        if kind == "fifo":
            fifo(s, ".sidecars/a/settings.json")
        elif kind == "link":
            put(h, "secret.txt", '{"system": "the secret"}')
            link(s, ".sidecars/a/settings.json", h / "secret.txt")
        elif kind == "folder link":
            put(h, "outside/settings.json", '{"system": "the secret"}')
            link(s, ".sidecars/a", h / "outside")
        else:
            put(s, ".sidecars/a/settings.json", data or b"")

    return setup


def _root_is(kind: str) -> Callable[[Path, Path], None]:
    def setup(s: Path, h: Path) -> None:
        if kind == "file":
            put(h, "sessions", b"not a folder")
        else:
            link(h, "sessions", h / "gone")

    return setup


LIST = ("--list-sessions",)
LEGACY = (".settings", ".kvstate", ".kvstate.meta")

CASES: dict[str, Case] = {
    # item 1: dotted ids
    "list: a.notes is listed next to a (as corrupt)": Case(_dotted, LIST, 0, "a.notes "),
    "delete project never touches project.notes": Case(
        _project_notes, ("--delete-session", "project"), 5, "No session 'project'"
    ),
    "delete a keeps a.notes, its legacy settings and a.d/": Case(
        _a_and_neighbours,
        ("--delete-session", "a"),
        0,
        "deleted",
        {"sessions/a.json", "sessions/.sidecars/a", "sessions/.sidecars/a/settings.json"},
    ),
    "delete takes an older layout's sidecars along": Case(
        _session_with_sidecars("a", *LEGACY),
        ("--delete-session", "a"),
        0,
        "deleted",
        {"sessions/a.json", *(f"sessions/a{x}" for x in LEGACY), "sessions/.sidecars"},
    ),
    "rename moves an older layout's sidecars into the new folder": Case(
        _session_with_sidecars("a", *LEGACY),
        ("--rename-session", "a", "b"),
        0,
        "renamed",
        {
            "sessions/a.json",
            "sessions/b.json",
            "sessions/.b.lock",
            *(f"sessions/a{x}" for x in LEGACY),
            "sessions/.sidecars",
            "sessions/.sidecars/b",
            *(f"sessions/.sidecars/b/{n}" for n in ("settings.json", "kvstate", "kvstate.meta")),
        },
    ),
    "rename onto a name with older sidecars is refused": Case(
        lambda s, h: (put(s, "a.json", history("x")), put(s, "b.settings", "{}")),
        ("--rename-session", "a", "b"),
        5,
        "already exists",
    ),
    # item 10 and 14: files the reader must survive; one bad file never hides the others
    "list: FIFO as a session file": Case(_fifo_session, LIST, 0, "good"),
    "list: ai entry with tool_calls 'zzz'": Case(_tool_calls, LIST, 0, "good"),
    "list: deep, huge, foreign, looping and outside files": Case(_foreign_files, LIST, 0, "good"),
    "list: an escaped lone surrogate is a usable session": Case(
        lambda s, h: put(s, "s.json", b'[{"type": "human", "data": {"content": "a\\ud800b"}}]'),
        LIST,
        0,
        "1 messages",
    ),
    "delete a FIFO session file": Case(
        lambda s, h: fifo(s, "x.json"), ("--delete-session", "x"), 0, "deleted", {"sessions/x.json"}
    ),
    # item 16: file-system faults
    "lock is a directory": Case(_lock("dir"), ("--delete-session", "a"), 5, "Cannot lock"),
    "lock is a link loop": Case(_lock("loop"), ("--rename-session", "a", "b"), 5, "Cannot lock"),
    "sessions dir is a file (list)": Case(_root_is("file"), LIST, 5, "not a directory"),
    "sessions dir is a file (delete)": Case(
        _root_is("file"), ("--delete-session", "a"), 5, "not a directory"
    ),
    "sessions dir is a dangling link (list)": Case(_root_is("link"), LIST, 5, "does not exist"),
    # item 18: sidecar links are never followed
    ".sidecars is a link out of the store (delete)": Case(
        _sidecars_link_out, ("--delete-session", "a"), 5, "never follows links"
    ),
    # item 20
    "LOCALBOT_SESSIONS_DIR=~nouser/x": Case(
        lambda s, h: None, LIST, 2, "no such user", env={"LOCALBOT_SESSIONS_DIR": "~nouser/x"}
    ),
}

# -p: the model path is only checked (GGUF header), never loaded, before these failures.
PROMPT = ("-p", "hi", "-s", "a")
PROMPT_CASES: dict[str, Case] = {
    "settings with wrong types": Case(
        _settings(b'{"system": 5, "vars": [1]}'), PROMPT, 5, '"system", not text'
    ),
    "settings with vars of the wrong type": Case(
        _settings(b'{"vars": {"x": 1}}'), PROMPT, 5, '"vars"'
    ),
    "settings nested 100k deep": Case(_settings(deep()), PROMPT, 5, "not valid JSON"),
    "settings not UTF-8": Case(_settings(b'{"system": "\xff"}'), PROMPT, 5, "not valid JSON"),
    "settings is a FIFO": Case(_settings(kind="fifo"), PROMPT, 5, "not a regular file"),
    "settings is a link out of the store": Case(
        _settings(kind="link"), PROMPT, 5, "does not follow", absent="the secret"
    ),
    "sidecar folder is a link out of the store": Case(
        _settings(kind="folder link"), PROMPT, 5, "never follows links", absent="the secret"
    ),
    "corrupt settings are never overwritten by --system": Case(
        _settings(b"{oops"), (*PROMPT, "--system", "new"), 5, "not valid JSON"
    ),
    "lock is a directory (--system saves settings)": Case(
        _lock("dir"), (*PROMPT, "--system", "new"), 5, "Cannot lock"
    ),
    "older layout's corrupt settings: moved, then refused": Case(
        lambda s, h: (put(s, "a.json", history("x")), put(s, "a.settings", b"[1]")),
        PROMPT,
        5,
        "holds a list, not a JSON object",
        {"sessions/a.settings", "sessions/.sidecars", "sessions/.sidecars/a"}
        | {"sessions/.sidecars/a/settings.json", "sessions/.a.lock"},
    ),
}


def run_case(case: Case, home: Path, *extra: str) -> None:
    sessions = home / "sessions"
    case.setup(sessions, home)
    before = snapshot(home)
    start = time.monotonic()
    result = cli(home, *case.args, *extra, env=case.env)
    assert time.monotonic() - start < 30
    if case.code == 0:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert case.text in result.stdout
    else:
        assert_one_line_error(result, case.code, case.text)
    if case.absent:
        assert case.absent not in result.stdout + result.stderr
    assert changed(before, snapshot(home)) == case.changes


@pytest.mark.parametrize("name", CASES)
def test_session_store_cli_table(name: str, tmp_path: Path) -> None:
    run_case(CASES[name], tmp_path)


@pytest.mark.parametrize("name", PROMPT_CASES)
def test_prompt_fails_on_hostile_sidecars_before_loading_the_model(
    name: str, tmp_path: Path, test_model_path: Path
) -> None:
    run_case(PROMPT_CASES[name], tmp_path, "--model", str(test_model_path))


def test_listing_reports_each_bad_file_as_corrupt(tmp_path: Path) -> None:
    _foreign_files(tmp_path / "sessions", tmp_path)
    _tool_calls(tmp_path / "sessions", tmp_path)
    rows = {info.id: info for info in SessionStore(tmp_path / "sessions").list()}
    assert rows.pop("good").message_count == 1
    assert sorted(rows) == ["bad", "deep", "digits", "dir", "huge", "loop", "out", "utf8"]
    for info in rows.values():
        assert info.corrupt
        assert "\n" not in info.problem
    assert "larger than" in rows["huge"].problem
    assert "not a regular file" in rows["dir"].problem
    assert "LangChain cannot load" in rows["bad"].problem


@pytest.mark.model
def test_prompt_on_a_session_with_bad_tool_calls_is_exit_5(
    tmp_path: Path, test_model_path: Path
) -> None:
    args = ("-p", "hi", "-s", "bad", "--max-tokens", "1", "--chat-format", "gemma")
    case = Case(_tool_calls, args, 5, "bad.json")
    run_case(case, tmp_path, "--model", str(test_model_path))


# --------------------------------------------------------------------------- migration


def test_older_layout_moves_on_first_use_and_only_for_its_owner(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    put(tmp_path, "a.json", history("x"))
    put(tmp_path, "a.settings", '{"system": "A"}')
    put(tmp_path, "a.kvstate", b"state")
    put(tmp_path, "a.kvstate.meta", b"{}")
    put(tmp_path, "orphan.settings", '{"system": "whose?"}')  # no orphan.json: left alone
    put(tmp_path, ".a.kvstate.tmp-dead", b"x" * 100)  # a killed save of the older layout
    os.utime(tmp_path / ".a.kvstate.tmp-dead", (time.time() - 600,) * 2)

    assert load_settings(store, "a") == {"system": "A"}
    assert sorted(p.name for p in store.sidecar_paths("a")) == [
        "kvstate",
        "kvstate.meta",
        "settings.json",
    ]
    assert (store.sidecar_dir("a") / "kvstate").read_bytes() == b"state"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".a.lock",
        ".sidecars",
        "a.json",
        "orphan.settings",
    ]
    assert load_settings(store, "orphan") == {}
    assert (tmp_path / "orphan.settings").exists()


def test_migration_never_overwrites_a_file_in_the_new_layout(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    put(tmp_path, "a.json", history("x"))
    put(tmp_path, ".sidecars/a/settings.json", '{"system": "new"}')
    put(tmp_path, "a.settings", '{"system": "old"}')
    assert load_settings(store, "a") == {"system": "new"}
    assert (tmp_path / "a.settings").read_text() == '{"system": "old"}'


# --------------------------------------------------------------------------- REPL /switch


def _repl(store: SessionStore):
    from localbot import ChatLlamaCpp, build_chatbot
    from localbot.repl import ReplState

    model = ChatLlamaCpp(model_path="/not/loaded.gguf")  # these commands never load it
    bot = build_chatbot(model, store, None)
    return ReplState(bot=bot, session="home", out=io.StringIO(), process_system="Be brief.")


@pytest.mark.parametrize("broken", ["settings", "history"])
def test_a_refused_switch_leaves_the_repl_where_it_was(tmp_path: Path, broken: str) -> None:
    from localbot.repl import handle_line

    store = SessionStore(tmp_path)
    store.get("home").add_message(HumanMessage("hi"))
    save_settings(store, "home", {"system": "Home {x}.", "vars": {"x": "1"}})
    if broken == "settings":
        put(tmp_path, "other.json", history("o"))
        put(tmp_path, ".sidecars/other/settings.json", b"{corrupt")
    else:
        put(tmp_path, "other.json", b"[{")
    before = snapshot(tmp_path)

    state = _repl(store)
    handle_line(state, "/switch home")
    handle_line(state, "/switch other")
    assert "error:" in state.out.getvalue().splitlines()[-1]
    assert state.session == "home"
    assert state.bot.system_prompt == "Home {x}."
    assert state.bot.variables == {"x": "1"}

    handle_line(state, "/system Changed {x}.")  # lands on home, never on other
    assert load_settings(store, "home") == {"system": "Changed {x}.", "vars": {"x": "1"}}
    assert changed(before, snapshot(tmp_path)) == {".sidecars/home/settings.json"}


def test_system_on_corrupt_settings_keeps_the_prompt_in_use(tmp_path: Path) -> None:
    from localbot.repl import handle_line

    store = SessionStore(tmp_path)
    state = _repl(store)
    state.bot = state.bot.with_settings("Before.")
    put(tmp_path, ".sidecars/home/settings.json", b"[]")
    handle_line(state, "/system After.")
    assert "error:" in state.out.getvalue()
    assert state.bot.system_prompt == "Before."
    assert (tmp_path / ".sidecars/home/settings.json").read_bytes() == b"[]"


# --------------------------------------------------------------------------- item 14: data


def test_settings_round_trip_and_lone_surrogates(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    save_settings(store, "a", {"system": "half \ud83c", "vars": {"x": "y"}})
    raw = (tmp_path / ".sidecars/a/settings.json").read_bytes()
    raw.decode("utf-8")
    assert load_settings(store, "a") == {"system": "half \ufffd", "vars": {"x": "y"}}
    with pytest.raises(SessionError, match="not text"):
        save_settings(store, "a", {"system": 5})
    assert load_settings(store, "a")["system"] == "half \ufffd"


def test_messages_with_surrogates_are_always_readable_after_a_write(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    h = store.get("s")
    h.add_messages(
        [HumanMessage("a\ud800b"), AIMessage("c", additional_kwargs={"\udc00": "\ud83c"})]
    )
    for m in h.messages:
        json.dumps(m.model_dump(), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- Hypothesis


def session_error_or(read: Callable[[], object]) -> object:
    """``read()``, or the one-line SessionError it raised; any other exception fails the test."""
    try:
        return read()
    except SessionError as err:
        message = str(err)
    assert "\n" not in message
    return None


_TEXT = st.text(max_size=20) | st.text(st.characters(categories=["Cs", "Ll"]), max_size=6)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=20,
)
_TYPES = ["human", "ai", "system", "tool", "chat", "function", "AIMessageChunk", "x", ""]
_FIELDS = [
    "tool_calls",
    "invalid_tool_calls",
    "tool_call_chunks",
    "additional_kwargs",
    "response_metadata",
    "usage_metadata",
    "tool_call_id",
    "id",
    "name",
    "role",
    "type",
]
_MESSAGE = st.fixed_dictionaries(  # close to a real message: one field at most is odd
    {"type": st.sampled_from(_TYPES), "data": st.fixed_dictionaries({"content": _TEXT})}
)
_ODD_MESSAGE = st.builds(
    lambda entry, key, value: {**entry, "data": {**entry["data"], key: value}},
    _MESSAGE,
    st.sampled_from(_FIELDS) | _TEXT,
    _JSON,
)
_ANY_ENTRY = st.fixed_dictionaries(
    {"type": st.sampled_from(_TYPES) | _TEXT},
    optional={"data": st.dictionaries(st.sampled_from(["content", *_FIELDS]), _JSON) | _JSON},
)
_ENTRIES = st.lists(_MESSAGE | _ODD_MESSAGE | _ANY_ENTRY, max_size=4)
_FILES = (
    st.binary(max_size=200)
    | _ENTRIES.map(lambda v: json.dumps(v).encode())  # LangChain's way: ASCII, \u escapes
    | _ENTRIES.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    | _JSON.map(lambda v: json.dumps(v).encode())
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=_FILES)
def test_reading_any_session_file_is_a_list_or_a_session_error_and_never_writes(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    root = tmp_path_factory.mktemp("h")
    put(root, "s.json", data)
    put(root, ".sidecars/s/settings.json", data)
    before = snapshot(root)
    store = SessionStore(root)
    messages = session_error_or(lambda: store.get("s").messages)
    if isinstance(messages, list):
        "".join(str(m.content) for m in messages).encode("utf-8")  # usable downstream
    assert [r.id for r in store.list()] == ["s"]
    session_error_or(lambda: load_settings(store, "s"))
    assert snapshot(root) == before


# --------------------------------------------------------------------------- item 16: faults


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount a small tmpfs (root only); the test may remount it read-only."""
    mounted: list[Path] = []

    def mount(size: str = "1m") -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
            capture_output=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


def _remount_read_only(point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)


def test_read_only_sessions_dir_is_one_line_and_intact(
    tmpfs: Callable[..., Path], test_model_path: Path
) -> None:
    home = tmpfs()
    store = SessionStore(home / "sessions")
    store.get("a").add_message(HumanMessage("x"))
    save_settings(store, "a", {"system": "S"})
    _remount_read_only(home)
    before = snapshot(home)
    with pytest.raises(SessionError, match="Read-only file system"):
        store.get("a").add_message(HumanMessage("y"))
    for args in (
        ("--delete-session", "a"),
        ("--rename-session", "a", "b"),
        ("-p", "hi", "-s", "a", "--system", "T", "--model", str(test_model_path)),
    ):
        assert_one_line_error(cli(home, *args), 5, "Read-only file system")
    assert snapshot(home) == before


def test_unwritable_sessions_dir_for_a_normal_user(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits (the read-only mount test covers this)")
    store = SessionStore(tmp_path / "sessions")
    store.get("a").add_message(HumanMessage("x"))
    store.root.chmod(0o500)
    try:
        with pytest.raises(SessionError, match="Permission denied"):
            store.get("a").add_message(HumanMessage("y"))
        assert_one_line_error(cli(tmp_path, "--delete-session", "a"), 5, "Permission denied")
    finally:
        store.root.chmod(0o700)
    assert len(store.get("a").messages) == 1


def test_full_disk_is_one_line_and_the_file_intact(
    tmpfs: Callable[..., Path], test_model_path: Path
) -> None:
    home = tmpfs("256k")
    store = SessionStore(home / "sessions")
    store.get("a").add_message(HumanMessage("x" * 1000))
    save_settings(store, "a", {"system": "S"})
    fill(home / "filler")
    before = snapshot(home)
    with pytest.raises(SessionError, match="No space left on device"):
        store.get("a").add_message(HumanMessage("y" * 100_000))
    result = cli(
        home, "-p", "hi", "-s", "a", "--system", "T" * 50_000, "--model", str(test_model_path)
    )
    assert_one_line_error(result, 5, "No space left on device")
    assert snapshot(home) == before
    assert [m.content for m in store.get("a").messages] == ["x" * 1000]
    assert not [p for p in (home / "sessions").iterdir() if ".tmp-" in p.name]


def test_dangling_link_as_sessions_dir_on_write(tmp_path: Path) -> None:
    (tmp_path / "sessions").symlink_to(tmp_path / "gone")
    with pytest.raises(SessionError, match="does not exist"):
        SessionStore(tmp_path / "sessions").get("a").add_message(HumanMessage("x"))
    assert not (tmp_path / "gone").exists()


def test_a_fifo_as_input_history_is_an_error_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(Path(os.environ["LOCALBOT_HOME"]) / "input_history")
    with pytest.raises(LocalbotError, match="not a regular file"):
        input_history_path()


# --------------------------------------------------------------------------- KV state files


def _kv_files(tmp_path: Path) -> tuple[Path, dict]:
    """A state file as save_state leaves it, and its meta (without a model: the trust check is
    about the file, not its contents)."""
    state = put(tmp_path, ".sidecars/s/kvstate", os.urandom(4096))
    fd = os.open(state, os.O_RDONLY)
    try:
        stamp = kv_files.stamp(os.fstat(fd))
    finally:
        os.close(fd)
    return state, {"state": stamp}


def test_the_state_file_we_wrote_is_trusted(tmp_path: Path) -> None:
    state, meta = _kv_files(tmp_path)
    os.close(kv_files.open_verified(state, meta))


def test_flipped_bits_with_mtime_put_back_are_refused(tmp_path: Path) -> None:
    state, meta = _kv_files(tmp_path)
    st = state.stat()
    data = bytearray(state.read_bytes())
    data[100] ^= 0xFF
    time.sleep(0.01)
    state.write_bytes(bytes(data))
    os.utime(state, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    with pytest.raises(kv_files.Rejected, match="ctime_ns differ"):
        kv_files.open_verified(state, meta)


def test_a_copy_with_a_matching_meta_is_refused(tmp_path: Path) -> None:
    state, meta = _kv_files(tmp_path)
    copy = put(tmp_path, "copy/kvstate", state.read_bytes())
    os.utime(copy, ns=(meta["state"]["mtime_ns"],) * 2)
    with pytest.raises(kv_files.Rejected, match="inode"):
        kv_files.open_verified(copy, meta)


def test_a_10_gb_sparse_state_is_refused_without_reading_it(tmp_path: Path) -> None:
    state = tmp_path / "kvstate"
    with open(state, "wb") as f:
        f.truncate(10 * 1024**3)
    meta = {"state": {"size": 10 * 1024**3, "inode": 1, "mtime_ns": 1, "ctime_ns": 1}}
    start = time.perf_counter()
    with pytest.raises(kv_files.Rejected):
        kv_files.open_verified(state, meta)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("which", ["state", "meta"])
@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_state_or_meta_that_is_a_fifo_or_a_link_is_refused_at_once(
    tmp_path: Path, which: str, kind: str
) -> None:
    state, meta = _kv_files(tmp_path)
    target = state if which == "state" else kv_files.meta_path(state)
    if which == "meta":
        target.write_text(json.dumps(meta))
    real = put(tmp_path, "outside", target.read_bytes())
    target.unlink()
    os.mkfifo(target) if kind == "fifo" else target.symlink_to(real)
    check = {"state": kv_files.open_verified, "meta": kv_files.read_meta}[which]
    args = (state, meta) if which == "state" else (state,)
    start = time.perf_counter()
    with pytest.raises(kv_files.Rejected):
        check(*args)
    assert time.perf_counter() - start < 1


# --------------------------------------------------------------------------- item 5: temps

_INTERRUPTED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from localbot import atomic
    target = Path(sys.argv[1])
    tmp = atomic.make_temp(target)  # as save_state does before llama.cpp writes the state
    Path(tmp).write_bytes(b"k" * 1_000_000)
    print("writing", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_temps_of_an_interrupted_save_are_removed(tmp_path: Path, sig: int) -> None:
    """SIGINT: removed at exit (atexit). SIGTERM: removed when the process's signal handler calls
    ``atomic.remove_own_temps`` (the CLI installs one); here the test installs it."""
    script = _INTERRUPTED_WRITER
    if sig == signal.SIGTERM:
        script = script.replace(
            "target = ",
            "import signal\n"
            "signal.signal(signal.SIGTERM, lambda *a: (atomic.remove_own_temps(), sys.exit(143)))\n"
            "target = ",
        )
    folder = tmp_path / ".sidecars" / "s"
    folder.mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(folder / "kvstate")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "writing\n"
    assert len(list(folder.iterdir())) == 1
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert list(folder.iterdir()) == []


_SAVE_THEN_CTRL_C = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path
    from langchain_core.messages import HumanMessage
    from localbot import ChatLlamaCpp
    from localbot.kv_state import save_state
    model = ChatLlamaCpp(model_path=sys.argv[1], n_ctx=2048, max_tokens=1, temperature=0)
    model.invoke([HumanMessage("word " * 1500)])  # ~1,500 tokens: a ~28 MB state
    folder = Path(sys.argv[2])
    # llama.cpp's write of the temp file takes tens of ms: keep the save there (written, not
    # yet renamed) so that the signal surely comes mid-save, however the threads are scheduled.
    import llama_cpp
    write, written = llama_cpp.llama_state_save_file, threading.Event()
    def slow_write(*args):
        ok = write(*args)
        written.set()
        time.sleep(60)
        return ok
    llama_cpp.llama_state_save_file = slow_write
    threading.Thread(target=save_state, args=(model, folder / "kvstate"), daemon=True).start()
    written.wait(60)
    print([p.name for p in folder.iterdir()], flush=True)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while llama.cpp writes the temp file
    time.sleep(10)
    """
)


@pytest.mark.model
def test_ctrl_c_during_a_real_kv_save_leaves_no_temp_file(
    tmp_path: Path, test_model_path: Path
) -> None:
    """Before the fix this left a hidden 27.9 MB ``.kvstate.tmp-*`` file behind."""
    folder = tmp_path / ".sidecars" / "s"
    folder.mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-c", _SAVE_THEN_CTRL_C, str(test_model_path), str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in proc.stderr
    assert ".kvstate.tmp-" in proc.stdout  # the signal came mid-save
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_remove_own_temps_leaves_other_processes_temps(tmp_path: Path) -> None:
    mine = atomic.make_temp(tmp_path / "kvstate")
    theirs = put(tmp_path, ".kvstate.tmp-other", b"x")
    atomic.remove_own_temps()
    assert not Path(mine).exists()
    assert theirs.exists()
