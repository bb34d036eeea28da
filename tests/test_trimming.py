"""Cache-aware trimming as pure logic: a fake counter (one token per character plus a fixed
overhead) makes every number checkable by hand."""

from __future__ import annotations

import itertools

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from localbot.errors import ContextOverflowError
from localbot.trimming import plan_trim

SYSTEM = 20  # tokens of system prompt + template around the messages


def cost(message: BaseMessage) -> int:
    return len(message.text) + 4


def count(messages) -> int:
    return SYSTEM + sum(cost(m) for m in messages)


def conversation(turns: int, size: int = 100) -> list[BaseMessage]:
    messages: list[BaseMessage] = []
    for i in range(turns):
        messages += [HumanMessage(f"{i:03d}" + "u" * (size - 3)), AIMessage("a" * (size // 2))]
    return messages


def plan(messages, budget=1000, watermark=0.6):
    return plan_trim(
        messages,
        count_prompt=count,
        message_cost=cost,
        fixed=SYSTEM,
        budget=budget,
        watermark=watermark,
    )


def test_nothing_is_trimmed_while_everything_fits() -> None:
    p = plan(conversation(3))
    assert p.start == 0
    assert p.prompt_tokens == count(conversation(3))


@pytest.mark.parametrize("turns", range(1, 80))
def test_every_plan_fits_and_starts_on_a_human_turn(turns: int) -> None:
    messages = conversation(turns)
    p = plan(messages)
    assert p.prompt_tokens == count(messages[p.start :]) <= 1000
    assert isinstance(messages[p.start], HumanMessage)


def test_the_cut_point_moves_rarely_and_in_big_steps() -> None:
    starts = [plan(conversation(t)).start for t in range(1, 120)]
    moves = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    # Each turn adds ~160 tokens; a naive trim moves the start on every turn once full (~110
    # times). Here the start moves once per ~(1 - watermark) * budget = ~380 tokens of growth.
    assert moves <= 119 * 160 / 380 + 2
    assert starts == sorted(starts)  # never goes backwards


def test_after_a_cut_the_history_sits_near_the_low_watermark() -> None:
    starts = [plan(conversation(t)).start for t in range(1, 120)]
    for t in range(2, 120):
        if starts[t - 1] != starts[t - 2]:
            kept = count(conversation(t)[starts[t - 1] :])
            assert kept <= 0.6 * 1000 + 200  # watermark, plus at most one turn's worth


def test_same_history_same_cut_so_a_restarted_process_reuses_its_cache() -> None:
    messages = conversation(50)
    assert plan(list(messages)).start == plan(list(messages)).start


def test_a_single_message_larger_than_the_budget_is_an_error() -> None:
    with pytest.raises(ContextOverflowError, match="too long"):
        plan([HumanMessage("x" * 5000)])


def test_watermark_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="watermark"):
        plan(conversation(2), watermark=0)
