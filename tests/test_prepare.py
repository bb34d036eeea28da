"""Getting the next turn ready while the user types (``Chatbot.prepare``), on the real model.

When the history's cut point moves, the next turn's prompt starts with a kept history the model
has never read in that position: without preparation the turn re-reads all of it while the user
waits. ``prepare`` evaluates it in the background. It must be exact (the reply is the one a cold
re-read gives, greedy), and a turn that arrives before it is done must keep what it evaluated.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from localbot import ChatLlamaCpp, SessionStore, build_chatbot
from localbot.chatbot import Chatbot, typical_message
from localbot.prefill import next_chunk

SESSION = {"configurable": {"session_id": "abc"}}
TOPICS = ["rivers", "mountains", "deserts", "forests", "islands", "volcanoes", "glaciers"]


def _model(path: Path) -> ChatLlamaCpp:
    return ChatLlamaCpp(model_path=str(path), n_ctx=512, temperature=0, max_tokens=8)


def _question(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return f"Question {i}: tell me three short facts about {topic}, and where to see them. " * 2


def _chat_until_the_cut_moves(bot: Chatbot) -> HumanMessage:
    """Chat until the next message would move the history's cut point; return that message
    (not sent). The turn that just completed started the background preparation."""
    for i in range(40):
        message = HumanMessage(_question(i))
        history = bot.store.get("abc").messages
        if history and bot.plan({}, [*history, message]).start != bot.last_turn.trim_start:
            return message
        bot.invoke({"messages": [message]}, SESSION)
    raise AssertionError("the cut never moved")


def _cold_reply(model_path: Path, store_dir: Path, message: HumanMessage):
    """The reply a new process gives with no saved state: it re-reads the whole prompt."""
    cold = build_chatbot(_model(model_path), SessionStore(store_dir), "Be brief.", kv_cache=False)
    reply = cold.invoke({"messages": [message]}, SESSION)
    assert cold.model.last_stats.cached_tokens == 0
    return reply


@pytest.mark.model
def test_the_kept_history_is_read_in_the_background_exactly(test_model_path, tmp_path):
    bot = build_chatbot(_model(test_model_path), SessionStore(tmp_path / "warm"), "Be brief.")
    message = _chat_until_the_cut_moves(bot)
    bot.kv.wait()  # the user takes their time: the background work finishes
    work, prefix = bot.kv.background, bot.next_prefix("abc")
    shutil.copytree(tmp_path / "warm", tmp_path / "cold")

    reply = bot.invoke({"messages": [message]}, SESSION)

    stats = bot.model.last_stats
    assert bot.last_turn.trim_start > 0  # the cut did move
    # Whole grains of 16 tokens were read in the background; the turn reads the rest.
    assert len(prefix) - 16 < work.prefilled <= len(prefix)
    assert 100 < work.evaluated < work.prefilled  # the start (the system prompt) was cached
    # Everything before the new message came from the cache: the kept history was not re-read.
    assert stats.cached_tokens >= work.prefilled > 100
    assert stats.evaluated_tokens == stats.prompt_tokens - stats.cached_tokens < 60
    cold = _cold_reply(test_model_path, tmp_path / "cold", message)
    assert reply.text == cold.text
    assert stats.prompt_tokens == cold.usage_metadata["input_tokens"]


@pytest.mark.model
def test_a_turn_arriving_mid_way_keeps_what_the_background_evaluated(test_model_path, tmp_path):
    bot = build_chatbot(_model(test_model_path), SessionStore(tmp_path / "warm"), "Be brief.")
    bot.prepare_next = False  # only this test's prepare() reads the new kept history
    message = _chat_until_the_cut_moves(bot)
    shutil.copytree(tmp_path / "warm", tmp_path / "cold")
    prefix = bot.next_prefix("abc")

    # Hold the background work after its first chunk until the turn asks it to stop.
    first_chunk = threading.Event()
    held: list[int] = []

    def pause(tokens: int, _evaluated: int, _start: float, _end: float) -> None:
        if not held:
            held.append(tokens)
            first_chunk.set()
            bot.kv._stop.wait(30)  # set by the turn, which then waits for this chunk to end

    bot.kv.on_chunk = pause
    bot.prepare("abc")
    work = bot.kv.background
    assert first_chunk.wait(30)
    reply = bot.invoke({"messages": [message]}, SESSION)

    stats = bot.model.last_stats
    assert len(work.chunks) == 1  # it stopped after that chunk
    assert held[0] < len(prefix)  # mid-way...
    assert stats.cached_tokens == held[0]  # ...and the turn went on from there
    assert reply.text == _cold_reply(test_model_path, tmp_path / "cold", message).text


@pytest.mark.model
def test_a_resumed_session_is_made_ready_before_the_first_message(test_model_path, tmp_path):
    """A new process opens a session whose next turn moves the cut: ``prepare`` restores the
    saved state and reads the new kept history while the user types."""
    first = build_chatbot(_model(test_model_path), SessionStore(tmp_path), "Be brief.")
    message = _chat_until_the_cut_moves(first)
    first.wait_for_saves()  # the first process exits

    resumed = build_chatbot(_model(test_model_path), SessionStore(tmp_path), "Be brief.")
    resumed.prepare("abc")
    resumed.kv.wait()
    resumed.invoke({"messages": [message]}, SESSION)

    stats = resumed.model.last_stats
    assert resumed.last_turn.trim_start > 0
    assert stats.cached_tokens >= len(resumed.next_prefix("abc")) - 60  # all but the new turn
    assert stats.evaluated_tokens < 60


@pytest.mark.model
def test_background_work_stops_when_the_process_exits(test_model_path, tmp_path):
    """Exiting mid-preparation neither hangs nor crashes (llama.cpp must not be torn down under
    a running background thread), and what is not on disk is saved."""
    script = f"""
