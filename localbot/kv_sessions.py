"""Per-session llama.cpp state for the chatbot: what the model's memory holds, getting it ready
for a session's next turn while the user types, and saving it to disk when that pays.

* **Before a turn** (:meth:`SessionKvCache.restore`): stop any background work, and load the
  session's saved state if the memory does not already hold the session.
* **After a turn, and when a session is opened** (:meth:`SessionKvCache.prepare`): in one
  background thread, save the state if a save is due, then restore the session's saved state if
  the memory holds another session, then evaluate the start of the next turn's prompt
  (``ChatLlamaCpp.prefill``): after the history's cut point moves, that is the whole kept
  history, which the turn would otherwise re-read while the user waits.
* **Saving** (~18 KB per token, rewritten whole): not after every turn but when it pays: every
  ``save_every`` turns, when the user has been idle ``idle_save_s`` seconds, before the memory
  switches to another session or to another prompt (a stateless request on the same model), and
  at exit (:meth:`SessionKvCache.close`). A kill -9 loses at
  most the turns since the last save, which costs re-reading them on resume, never a wrong
  reply: a saved state records exactly the tokens it holds.

The file format and the safety rules are ``localbot.kv_files``'s, moving a live model's state in
and out ``localbot.kv_state``'s.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage

from localbot import kv_files, kv_state
from localbot.chat_model import ChatLlamaCpp
from localbot.sessions import SessionStore

log = logging.getLogger(__name__)

DEFAULT_SAVE_EVERY = 8
"""Save a session's state at least every this many turns (besides idle time and exit)."""
DEFAULT_IDLE_SAVE_S = 15.0
"""Save once the user has been idle this long after a turn."""


