"""Cache-aware trimming: choose where the history starts so that the prompt fits the context window
and its beginning stays the same for many turns.

The obvious trim (keep the newest messages that fit) moves the start of the prompt on every turn
once the history is full, and llama.cpp can then reuse none of its KV cache: every turn re-reads
the whole prompt. Here the cut point moves in steps instead. Each message has a fixed position
(its cumulative token offset from the start of the session); the cut is placed at the first human
turn at or after ``q``, where ``q`` is the overflow rounded *up* to a multiple of ``step``. While
the history grows by less than ``step`` tokens the cut does not move, so the prompt's prefix (and
llama.cpp's cache of it) survives; when it moves, it drops ``step`` tokens at once, leaving the
history near the low watermark. The rule is a pure function of the history, so a restarted
process picks the same cut, which keeps a saved KV state usable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from langchain_core.messages import BaseMessage, HumanMessage

from localbot.errors import ContextOverflowError

DEFAULT_WATERMARK = 0.6
"""After a cut the history fills about this fraction of its budget."""


CLEAR_OVERFLOW = 0.1
"""A history whose estimated size exceeds the budget by more than this fraction is trimmed
without counting it exactly first (the kept part is always counted exactly)."""


@dataclass(frozen=True)
class TrimPlan:
    """Where the kept history starts, and what that costs."""

    start: int
    """Index of the first kept message."""
    prompt_tokens: int
    """Exact prompt tokens for the kept messages (system prompt and template included)."""
    budget: int
    """Most prompt tokens allowed (context window minus room for the reply)."""

    @property
    def dropped(self) -> int:
        return self.start


def _is_human(message: BaseMessage) -> bool:
    return isinstance(message, HumanMessage) or message.type == "human"


def plan_trim(
    history: Sequence[BaseMessage],
    *,
    count_prompt: Callable[[Sequence[BaseMessage]], int],
    message_cost: Callable[[BaseMessage], int],
    fixed: int,
    budget: int,
    watermark: float = DEFAULT_WATERMARK,
) -> TrimPlan:
    """Choose the first message to keep.

    ``count_prompt(messages)`` is the exact prompt size for a non-empty suffix of the history (the
    system prompt and template included); ``message_cost`` a stable per-message estimate used to
    place the cut, and ``fixed`` the estimated tokens around the history (system prompt, BOS,
    generation prompt). The empty history is never counted: many real templates read
    ``messages[0]`` and cannot render it. The result always fits ``budget`` exactly and starts
    on a human turn; if even the newest human turn alone does not fit, ContextOverflowError says
    by how much.
    """
    if not 0 < watermark <= 1:
        raise ValueError("watermark must be in (0, 1]")
    offsets, total = [], 0
    for message in history:
        offsets.append(total)
        total += message_cost(message)
    # Counting a prompt exactly renders and tokenizes it (~1 ms at 2,000 tokens): skipped for
    # the whole history when the estimate says it clearly overflows.
    if fixed + total <= budget * (1 + CLEAR_OVERFLOW):
        full = count_prompt(history)
        if full <= budget:
            return TrimPlan(0, full, budget)

    history_budget = max(1, budget - fixed)
    step = max(1, math.floor(history_budget * (1 - watermark)))
    q = max(step, math.ceil((total - history_budget) / step) * step)

    humans = [i for i, m in enumerate(history) if _is_human(m)]
    candidates = [i for i in humans if offsets[i] >= q] or humans[-1:]
    if not candidates:
        raise ContextOverflowError(
            f"the conversation (about {fixed + total} tokens) does not fit the {budget}-token "
            "budget and has no "
            "user turn to start from"
        )
    for start in [i for i in humans if i >= candidates[0]]:
        tokens = count_prompt(history[start:])
        if tokens <= budget:
            return TrimPlan(start, tokens, budget)
    raise ContextOverflowError(
        f"the message is too long: the prompt needs {tokens} tokens but only {budget} fit "
        "(the context window minus room for the reply); shorten it, raise --ctx or lower "
        "--max-tokens"
    )
