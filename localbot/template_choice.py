"""Which chat template a model runs with: ``chat_format`` (a built-in name or Jinja source), else
the GGUF's own ``tokenizer.chat_template``, else a built-in chosen from ``general.architecture``
(and the vocabulary, for the ambiguous ``llama``), with a one-time warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from localbot.templates import ChatTemplate

log = logging.getLogger("localbot.templates")

_warned_no_template: set[str] = set()

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


def choose_builtin(architecture: str, has_token: Callable[[str], bool]) -> str:
    """Name of the built-in template for a model without one (``has_token`` probes the vocab)."""
    if architecture in _ARCHITECTURES:
        return _ARCHITECTURES[architecture]
    for marker, name in _VOCAB_MARKERS:
        if has_token(marker):
            return name
    return "chatml"


def resolve_template(
    *,
    chat_format: str | None,
    gguf_template: str | None,
    architecture: str,
    has_token: Callable[[str], bool],
    bos: str,
    eos: str,
    max_chars: int,
    model_name: str,
) -> ChatTemplate:
    """The template for a model, with ``origin`` saying where it came from."""
    bounds = {"max_chars": max_chars}
    if chat_format and ("{%" in chat_format or "{{" in chat_format):
        origin = "custom Jinja, from chat_format"
        return ChatTemplate(chat_format, "custom", bos, eos, origin=origin, **bounds)
    if chat_format:
        origin = f"built-in {chat_format}, from chat_format"
        return ChatTemplate.builtin(chat_format, bos, eos, origin=origin, **bounds)
    if gguf_template:
        origin = "the model file's own"
        return ChatTemplate(gguf_template, "gguf", bos, eos, origin=origin, **bounds)
    name = choose_builtin(architecture, has_token)
    if model_name not in _warned_no_template:
        _warned_no_template.add(model_name)
        log.warning(
            "%s has no chat template; using the built-in %r format for architecture %r "
            "(set chat_format / --chat-format to override)",
            model_name,
            name,
            architecture,
        )
    origin = f"built-in {name}, for architecture {architecture!r} (none in file)"
    return ChatTemplate.builtin(name, bos, eos, origin=origin, **bounds)
