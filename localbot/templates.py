"""Chat templates: from messages to the exact token ids the model reads.

Two rules shape this module:

* Content stays content. The template is rendered with every message's text replaced by a
  sentinel, so the rendered string splits into template markup (tokenized with special tokens
  enabled: ``<start_of_turn>`` becomes the control token) and message text (tokenized as plain
  text: a user typing ``<end_of_turn>`` gets seven ordinary tokens, not a turn boundary).
* A system message is never dropped. When a template has no system role (it raises, or the system
  text does not appear in its output) the system text is merged into the first user turn, the way
  llama.cpp's own Gemma handling does.

Templates from a GGUF file are rendered in Jinja's ``ImmutableSandboxedEnvironment`` (a GGUF
template is untrusted input: CVE-2024-34359). Files without a template get a built-in one chosen
from ``general.architecture`` (and the vocabulary, for the ambiguous ``llama``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from localbot.errors import ConfigError

log = logging.getLogger(__name__)

# Built-in templates, in the shape of the publishers' own. None renders BOS itself: the tokenizer
# adds it when the model's metadata asks for it (see ChatLlamaCpp.prompt_ids).
BUILTIN_TEMPLATES: dict[str, str] = {
    "gemma": (
        "{% for m in messages %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + m['content'] + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content']"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] + '</s>' }}{% endif %}"
        "{% endfor %}"
    ),
    "phi3": (
        "{% for m in messages %}"
        "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}

# Built-ins without a system role: the system text is merged into the first user turn.
_NO_SYSTEM_ROLE = {"gemma", "mistral"}

_ARCHITECTURES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen": "chatml",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "qwen2vl": "chatml",
    "internlm2": "chatml",
    "phi3": "phi3",
    "mistral": "mistral",
    "mistral3": "mistral",
}

# The ``llama`` architecture covers Llama 2/3, Mistral and SmolLM: the vocabulary tells them apart.
_VOCAB_MARKERS = (("<|eot_id|>", "llama3"), ("<|im_start|>", "chatml"), ("[INST]", "mistral"))

_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class Piece:
    """A run of prompt text: template markup (``is_content=False``) or message text."""

    text: str
    is_content: bool


def choose_builtin(architecture: str, has_token: Callable[[str], bool]) -> str:
    """Name of the built-in template for a model without one (``has_token`` probes the vocab)."""
    if architecture in _ARCHITECTURES:
        return _ARCHITECTURES[architecture]
    for marker, name in _VOCAB_MARKERS:
        if has_token(marker):
            return name
    return "chatml"


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as err:
        raise ConfigError(f"the chat template does not compile: {err}") from err


class ChatTemplate:
    """A Jinja chat template plus the knowledge of whether it has a system role."""

    def __init__(self, source: str, name: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = _compile(source)
        self.supports_system = name not in _NO_SYSTEM_ROLE and self._probe_system_role()

    @classmethod
    def builtin(cls, name: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        if name not in BUILTIN_TEMPLATES:
            known = ", ".join(sorted(BUILTIN_TEMPLATES))
            raise ConfigError(f"unknown chat format {name!r}; choose one of: {known}")
        return cls(BUILTIN_TEMPLATES[name], name, bos_token, eos_token)

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def _probe_system_role(self) -> bool:
        probe = [
            {"role": "system", "content": _SENTINEL.format(0)},
            {"role": "user", "content": _SENTINEL.format(1)},
        ]
        try:
            return _SENTINEL.format(0) in self._render(probe, True)
        except Exception:  # a template that rejects the system role by raising
            return False

    def pieces(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True):
        """Render ``messages`` ({role, content} dicts) into markup and content pieces."""
        messages = merge_system(messages) if not self.supports_system else list(messages)
        masked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        try:
            rendered = self._render(masked, add_generation_prompt)
        except Exception as err:
            raise ConfigError(f"chat template {self.name!r} failed to render: {err}") from err
        pieces: list[Piece] = []
        pos = 0
        for match in _SENTINEL_RE.finditer(rendered):
            if match.start() > pos:
                pieces.append(Piece(rendered[pos : match.start()], False))
            content = messages[int(match.group(1))]["content"]
            if content:
                pieces.append(Piece(content, True))
            pos = match.end()
        if pos < len(rendered):
            pieces.append(Piece(rendered[pos:], False))
        return pieces


def merge_system(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Fold system messages into the first user turn (or make them one) for templates without
    a system role. Nothing is dropped."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for i, m in enumerate(rest):
        if m["role"] == "user":
            merged = f"{system}\n\n{m['content']}" if m["content"] else system
            return [*rest[:i], {**m, "content": merged}, *rest[i + 1 :]]
    return [{"role": "user", "content": system}, *rest]
