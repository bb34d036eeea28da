"""localbot's chatbot, driven the way the REPL drives it, one turn at a time; each turn's row is
read from what localbot records itself (``Chatbot.last_turn``, ``ChatLlamaCpp.last_stats``,
``SessionKvCache.last_save``), never from wrappers around its methods."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage

from bench.settings import Settings
from bench.timing import GenerateProbe, finish_row
from localbot.chat_model import ChatLlamaCpp
from localbot.chatbot import Chatbot, TurnTimings, build_chatbot
from localbot.sessions import SessionStore

STEP_COLUMNS = (
    "trim_s",
    "session_read_s",
    "prompt_s",
    "session_write_s",
    "kv_restore_s",
    "adapter_s",
    "between_s",
    "other_s",
)
"""localbot's share of a turn's overhead, step by step (they add up to ``overhead_s``)."""


def load_localbot_model(s: Settings, load: bool = True) -> ChatLlamaCpp:
    """localbot's chat model with the benchmark's settings (loaded unless ``load`` is False)."""
    threads = s.thread_kwargs()
    model = ChatLlamaCpp(
        model_path=str(s.model),
        n_ctx=s.ctx,
        n_batch=s.batch,
        n_gpu_layers=s.gpu_layers,
        n_threads=threads.get("n_threads"),
        model_kwargs={k: v for k, v in threads.items() if k != "n_threads"},
        temperature=0,
        max_tokens=s.max_tokens,
        seed=s.seed,
    )
    if load:
        model.load()
    return model


def make_localbot(
    model: ChatLlamaCpp, sessions: Path, s: Settings, kv_cache: bool = True
) -> Chatbot:
    return build_chatbot(
        model, SessionStore(sessions), None, trim_watermark=s.watermark, kv_cache=kv_cache
    )


def steps(timings: TurnTimings, generate_s: float, turn_s: float) -> dict[str, float]:
    """The turn's overhead (wall time outside ``Llama.generate``) split by localbot's own step
    timings. ``adapter_s``: the chat model's work around ``generate`` (template, tokenizing,
    callbacks); ``between_s``: inside the turn's clock but in no step (mostly starting the
    background save); ``other_s``: outside the turn's clock (input checks, the chain run's
    callbacks, the caller's loop)."""
    own = {
        "trim_s": timings.plan,
        "session_read_s": timings.read_session,
        "prompt_s": timings.prompt,
        "session_write_s": timings.save_human + timings.save_reply,
        "kv_restore_s": timings.restore_kv,
    }
    return {
        **own,
        "adapter_s": timings.model - generate_s,
        "between_s": timings.total - timings.model - sum(own.values()),
        "other_s": turn_s - timings.total,
    }


class LocalbotChat:
    """One localbot chatbot on one session; ``turn`` streams a message and returns its row."""

    name = "localbot"

    def __init__(self, bot: Chatbot, probe: GenerateProbe, session_id: str) -> None:
        self.bot, self.probe, self.session_id = bot, probe, session_id

    def turn(self, text: str) -> dict[str, Any]:
        self.probe.begin()
        start = time.perf_counter()
        first, parts = None, []
        config = {"configurable": {"session_id": self.session_id}}
        for chunk in self.bot.stream({"messages": [HumanMessage(text)]}, config):
            if chunk.text and first is None:
                first = time.perf_counter()
            parts.append(chunk.text)
        end = time.perf_counter()
        self.bot.wait_for_saves()  # the user reads the reply meanwhile: not part of the turn
        kv_wait = time.perf_counter() - end
        timings = self.bot.last_turn
        row = self.probe.result(start)
        row = finish_row(row, self.name, start, first, end, "".join(parts), timings.trim_start)
        row.update(steps(timings, row["model_s"], row["turn_s"]))
        stats = self.bot.model.last_stats
        saved = self.bot.kv.last_save if self.bot.kv else None
        row.update(
            own_s=timings.own_seconds,
            chatbot_total_s=timings.total,
            stats_cached_tokens=stats.cached_tokens if stats else None,
            stats_ttft_s=stats.time_to_first_token if stats else None,
            stats_gen_tps=stats.generation_tokens_per_second if stats else None,
            stats_finish_reason=stats.finish_reason if stats else None,
            kv_restored=timings.restored_tokens,
            kv_save_s=saved[0] if saved else None,
            kv_save_bytes=saved[1] if saved else None,
            kv_wait_s=kv_wait,
        )
        return row
