"""One session's messages as a LangChain ``BaseChatMessageHistory``, over the files of a
``SessionStore`` (``localbot.sessions``), which does the locking and the atomic writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, messages_from_dict, messages_to_dict

from localbot.session_file import read_session, remember

if TYPE_CHECKING:
    from localbot.sessions import SessionStore

__all__ = ["SessionHistory"]


class SessionHistory(BaseChatMessageHistory):
    """The chat history of one session, read from disk on every access.

    Reading each time (no cache) means another process's appends are always seen, and the file
    stays the single source of truth.
    """

    def __init__(self, store: SessionStore, session_id: str) -> None:
        super().__init__()
        self.store = store
        self.path = store.path_for(session_id)  # refuses a bad id or a link out of the store
        self.session_id = session_id

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The stored messages; an empty list if the session has no file yet."""
        return read_session(self._checked_path())[1]

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append ``messages`` in one atomic write, so a turn's messages land together."""
        self.add_messages_after(messages, None)

    def add_messages_after(self, messages: Sequence[BaseMessage], after_id: str | None) -> None:
        """Write ``messages`` in one atomic write right after the message whose id is
        ``after_id`` (a reply after the message it answers), or at the end when that message is
        last, gone or None. Another process on the same session may have added its own message
        meanwhile: each reply still follows its question."""
        new = messages_to_dict(list(messages))
        if not new:
            return
        with self.store.locked(self.session_id):
            path = self._checked_path()
            entries, old = read_session(path)
            at = _index_after(entries, after_id)
            merged = [*entries[:at], *new, *entries[at:]]
            if at == len(entries):  # the usual case: new bytes spliced onto the old ones
                data = self.store.write_entries(path, entries, appended=new)
            else:
                data = self.store.write_entries(path, merged)
            if data is not None:
                # The next read finds these very bytes: it need not decode them again. The new
                # messages are loaded from their dicts, as a read would load them.
                loaded = [*old[:at], *messages_from_dict(new), *old[at:]]
                remember(path, data, merged, loaded, ours=True)

    def add_message(self, message: BaseMessage) -> None:
        self.add_messages([message])

    def replace_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Rewrite the whole history atomically (e.g. to replace a partial reply)."""
        new = messages_to_dict(list(messages))
        with self.store.locked(self.session_id):
            path = self._checked_path()
            read_session(path)  # refuse to write over a file we cannot read: it may be user data
            self.store.write_entries(path, new)

    def clear(self) -> None:
        """Leave the session in place with no messages."""
        self.replace_messages([])

    def _checked_path(self) -> Path:
        """Re-check the path on each use: a link could have appeared since ``__init__``."""
        return self.store.path_for(self.session_id)


def _index_after(entries: list[dict], message_id: str | None) -> int:
    """The index just after the last entry with id ``message_id``; the end if there is none."""
    if message_id is not None:
        for index in range(len(entries) - 1, -1, -1):
            if entries[index]["data"].get("id") == message_id:
                return index + 1
    return len(entries)
