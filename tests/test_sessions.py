"""The session store: format, LangChain interop, list/rename/delete, bad files, hostile ids."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.runnables import RunnableLambda

import localbot.sessions
from localbot import sessions as sessions_mod
from localbot.errors import LocalbotError, SessionError
from localbot.sessions import SessionHistory, SessionStore, validate_session_id

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore(tmp_path / "sessions")


def streamed_reply() -> AIMessageChunk:
    """A reply as LangChain stores a streamed one: the sum of its chunks, type AIMessageChunk."""
    chunks = [
        AIMessageChunk(content="Bonjour ", id="run-1"),
        AIMessageChunk(content="à vous 🌍", id="run-1"),
        AIMessageChunk(
            content="",
            id="run-1",
            response_metadata={"finish_reason": "stop", "model_name": "gemma-3-270m"},
            usage_metadata={"input_tokens": 12, "output_tokens": 5, "total_tokens": 17},
        ),
    ]
    reply = chunks[0]
    for chunk in chunks[1:]:
        reply += chunk
    return reply


def conversation() -> list[BaseMessage]:
    return [
        SystemMessage("You are terse."),
        HumanMessage("Grüß dich — ça va? 你好", additional_kwargs={"source": "repl"}),
        AIMessage(
            "Très bien ✓",
            response_metadata={"finish_reason": "length", "tokens": [1, 2]},
            additional_kwargs={"seed": 7},
        ),
        HumanMessage("and you?"),
        streamed_reply(),
    ]


def file_chat_message_history(path: Path, **kwargs: object):
    """LangChain's own FileChatMessageHistory; langchain_community warns that it is sunset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from langchain_community.chat_message_histories import FileChatMessageHistory

        return FileChatMessageHistory(str(path), **kwargs)


def assert_one_line_error(err: pytest.ExceptionInfo[SessionError], path: Path) -> None:
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message
    assert "move it aside or pick another session" in message


# -- format and round trip -------------------------------------------------------------------------


def test_round_trip_through_a_fresh_store(store: SessionStore) -> None:
    store.get("chat").add_messages(conversation())
    loaded = SessionStore(store.root).get("chat").messages
    assert loaded == conversation()
    assert isinstance(loaded[-1], AIMessageChunk)
    assert loaded[-1].content == "Bonjour à vous 🌍"
    assert loaded[-1].response_metadata["finish_reason"] == "stop"
    assert loaded[2].additional_kwargs == {"seed": 7}


def test_file_is_a_list_of_message_dicts_in_unescaped_utf8(store: SessionStore) -> None:
    history = store.get("chat")
    history.add_messages(conversation())
    raw = history.path.read_bytes()
    assert "Grüß dich — ça va? 你好".encode() in raw
    assert b"\\u" not in raw
    entries = json.loads(raw.decode("utf-8"))
    assert [e["type"] for e in entries] == ["system", "human", "ai", "human", "AIMessageChunk"]
    assert all(set(e) == {"type", "data"} for e in entries)


def test_a_lone_surrogate_is_written_as_u_fffd_and_reads_back(store: SessionStore) -> None:
    history = store.get("chat")
    history.add_messages([AIMessage("half an emoji: \ud83c"), AIMessage("pair: \ud83c\udf0d")])
    raw = history.path.read_bytes()
    raw.decode("utf-8")  # valid UTF-8: no surrogate, raw or escaped
    assert b"\\ud8" not in raw
    assert [m.content for m in history.messages] == ["half an emoji: \ufffd", "pair: 🌍"]


def test_an_escaped_lone_surrogate_in_a_file_reads_as_u_fffd(store: SessionStore) -> None:
    store.root.mkdir(parents=True)
    path = store.root / "chat.json"
    path.write_bytes(b'[{"type": "human", "data": {"content": "a\\ud800b \\ud83c\\udf0d"}}]')
    history = store.get("chat")
    assert history.messages[0].content == "a\ufffdb 🌍"
    "".join(m.content for m in history.messages).encode("utf-8")  # usable downstream
    history.add_message(HumanMessage("next"))
    assert [m.content for m in history.messages] == ["a\ufffdb 🌍", "next"]