@dataclass
class BackgroundWork:
    """What the background thread did since the last turn (for ``/stats`` and the benchmark)."""

    prefilled: int = 0
    """Tokens of the next prompt the model held when the work stopped."""
    evaluated: int = 0
    """Of those, the tokens the work evaluated (the rest were in the cache already)."""
    chunks: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) perf_counter times of each prefill chunk."""
    saves: list[tuple[float, float, int]] = field(default_factory=list)
    """(start, end, bytes) of each state saved."""
    done: threading.Event = field(default_factory=threading.Event)
    """Set when the work is done (saving, restoring, prefilling); an idle save may follow."""


class SessionKvCache:
    """Restores, prepares and saves the KV state of each session of one store, for one model."""

    def __init__(
        self,
        model: ChatLlamaCpp,
        store: SessionStore,
        budget_bytes: int = kv_files.DEFAULT_MAX_TOTAL_BYTES,
        *,
        save_every: int = DEFAULT_SAVE_EVERY,
        idle_save_s: float = DEFAULT_IDLE_SAVE_S,
    ) -> None:
        self.model = model
        self.store = store
        self.budget_bytes = budget_bytes
        """Disk budget for all sessions' saved states together (oldest pruned first)."""
        self.save_every = max(1, save_every)
        self.idle_save_s = idle_save_s
        self.bytes_written = 0
        """KV-state bytes written to disk by this object so far."""
        self.last_save: tuple[float, int] | None = None
        """(seconds, bytes) of the most recent save."""
        self.background = BackgroundWork()
        """What the background thread did since the last turn."""
        self.on_chunk: Callable[[int, int, float, float], None] | None = None
        """Called after each prefill chunk with (tokens held, evaluated, start, end): tests."""
        # The session the model's memory holds, and the model's generation count then: any
        # other generation since (a stateless request, another chatbot on the same model)
        # means the memory holds something else.
        self._live: tuple[str, int] | None = None
        # The session whose state in memory is newer than its file, and for how many turns.
        self._unsaved: tuple[str, int] | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one save at a time; guards _unsaved
        self._turn_thread: int | None = None  # the thread whose turn restore() prepared
        model.before_generation(self._before_generation)
        _open.add(self)

    # ----------------------------------------------------------------- turns
    def restore(
        self,
        session_id: str,
        prompt: Sequence[BaseMessage],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> int:
        """Before a turn: stop background work (what it evaluated stays), then load the
        session's saved state if that saves reading the prompt (with ``tools``, OpenAI-shaped
        specs, in it when the turn binds them); returns the tokens restored (0 when the model's
        memory already holds this session, or when no usable state exists)."""
        self.stop_background()
        self._turn_thread = threading.get_ident()  # the generation that follows is this turn's
        if self._holds(session_id):
            return 0
        return self._switch_to(session_id, self.model.prompt_ids(prompt, tools))

    def _before_generation(self) -> None:
        """Before any generation on the model: one that is not a turn of ours (a stateless
        request, another chatbot) replaces what the memory holds, so save it first if its file
        is behind (as at a session switch)."""
        if self._turn_thread == threading.get_ident():
            self._turn_thread = None
            return
        if self._unsaved:
            self.stop_background()
            self.save()

    def turn_done(self, session_id: str, complete: bool) -> None:
        """After a turn's generation (``complete``: the reply came whole): the model now holds
        this session, newer than its file."""
        self._turn_thread = None
        self._live = (session_id, self.model.generation_count)
        if complete:
            with self._lock:
                turns = self._unsaved[1] if self._unsaved and self._unsaved[0] == session_id else 0
                self._unsaved = (session_id, turns + 1)

    def prepare(
        self, session_id: str, next_prefix: Callable[[], Sequence[int] | None] | None = None
    ) -> None:
        """In the background: save if due, make the memory hold ``session_id`` (its saved
        state) and evaluate ``next_prefix()``, the token ids the session's next prompt will
        start with; then save once the user has been idle ``idle_save_s`` seconds. Returns at
        once; a turn (:meth:`restore`) stops the work and keeps what it did."""
        self.stop_background()
        self._stop = stop = threading.Event()
        self.background = work = BackgroundWork()

        def run() -> None:
            try:
                self._prepare(session_id, next_prefix, stop, work)
            except Exception:
                log.debug("background work for session %s failed", session_id, exc_info=True)
            finally:
                work.done.set()

        self._worker = threading.Thread(target=run, name="localbot-prepare", daemon=True)
        self._worker.start()

    def _prepare(
        self,
        session_id: str,
        next_prefix: Callable[[], Sequence[int] | None] | None,
        stop: threading.Event,
        work: BackgroundWork,
    ) -> None:
        if self._save_due():
            self.save()
        ids = list(next_prefix() or []) if next_prefix else []
        if stop.is_set():
            return
        if ids and not self._holds(session_id):
            self._switch_to(session_id, ids)
        if ids and not stop.is_set():

            def chunk_done(held: int, evaluated: int, started: float, ended: float) -> None:
                work.chunks.append((started, ended))
                work.evaluated += evaluated
                if self.on_chunk is not None:
                    self.on_chunk(held, evaluated, started, ended)

            work.prefilled = self.model.prefill(ids, stop, chunk_done)
        work.done.set()
        if self._unsaved and not stop.wait(self.idle_save_s):
            self.save()

    def stop_background(self) -> None:
        """Stop the background work (at the end of its current chunk) and wait for it."""
        self._stop.set()
        worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            worker.join()

    # ----------------------------------------------------------------- memory and files
    def _holds(self, session_id: str) -> bool:
        return self._live == (session_id, self.model.generation_count)

    def _switch_to(self, session_id: str, prompt_ids: Sequence[int]) -> int:
        """Make the memory hold ``session_id``: save the session it held if its file is behind,
        then restore this session's saved state if it shares more with ``prompt_ids``."""
        if self._unsaved and self._unsaved[0] != session_id:
            self.save()
        path = self.store.kv_state_path(session_id)
        restored = kv_state.restore_state(self.model, path, prompt_ids)
        self._live = (session_id, self.model.generation_count)
        return restored

    def _save_due(self) -> bool:
        return bool(self._unsaved and self._unsaved[1] >= self.save_every)

    def save(self) -> int | None:
        """Save the state of the session the memory holds, if its file is behind; returns the
        bytes written. A save that fails costs speed next time, never data."""
        with self._lock:
            if not self._unsaved or not self._holds(self._unsaved[0]):
                self._unsaved = None  # the memory moved on: nothing of that session to save
                return None
            session_id = self._unsaved[0]
            path = self.store.kv_state_path(session_id)
            start = time.perf_counter()
            try:
                written = kv_state.save_state(self.model, path)
                kv_files.prune_states(self.store.root, self.budget_bytes)
            except Exception:
                log.debug("could not save KV state to %s", path, exc_info=True)
                return None
            end = time.perf_counter()
            self._unsaved = None
            if written:
                self.bytes_written += written
                self.last_save = (end - start, written)
                self.background.saves.append((start, end, written))
            return written

    def close(self) -> None:
        """Before exiting: stop background work and save what is not on disk."""
        self.stop_background()
        self.save()

    def wait(self) -> None:
        """Block until the background work is done (not counting a coming idle save)."""
        if self._worker is not None:
            self.background.done.wait()

    def forget(self, session_id: str) -> None:
        """The session's messages are gone (``/clear``): so is its saved state."""
        self.stop_background()
        with self._lock:
            if self._unsaved and self._unsaved[0] == session_id:
                self._unsaved = None
        kv_files.remove_state(self.store.kv_state_path(session_id))
        if self._live and self._live[0] == session_id:
            self._live = None


_open: weakref.WeakSet[SessionKvCache] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Background work must stop before the interpreter tears the model down under it; what is
    # not on disk is saved (a clean exit resumes at warm speed).
    for cache in list(_open):
        try:
            cache.close()
        except Exception:
            log.debug("could not close a KV cache at exit", exc_info=True)
