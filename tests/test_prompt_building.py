"""A turn's prompt is built once, even when two threads want it: the chatbot builds the prompt a
turn will most likely get on a second thread while the turn's plan tokenizes the new message,
and the plan's exact count then waits for that build instead of repeating it (real tokenizer)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage

from localbot import ChatLlamaCpp, SessionStore, build_chatbot
from localbot.turn_threads import worker

SESSION = {"configurable": {"session_id": "s"}}


def _model(path: Path) -> ChatLlamaCpp:
    return ChatLlamaCpp(model_path=str(path), n_ctx=512, temperature=0, max_tokens=4)


def _record_builds(model: ChatLlamaCpp, monkeypatch, delay: float = 0.0) -> list[str]:
    """The names of the threads that rendered a prompt, one per render."""
    builds: list[str] = []
    builder = model._prompts
    render = builder._render_ids

    def recorded(messages, tools):
        builds.append(threading.current_thread().name)
        time.sleep(delay)
        return render(messages, tools)

    monkeypatch.setattr(builder, "_render_ids", recorded)
    return builds


@pytest.mark.model
def test_two_threads_asking_for_one_prompt_build_it_once(test_model_path, monkeypatch):
    model = _model(test_model_path)
    builds = _record_builds(model, monkeypatch, delay=0.2)  # a slow build: the second must wait
    prompt = [HumanMessage("Where do rivers start?"), AIMessage("In hills."), HumanMessage("Why?")]
    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(model.prompt_ids(prompt)))]
    threads.append(threading.Thread(target=lambda: results.append(model.prompt_ids(prompt))))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results[0] == results[1]
    assert len(results[0]) == model.get_num_tokens_from_messages(prompt)


@pytest.mark.model
def test_a_failed_build_is_not_an_answer_for_the_thread_that_waited(test_model_path, monkeypatch):
    model = _model(test_model_path)
    builder = model._prompts
    render = builder._render_ids
    calls: list[int] = []
    building = threading.Event()

    def fails_once(messages, tools):
        calls.append(1)
        if len(calls) == 1:
            building.set()
            time.sleep(0.2)
            raise RuntimeError("the first build fails")
        return render(messages, tools)

    monkeypatch.setattr(builder, "_render_ids", fails_once)
    prompt = [HumanMessage("hello")]
    failed: list[BaseException] = []

    def first() -> None:
        try:
            model.prompt_ids(prompt)
        except RuntimeError as err:
            failed.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    assert building.wait(10)
    ids = model.prompt_ids(prompt)  # waits for the first, then builds it itself
    thread.join()
    assert len(failed) == 1
    assert len(calls) == 2
    assert len(ids) == model.get_num_tokens_from_messages(prompt)


@pytest.mark.model
def test_a_turn_finds_its_prompt_built_on_the_prompt_thread(test_model_path, tmp_path, monkeypatch):
    bot = build_chatbot(_model(test_model_path), SessionStore(tmp_path), "Be brief.")
    bot.prepare_next = False  # only the turn's own work builds prompts here
    bot.invoke({"messages": [HumanMessage("Tell me about rivers.")]}, SESSION)
    builds = _record_builds(bot.model, monkeypatch)

    bot.invoke({"messages": [HumanMessage("And about mountains?")]}, SESSION)

    # The turn's prompt was rendered once, on the prompt thread, not by the turn's plan again.
    assert builds == ["localbot-prompt_0"]
    assert bot.last_turn.trim_start == 0
    stats = bot.model.last_stats
    prompt = bot.prompt_messages({}, bot.store.get("s").messages[:-1])
    assert stats.prompt_tokens == bot.model.get_num_tokens_from_messages(prompt)


@pytest.mark.model
def test_a_late_prompt_thread_is_still_waited_for(test_model_path, tmp_path, monkeypatch):
    # The build is claimed when it is handed to the thread, not when the thread gets to it: a
    # thread that starts after the plan asks for the prompt still builds it, once.
    bot = build_chatbot(_model(test_model_path), SessionStore(tmp_path), "Be brief.")
    bot.prepare_next = False
    bot.invoke({"messages": [HumanMessage("Tell me about rivers.")]}, SESSION)
    builds = _record_builds(bot.model, monkeypatch)
    prompt_thread = worker("prompt")
    submit = prompt_thread.submit

    def late(fn):
        return submit(lambda: (time.sleep(0.3), fn()))

    monkeypatch.setattr(prompt_thread, "submit", late)

    bot.invoke({"messages": [HumanMessage("And about mountains?")]}, SESSION)

    assert builds == ["localbot-prompt_0"]
    assert bot.last_turn.plan >= 0.2  # the plan waited for the late build