def test_missing_session_is_empty_and_writes_nothing(store: SessionStore) -> None:
    history = store.get("new")
    assert history.messages == []
    assert not store.exists("new")
    assert not store.root.exists()
    assert store.list() == []


def test_first_write_creates_the_root_with_parents(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "a" / "b" / "sessions")
    store.get("s").add_message(HumanMessage("hi"))
    assert (tmp_path / "a" / "b" / "sessions" / "s.json").is_file()


def test_default_root_honours_localbot_home() -> None:
    home = Path(os.environ["LOCALBOT_HOME"])  # set by the autouse fixture in conftest.py
    store = SessionStore()
    assert store.root == home / "sessions"
    store.get("s").add_message(HumanMessage("hi"))
    assert (home / "sessions" / "s.json").is_file()


def test_add_messages_is_one_write(store: SessionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[Path] = []
    real = localbot.sessions.write_atomic

    def counting(path: Path, data: bytes) -> None:
        writes.append(path)
        real(path, data)

    monkeypatch.setattr(localbot.sessions, "write_atomic", counting)
    history = store.get("chat")
    history.add_messages(conversation())
    history.add_messages([])
    assert writes == [history.path]


def test_append_replace_and_clear(store: SessionStore) -> None:
    history = store.get("chat")
    history.add_message(HumanMessage("one"))
    history.add_user_message("two")
    history.add_ai_message("partial rep")
    assert [m.content for m in history.messages] == ["one", "two", "partial rep"]

    history.replace_messages([*history.messages[:-1], AIMessage("partial reply, finished")])
    assert [m.content for m in history.messages] == ["one", "two", "partial reply, finished"]

    history.clear()
    assert history.messages == []
    assert store.exists("chat")
    assert store.list()[0].message_count == 0


def test_async_variants(store: SessionStore) -> None:
    history = store.get("chat")

    async def use() -> list[BaseMessage]:
        await history.aadd_messages([HumanMessage("hi"), AIMessage("hello")])
        return await history.aget_messages()

    assert [m.content for m in asyncio.run(use())] == ["hi", "hello"]


def test_stale_temp_files_are_ignored_and_cleaned_up(store: SessionStore) -> None:
    store.root.mkdir(parents=True)
    old = store.root / ".chat.json.tmp-dead"
    young = store.root / ".chat.json.tmp-busy"
    for temp in (old, young):
        temp.write_bytes(b'[{"type": "human", "da')  # what a killed writer leaves
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))

    history = store.get("chat")
    assert history.messages == []
    assert store.list() == []
    history.add_message(HumanMessage("hi"))
    assert not old.exists()
    assert young.exists()  # may belong to a write in progress
    assert [m.content for m in history.messages] == ["hi"]


def test_temp_files_are_looked_for_at_most_once_a_minute(store: SessionStore, monkeypatch) -> None:
    """The scan lists the whole sessions directory: not on every write of a chat."""
    clock = [1000.0]
    monkeypatch.setattr(sessions_mod.time, "monotonic", lambda: clock[0])
    history = store.get("chat")
    history.add_message(HumanMessage("hi"))
    dead = store.root / ".chat.json.tmp-dead"
    dead.write_bytes(b"[")
    os.utime(dead, (time.time() - 3600,) * 2)
    history.add_message(HumanMessage("again"))
    assert dead.exists()
    clock[0] += 61
    history.add_message(HumanMessage("a minute later"))
    assert not dead.exists()


# -- interop with LangChain's FileChatMessageHistory -----------------------------------------------


def test_file_chat_message_history_reads_our_files(store: SessionStore) -> None:
    history = store.get("chat")
    history.add_messages(conversation())
    theirs = file_chat_message_history(history.path, encoding="utf-8")
    assert theirs.messages == conversation()

    theirs.add_message(HumanMessage("appended by LangChain"))
    assert history.messages == [*conversation(), HumanMessage("appended by LangChain")]


