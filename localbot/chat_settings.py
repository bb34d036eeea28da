"""The settings of ``ChatLlamaCpp``, declared once with what each means (pydantic checks them: a
misspelt setting is an error, not silently ignored), and the model's identity for LangChain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel, LangSmithParams
from pydantic import ConfigDict, Field


class LlamaCppSettings(BaseChatModel):
    """The fields of ``localbot.ChatLlamaCpp`` (see there), and what LangChain reads from them
    to name and trace the model."""

    # A misspelt setting is an error, not silently ignored.
    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), extra="forbid")

    model_path: str
    """Path to the GGUF model file."""
    n_ctx: int | None = None
    """Context window in tokens. Default: the model's trained context, capped at 8192."""
    n_gpu_layers: int | None = None
    """Layers to offload to the GPU. Default: all when this llama.cpp build can offload, else 0."""
    n_threads: int | None = None
    """CPU threads for generation. Default: llama.cpp's choice."""
    n_batch: int = 512
    """Prompt tokens evaluated per llama.cpp batch."""
    temperature: float = 0.8
    """Sampling temperature; 0 means greedy (deterministic) decoding."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    top_k: int = 40
    """Sample only among the k most likely tokens."""
    min_p: float = 0.05
    """Drop tokens less likely than min_p times the most likely one."""
    repeat_penalty: float = 1.0
    """Penalty for repeating recent tokens (1.0 = none)."""
    max_tokens: int | None = 512
    """Longest reply in tokens; None lets a reply fill the rest of the context."""
    seed: int | None = None
    """Random seed for sampling; None picks a fresh one per call."""
    stop: list[str] | None = None
    """Stop sequences: generation ends before any of them and they are not returned."""
    chat_format: str | None = None
    """Override the chat template: a built-in name (gemma, llama3, chatml, mistral, phi3) or Jinja
    source. Default: the GGUF's own template, else a built-in chosen from its architecture."""
    rope_freq_base: float = 0.0
    """RoPE base frequency; 0 takes the model file's value."""
    rope_freq_scale: float = 0.0
    """RoPE frequency scale; 0 takes the model file's value."""
    swa_full: bool = True
    """Keep a full-size cache for sliding-window layers (Gemma 3), so the KV cache prefix of an
    earlier turn can be reused exactly instead of being recomputed."""
    context_shift: bool = False
    """When the start of a history is dropped, shift the cached rest into place instead of
    re-reading it. Instant but approximate (the kept tokens' cache was computed with the dropped
    ones in view), which is why llama.cpp turned it off by default. Refused (ConfigError at
    load) where the cache cannot shift: recurrent models, sliding-window attention without
    ``swa_full``."""
    verbose: bool = False
    """Let llama.cpp's own log through to stderr."""
    timeout: float | None = None
    """Wall-clock limit in seconds for one reply; generation stops there (finish_reason
    "timeout") and the text so far is returned."""
    max_retries: int = 0
    """LangChain's standard parameter; a local model has no transient failures to retry."""
    streaming: bool = False
    """Generate through the streaming path even in ``invoke`` (callbacks see every token)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for ``llama_cpp.Llama``."""

    # ----------------------------------------------------------------- identity (LangChain's)
    @property
    def _llm_type(self) -> str:
        return "localbot-llamacpp"

    @property
    def model_name(self) -> str:
        return Path(self.model_path).name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "n_ctx": self.n_ctx,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "chat_format": self.chat_format,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="llamacpp",
            ls_model_name=self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = stop or self.stop
        if stops:
            params["ls_stop"] = stops
        return params
