"""Per-session llama.cpp state for the chatbot: restore a session's saved KV cache before its turn,
save it again after the turn in the background, and know which session the model's memory holds.

The file format and the safety rules are ``localbot.kv_files``'s, moving a live model's state in
and out ``localbot.kv_state``'s; this class only decides *when* (see ``Chatbot.stream``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage

from localbot import kv_files, kv_state
from localbot.chat_model import ChatLlamaCpp
from localbot.sessions import SessionStore

log = logging.getLogger(__name__)


class SessionKvCache:
    """Saves and restores the KV state of each session of one store, for one model."""

    def __init__(
        self,
        model: ChatLlamaCpp,
        store: SessionStore,
        budget_bytes: int = kv_files.DEFAULT_MAX_TOTAL_BYTES,
    ) -> None:
        self.model = model
        self.store = store
        self.budget_bytes = budget_bytes
        """Disk budget for all sessions' saved states together (oldest pruned first)."""
        self.last_save: tuple[float, int] | None = None
        """(seconds, bytes) of the most recent background save that wrote a state, None while
        one runs or when it wrote nothing: for ``/stats`` and the benchmark (after ``wait()``)."""
        self._saves: list[threading.Thread] = []
        # The session the model's memory holds, and the model's generation count it will have
        # once that session's turn has generated: any other generation in between (a stateless
        # request, another chatbot on the same model) means the memory holds something else.
        self._live: tuple[str, int] | None = None

    def restore(
        self,
        session_id: str,
        prompt: Sequence[BaseMessage],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> int:
        """Before a turn: load the session's saved state if it saves reading the prompt (with
        ``tools``, OpenAI-shaped specs, in it when the turn binds them); returns
        the tokens restored (0 when the model's memory already holds this session, or when no
        usable state exists)."""
        expected = self.model.generation_count + 1
        if self._live == (session_id, self.model.generation_count):
            # The model holds at least what the file holds: do not even look at it.
            self._live = (session_id, expected)
            return 0
        self.wait()
        path = self.store.kv_state_path(session_id)
        restored = kv_state.restore_state(self.model, path, self.model.prompt_ids(prompt, tools))
        self._live = (session_id, expected)
        return restored

    def save_in_background(self, session_id: str) -> None:
        """After a complete turn: save the state while the user reads and types (~18 KB per
        token). A save that fails costs speed next time, never data."""
        path = self.store.kv_state_path(session_id)
        self.last_save = None

        def save() -> None:
            try:
                start = time.perf_counter()
                written = kv_state.save_state(self.model, path)
                if written is not None:
                    self.last_save = (time.perf_counter() - start, written)
                kv_files.prune_states(self.store.root, self.budget_bytes)
            except Exception:
                log.debug("could not save KV state to %s", path, exc_info=True)

        thread = threading.Thread(target=save, name="localbot-kv-save", daemon=True)
        thread.start()
        self._saves.append(thread)

    def wait(self) -> None:
        """Block until background saves are on disk (call before exiting)."""
        while self._saves:
            self._saves.pop().join()

    def forget(self, session_id: str) -> None:
        """The session's messages are gone (``/clear``): so is its saved state."""
        self.wait()
        kv_files.remove_state(self.store.kv_state_path(session_id))
        if self._live and self._live[0] == session_id:
            self._live = None
