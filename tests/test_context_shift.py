"""``--context-shift`` (``ChatLlamaCpp(context_shift=True)``), on the real model: when the start of
the history is dropped, the cached rest is shifted into place instead of re-read. Approximate by
design, so opt-in; refused where llama.cpp's cache cannot shift."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from test_prepare import SESSION, _chat_until_the_cut_moves

from localbot import ChatLlamaCpp, SessionStore, build_chatbot
from localbot.errors import ConfigError

pytestmark = pytest.mark.model


def _bot(model_path: Path, store: Path, shift: bool):
    model = ChatLlamaCpp(
        model_path=str(model_path), n_ctx=512, temperature=0, max_tokens=8, context_shift=shift
    )
    # No background preparation: the turn itself must meet the moved cut.
    return build_chatbot(model, SessionStore(store), "Be brief.", prepare_next=False)


def test_a_moved_cut_reuses_the_shifted_cache_instead_of_re_reading(test_model_path, tmp_path):
    exact = _bot(test_model_path, tmp_path / "exact", shift=False)
    shifted = _bot(test_model_path, tmp_path / "shifted", shift=True)
    message = _chat_until_the_cut_moves(exact)
    assert _chat_until_the_cut_moves(shifted).text == message.text

    exact.invoke({"messages": [message]}, SESSION)
    reply = shifted.invoke({"messages": [message]}, SESSION)

    re_read, reused = exact.model.last_stats, shifted.model.last_stats
    assert shifted.last_turn.trim_start == exact.last_turn.trim_start > 0
    assert reused.prompt_tokens == re_read.prompt_tokens
    assert re_read.cached_tokens < 20  # the exact path re-reads all but the system prompt
    # Shifted: only the new message (and the last reply's template tail) is read.
    assert reused.evaluated_tokens < 60 < reused.cached_tokens
    assert reply.text  # approximate, so no claim on the words


def test_a_repeated_message_is_not_mistaken_for_a_dropped_start(test_model_path, tmp_path):
    """Text that occurs twice in a conversation must not make the shift cut real history."""
    said = "Please remember this list: apples, pears, plums, cherries, figs and dates. " * 2
    results = []
    for shift in (False, True):
        bot = _bot(test_model_path, tmp_path / str(shift), shift=shift)
        for text in (said, "Thanks.", said):
            reply = bot.invoke({"messages": [HumanMessage(text)]}, SESSION)
        results.append((bot.model.last_stats.cached_tokens, reply.text))
    assert results[0] == results[1]


def test_it_is_refused_where_the_cache_cannot_shift(test_model_path):
    model = ChatLlamaCpp(model_path=str(test_model_path), context_shift=True, swa_full=False)
    with pytest.raises(ConfigError, match="--context-shift cannot be used with gemma"):
        model.load()
