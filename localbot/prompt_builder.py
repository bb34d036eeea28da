"""From messages (and tools) to the exact token ids a model reads, cached.

The template renders the prompt (``localbot.templates``; roles, tool calls and tool definitions
laid out by ``localbot.tools``); ``localbot.prompt_tokens`` tokenizes it the way llama.cpp
tokenizes a whole prompt, except control-token text a user typed, which stays text; BOS is added
when the model asks for it. A turn asks for its prompt several times (trim count, KV restore,
generation) and old messages repeat every turn: both are cached. A prompt being built by one
thread is waited for, not built again, by another that asks for it (the chatbot builds its likely
prompt on a worker thread while it plans the turn).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.messages import BaseMessage

from localbot import tools as tools_mod
from localbot.llama_cache import vocab_handle
from localbot.prompt_tokens import encode, special_tokens
from localbot.templates import ChatTemplate, texts_in

_MAX_PIECES = 8192
_MAX_PROMPTS = 8


class PromptBuilder:
    """Token ids of prompts for one model (``tokenizer`` and ``template`` are looked up lazily:
    the tokenizer switches from a vocabulary-only load to the full model once it is loaded)."""

    def __init__(
        self, tokenizer: Callable[[], Any], template: Callable[[], ChatTemplate], model_path: str
    ) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self._model_path = model_path
        self._pieces: dict[tuple[str, bool], tuple[int, ...]] = {}
        self._prompts: dict[Any, tuple[int, ...]] = {}
        self._building: dict[Any, threading.Event] = {}  # prompts a thread is building now
        self._building_lock = threading.Lock()

    def clear(self) -> None:
        self._prompts.clear()

    def tokenize_piece(self, text: str, special: bool) -> tuple[int, ...]:
        """Ids of one stretch of prompt text (special tokens parsed or not); cached."""
        key = (text, special)
        ids = self._pieces.get(key)
        if ids is None:
            tok = self._tokenizer()
            ids = tuple(tok.tokenize(text.encode("utf-8"), add_bos=False, special=special))
            if len(self._pieces) >= _MAX_PIECES:
                self._pieces.clear()
            self._pieces[key] = ids
        return ids

    def prompt_ids(
        self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None
    ) -> list[int]:
        key = tools_mod.cache_key(messages, tools)  # tool calls and ids are in the key
        while (ids := self._prompts.get(key)) is None:
            building = self._claim(key)
            if building is None:  # ours to build
                return list(self._build(key, messages, tools))
            building.wait()  # another thread is on it: its result, or (it failed) our own try
        return list(ids)

    def claim(
        self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None
    ) -> Callable[[], object] | None:
        """Take on building this prompt now, and get the build to run on another thread: from
        this call on, a thread asking for the prompt waits for that build instead of racing it
        to the tokenizer. The caller must run what it gets (once). None when the prompt is
        built or being built already."""
        key = tools_mod.cache_key(messages, tools)
        if key in self._prompts or self._claim(key) is not None:
            return None
        return lambda: self._build(key, messages, tools)

    def _claim(self, key: Any) -> threading.Event | None:
        """Mark ``key`` as being built by the caller (None), or get the build in progress."""
        with self._building_lock:
            building = self._building.get(key)
            if building is None:
                self._building[key] = threading.Event()
            return building

    def _build(
        self, key: Any, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None
    ) -> tuple[int, ...]:
        """Render a claimed prompt, cache it, and wake the threads waiting for it (also when
        the render fails: each of them then tries on its own)."""
        try:
            ids = tuple(self._render_ids(messages, tools))
            if len(self._prompts) >= _MAX_PROMPTS:
                self._prompts.pop(next(iter(self._prompts)), None)
            self._prompts[key] = ids
            return ids
        finally:
            with self._building_lock:
                self._building.pop(key).set()

    def _render_ids(
        self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None
    ) -> list[int]:
        if not messages:
            # Nothing to evaluate, so nothing to count. An empty list is never rendered: most real
            # templates read messages[0] and raise, and LangChain's trim_messages (a binary
            # search over prefixes) may ask for it.
            return []
        template = self._template()
        specials = special_tokens(self._tokenizer(), self._model_path)
        turns, extra = tools_mod.prompt_turns(template, messages, tools)
        controls = specials.controls_in(texts_in(turns, extra))
        pieces = template.pieces(
            turns, add_generation_prompt=True, control_tokens=controls, **extra
        )
        # Tokenized like llama.cpp tokenizes the whole rendered prompt (special tokens parsed),
        # except control-token text typed in a message, tool call or tool definition, which
        # stays text.
        ids = encode(pieces, specials, self.tokenize_piece)
        bos = self._bos_to_add()
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def _bos_to_add(self) -> int | None:
        """The BOS id when the model wants one at the start of every prompt, else None."""
        import llama_cpp

        tok = self._tokenizer()
        if not llama_cpp.llama_vocab_get_add_bos(vocab_handle(tok)):
            return None
        bos = tok.token_bos()
        return bos if bos >= 0 else None
