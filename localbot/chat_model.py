"""``ChatLlamaCpp``: a LangChain chat model over a local GGUF file, through llama-cpp-python.

What it does differently from ``langchain_community.chat_models.ChatLlamaCpp``:

* Token counts come from the model's own tokenizer, and ``get_num_tokens_from_messages`` is the
  exact number of tokens llama.cpp evaluates for those messages: both are computed by the same
  function (:meth:`ChatLlamaCpp.prompt_ids`), which is also what generation feeds to llama.cpp.
* The prompt is built by us (``localbot.templates``), so message text never becomes control tokens
  and a system message is never silently dropped.
* Settings come from the model file (context length, RoPE) unless set; llama.cpp stays quiet.
* Construction is cheap: the GGUF is opened on first use, once per instance, and one ``Llama`` is
  never used by two threads at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    MessageLikeRepresentation,
    convert_to_messages,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from localbot import structured
from localbot import tools as tools_mod
from localbot.errors import ConfigError, ContextOverflowError
from localbot.generation import Sampling, TurnStats, generate
from localbot.gguf_file import GGUFInfo, read_gguf
from localbot.grammar import check_grammar
from localbot.llama_cache import vocab_handle
from localbot.runtime import load_llama, supports_gpu_offload
from localbot.template_choice import resolve_template
from localbot.templates import ChatTemplate, max_chars_for_context, texts_in
from localbot.tool_parser import CallParser
from localbot.tools import ToolCall

log = logging.getLogger(__name__)

MAX_DEFAULT_CTX = 8192
"""The default context is the model's trained one, capped here: KV memory grows with it."""

CTX_BLOCK = 256
"""llama.cpp allocates the context in blocks of this many tokens and rounds a request up (while
llama-cpp-python sizes its token buffer from the request: the two must agree, so we round)."""