def test_we_read_files_written_by_file_chat_message_history(store: SessionStore) -> None:
    path = store.root / "theirs.json"
    store.root.mkdir(parents=True)
    theirs = file_chat_message_history(path)  # defaults: ensure_ascii=True, locale encoding
    for message in conversation():
        theirs.add_message(message)
    assert b"\\u00fc" in path.read_bytes()  # escaped, unlike ours
    assert '"AIMessageChunk"' in path.read_text()

    history = store.get("theirs")
    assert history.messages == conversation()
    history.add_message(AIMessage("appended by localbot ✓"))
    assert theirs.messages == [*conversation(), AIMessage("appended by localbot ✓")]


# -- LangChain integration -------------------------------------------------------------------------


def test_plugs_into_runnable_with_message_history(store: SessionStore) -> None:
    from langchain_core.runnables.history import RunnableWithMessageHistory

    seen: list[int] = []

    def echo(messages: list[BaseMessage]) -> AIMessage:
        seen.append(len(messages))
        return AIMessage(f"echo: {messages[-1].content}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        chain = RunnableWithMessageHistory(RunnableLambda(echo), store.get)
    config = {"configurable": {"session_id": "chat"}}
    assert chain.invoke("hi", config).content == "echo: hi"
    assert chain.invoke("again", config).content == "echo: again"

    assert seen == [1, 3]  # the second turn saw the first one
    contents = [m.content for m in store.get("chat").messages]
    assert contents == ["hi", "echo: hi", "again", "echo: again"]


def test_session_history_emits_no_deprecation_warning(store: SessionStore) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = store.get("chat")
        history.add_messages(conversation())
        _ = history.messages
        history.clear()
        store.list()
        SessionHistory(store, "other").add_message(HumanMessage("x"))
    assert [w for w in caught if issubclass(w.category, DeprecationWarning)] == []


def test_importing_and_using_the_store_passes_with_deprecations_as_errors(tmp_path: Path) -> None:
    script = (
        "from langchain_core.messages import HumanMessage\n"
        "from localbot.sessions import SessionStore\n"
        f"h = SessionStore({str(tmp_path)!r}).get('s')\n"
        "h.add_message(HumanMessage('x')); assert len(h.messages) == 1\n"
    )
    subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", script], cwd=REPO, check=True
    )


# -- listing, rename, delete, sidecars -------------------------------------------------------------


def make_session(store: SessionStore, session_id: str, n: int, mtime: float | None = None) -> Path:
    history = store.get(session_id)
    history.add_messages([HumanMessage(f"{session_id} {i}") for i in range(n)])
    if mtime is not None:
        os.utime(history.path, (mtime, mtime))
    return history.path


def test_list_is_newest_first_and_survives_a_corrupt_file(store: SessionStore) -> None:
    now = time.time()
    make_session(store, "old", 1, now - 300)
    make_session(store, "new", 3, now - 10)
    make_session(store, "middle", 2, now - 100)
    broken = store.root / "broken.json"
    broken.write_bytes(b"[{")
    os.utime(broken, (now - 200, now - 200))

    infos = store.list()
    assert [i.id for i in infos] == ["new", "middle", "broken", "old"]
    assert [i.message_count for i in infos] == [3, 2, None, 1]
    assert [i.corrupt for i in infos] == [False, False, True, False]
    assert infos[2].problem is not None
    assert str(broken) in infos[2].problem
    assert infos[0].path == store.root / "new.json"
    assert abs(infos[0].updated.timestamp() - (now - 10)) < 1
    assert infos[0].updated.tzinfo is not None


def test_list_shows_every_valid_id_and_skips_hidden_and_foreign_names(
    store: SessionStore,
) -> None:
    make_session(store, "chat", 1)
    make_session(store, "chat.v2", 2)
    (store.root / "chat.kv.json").write_text('{"n_tokens": 16}')  # a (corrupt) session of its own
    (store.root / "notes.txt").write_text("not a session")
    (store.root / ".hidden.json").write_text("[]")
    add_sidecars(store, "chat")
    rows = {i.id: i.message_count for i in store.list()}
    assert rows == {"chat": 1, "chat.v2": 2, "chat.kv": None}


def add_sidecars(store: SessionStore, session_id: str) -> list[Path]:
    folder = store.sidecar_dir(session_id)
    folder.mkdir(parents=True)
    paths = [folder / "kv", folder / "kv.json"]
    paths[0].write_bytes(b"\1\2\3")
    paths[1].write_text('{"tokens": [1, 2, 3]}')
    return paths


