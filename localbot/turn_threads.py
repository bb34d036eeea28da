"""The threads a chatbot turn hands work to, so that it does not wait for it: writing the user's
message while the model reads the prompt (:class:`HumanSave`), and building the turn's likely
prompt while the turn plans its trim."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from langchain_core.messages import BaseMessage

from localbot.turn_timings import Clock

if TYPE_CHECKING:
    from localbot.session_history import SessionHistory

__all__ = ["HumanSave", "worker"]

_workers: dict[tuple[int, str], ThreadPoolExecutor] = {}


def worker(name: str) -> ThreadPoolExecutor:
    """A thread of this process for one kind of background work of a turn: ``"save"`` writes
    users' messages while the model reads the prompt (a write is ~1-2 ms of fsyncs and JSON);
    ``"prompt"`` builds a turn's likely prompt while the turn plans. Separate, so that a write
    never waits behind a build. One each: turns take the model one at a time anyway, and pending
    work finishes before the interpreter exits. A forked child gets its own (it has none of its
    parent's threads)."""
    key = (os.getpid(), name)
    worker = _workers.get(key)
    if worker is None:
        worker = _workers[key] = ThreadPoolExecutor(1, thread_name_prefix=f"localbot-{name}")
    return worker


class HumanSave:
    """The user's new messages being appended to the session file by the writer thread."""

    def __init__(self, history: SessionHistory, messages: Sequence[BaseMessage]) -> None:
        self._done: Future[None] = worker("save").submit(history.add_messages, list(messages))
        self.held = 0.0
        """Seconds the model held the reply waiting for the write."""

    def wait(self) -> None:
        """Wait for the write; raises its error (a :class:`SessionError`)."""
        self._done.result()

    def hold(self) -> None:
        """:meth:`wait`, for the model to call before the reply's first token (timed)."""
        began = time.perf_counter()
        try:
            self.wait()
        finally:
            self.held += time.perf_counter() - began

    def succeeded(self, clock: Clock) -> bool:
        """Wait for the write (timed as saving the human turn); whether it landed."""
        with clock.step("save_human"):
            return self._done.exception() is None
