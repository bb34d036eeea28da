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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    MessageLikeRepresentation,
    convert_to_messages,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import PrivateAttr

from localbot import structured
from localbot import tools as tools_mod
from localbot.chat_settings import LlamaCppSettings
from localbot.chat_tools import ToolsAndSchemas
from localbot.errors import ConfigError, ContextOverflowError
from localbot.generation import Sampling, TurnStats, generate
from localbot.gguf_file import GGUFInfo, read_gguf
from localbot.llama_cache import shift_problem
from localbot.prefill import background_prefill
from localbot.prompt_builder import PromptBuilder
from localbot.runtime import load_llama, supports_gpu_offload
from localbot.template_choice import resolve_template
from localbot.templates import ChatTemplate, max_chars_for_context
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


class ChatLlamaCpp(ToolsAndSchemas, LlamaCppSettings):
    """A LangChain chat model over a local GGUF model file, run by llama.cpp.

    Example:
        .. code-block:: python

            from localbot import ChatLlamaCpp

            model = ChatLlamaCpp(model_path="models/qwen2.5-0.5b-instruct-q4_k_m.gguf")
            model.invoke([("system", "Be brief."), ("human", "Hi!")])

    Besides the usual call options (``max_tokens``, ``temperature``, ``stop``, ``seed``...),
    ``stream``/``invoke`` take ``hold_reply``: a function called once the prompt is read and the
    first token sampled, before any of the reply leaves the model (in a chunk or a callback).
    The chatbot writes the user's message meanwhile, so that no reply is shown to a message
    that is not on disk; the function raising ends the call with its error.
    """

    _llama: Any = PrivateAttr(default=None)
    _vocab: Any = PrivateAttr(default=None)
    _info: GGUFInfo | None = PrivateAttr(default=None)
    _template: ChatTemplate | None = PrivateAttr(default=None)
    _load_lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)
    _run_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _last_stats: TurnStats | None = PrivateAttr(default=None)
    _generations: int = PrivateAttr(default=0)
    _waiting: list[int] = PrivateAttr(default_factory=lambda: [0])  # generations waiting
    _waiting_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _before_generation: list[Callable[[], None]] = PrivateAttr(default_factory=list)
    _load_seconds: float | None = PrivateAttr(default=None)
    _prompts: PromptBuilder = PrivateAttr()

    def model_post_init(self, __context: Any) -> None:
        self._prompts = PromptBuilder(self._tokenizer, lambda: self.template, self.model_path)

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
                self._check_context_shift()
            return self._llama

    def _check_context_shift(self) -> None:
        problem = shift_problem(self._llama, self.swa_full) if self.context_shift else None
        if problem:
            self._llama = None
            raise ConfigError(
                f"--context-shift cannot be used with {self.model_name}: {problem} (leave it "
                "off: the history is then re-read exactly)"
            )

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
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain content (no BOS, special-token text stays text)."""
        return list(self._prompts.tokenize_piece(text, False))

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
        return self._prompts.prompt_ids(convert_to_messages(messages), tools)

    def claim_prompt(
        self,
        messages: Sequence[MessageLikeRepresentation],
        tools: Sequence[Any] | None = None,
    ) -> Callable[[], object] | None:
        """Take on building the prompt of ``messages`` (and ``tools``, as for
        :meth:`get_num_tokens_from_messages`) and get the build to run on another thread: from
        this call on, any thread that asks for that prompt waits for the build rather than
        tokenizing it a second time. Run what you get exactly once; None when the prompt is
        built or being built already."""
        specs = tools_mod.tool_specs(tools) if tools else None
        return self._prompts.claim(convert_to_messages(messages), specs)

    def clear_prompt_cache(self) -> None:
        """Forget the prompts already tokenized (they are cached: a turn asks for its prompt
        several times)."""
        self._prompts.clear()

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

    @contextlib.contextmanager
    def _turn_lock(self) -> Iterator[None]:
        """The model, for a generation: background prefill (:meth:`prefill`) sees the
        generation waiting and gives way after its current chunk."""
        with self._waiting_lock:  # not _load_lock: a load may hold that one for seconds
            self._waiting[0] += 1
        try:
            self._run_lock.acquire()
        finally:
            with self._waiting_lock:
                self._waiting[0] -= 1
        try:
            yield
        finally:
            self._run_lock.release()

    def before_generation(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before each generation, in its thread, before it takes the model: a
        session's KV cache saves what the model holds before another prompt replaces it."""
        self._before_generation.append(hook)

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict:
        # ``hold_reply`` is a callable for one call, not a setting: callbacks, tracers and
        # caches never see it.
        kwargs.pop("hold_reply", None)
        return super()._get_invocation_params(stop=stop, **kwargs)

    def prefill(
        self,
        ids: Sequence[int],
        stop: threading.Event | None = None,
        on_chunk: Callable[[int, int, float, float], None] | None = None,
    ) -> int:
        """Evaluate ``ids``, the start of a prompt to come, into llama.cpp's KV cache ahead of
        time (from a background thread while the user types), so the turn that sends that
        prompt only reads what follows. Returns how many of ``ids`` the cache then holds.

        How (chunks, when it stops, what it guarantees): ``localbot.prefill``. It gives way to
        any generation: one waiting for the model stops it after the current chunk, and so does
        one that ran since it started (the cache then holds that generation's prompt). A turn
        that arrives mid-way keeps every chunk already evaluated."""
        generations = self._generations

        def give_way() -> bool:
            # A generation waiting for the model, or one that ran since: stop.
            return bool(self._waiting[0]) or self._generations != generations

        return background_prefill(
            self.load(),
            ids,
            lock=self._run_lock,
            give_way=give_way,
            stop=stop,
            on_chunk=on_chunk,
            shift=self.context_shift,
        )

    def _run(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        call: ToolCall | None = None,
        hold: Callable[[], None] | None = None,
    ) -> Iterator[str]:
        """Generate a reply: yields text pieces; ``self.last_stats`` says how it went. ``hold``
        is called before the first piece (the ``hold_reply`` argument)."""
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
        for hook in list(self._before_generation):
            hook()
        with self._turn_lock():
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
                context_shift=self.context_shift,
                hold=hold,
            )

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
        for text in self._run(messages, stop, kwargs, call, kwargs.get("hold_reply")):
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
        stats = self._last_stats or TurnStats()
        usage, response = stats.usage(), stats.response(self.model_name)
        if parser and parser.calls and response["finish_reason"] == "stop":
            response["finish_reason"] = "tool_calls"
        last = AIMessageChunk(
            content="", usage_metadata=usage, response_metadata=response, chunk_position="last"
        )
        yield ChatGenerationChunk(message=last)


__all__ = ["MAX_DEFAULT_CTX", "ChatLlamaCpp", "TurnStats"]
