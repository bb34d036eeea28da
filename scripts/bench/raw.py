"""The baseline: a straightforward chatbot on raw llama-cpp-python that keeps the newest
user/assistant pairs that fit, with its own ``Llama`` set up like localbot's."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.messages import BaseMessage
from llama_cpp import Llama, llama_chat_format
from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

from bench.settings import Settings
from bench.timing import GenerateProbe, finish_row
from localbot.chat_model import ChatLlamaCpp

_LLAMA_CPP_FORMATS = {
    "gemma": "format_gemma",
    "llama3": "format_llama3",
    "chatml": "format_chatml",
    "mistral": "format_mistral_instruct",
}
_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def raw_formatter(model: ChatLlamaCpp) -> tuple[Callable[..., Any], str]:
    """llama-cpp-python's own chat formatter for the template localbot uses on this model:
    its built-in one of the same name, else a Jinja formatter of the template (what
    llama-cpp-python does with a GGUF's template). Returns (formatter, description)."""
    template = model.template
    name = _LLAMA_CPP_FORMATS.get(template.name)
    if name:
        return getattr(llama_chat_format, name), f"llama-cpp-python built-in {name[7:]!r}"
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template.source,
        eos_token=template.eos_token,
        bos_token=template.bos_token,
        stop_token_ids=[model.load().token_eos()],
    )
    return formatter, f"Jinja2ChatFormatter of the {template.name!r} template"


def load_raw(s: Settings, model: ChatLlamaCpp) -> tuple[Llama, Callable[..., Any], str]:
    """A separate ``Llama`` with the same settings as localbot's, and its chat formatter
    (``model`` picks the template; it may be unloaded)."""
    formatter, description = raw_formatter(model)
    llama = Llama(
        model_path=str(s.model),
        n_ctx=s.ctx,
        n_batch=min(s.batch, s.ctx),
        n_gpu_layers=model.gpu_layers,
        swa_full=True,
        seed=s.seed,
        verbose=False,
        chat_handler=chat_formatter_to_chat_completion_handler(formatter),
        **s.thread_kwargs(),
    )
    return llama, formatter, description


class RawBot:
    """A straightforward chatbot: keep the newest user/assistant pairs that fit."""

    name = "raw"

    def __init__(self, llama: Llama, formatter: Callable[..., Any], s: Settings) -> None:
        self.llama, self.formatter, self.s = llama, formatter, s
        self.history: list[dict[str, str]] = []
        self.start = 0  # first kept message; only moves forward as the history grows
        self.probe = GenerateProbe(llama)

    def load_history(self, messages: Sequence[BaseMessage]) -> None:
        """Continue a conversation saved by localbot (the restart scenario)."""
        self.history = [{"role": _ROLES.get(m.type, "user"), "content": m.text} for m in messages]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Exactly what ``create_chat_completion`` tokenizes for ``messages``."""
        rendered = self.formatter(messages=messages)
        return self.llama.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )

    def _trim(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        while len(messages) - self.start > 1:
            kept = messages[self.start :]
            if len(self.prompt_ids(kept)) + self.s.max_tokens <= self.s.ctx:
                return kept
            self.start += 2  # drop the oldest user/assistant pair
        return messages[self.start :]

    def turn(self, text: str) -> dict[str, Any]:
        self.probe.begin()
        start = time.perf_counter()
        messages = [*self.history, {"role": "user", "content": text}]
        kept = self._trim(messages)
        first, parts = None, []
        stream = self.llama.create_chat_completion(
            kept,
            stream=True,
            max_tokens=self.s.max_tokens,
            temperature=0.0,
            repeat_penalty=1.0,
            seed=self.s.seed,
        )
        for chunk in stream:
            delta = chunk["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter()
            parts.append(delta)
        end = time.perf_counter()
        reply = "".join(parts)
        self.history = [*messages, {"role": "assistant", "content": reply}]
        row = self.probe.result(start)
        return finish_row(row, self.name, start, first, end, reply, dropped=self.start)