import sys, time
from langchain_core.messages import HumanMessage
from localbot import ChatLlamaCpp, SessionStore, build_chatbot
model = ChatLlamaCpp(model_path={str(test_model_path)!r}, n_ctx=2048, temperature=0, max_tokens=2)
bot = build_chatbot(model, SessionStore({str(tmp_path)!r}), "Be brief.")
bot.invoke({{"messages": [HumanMessage("Tell me about rivers. " * 150)]}},
           {{"configurable": {{"session_id": "abc"}}}})
model.load().reset()  # the memory is empty: preparing re-reads the whole history
bot.prepare("abc")
while not bot.kv.background.chunks:  # exit while it works
    time.sleep(0.005)
sys.exit(0)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / ".sidecars" / "abc" / "kvstate").is_file()


def test_prefill_chunks_aim_at_a_short_pause():
    assert next_chunk(16, 0.005, 512) == 64  # fast: grows, at most 4x a step
    assert next_chunk(64, 0.2, 512) == 32  # slow: shrinks to ~100 ms of work
    assert next_chunk(256, 0.01, 512) == 512  # never past the batch
    assert next_chunk(16, 10.0, 512) == 16  # never below a grain of 16 tokens
    assert next_chunk(64, 0.15, 512) == 32  # always whole grains (42 -> 32)


def test_the_next_message_is_assumed_as_long_as_the_recent_ones():
    history = [HumanMessage("a " * n) for n in (5, 50, 10, 12, 11)]
    probe = typical_message(history, lambda text: len(text.split()))
    assert len(probe.text.split()) == 11
    assert len(typical_message([], lambda text: len(text.split())).text.split()) == 64


@pytest.mark.model
def test_the_state_is_saved_when_due_not_after_every_turn(smol_model_path, tmp_path):
    model = ChatLlamaCpp(model_path=str(smol_model_path), n_ctx=1024, temperature=0, max_tokens=4)
    bot = build_chatbot(model, SessionStore(tmp_path), "Answer briefly.")
    bot.kv.save_every = 3
    state = SessionStore(tmp_path).kv_state_path("abc")
    for question in ("Name a river.", "Name a lake."):
        bot.invoke({"messages": [HumanMessage(question)]}, SESSION)
        bot.kv.wait()
    assert not state.exists()  # two turns: not due yet
    bot.invoke({"messages": [HumanMessage("Name a sea.")]}, SESSION)
    bot.kv.wait()
    bot.invoke({"messages": [HumanMessage("Name a bay.")]}, SESSION)  # the due save runs first
    bot.kv.wait()
    assert state.exists()
    written = bot.kv.bytes_written
    bot.wait_for_saves()  # exit: the fourth turn is saved too
    assert bot.kv.bytes_written > written


@pytest.mark.model
def test_a_stateless_request_saves_the_session_it_displaces(smol_model_path, tmp_path):
    """The server answers stateless requests on the same model between a session's turns: the
    session's state, not yet due for saving, is saved before the request replaces it, so the
    next turn restores it instead of re-reading."""
    model = ChatLlamaCpp(model_path=str(smol_model_path), n_ctx=1024, temperature=0, max_tokens=4)
    bot = build_chatbot(model, SessionStore(tmp_path), "Answer briefly.")
    bot.invoke({"messages": [HumanMessage("Name a river in Spain.")]}, SESSION)
    bot.invoke({"messages": [HumanMessage("And one in France?")]}, SESSION)
    state = SessionStore(tmp_path).kv_state_path("abc")
    assert not state.exists()
    model.invoke("Something else entirely, from another client.")
    assert state.exists()
    bot.invoke({"messages": [HumanMessage("And one in Italy?")]}, SESSION)
    assert bot.last_turn.restored_tokens > 30