def test_sidecars_live_in_a_hidden_folder_named_exactly_after_the_id(store: SessionStore) -> None:
    make_session(store, "chat", 1)
    make_session(store, "chat.v2", 1)
    add_sidecars(store, "chat")
    add_sidecars(store, "chat.v2")
    assert store.sidecar_dir("chat") == store.root / ".sidecars" / "chat"
    assert store.sidecar_paths("chat") == [store.sidecar_dir("chat") / n for n in ("kv", "kv.json")]
    assert store.kv_state_path("chat.v2") == store.root / ".sidecars" / "chat.v2" / "kvstate"
    assert sorted(i.id for i in store.list()) == ["chat", "chat.v2"]


def test_rename_moves_the_history_and_its_sidecars(store: SessionStore) -> None:
    make_session(store, "chat", 2)
    make_session(store, "chat.v2", 1)
    add_sidecars(store, "chat")
    add_sidecars(store, "chat.v2")
    store.rename("chat", "renamed")

    assert not store.exists("chat")
    assert [m.content for m in store.get("renamed").messages] == ["chat 0", "chat 1"]
    assert (store.sidecar_dir("renamed") / "kv").read_bytes() == b"\1\2\3"
    assert store.sidecar_paths("chat") == []
    assert [m.content for m in store.get("chat.v2").messages] == ["chat.v2 0"]
    assert len(store.sidecar_paths("chat.v2")) == 2


def test_rename_refuses_to_overwrite(store: SessionStore) -> None:
    make_session(store, "a", 1)
    target = make_session(store, "b", 2)
    before = target.read_bytes()
    with pytest.raises(SessionError, match="already exists"):
        store.rename("a", "b")
    assert target.read_bytes() == before
    assert store.exists("a")

    store.sidecar_dir("c").mkdir(
        parents=True
    )  # sidecars alone (settings saved, no message yet) also block
    with pytest.raises(SessionError, match="already exists"):
        store.rename("a", "c")
    assert store.exists("a")


def test_rename_and_delete_of_a_missing_session_fail(store: SessionStore) -> None:
    with pytest.raises(SessionError, match="No session 'ghost'"):
        store.rename("ghost", "b")
    with pytest.raises(SessionError, match="No session 'ghost'"):
        store.delete("ghost")


def test_delete_removes_history_and_sidecars_only(store: SessionStore) -> None:
    make_session(store, "chat", 1)
    make_session(store, "chat.v2", 1)
    make_session(store, "other", 1)
    add_sidecars(store, "chat")
    add_sidecars(store, "chat.v2")
    (store.sidecar_dir("chat") / "sub").mkdir()
    (store.sidecar_dir("chat") / "sub" / "part").write_bytes(b"x")

    (store.root / ".chat.json.tmp-dead").write_bytes(b"[")  # left by a killed writer

    store.delete("chat")
    left = sorted(p.name for p in store.root.iterdir())
    assert [n for n in left if not n.startswith(".")] == ["chat.v2.json", "other.json"]
    assert [n for n in left if n.startswith(".chat.")] == [".chat.v2.lock"]
    assert sorted(p.name for p in (store.root / ".sidecars").iterdir()) == ["chat.v2"]
    assert len(store.sidecar_paths("chat.v2")) == 2


def test_delete_of_sidecars_alone_works(store: SessionStore) -> None:
    add_sidecars(store, "draft")  # e.g. --system saved before the first message
    store.delete("draft")
    assert not store.sidecar_dir("draft").exists()


def test_delete_works_on_a_corrupt_file(store: SessionStore) -> None:
    store.root.mkdir(parents=True)
    (store.root / "bad.json").write_bytes(b"\x00garbage")
    store.delete("bad")
    assert not store.exists("bad")


# -- unusable files --------------------------------------------------------------------------------