def round_context(n_ctx: int) -> int:
    """The context size llama.cpp really gives for a request of ``n_ctx`` tokens."""
    return -(-n_ctx // CTX_BLOCK) * CTX_BLOCK


def message_role(message: BaseMessage) -> str:
    """The chat-template role of ``message`` ("tool" for tool results; see localbot.tools)."""
    return tools_mod.template_role(message)


class ChatLlamaCpp(BaseChatModel):
    """A LangChain chat model over a local GGUF model file, run by llama.cpp.

    Example:
        .. code-block:: python

            from localbot import ChatLlamaCpp

            model = ChatLlamaCpp(model_path="models/qwen2.5-0.5b-instruct-q4_k_m.gguf")
            model.invoke([("system", "Be brief."), ("human", "Hi!")])
    """

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

    _llama: Any = PrivateAttr(default=None)
    _vocab: Any = PrivateAttr(default=None)
    _info: GGUFInfo | None = PrivateAttr(default=None)
    _template: ChatTemplate | None = PrivateAttr(default=None)
    _load_lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)
    _run_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _last_stats: TurnStats | None = PrivateAttr(default=None)
    _generations: int = PrivateAttr(default=0)
    _load_seconds: float | None = PrivateAttr(default=None)
    _piece_cache: dict[tuple[str, bool], tuple[int, ...]] = PrivateAttr(default_factory=dict)
    _prompt_cache: dict[str, tuple[int, ...]] = PrivateAttr(default_factory=dict)

    # ----------------------------------------------------------------- identity
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

    # ----------------------------------------------------------------- loading
    @property
    def gguf(self) -> GGUFInfo:
        """The model file's header (validated: missing/non-GGUF/truncated files raise)."""
        with self._load_lock:
            if self._info is None:
                self._info = read_gguf(self.model_path)
            return self._info

    @property
    def context_window(self) -> int:
        """The context size in tokens this model runs with."""
        if self._llama is not None:
            return int(self._llama.n_ctx())
        if self.n_ctx:
            return round_context(self.n_ctx)
        return round_context(min(self.gguf.context_length or 4096, MAX_DEFAULT_CTX))

    @property
    def gpu_layers(self) -> int:
        if self.n_gpu_layers is not None:
            return self.n_gpu_layers
        return -1 if supports_gpu_offload() else 0

    @property
    def load_seconds(self) -> float | None:
        return self._load_seconds

    @property
    def generation_count(self) -> int:
        """How many generations this model has started: what its KV memory last held changes
        with each (see ``localbot.kv_sessions``)."""
        return self._generations

    @property
    def last_stats(self) -> TurnStats | None:
        """Timings of the most recent generation."""
        return self._last_stats

    def load(self) -> Any:
        """Open the model (once) and return the ``llama_cpp.Llama``."""
        with self._load_lock:
            if self._llama is None:
                info = self.gguf
                if self.n_ctx and self.context_window != self.n_ctx:
                    log.warning(
                        "context of %d tokens rounded up to %d (llama.cpp allocates it in blocks "
                        "of %d)",
                        self.n_ctx,
                        self.context_window,
                        CTX_BLOCK,
                    )
                params: dict[str, Any] = {
                    "n_ctx": self.context_window,
                    "n_batch": min(self.n_batch, self.context_window),
                    "n_gpu_layers": self.gpu_layers,
                    "rope_freq_base": self.rope_freq_base,
                    "rope_freq_scale": self.rope_freq_scale,
                    "swa_full": self.swa_full,
                    **self.model_kwargs,
                }
                if self.n_threads:
                    params["n_threads"] = self.n_threads
                if self.seed is not None:
                    params["seed"] = self.seed
                start = time.perf_counter()
                self._llama = load_llama(info.path, verbose=self.verbose, **params)
                self._load_seconds = time.perf_counter() - start
                self._vocab = None  # the full model tokenizes from now on
            return self._llama

    def _tokenizer(self) -> Any:
        """The loaded model if there is one, else a vocabulary-only load (fast, no weights)."""
        with self._load_lock:
            if self._llama is not None:
                return self._llama
            if self._vocab is None:
                self._vocab = load_llama(self.gguf.path, verbose=self.verbose, vocab_only=True)
            return self._vocab

    @property
    def template(self) -> ChatTemplate:
        """The chat template in use (see ``chat_format``)."""
        with self._load_lock:
            if self._template is None:
                self._template = self._resolve_template()
            return self._template

    def _resolve_template(self) -> ChatTemplate:
        tok = self._tokenizer()
        template = resolve_template(
            chat_format=self.chat_format,
            gguf_template=self.gguf.chat_template,
            architecture=self.gguf.architecture,
            has_token=self._is_single_special_token,
            bos=tok.detokenize([tok.token_bos()], special=True).decode("utf-8", "replace"),
            eos=tok.detokenize([tok.token_eos()], special=True).decode("utf-8", "replace"),
            # A template's output is bounded by the context it must fit: a hostile template in
            # a GGUF cannot fill memory (see localbot.template_sandbox).
            max_chars=max_chars_for_context(self.context_window),
            model_name=self.model_name,
        )
        log.info("chat template: %s", self.template_description(template))
        return template

    def template_description(self, template: ChatTemplate | None = None) -> str:
        """Which chat template is in use and where it came from: "the model file's own",
        "built-in gemma, for architecture 'gemma3' (none in file)", "built-in chatml, from
        chat_format" or "custom Jinja, from chat_format"."""
        template = template or self.template
        return template.origin or template.name

    def _is_single_special_token(self, text: str) -> bool:
        return len(self._tokenizer().tokenize(text.encode(), add_bos=False, special=True)) == 1

    # ----------------------------------------------------------------- counting
    def _tokenize_piece(self, text: str, special: bool) -> tuple[int, ...]:
        # Template markup and old messages repeat every turn: cache their ids.
        key = (text, special)
        ids = self._piece_cache.get(key)
        if ids is None:
            tok = self._tokenizer()
            ids = tuple(tok.tokenize(text.encode("utf-8"), add_bos=False, special=special))
            if len(self._piece_cache) >= 8192:
                self._piece_cache.clear()
            self._piece_cache[key] = ids
        return ids

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain content (no BOS, special-token text stays text)."""
        return list(self._tokenize_piece(text, False))

    def get_num_tokens(self, text: str) -> int:
        return len(self.get_token_ids(text))

    def get_num_tokens_from_messages(
        self,
        messages: Sequence[MessageLikeRepresentation],  # type: ignore[override]
        tools: Sequence[Any] | None = None,
    ) -> int:
        """Exactly the number of prompt tokens llama.cpp evaluates for ``messages``: chat
        template, generation prompt and BOS included (and ``tools``, as ``bind_tools`` puts
        them in the prompt)."""
        specs = tools_mod.tool_specs(tools) if tools else None
        return len(self.prompt_ids(messages, specs))

    def prompt_ids(
        self,
        messages: Sequence[MessageLikeRepresentation],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The token ids llama.cpp is given for ``messages`` (with the generation prompt), with
        ``tools`` (OpenAI-shaped specs, see ``localbot.tools.tool_specs``) when given.

        Messages may be given in any form ``invoke`` takes (``("human", "hi")`` tuples, dicts)."""
        # A turn asks for the same prompt three times (trim count, KV restore, generation):
        # render and tokenize it once.
        converted = convert_to_messages(messages)
        key = tools_mod.cache_key(converted, tools)  # tool calls and ids are in the key
        ids = self._prompt_cache.get(key)
        if ids is None:
            ids = tuple(self._render_ids(converted, tools))
            if len(self._prompt_cache) >= 8:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = ids
        return list(ids)

    def _render_ids(
        self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None
    ) -> list[int]:
        if not messages:
            # Nothing to evaluate, so nothing to count. An empty list is never rendered: most real
            # templates read messages[0] and raise, and LangChain's trim_messages (a binary
            # search over prefixes) may ask for it.
            return []
        from localbot.prompt_tokens import encode, special_tokens

        specials = special_tokens(self._tokenizer(), self.model_path)
        # Roles, tool calls and tool definitions are laid out by localbot.tools.
        turns, extra = tools_mod.prompt_turns(self.template, messages, tools)
        controls = specials.controls_in(texts_in(turns, extra))
        pieces = self.template.pieces(
            turns, add_generation_prompt=True, control_tokens=controls, **extra
        )
        # Tokenized like llama.cpp tokenizes the whole rendered prompt (special tokens parsed),
        # except control-token text typed in a message, tool call or tool definition, which
        # stays text.
        ids = encode(pieces, specials, self._tokenize_piece)
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

    # ----------------------------------------------------------------- generation
    @contextlib.contextmanager
    def exclusive(self, load: bool = True) -> Iterator[Any]:
        """The ``llama_cpp.Llama``, held for this caller alone (generation waits): for saving
        and restoring its state. With ``load=False`` it yields None when the model is not
        loaded rather than loading it."""
        llama = self.load() if load else self._llama
        if llama is None:
            yield None
            return
        with self._run_lock:
            yield llama

    def _run(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        call: ToolCall | None = None,
    ) -> Iterator[str]:
        """Generate a reply: yields text pieces; ``self.last_stats`` says how it went."""
        if kwargs.get("model") not in (None, self.model_name, self.model_path):
            raise ConfigError(
                "ChatLlamaCpp runs the one GGUF file it was created with; "
                "make another ChatLlamaCpp to use another model"
            )
        # Tools are in the prompt, and a grammar shapes the reply (tool calls, structured output).
        prompt = self.prompt_ids(messages, call.specs if call else None)
        grammar = call.grammar if call else structured.grammar_for(kwargs.get("response_format"))
        llama = self.load()
        n_ctx = int(llama.n_ctx())
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is None:
            max_tokens = n_ctx - len(prompt)
        if len(prompt) + max_tokens > n_ctx or max_tokens <= 0:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens and the reply may take {max_tokens}: "
                f"{len(prompt) + max_tokens} > the context window of {n_ctx} tokens "
                "(shorten the conversation, lower max_tokens or raise n_ctx)"
            )
        sampling = Sampling(
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            top_k=kwargs.get("top_k", self.top_k),
            min_p=kwargs.get("min_p", self.min_p),
            repeat_penalty=kwargs.get("repeat_penalty", self.repeat_penalty),
            seed=kwargs.get("seed", self.seed),
        )
        with self._run_lock:
            self._generations += 1
            self._last_stats = stats = TurnStats()
            yield from generate(
                llama,
                prompt,
                max_tokens=max_tokens,
                stops=[*(self.stop or []), *(stop or [])],
                sampling=sampling,
                timeout=kwargs.get("timeout", self.timeout),
                stats=stats,
                grammar=grammar,
            )

    def _result_metadata(self, stats: TurnStats) -> tuple[dict[str, Any], dict[str, Any]]:
        usage = {
            "input_tokens": stats.prompt_tokens,
            "output_tokens": stats.output_tokens,
            "total_tokens": stats.prompt_tokens + stats.output_tokens,
            "input_token_details": {"cache_read": stats.cached_tokens},
        }
        response = {
            "model_name": self.model_name,
            "model_provider": "llamacpp",
            "finish_reason": stats.finish_reason,
            "timings": stats.as_dict(),
        }
        return usage, response

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        parsers: list[CallParser] = []
        chunks = list(self._chunks(messages, stop, run_manager, kwargs, parsers))
        full = chunks[0].message
        for chunk in chunks[1:]:
            full += chunk.message
        # The calls as the parser finished them: a call the reply ended inside is invalid (the
        # merged chunks would read its partial JSON as a complete call).
        calls, invalid = tools_mod.finished_calls(parsers[0]) if parsers else ([], [])
        message = AIMessage(
            content=full.content,
            usage_metadata=full.usage_metadata,
            response_metadata=full.response_metadata,
            tool_calls=calls,
            invalid_tool_calls=invalid,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(messages, stop, run_manager, kwargs)

    def _chunks(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
        parsers: list[CallParser] | None = None,
    ) -> Iterator[ChatGenerationChunk]:
        """The reply as chunks: text, ``tool_call_chunks`` when tools are bound (the parser that
        found them is appended to ``parsers``), and a last chunk with the usage."""
        call = self._tool_call(kwargs)
        parser = call.parser() if call and call.choice != "none" else None
        if parser is not None and parsers is not None:
            parsers.append(parser)
        for text in self._run(messages, stop, kwargs, call):
            for message in tools_mod.stream_chunks(parser.feed(text)) if parser else [text]:
                chunk = ChatGenerationChunk(
                    message=message if parser else AIMessageChunk(content=message)
                )
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        if parser:
            for message in tools_mod.stream_chunks(parser.finish()):
                yield ChatGenerationChunk(message=message)
        usage, response = self._result_metadata(self._last_stats or TurnStats())
        if parser and parser.calls and response["finish_reason"] == "stop":
            response["finish_reason"] = "tool_calls"
        last = AIMessageChunk(
            content="", usage_metadata=usage, response_metadata=response, chunk_position="last"
        )
        yield ChatGenerationChunk(message=last)

    # ----------------------------------------------------------------- tools, schemas
    def _tool_call(self, kwargs: dict[str, Any]) -> ToolCall | None:
        tools = kwargs.get("tools")
        specs = tools_mod.tool_specs(tools) if tools else None
        parallel = kwargs.get("parallel_tool_calls")
        return tools_mod.plan(self.template, specs, kwargs.get("tool_choice"), parallel)

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict | bool | None = None,
        parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (``@tool`` functions, ``BaseTool``s, Pydantic classes, TypedDicts, OpenAI
        dicts). ``tool_choice``: "auto" (default: text or a call), "any"/"required" (a call),
        "none", or a tool name. Sampling follows a grammar, so calls are always well-formed
        JSON matching the tool's arguments schema; a schema the grammar cannot enforce is a
        ConfigError here. ``parallel_tool_calls=True`` allows several calls in one reply where
        the chat template can show them (off by default: small models repeat a call)."""
        specs = tools_mod.tool_specs(tools)
        call = tools_mod.plan(self.template, specs, tool_choice, parallel_tool_calls)
        if call is not None:
            self.check_grammar(call.grammar)
        return super().bind(
            tools=specs, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, **kwargs
        )

    def check_grammar(self, grammar: str) -> None:
        """Raise ConfigError now if llama.cpp's parser rejects ``grammar`` (GBNF)."""
        check_grammar(grammar, vocab_handle(self._tokenizer()))

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        include_raw: bool = False,
        method: str = "json_schema",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Replies parsed into ``schema`` (a Pydantic class, TypedDict or JSON schema dict).

        ``method``: "json_schema" (default; sampling follows a grammar built from the schema),
        "json_mode" (any JSON object) or "function_calling" (a forced tool call). See
        ``localbot.structured``."""
        return structured.with_structured_output(
            self, schema, method=method, include_raw=include_raw, **kwargs
        )


__all__ = ["MAX_DEFAULT_CTX", "ChatLlamaCpp", "TurnStats"]
