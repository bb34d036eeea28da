"""Where the time of a chatbot turn goes, step by step: recorded by the chatbot itself (so
``/stats`` and the benchmarks read it instead of wrapping its methods)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TurnTimings:
    """Where the time of the last turn went, in seconds (for ``/stats`` and the benchmarks)."""

    read_session: float = 0.0
    plan: float = 0.0
    prompt: float = 0.0
    save_human: float = 0.0
    """Handing the user's message to the writer thread, plus any wait for it: the model holds
    the reply until it is on disk, so only a write slower than reading the prompt shows here."""
    restore_kv: float = 0.0
    model: float = 0.0
    """From asking the model to its last chunk: llama.cpp's work plus the adapter's (not the
    wait for the user's message to be written, which is ``save_human``)."""
    save_reply: float = 0.0
    total: float = 0.0
    restored_tokens: int = 0
    trim_start: int = 0
    """Index of the first history message the prompt kept."""

    @property
    def own_seconds(self) -> float:
        """localbot's own time: everything outside the model call."""
        return self.total - self.model

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "own_seconds": self.own_seconds}


class Clock:
    """Times the steps of one turn into a TurnTimings."""

    def __init__(self, timings: TurnTimings) -> None:
        self.timings = timings
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.timings, name, getattr(self.timings, name) + time.perf_counter() - began)

    def stop(self) -> None:
        self.timings.total = time.perf_counter() - self.start
