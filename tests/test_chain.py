"""The chatbot chain on the real model: sessions saved around each turn, trimming that never
overflows, partial replies kept when a turn is cut short, and the system prompt template."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from localbot import ChatLlamaCpp, SessionStore, build_chatbot
from localbot.errors import ConfigError, ContextOverflowError

SESSION = {"configurable": {"session_id": "abc"}}


@pytest.fixture(scope="module")
def model(test_model_path: Path) -> ChatLlamaCpp:
    return ChatLlamaCpp(model_path=str(test_model_path), n_ctx=1024, temperature=0, max_tokens=6)


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore(tmp_path / "sessions")


def _file(store: SessionStore, session_id: str = "abc") -> list[dict]:
    return json.loads((store.root / f"{session_id}.json").read_text(encoding="utf-8"))


class _RaiseAfter(BaseCallbackHandler):
    """Raises inside generation after n tokens, the way Ctrl-C lands mid-reply."""

    raise_error = True

    def __init__(self, n: int, exc: BaseException) -> None:
        self.n, self.exc, self.seen = n, exc, 0

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.seen += 1
        if self.seen >= self.n:
            raise self.exc


def test_tutorial_usage_invoke_then_resume(model: ChatLlamaCpp, store: SessionStore) -> None:
    bot = build_chatbot(model, store, "You answer in {language}.", kv_cache=False)
    first = bot.invoke(
        {"messages": [HumanMessage("hi! I'm Todd")], "language": "Spanish"}, config=SESSION
    )
    assert isinstance(first, AIMessage)
    saved = _file(store)
    assert [m["type"] for m in saved] == ["human", "ai"]
    assert saved[0]["data"]["content"] == "hi! I'm Todd"
    assert saved[1]["data"]["content"] == first.content

    # A new chatbot (as after a restart) resumes the session: the prompt holds the whole history.
    bot2 = build_chatbot(
        model, SessionStore(store.root), "You answer in {language}.", kv_cache=False
    )
    second = bot2.invoke(
        {"messages": [HumanMessage("what's my name?")], "language": "Spanish"}, config=SESSION
    )
    expected_prompt = [
        SystemMessage("You answer in Spanish."),
        HumanMessage("hi! I'm Todd"),
        AIMessage(first.content),
        HumanMessage("what's my name?"),
    ]
    assert second.usage_metadata["input_tokens"] == model.get_num_tokens_from_messages(
        expected_prompt
    )
    assert len(_file(store)) == 4


def test_stream_saves_the_streamed_reply(model: ChatLlamaCpp, store: SessionStore) -> None:
    bot = build_chatbot(model, store, "Be brief.", kv_cache=False)
    chunks = list(bot.stream({"messages": [HumanMessage("Hello")]}, config=SESSION))
    text = "".join(c.text for c in chunks)
    saved = _file(store)
    assert saved[-1]["type"] == "ai"
    assert saved[-1]["data"]["content"] == text
    assert saved[-1]["data"]["response_metadata"]["finish_reason"] in ("stop", "length")
    assert "interrupted" not in saved[-1]["data"]["response_metadata"]


def test_human_turn_is_on_disk_before_the_reply_starts(model, store) -> None:
    bot = build_chatbot(model, store, None, kv_cache=False)
    stream = bot.stream({"messages": [HumanMessage("Hello")]}, config=SESSION)
    next(stream)
    assert [m["type"] for m in _file(store)] == ["human"]
    for _ in stream:
        pass
    assert [m["type"] for m in _file(store)] == ["human", "ai"]


def test_abandoned_stream_keeps_partial_reply_and_next_turn_works(model, store) -> None:
    bot = build_chatbot(model, store, None, kv_cache=False)
    stream = bot.stream(
        {"messages": [HumanMessage("Count to ten:")]}, config=SESSION, max_tokens=40
    )
    got = [next(stream).text, next(stream).text]
    stream.close()
    saved = _file(store)
    assert saved[-1]["type"] == "ai"
    assert saved[-1]["data"]["content"] == "".join(got)
    meta = saved[-1]["data"]["response_metadata"]
    assert meta["interrupted"] is True
    assert meta["finish_reason"] == "abandoned"
    bot.invoke({"messages": [HumanMessage("again")]}, config=SESSION)
    saved = _file(store)
    assert [m["type"] for m in saved] == ["human", "ai", "human", "ai"]
    assert "interrupted" not in saved[-1]["data"]["response_metadata"]


@pytest.mark.parametrize(
    ("exc", "reason"), [(KeyboardInterrupt(), "interrupted"), (RuntimeError("boom"), "error")]
)
def test_interrupt_or_failure_mid_reply_keeps_partial_reply(model, store, exc, reason) -> None:
    bot = build_chatbot(model, store, None, kv_cache=False)
    chunks: list = []
    stream = bot.stream(
        {"messages": [HumanMessage("Count to ten:")]},
        config={**SESSION, "callbacks": [_RaiseAfter(3, exc)]},
        max_tokens=40,
    )
    with pytest.raises(type(exc)):
        chunks.extend(stream)
    saved = _file(store)
    assert [m["type"] for m in saved] == ["human", "ai"]
    assert saved[1]["data"]["response_metadata"]["interrupted"] is True
    assert saved[1]["data"]["response_metadata"]["finish_reason"] == reason
    assert saved[1]["data"]["content"] == "".join(c.text for c in chunks)
    # The model is usable again at once.
    bot.invoke({"messages": [HumanMessage("next")]}, config=SESSION)
    assert len(_file(store)) == 4


def test_literal_braces_in_system_prompt(model, store) -> None:
    system = 'Reply as JSON like {"answer": 1} or {{ok}}, in {language}. Code: if (x) { y; }'
    bot = build_chatbot(model, store, system, kv_cache=False)
    rendered = bot.prompt_messages({"language": "Spanish"}, [])
    assert rendered[0].content == (
        'Reply as JSON like {"answer": 1} or {ok}, in Spanish. Code: if (x) { y; }'
    )
    bot.invoke({"messages": [HumanMessage("hi")], "language": "Spanish"}, config=SESSION)


def test_unknown_variable_is_a_clear_error_and_saves_nothing(model, store) -> None:
    bot = build_chatbot(model, store, "Talk like {persona}.", kv_cache=False)
    # Python callers are told how to pass it from Python, not with a command-line flag.
    with pytest.raises(ConfigError, match=r'\{persona\}.*"persona" in the input') as err:
        bot.invoke({"messages": [HumanMessage("hi")]}, config=SESSION)
    assert "--var" not in str(err.value)
    assert not (store.root / "abc.json").exists()


def test_long_history_is_trimmed_to_fit_and_keeps_the_system_prompt(model, store) -> None:
    history = store.get("abc")
    for i in range(60):
        history.add_messages(
            [HumanMessage(f"Message {i}: " + "blah " * 20), AIMessage(f"Reply {i}: " + "ok " * 10)]
        )
    bot = build_chatbot(model, store, "SYSTEM PROMPT HERE", kv_cache=False)
    everything = [*history.messages, HumanMessage("last question")]
    assert model.get_num_tokens_from_messages(everything) > model.context_window

    reply = bot.invoke({"messages": [HumanMessage("last question")]}, config=SESSION)
    plan = bot.plan({}, everything)
    kept = [SystemMessage("SYSTEM PROMPT HERE"), *everything[plan.start :]]
    assert isinstance(everything[plan.start], HumanMessage)
    assert reply.usage_metadata["input_tokens"] == model.get_num_tokens_from_messages(kept)
    assert reply.usage_metadata["input_tokens"] <= model.context_window - model.max_tokens
    assert len(history.messages) == 122  # trimming never touches the file


def test_a_message_too_long_for_the_context_is_refused_and_loses_nothing(model, store) -> None:
    bot = build_chatbot(model, store, None, kv_cache=False)
    bot.invoke({"messages": [HumanMessage("hello")]}, config=SESSION)
    before = (store.root / "abc.json").read_bytes()
    with pytest.raises(ContextOverflowError, match="too long"):
        bot.invoke({"messages": [HumanMessage("word " * 2000)]}, config=SESSION)
    assert (store.root / "abc.json").read_bytes() == before


def test_no_deprecation_warnings_reach_the_user(model, store) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bot = build_chatbot(model, store, "Hi {name}", variables={"name": "Ann"}, kv_cache=False)
        bot.invoke({"messages": [HumanMessage("hi")]}, config=SESSION)
        list(bot.stream({"messages": [HumanMessage("hi")]}, config=SESSION))
    deprecations = [
        w
        for w in caught
        if issubclass(w.category, DeprecationWarning) or "deprecat" in str(w.message).lower()
    ]
    assert deprecations == []


def test_hostile_session_id_is_refused(model, store) -> None:
    from localbot.errors import SessionError

    bot = build_chatbot(model, store, None, kv_cache=False)
    with pytest.raises(SessionError):
        bot.invoke(
            {"messages": [HumanMessage("hi")]}, config={"configurable": {"session_id": "../escape"}}
        )


def test_a_resumed_session_reads_only_the_new_message(test_model_path, tmp_path) -> None:
    """After a restart the saved KV state is restored: the reply equals the warm process's and
    the earlier turns come from the cache."""
    import shutil

    def fresh_model() -> ChatLlamaCpp:
        return ChatLlamaCpp(
            model_path=str(test_model_path), n_ctx=1024, temperature=0, max_tokens=6
        )

    first_store = SessionStore(tmp_path / "a")
    warm_bot = build_chatbot(fresh_model(), first_store, "Be brief.")
    first = warm_bot.invoke({"messages": [HumanMessage("Tell me about rivers. " * 30)]}, SESSION)
    warm_bot.wait_for_saves()
    assert first_store.kv_state_path("abc").exists()
    seconds, written = warm_bot.kv.last_save  # the background save reports what it wrote
    assert seconds > 0
    assert written > first_store.kv_state_path("abc").stat().st_size  # the state and its meta
    # The warm process goes on in a copy; the new process gets the very files the first wrote
    # (a copied state file is another inode, which kv_state rightly refuses to trust).
    shutil.copytree(first_store.root, tmp_path / "b")
    warm_bot.store = SessionStore(tmp_path / "b")

    warm = warm_bot.invoke({"messages": [HumanMessage("And lakes?")]}, SESSION)
    resumed_bot = build_chatbot(fresh_model(), first_store, "Be brief.")
    resumed = resumed_bot.invoke({"messages": [HumanMessage("And lakes?")]}, SESSION)

    assert resumed.content == warm.content
    assert resumed_bot.last_turn.restored_tokens >= first.usage_metadata["input_tokens"]
    cached = resumed.usage_metadata["input_token_details"]["cache_read"]
    assert cached >= first.usage_metadata["input_tokens"]
    assert resumed.usage_metadata["input_tokens"] - cached < 30  # only the new turn was read


async def test_async_stream_and_invoke(model, store) -> None:
    bot = build_chatbot(model, store, None, kv_cache=False)
    chunks = [c async for c in bot.astream({"messages": [HumanMessage("Hello")]}, SESSION)]
    assert len(chunks) > 1
    reply = await bot.ainvoke({"messages": [HumanMessage("Again")]}, SESSION)
    saved = _file(store)
    assert [m["type"] for m in saved] == ["human", "ai", "human", "ai"]
    assert saved[1]["data"]["content"] == "".join(c.text for c in chunks)
    assert saved[3]["data"]["content"] == reply.content
