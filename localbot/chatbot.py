"""The chatbot: a session-aware chat Runnable whose turn reads top to bottom.

One turn (:meth:`Chatbot.stream`), in order:

1. **read** the session's history from the store;
2. **plan the trim**: keep the newest history that fits ``n_ctx - max_tokens`` exactly (system
   prompt and template counted), starting on a human turn, with a cut point that moves in steps
   so llama.cpp's cache survives (``localbot.trimming``);
3. **build the prompt**: the system prompt (with ``{variables}``), then the kept messages;
4. **save the human turn**, so a crash mid-reply never loses what the user typed: a worker
   thread writes it while the model reads the prompt, and the model holds the reply's first
   token until it is on disk (``ChatLlamaCpp``'s ``hold_reply``);
5. **restore the KV state** saved for this session, if that saves reading the prompt
   (``localbot.kv_sessions``);
6. **stream the model**;
7. **save the reply**: complete, or as far as it got (Ctrl-C, an abandoned stream, an error),
   marked ``response_metadata["interrupted"]``; then get the next turn ready in the
   background (:meth:`Chatbot.prepare`).

Each step's time is recorded in :attr:`Chatbot.last_turn`. The turn honours LangChain's
``config`` (callbacks, tags, metadata): it is one chain run with the model's run inside it.
``RunnableWithMessageHistory`` is not used: it is deprecated, and it saves nothing when a run is
interrupted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import uuid4

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import add_ai_message_chunks
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
    get_callback_manager_for_config,
    patch_config,
)

from localbot.chat_model import ChatLlamaCpp
from localbot.errors import ConfigError, ContextOverflowError, MissingVariableError
from localbot.kv_sessions import SessionKvCache
from localbot.llama_cache import common_prefix
from localbot.sessions import SessionHistory, SessionStore
from localbot.system_prompt import make_prompt
from localbot.tools import tool_specs
from localbot.trimming import DEFAULT_WATERMARK, TrimPlan, plan_trim
from localbot.turn_threads import HumanSave, worker
from localbot.turn_timings import Clock, TurnTimings

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_SESSION = "default"


def _as_messages(value: Any) -> list[BaseMessage]:
    if isinstance(value, str):
        return [HumanMessage(value)]
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, Sequence):
        messages = []
        for item in value:
            if isinstance(item, BaseMessage):
                messages.append(item)
            elif isinstance(item, str):
                messages.append(HumanMessage(item))
            else:
                raise ConfigError(f"expected messages, got {type(item).__name__}")
        return messages
    raise ConfigError(f"expected a message or a list of messages, got {type(value).__name__}")


@dataclass(frozen=True)
class _TurnCosts:
    """Estimated template tokens: once per prompt, and around one message of each role."""

    fixed: int
    human: int
    ai: int

    def of(self, message: BaseMessage) -> int:
        if message.type == "human":
            return self.human
        if message.type == "ai":
            return self.ai
        return max(self.human, self.ai)


class Chatbot(Runnable[dict[str, Any], BaseMessage]):
    """A session-aware chat Runnable (see ``build_chatbot``).

    Input: ``{"messages": [...new messages...], **template_variables}``; config:
    ``{"configurable": {"session_id": "abc"}}``. ``invoke`` returns the reply ``AIMessage``;
    ``stream`` yields its ``AIMessageChunk``s.
    """

    def __init__(
        self,
        model: ChatLlamaCpp,
        store: SessionStore,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        *,
        variables: Mapping[str, Any] | None = None,
        trim_watermark: float = DEFAULT_WATERMARK,
        kv_cache: bool = True,
        prepare_next: bool = True,
        tools: Sequence[Any] = (),
    ) -> None:
        self.model = model
        # Tools bound to every turn (and counted in every prompt); localbot.tool_loop runs them.
        self.tools = list(tools)
        self.tool_specs = tool_specs(self.tools) if self.tools else None
        self.store = store
        self.system_prompt = system_prompt
        self.prompt = make_prompt(system_prompt)
        self.variables = dict(variables or {})
        self.trim_watermark = trim_watermark
        self.kv = SessionKvCache(model, store) if kv_cache else None
        self.prepare_next = prepare_next
        """Whether a completed turn starts getting the next one ready (:meth:`prepare`)."""
        self.last_turn = TurnTimings()
        self._turn_costs: tuple[tuple[str, ...], _TurnCosts] | None = None
        self._reply_budget: int | None = None  # the last turn's max_tokens
        # Where each session's next prompt will likely start (its last or predicted cut).
        self._likely_start: dict[str, int] = {}

    def with_settings(
        self, system_prompt: str | None, variables: Mapping[str, Any] | None = None
    ) -> Chatbot:
        """The same chatbot (model, store, KV caches) with another system prompt and variables:
        what a session's own settings give (``/switch``, ``/system``)."""
        other = Chatbot(
            self.model,
            self.store,
            system_prompt,
            variables=variables,
            trim_watermark=self.trim_watermark,
            kv_cache=False,
        )
        other.tools, other.tool_specs = self.tools, self.tool_specs
        other.kv = self.kv  # one model memory, one record of what it holds
        other.prepare_next = self.prepare_next
        other.last_turn = self.last_turn
        return other

    # -------------------------------------------------------------- one turn
    def stream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        """Run one turn (see the module docstring); ``kwargs`` go to the model
        (``max_tokens``, ``temperature``, ``stop``, ``seed``...)."""
        if not isinstance(input, Mapping) or "messages" not in input:
            raise ConfigError('the chatbot takes {"messages": [...], **variables}')
        config = ensure_config(config)
        session_id = config.get("configurable", {}).get("session_id") or DEFAULT_SESSION
        values = self._values(input)  # a missing variable fails here, before anything is saved
        # Each new message gets an id, so that the reply is saved right after it even if another
        # process adds to the session meanwhile.
        new = [
            m if m.id else m.model_copy(update={"id": str(uuid4())})
            for m in _as_messages(input["messages"])
        ]
        run = get_callback_manager_for_config(config).on_chain_start(
            None, dict(input), name=self.get_name(), run_id=config.pop("run_id", None)
        )
        self.last_turn = timings = TurnTimings()
        clock = Clock(timings)
        history: SessionHistory | None = None
        saving: HumanSave | None = None
        chunks: list[AIMessageChunk] = []
        outcome = "error"
        try:
            with clock.step("read_session"):
                history = self.store.get(session_id)
                messages = [*history.messages, *new]
            with clock.step("plan"):
                self._build_likely_prompt(session_id, values, messages)
                plan = self.plan(values, messages, kwargs.get("max_tokens"))
                timings.trim_start = plan.start
                self._expect_start(session_id, plan.start)
            with clock.step("prompt"):
                prompt = self.prompt_messages(values, messages[plan.start :])
            with clock.step("save_human"):
                saving = HumanSave(history, new)  # on disk before the reply's first token
            with clock.step("restore_kv"):
                timings.restored_tokens = (
                    self.kv.restore(session_id, prompt, self.tool_specs) if self.kv else 0
                )
            with clock.step("model"):
                model_config = patch_config(config, callbacks=run.get_child())
                if self.tool_specs and "tools" not in kwargs:
                    kwargs = {"tools": self.tool_specs, **kwargs}
                model_kwargs = {**kwargs, "hold_reply": saving.hold}
                for chunk in self.model.stream(prompt, config=model_config, **model_kwargs):
                    chunks.append(chunk)
                    yield chunk
            with clock.step("save_human"):
                saving.wait()  # done: the model waited for it (unless it never got to a token)
            outcome = "complete"
        except BaseException as err:
            if isinstance(err, GeneratorExit):  # the caller stopped reading: generation stops
                outcome = "abandoned"
            elif isinstance(err, KeyboardInterrupt):
                outcome = "interrupted"
            run.on_chain_error(err)
            raise
        finally:
            reply = None
            if saving is not None:
                # The model's wait for the write is localbot's time, not the model's.
                timings.model -= saving.held
                timings.save_human += saving.held
            if saving is not None and saving.succeeded(clock):
                with clock.step("save_reply"):
                    after = new[-1].id if new else None
                    reply = self._save_reply(history, chunks, outcome, after)
                if self.kv:
                    self.kv.turn_done(session_id, complete=outcome == "complete")
            clock.stop()
        if self.kv and self.prepare_next:
            # While the user reads and types: get the next turn's prompt ready.
            self._reply_budget = kwargs.get("max_tokens")
            self.prepare(session_id, values)
        run.on_chain_end(reply)

    def _save_reply(
        self,
        history: SessionHistory,
        chunks: Sequence[AIMessageChunk],
        outcome: str,
        after: str | None,
    ) -> AIMessage:
        reply = _to_message(chunks)
        if outcome != "complete":
            reply.response_metadata = {
                **reply.response_metadata,
                "model_name": self.model.model_name,
                "interrupted": True,
                "finish_reason": outcome,
            }
        history.add_messages_after([reply], after)
        return reply

    def invoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return _to_message(list(self.stream(input, config, **kwargs)))

    async def astream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        """``stream`` driven from a worker thread, one chunk at a time, so the event loop stays
        free while llama.cpp works (the model's lock serializes turns across threads)."""
        loop = asyncio.get_running_loop()
        chunks = self.stream(input, config, **kwargs)
        done = object()
        try:
            while (chunk := await loop.run_in_executor(None, next, chunks, done)) is not done:
                yield chunk
        finally:
            await loop.run_in_executor(None, chunks.close)

    async def ainvoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return _to_message([chunk async for chunk in self.astream(input, config, **kwargs)])

    def prepare(
        self, session_id: str = DEFAULT_SESSION, variables: Mapping[str, Any] | None = None
    ) -> None:
        """Get the model ready for the session's next turn, in the background, while the user
        reads and types: load its saved KV state, and evaluate the start of its next prompt
        (for a next message of typical length). After the history's cut point moves, that is the
        whole kept history, which the next turn would otherwise re-read. Call it when a session
        is opened, switched to or resumed; each completed turn calls it itself.

        The next turn's prompt is compared token by token with what the model holds, so it
        reuses exactly the tokens it shares with what was read ahead (``localbot.prefill`` says
        how batches are kept to shapes that round as a turn's own do); a message that needs
        another cut re-reads as before. Needs ``kv_cache``; returns at once."""
        if self.kv:
            values = {**self.variables, **(variables or {})}
            self.kv.prepare(session_id, lambda: self.next_prefix(session_id, values))

    def next_prefix(self, session_id: str, values: Mapping[str, Any] | None = None) -> list[int]:
        """The token ids the session's next prompt will start with (everything before the next
        message), assuming a message of typical length; empty when no turn could be planned."""
        values = {**self.variables, **(values or {})}
        try:
            self.check_variables(values)
            history = self.store.get(session_id).messages
            probe = typical_message(history, self.model.get_num_tokens)
            plan = self.plan(values, [*history, probe], self._reply_budget)
        except (ConfigError, ContextOverflowError):
            return []
        kept = history[plan.start :]
        self._expect_start(session_id, plan.start)
        first, second = (
            self.model.prompt_ids(
                self.prompt_messages(values, [*kept, HumanMessage(text)]), self.tool_specs
            )
            for text in ("A", "z")
        )
        return first[: common_prefix(first, second)]

    def _expect_start(self, session_id: str, start: int) -> None:
        self._likely_start.pop(session_id, None)
        if len(self._likely_start) >= 256:  # a server's many sessions: forget the oldest
            self._likely_start.pop(next(iter(self._likely_start)), None)
        self._likely_start[session_id] = start

    def _build_likely_prompt(
        self, session_id: str, values: Mapping[str, Any], messages: Sequence[BaseMessage]
    ) -> None:
        """Build the prompt this turn most likely gets (cut where the last plan or prediction
        for the session cut) on another thread, while :meth:`plan` tokenizes the new message
        for its estimate: the two tokenizations (~1 ms each) run side by side, and the plan's
        exact count then finds the prompt built (the model waits for a prompt being built rather
        than building it twice). A wrong guess costs only that thread's time."""
        start = self._likely_start.get(session_id)
        if start is None or not 0 <= start < len(messages) or messages[start].type != "human":
            return
        # Claimed here, not on the thread: the plan's count then always waits for this build,
        # however late the thread starts, instead of sometimes racing it.
        build = self.model.claim_prompt(
            self.prompt_messages(values, messages[start:]), self.tool_specs
        )
        if build is not None:
            try:
                worker("prompt").submit(build)
            except RuntimeError:  # the interpreter is exiting: no new threads; build it here
                build()

    def wait_for_saves(self) -> None:
        """Stop background work (what it evaluated stays) and write the KV state that is not yet
        on disk: call before exiting (interpreter exit does it too) or before another process
        opens the session."""
        if self.kv:
            self.kv.close()

    def forget(self, session_id: str) -> None:
        """Clear a session's messages and its saved KV state."""
        self.store.get(session_id).clear()
        if self.kv:
            self.kv.forget(session_id)

    # -------------------------------------------------------------- settings and counting
    def _values(self, input: Mapping[str, Any]) -> dict[str, Any]:
        values = {**self.variables, **{k: v for k, v in input.items() if k != "messages"}}
        self.check_variables(values)
        return values

    def reply_budget(self, max_tokens: int | None = None) -> int:
        """Tokens kept free for the reply."""
        return max_tokens or self.model.max_tokens or max(1, self.model.context_window // 4)

    def prompt_budget(self, max_tokens: int | None = None) -> int:
        return self.model.context_window - self.reply_budget(max_tokens)

    def check_variables(self, values: Mapping[str, Any]) -> None:
        missing = sorted(set(self.prompt.input_variables) - {"messages"} - set(values))
        if missing:
            raise MissingVariableError(missing)

    # -------------------------------------------------------------- counting
    def prompt_messages(
        self, values: Mapping[str, Any], history: Sequence[BaseMessage]
    ) -> list[BaseMessage]:
        """The prompt template filled: the system prompt with ``values``, then ``history``."""
        return self.prompt.format_messages(**values, messages=list(history))

    def turn_costs(self, values: Mapping[str, Any]) -> _TurnCosts:
        """Template tokens around the history and around one message of each role, measured in
        place: with this system prompt ahead, inside a real conversation.

        Differences of three renders (user; user, assistant; user, assistant, user) cancel what
        every prompt has once (BOS, a default system prompt the template injects, the generation
        prompt), so that is counted once and not charged to every message. Nothing impossible is
        rendered: real templates read ``messages[0]`` and may insist on alternating roles.
        """
        head = self.prompt_messages(values, [])
        key = tuple(m.text for m in head)
        if self._turn_costs is None or self._turn_costs[0] != key:
            count = self._count
            tokens = self.model.get_num_tokens
            user, reply, again = HumanMessage("a"), AIMessage("b"), HumanMessage("c")
            one = count([*head, user])
            two = count([*head, user, reply])
            three = count([*head, user, reply, again])
            human = max(0, three - two - tokens(again.text))
            ai = max(0, two - one - tokens(reply.text))
            fixed = max(0, one - human - tokens(user.text))
            self._turn_costs = (key, _TurnCosts(fixed, human, ai))
        return self._turn_costs[1]

    def plan(
        self,
        values: Mapping[str, Any],
        history: Sequence[BaseMessage],
        max_tokens: int | None = None,
    ) -> TrimPlan:
        """Where the history will be cut for the next turn, and how full the context is."""
        budget = self.prompt_budget(max_tokens)
        if budget <= 0:
            raise self._too_small(max_tokens)
        # A message too long for any context (a hostile or pasted-in session file) is never
        # tokenized: the history starts after it. Tokenizing 200 MB took minutes and gigabytes.
        skip = 1 + max((i for i, m in enumerate(history) if _beyond(m, budget)), default=-1)
        if skip and skip == len(history):
            raise ContextOverflowError(
                f"the message is {len(history[-1].text):,} characters: far more than the "
                f"{budget}-token budget can hold; shorten it"
            )
        while 0 < skip < len(history) and history[skip].type != "human":
            skip += 1  # the kept history starts on a human turn
        costs = self.turn_costs(values)
        plan = plan_trim(
            history[skip:],
            count_prompt=lambda msgs: self._count(self.prompt_messages(values, msgs)),
            message_cost=lambda m: self.model.get_num_tokens(m.text) + costs.of(m),
            fixed=costs.fixed,
            budget=budget,
            watermark=self.trim_watermark,
        )
        return replace(plan, start=plan.start + skip)

    def check_fits(self, values: Mapping[str, Any] | None = None) -> None:
        """Raise a one-line error now if no turn could ever fit: a reply budget that fills the
        context, or a system prompt and template that leave no room for a short message."""
        values = self._values(values or {})
        budget = self.prompt_budget()
        if budget > 0:
            probe = self.prompt_messages(values, [HumanMessage("hi")])
            needed = self._count(probe)
            if needed <= budget:
                return
            raise self._too_small(None, needed)
        raise self._too_small(None)

    def _too_small(self, max_tokens: int | None, needed: int | None = None) -> ConfigError:
        """The one error for a context that cannot hold a turn (at start, and at any turn)."""
        alone = ""
        if needed is not None:
            alone = f"the system prompt and chat template alone take {needed} tokens, and "
        return ConfigError(
            f"the context window of {self.model.context_window} tokens is too small: {alone}"
            f"replies may take up to {self.reply_budget(max_tokens)} tokens; raise --ctx or "
            "lower --max-tokens"
        )

    def _count(self, messages: Sequence[BaseMessage]) -> int:
        # The tool definitions are part of every prompt.
        return self.model.get_num_tokens_from_messages(messages, tools=self.tool_specs)


MAX_CHARS_PER_TOKEN = 1024
"""No vocabulary has tokens near this long: a text longer than this many characters per token of
the budget cannot fit, whatever the tokenizer."""


TYPICAL_TOKENS = 64
"""A next message's assumed length when the session has no message of the user's yet."""


def typical_message(history: Sequence[BaseMessage], count: Callable[[str], int]) -> HumanMessage:
    """A stand-in for the user's next message: as long as their recent ones (the median of the
    last eight), in tokens."""
    recent = [m for m in history if m.type == "human"][-8:]
    sizes = sorted(count(m.text) for m in recent)
    tokens = sizes[len(sizes) // 2] if sizes else TYPICAL_TOKENS
    return HumanMessage(" ".join(["word"] * max(1, tokens)))


def _beyond(message: BaseMessage, budget: int) -> bool:
    return len(message.text) > budget * MAX_CHARS_PER_TOKEN


def _to_message(chunks: Sequence[AIMessageChunk]) -> AIMessage:
    if not chunks:
        return AIMessage(content="")
    full = add_ai_message_chunks(chunks[0], *chunks[1:])  # one merge, not one per chunk
    return AIMessage(
        content=full.content,
        response_metadata=dict(full.response_metadata),
        usage_metadata=full.usage_metadata,
        id=full.id,
        tool_calls=full.tool_calls,  # a reply's tool calls are saved with it
        invalid_tool_calls=full.invalid_tool_calls,
    )


def build_chatbot(
    model: ChatLlamaCpp,
    store: SessionStore,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    **options: Any,
) -> Chatbot:
    """A Runnable chatbot over ``model`` that keeps each session in ``store``.

    ``options``: ``variables`` (values for the system prompt's ``{names}``), ``trim_watermark``
    (see ``localbot.trimming``), ``kv_cache`` (save/restore llama.cpp's state per session),
    ``prepare_next`` (after each turn, get the next one ready in the background; needs
    ``kv_cache``),
    ``tools`` (bound to every turn; ``localbot.tool_loop.run_tool_loop`` runs them).

    Example:
        .. code-block:: python

            bot = build_chatbot(model, SessionStore(), "Answer in {language}.")
            bot.invoke(
                {"messages": [HumanMessage("hi! I'm Todd")], "language": "Spanish"},
                config={"configurable": {"session_id": "abc"}},
            )
    """
    return Chatbot(model, store, system_prompt, **options)