BAD_FILES = {
    "empty": b"",
    "whitespace": b"  \n",
    "truncated": b'[{"type": "human", "data": {"content": "hi"',
    "not utf-8": b'[{"type": "human", "data": {"content": "\xff"}}]',
    "object": b'{"type": "human", "data": {"content": "hi"}}',
    "list of numbers": b"[1, 2]",
    "openai style": b'[{"role": "user", "content": "hi"}]',
    "unknown type": b'[{"type": "alien", "data": {"content": "hi"}}]',
    "data not a dict": b'[{"type": "human", "data": "hi"}]',
    "no content": b'[{"type": "human", "data": {}}]',
    "bad field": b'[{"type": "human", "data": {"content": "hi", "additional_kwargs": 5}}]',
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_unusable_file_raises_and_is_never_overwritten(store: SessionStore, content: bytes) -> None:
    store.root.mkdir(parents=True)
    path = store.root / "bad.json"
    path.write_bytes(content)
    history = store.get("bad")

    with pytest.raises(SessionError) as err:
        _ = history.messages
    assert_one_line_error(err, path)
    for write in (
        lambda: history.add_messages([HumanMessage("hi")]),
        lambda: history.add_message(HumanMessage("hi")),
        lambda: history.replace_messages([HumanMessage("hi")]),
        history.clear,
    ):
        with pytest.raises(SessionError):
            write()
        assert path.read_bytes() == content
    assert [(i.id, i.corrupt) for i in store.list()] == [("bad", True)]


def test_session_error_is_a_localbot_error() -> None:
    assert issubclass(SessionError, LocalbotError)


# -- hostile ids and links -------------------------------------------------------------------------

HOSTILE_IDS = [
    "../x",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "",
    "a\x00b",
    "x" * 200,
    "x" * 65,
    "..",
    ".",
    "a..b",
    ".hidden",
    "-rf",
    "chat\n",
    "sp ace",
    "C:evil",
]


@pytest.mark.parametrize("session_id", HOSTILE_IDS)
def test_hostile_ids_are_refused(store: SessionStore, tmp_path: Path, session_id: str) -> None:
    with pytest.raises(SessionError) as err:
        validate_session_id(session_id)
    assert "\n" not in str(err.value)
    assert len(str(err.value)) < 200
    for use in (
        lambda: store.get(session_id),
        lambda: store.exists(session_id),
        lambda: store.delete(session_id),
        lambda: store.rename("ok", session_id),
        lambda: store.sidecar_paths(session_id),
    ):
        with pytest.raises(SessionError):
            use()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("session_id", [None, 5, b"chat", ["chat"]])
def test_non_string_ids_are_refused(store: SessionStore, session_id: object) -> None:
    with pytest.raises(SessionError, match="must be a string"):
        store.get(session_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("session_id", ["a", "chat-2024.v2_x", "0", "x" * 64, "A.b-c_d"])
def test_ordinary_ids_are_accepted(store: SessionStore, session_id: str) -> None:
    assert validate_session_id(session_id) == session_id
    store.get(session_id).add_message(HumanMessage("hi"))
    assert store.exists(session_id)


@pytest.mark.parametrize("target", ["/etc/passwd", "outside"])
def test_links_out_of_the_store_are_refused(
    store: SessionStore, tmp_path: Path, target: str
) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('[{"type": "human", "data": {"content": "secret"}}]')
    before = outside.read_bytes()
    store.root.mkdir(parents=True)
    link = store.root / "evil.json"
    link.symlink_to(outside if target == "outside" else Path(target))

    with pytest.raises(SessionError, match="outside"):
        store.get("evil")
    assert [(i.id, i.corrupt) for i in store.list()] == [("evil", True)]
    with pytest.raises(SessionError):
        store.delete("evil")
    assert outside.read_bytes() == before
    assert link.is_symlink()


def test_a_link_that_appears_later_is_refused(store: SessionStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("[]")
    history = store.get("chat")
    history.add_message(HumanMessage("hi"))
    history.path.unlink()
    history.path.symlink_to(outside)

    with pytest.raises(SessionError, match="outside"):
        _ = history.messages
    with pytest.raises(SessionError, match="outside"):
        history.add_message(HumanMessage("leak"))
    assert outside.read_text() == "[]"


def test_a_store_whose_root_is_a_link_works(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    store = SessionStore(tmp_path / "link")
    store.get("chat").add_message(HumanMessage("hi"))
    assert (real / "chat.json").is_file()
    assert [i.id for i in store.list()] == ["chat"]
