"""The user's message is written while the model reads the prompt, and no part of the reply
leaves the model before that write is on disk (real model, real files).

Writing the message is ~1-2 ms of JSON and fsyncs. Doing it while llama.cpp reads the prompt
takes it off the turn's critical path; holding the reply's first token until it is done keeps
the promise that a crash mid-reply never loses what the user typed.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage

from localbot import ChatLlamaCpp, SessionStore, build_chatbot
from localbot import sessions as sessions_mod
from localbot.errors import SessionError
from localbot.turn_threads import HumanSave, worker

SESSION = {"configurable": {"session_id": "s"}}
SLOW_WRITE_S = 0.3


def _bot(model_path: Path, root: Path):
    model = ChatLlamaCpp(model_path=str(model_path), n_ctx=512, temperature=0, max_tokens=4)
    return build_chatbot(model, SessionStore(root), "Be brief.", kv_cache=False)


def _texts_on_disk(root: Path) -> list[str]:
    path = root / "s.json"
    if not path.exists():
        return []
    return [entry["data"]["content"] for entry in json.loads(path.read_bytes())]


class _Events:
    """When things happened, on one clock."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.lock = threading.Lock()

    def mark(self, name: str) -> None:
        with self.lock:
            self.at.setdefault(name, time.perf_counter())


class _FirstToken(BaseCallbackHandler):
    """Records what the session file held when the first token reached a callback."""

    def __init__(self, root: Path, events: _Events) -> None:
        self.root, self.events = root, events
        self.on_disk: list[str] | None = None

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        if self.on_disk is None:
            self.events.mark("first token callback")
            self.on_disk = _texts_on_disk(self.root)


@pytest.mark.model
def test_the_message_is_written_while_the_prompt_is_read_and_before_any_reply(
    test_model_path, tmp_path, monkeypatch
):
    bot = _bot(test_model_path, tmp_path)
    bot.invoke({"messages": [HumanMessage("first")]}, SESSION)  # loaded, history on disk
    events = _Events()
    write = sessions_mod.write_atomic
    holding = threading.Event()
    hold = HumanSave.hold

    def marked_hold(self) -> None:
        holding.set()
        hold(self)

    def slow_write(path, data, **kwargs):
        # A slow disk: the write is still going when the model has read the prompt and holds
        # its first token. (Waiting for the hold makes this so on a loaded machine too; a
        # write done before the prompt is read would never see it and end after 10 s.)
        holding.wait(10)
        time.sleep(SLOW_WRITE_S)
        write(path, data, **kwargs)
        events.mark("write end")

    monkeypatch.setattr(HumanSave, "hold", marked_hold)
    monkeypatch.setattr(sessions_mod, "write_atomic", slow_write)
    llama = bot.model.load()
    generate = llama.generate

    def timed_generate(*args, **kwargs):
        events.mark("model reads the prompt")
        return generate(*args, **kwargs)

    monkeypatch.setattr(llama, "generate", timed_generate)
    callback = _FirstToken(tmp_path, events)
    question = "Where is the river that flows through the old town?"

    chunks = bot.stream(
        {"messages": [HumanMessage(question)]}, {**SESSION, "callbacks": [callback]}
    )
    first = next(chunk for chunk in chunks if chunk.text)
    events.mark("first chunk")
    on_disk_at_first_chunk = _texts_on_disk(tmp_path)
    reply = first.text + "".join(chunk.text for chunk in chunks)

    at = events.at
    # The model started reading the prompt before the message was written...
    assert at["model reads the prompt"] < at["write end"]
    # ...and no token left it (to a callback or the caller) before the write was done.
    assert at["write end"] < at["first token callback"] <= at["first chunk"]
    assert callback.on_disk is not None
    assert callback.on_disk[-1] == question
    assert on_disk_at_first_chunk[-1] == question
    assert _texts_on_disk(tmp_path)[-2:] == [question, reply]
    # The wait for the write is localbot's own time, not the model's.
    timings = bot.last_turn
    assert timings.save_human >= SLOW_WRITE_S
    assert timings.own_seconds >= timings.save_human


@pytest.mark.model
def test_a_message_that_cannot_be_written_gets_no_reply(test_model_path, tmp_path, monkeypatch):
    bot = _bot(test_model_path, tmp_path)
    bot.invoke({"messages": [HumanMessage("first")]}, SESSION)
    before = (tmp_path / "s.json").read_bytes()

    def disk_full(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sessions_mod, "write_atomic", disk_full)
    tokens: list[str] = []

    class Tokens(BaseCallbackHandler):
        def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
            tokens.append(token)

    chunks: list = []
    config = {**SESSION, "callbacks": [Tokens()]}
    turn = bot.stream({"messages": [HumanMessage("Are you there?")]}, config)
    with pytest.raises(SessionError, match="No space left on device"):
        chunks.extend(turn)
    assert chunks == []
    assert tokens == []
    assert (tmp_path / "s.json").read_bytes() == before  # nothing written, nothing lost


@pytest.mark.model
def test_a_plain_model_run_can_hold_its_reply(test_model_path):
    """``hold_reply`` is the model's own call option: any caller can use it."""
    model = ChatLlamaCpp(model_path=str(test_model_path), n_ctx=256, temperature=0, max_tokens=3)
    calls: list[float] = []
    seen: list[dict] = []

    class Params(BaseCallbackHandler):
        def on_chat_model_start(self, serialized, messages, **kwargs: Any) -> None:
            seen.append(kwargs["invocation_params"])

    hold = lambda: calls.append(time.perf_counter())  # noqa: E731
    chunks = list(model.stream("Hello", config={"callbacks": [Params()]}, hold_reply=hold))
    assert len(calls) == 1
    assert [c for c in chunks if c.text]  # the reply came, after the hold
    assert model.invoke("Hello", hold_reply=hold).text
    assert len(calls) == 2
    assert [c for c in model.stream("Hello") if c.text]
    assert len(calls) == 2  # other calls are not held
    assert "hold_reply" not in seen[0]  # not a setting: callbacks and tracers never see it


def test_a_forked_child_gets_its_own_writer_thread():
    """A fork copies the writer's bookkeeping but not its thread: work submitted in the child
    must still run (else a turn there would wait forever for its message to be written)."""
    assert worker("save").submit(lambda: "parent").result(timeout=5) == "parent"
    pid = os.fork()
    if pid == 0:  # the child
        done = False
        try:
            done = worker("save").submit(lambda: "child").result(timeout=5) == "child"
        finally:
            os._exit(0 if done else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.model
def test_each_reply_follows_its_question_when_two_processes_share_a_session(
    test_model_path, tmp_path
):
    bot = _bot(test_model_path, tmp_path)
    other = SessionStore(tmp_path).get("s")  # a second process on the same session
    turn = bot.stream({"messages": [HumanMessage("Mine: where is the river?")]}, SESSION)
    first = next(turn)  # the reply has begun; the other process sends its message now
    other.add_messages([HumanMessage("Theirs: and the mountains?")])
    reply = first.text + "".join(chunk.text for chunk in turn)
    texts = _texts_on_disk(tmp_path)
    assert texts == ["Mine: where is the river?", reply, "Theirs: and the mountains?"]
