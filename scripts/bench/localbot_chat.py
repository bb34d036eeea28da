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
        context_shift=s.context_shift,
    )
    if load:
        model.load()
    return model


def make_localbot(
    model: ChatLlamaCpp, sessions: Path, s: Settings, kv_cache: bool = True
) -> Chatbot:
    return build_chatbot(
        model,
        SessionStore(sessions),
        None,
        trim_watermark=s.watermark,
        kv_cache=kv_cache,
        prepare_next=s.prepare,
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
    """One localbot chatbot on one session; ``turn`` streams a message and returns its row.

    Between turns the user reads and types (:meth:`pause`): localbot's background work (getting
    the next turn ready, saving the KV state when due) runs then, and is reported with the next
    turn (``bg_*`` columns), outside its time."""

    name = "localbot"

    def __init__(self, bot: Chatbot, probe: GenerateProbe, session_id: str) -> None:
        self.bot, self.probe, self.session_id = bot, probe, session_id
        self._stop_wait = 0.0  # waiting for background work to stop: charged to the next turn
        self._kv_bytes = 0

    def pause(self, seconds: float) -> None:
        """The user reads and types for ``seconds``; then their message arrives, which stops
        the background work (at the end of its chunk: that wait is charged to the next turn)."""
        if seconds > 0:
            time.sleep(seconds)
        start = time.perf_counter()
        if self.bot.kv:
            self.bot.kv.stop_background()
        self._stop_wait = time.perf_counter() - start

    def turn(self, text: str) -> dict[str, Any]:
        work = self.bot.kv.background if self.bot.kv else None  # done in the pause before
        self.probe.begin()
        start = time.perf_counter()
        first, parts = None, []
        config = {"configurable": {"session_id": self.session_id}}
        for chunk in self.bot.stream({"messages": [HumanMessage(text)]}, config):
            if chunk.text and first is None:
                first = time.perf_counter()
            parts.append(chunk.text)
        end = time.perf_counter()
        timings = self.bot.last_turn
        row = self.probe.result(start)
        row = finish_row(row, self.name, start, first, end, "".join(parts), timings.trim_start)
        row.update(steps(timings, row["model_s"], row["turn_s"]))
        # A message arriving during background work waits for its current chunk to end.
        for key in ("ttft_s", "turn_s", "overhead_s", "other_s"):
            row[key] += self._stop_wait
        stats = self.bot.model.last_stats
        row.update(
            own_s=timings.own_seconds,
            chatbot_total_s=timings.total,
            stats_cached_tokens=stats.cached_tokens if stats else None,
            stats_ttft_s=stats.time_to_first_token if stats else None,
            stats_gen_tps=stats.generation_tokens_per_second if stats else None,
            stats_finish_reason=stats.finish_reason if stats else None,
            kv_restored=timings.restored_tokens,
            bg_stop_wait_s=self._stop_wait,
            **self._background(work),
            session_bytes=self._session_bytes(),
            state_bytes=self._state_bytes(),
        )
        return row

    def _background(self, work: Any) -> dict[str, Any]:
        """What the background did in the pause before this turn, and KV bytes written since
        the previous row."""
        written = self.bot.kv.bytes_written if self.bot.kv else 0
        kv_bytes, self._kv_bytes = written - self._kv_bytes, written
        if work is None:
            return {"bg_evaluated": 0, "bg_s": 0.0, "kv_bytes": kv_bytes}
        return {
            "bg_evaluated": work.evaluated,
            "bg_s": sum(end - start for start, end in work.chunks),
            "kv_bytes": kv_bytes,
            "kv_save_s": sum(end - start for start, end, _ in work.saves) or None,
        }

    def _session_bytes(self) -> int:
        """Bytes the turn wrote to the session file: it is rewritten whole, twice (the user's
        message before the reply, then the reply)."""
        path = self.bot.store.root / f"{self.session_id}.json"
        return 2 * path.stat().st_size if path.exists() else 0

    def _state_bytes(self) -> int:
        """The KV state's size now: what saving it after every turn would write."""
        import llama_cpp

        from localbot.llama_cache import context_handle

        with self.bot.model.exclusive() as llama:
            return int(llama_cpp.llama_state_get_size(context_handle(llama)))

    def finish(self) -> int:
        """The session ends (the user quits): what is not on disk is saved; returns the KV
        bytes that wrote."""
        self.bot.wait_for_saves()
        written = self.bot.kv.bytes_written if self.bot.kv else 0
        kv_bytes, self._kv_bytes = written - self._kv_bytes, written
        return kv_bytes
