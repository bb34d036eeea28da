"""The chatbot: one chain per turn, with the session loaded before and saved around it.

Every turn runs ``trim → prompt → (save the human turn, restore KV state) → model``:

* **trim** keeps the newest history that fits ``n_ctx - max_tokens`` exactly (the system prompt and
  the template's own tokens counted), starting on a human turn; see ``localbot.trimming``.
* **prompt** is a ``ChatPromptTemplate``: the system prompt (with ``{variables}``), then
  ``MessagesPlaceholder("messages")``.
* The human turn is written to the session before generation starts, so a crash mid-reply never
  loses what the user typed; the reply is written when it completes, and a reply that is cut
  short (Ctrl-C, an abandoned stream, an error) is saved as far as it got and marked
  ``response_metadata["interrupted"]``.

Built from non-deprecated langchain-core parts (``RunnableWithMessageHistory`` is deprecated and
saves nothing when a run is interrupted).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.runnables.config import ensure_config

from localbot.chat_model import ChatLlamaCpp
from localbot.errors import ConfigError, MissingVariableError
from localbot.sessions import SessionHistory, SessionStore
from localbot.trimming import DEFAULT_WATERMARK, TrimPlan, plan_trim

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_SESSION = "default"

_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


def escape_system_prompt(text: str) -> str:
    """Make ``text`` a safe f-string template: ``{name}`` stays a variable, ``{{``/``}}`` stay
    literal braces, and every other brace (JSON, code) is literal too."""

    def repl(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(0)
        token = match.group(0)
        return {"{{": "{{", "}}": "}}", "{": "{{", "}": "}}"}[token]

    return _FIELD.sub(repl, text)


def make_prompt(system_prompt: str | None) -> ChatPromptTemplate:
    parts: list[Any] = []
    if system_prompt:
        parts.append(("system", escape_system_prompt(system_prompt)))
    parts.append(MessagesPlaceholder("messages"))
    return ChatPromptTemplate.from_messages(parts)


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


@dataclass
class _Turn:
    """What one call knows while it runs."""

    session_id: str
    history: SessionHistory
    new: list[BaseMessage]
    plan: TrimPlan | None = None
    max_tokens: int | None = None
    saved_human: bool = False
    chunks: list[AIMessageChunk] = field(default_factory=list)


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
    ) -> None:
        self.model = model
        self.store = store
        self.variables = dict(variables or {})
        self.trim_watermark = trim_watermark
        self.kv_cache = kv_cache
        self.system_prompt = system_prompt
        self._kv_threads: list[threading.Thread] = []
        self.kv_budget_bytes = 2 << 30  # all sessions' saved KV states together
        self.last_restore: tuple[int, float] = (0, 0.0)  # tokens restored, seconds spent
        self._turn_costs: tuple[tuple[str, ...], _TurnCosts] | None = None
        self._live_session: str | None = None

    # -------------------------------------------------------------- settings
    @property
    def system_prompt(self) -> str | None:
        return self._system_prompt

    @system_prompt.setter
    def system_prompt(self, text: str | None) -> None:
        self._system_prompt = text
        self.prompt = make_prompt(text)

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
    def prompt_messages(self, values: Mapping[str, Any], history: Sequence[BaseMessage]):
        return self.prompt.invoke({**values, "messages": list(history)}).to_messages()

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
            count = self.model.get_num_tokens_from_messages
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
            raise ConfigError(
                f"a reply of up to {self.reply_budget(max_tokens)} tokens leaves no room for the "
                f"prompt in a {self.model.context_window}-token context: lower --max-tokens or "
                "raise --ctx"
            )
        costs = self.turn_costs(values)
        return plan_trim(
            history,
            count_prompt=lambda msgs: self.model.get_num_tokens_from_messages(
                self.prompt_messages(values, msgs)
            ),
            message_cost=lambda m: self.model.get_num_tokens(m.text) + costs.of(m),
            fixed=costs.fixed,
            budget=budget,
            watermark=self.trim_watermark,
        )

    def check_fits(self, values: Mapping[str, Any] | None = None) -> None:
        """Raise a one-line error now if no turn could ever fit: a reply budget that fills the
        context, or a system prompt and template that leave no room for a short message."""
        values = self._values(values or {})
        budget = self.prompt_budget()
        if budget > 0:
            probe = self.prompt_messages(values, [HumanMessage("hi")])
            needed = self.model.get_num_tokens_from_messages(probe)
            if needed <= budget:
                return
            what = f"the system prompt and chat template alone take {needed} tokens, and "
        else:
            what = ""
        raise ConfigError(
            f"the context window of {self.model.context_window} tokens is too small: {what}"
            f"replies may take up to {self.reply_budget()} tokens; raise --ctx or lower "
            "--max-tokens"
        )

    # -------------------------------------------------------------- the chain
    def _values(self, input: Mapping[str, Any]) -> dict[str, Any]:
        values = {**self.variables, **{k: v for k, v in input.items() if k != "messages"}}
        self.check_variables(values)
        return values

    def _trim_step(self, turn: _Turn):
        def trim(chain_input: dict[str, Any]) -> list[BaseMessage]:
            values = {k: v for k, v in chain_input.items() if k != "messages"}
            turn.plan = self.plan(values, chain_input["messages"], turn.max_tokens)
            return chain_input["messages"][turn.plan.start :]

        return RunnableLambda(trim, name="trim_history")

    def _before_model_step(self, turn: _Turn):
        def before_model(prompt_value: Any) -> Any:
            turn.history.add_messages(turn.new)
            turn.saved_human = True
            if self.kv_cache and turn.session_id != self._live_session:
                self._restore_kv(turn.session_id, prompt_value.to_messages())
            else:
                self.last_restore = (0, 0.0)
            # From here on llama.cpp's memory holds this session: at least as much as its saved
            # state, so the next turn of the same session need not even look at that file.
            self._live_session = turn.session_id
            return prompt_value

        return RunnableLambda(before_model, name="save_turn_and_restore_cache")

    def chain_for(self, turn: _Turn, **model_kwargs: Any) -> Runnable:
        """trim → prompt → (save the human turn, restore the KV cache) → model."""
        from langchain_core.runnables import RunnablePassthrough

        turn.max_tokens = model_kwargs.get("max_tokens")
        model = self.model.bind(**model_kwargs) if model_kwargs else self.model
        return (
            RunnablePassthrough.assign(messages=self._trim_step(turn))
            | self.prompt
            | self._before_model_step(turn)
            | model
        )

    # -------------------------------------------------------------- running
    def _start(self, input: Any, config: RunnableConfig | None) -> tuple[_Turn, dict]:
        if not isinstance(input, Mapping) or "messages" not in input:
            raise ConfigError('the chatbot takes {"messages": [...], **variables}')
        config = ensure_config(config)
        session_id = config.get("configurable", {}).get("session_id") or DEFAULT_SESSION
        history = self.store.get(session_id)
        values = self._values(input)
        turn = _Turn(session_id, history, _as_messages(input["messages"]))
        return turn, {**values, "messages": history.messages + turn.new}

    def stream(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        turn, chain_input = self._start(input, config)
        outcome = "error"
        inner = self.chain_for(turn, **kwargs).stream(chain_input, config)
        try:
            for chunk in inner:
                turn.chunks.append(chunk)
                yield chunk
            outcome = "complete"
        except GeneratorExit:
            outcome = "abandoned"
            raise
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        finally:
            inner.close()  # stops generation now and frees the model for the next turn
            self._finish(turn, outcome)

    def invoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        chunks = list(self.stream(input, config, **kwargs))
        return _to_message(chunks)

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

    def _finish(self, turn: _Turn, outcome: str) -> None:
        if not turn.saved_human:
            return  # failed before generation (bad input): nothing to save
        reply = _to_message(turn.chunks)
        if outcome != "complete":
            reply.response_metadata = {
                **reply.response_metadata,
                "model_name": self.model.model_name,
                "interrupted": True,
                "finish_reason": outcome,
            }
        turn.history.add_messages([reply])
        if self.kv_cache and outcome == "complete":
            self._save_kv(turn.session_id)

    # -------------------------------------------------------------- KV state
    def _kv_path(self, session_id: str):
        return self.store.kv_state_path(session_id)

    def _restore_kv(self, session_id: str, messages: list[BaseMessage]) -> None:
        from localbot import kv_state

        self.wait_for_saves()
        start = time.perf_counter()
        prompt_ids = self.model.prompt_ids(messages)
        restored = kv_state.restore_state(self.model, self._kv_path(session_id), prompt_ids)
        self.last_restore = (restored, time.perf_counter() - start)

    def _save_kv(self, session_id: str) -> None:
        from localbot import kv_state

        path = self._kv_path(session_id)

        def save() -> None:
            try:
                kv_state.save_state(self.model, path)
                kv_state.prune_states(self.store.root, self.kv_budget_bytes)
            except Exception:  # a cache that fails to save costs speed, never data
                log.debug("could not save KV state to %s", path, exc_info=True)

        # Saving ~18 KB per token takes a moment: do it while the user reads and types.
        thread = threading.Thread(target=save, name="localbot-kv-save", daemon=True)
        thread.start()
        self._kv_threads.append(thread)

    def wait_for_saves(self) -> None:
        """Block until background KV-state saves are on disk (call before exiting)."""
        while self._kv_threads:
            self._kv_threads.pop().join()


def _to_message(chunks: Sequence[AIMessageChunk]) -> AIMessage:
    if not chunks:
        return AIMessage(content="")
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return AIMessage(
        content=full.content,
        response_metadata=dict(full.response_metadata),
        usage_metadata=full.usage_metadata,
        id=full.id,
    )


def build_chatbot(
    model: ChatLlamaCpp,
    store: SessionStore,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    **options: Any,
) -> Chatbot:
    """A Runnable chatbot over ``model`` that keeps each session in ``store``.

    ``options``: ``variables`` (values for the system prompt's ``{names}``), ``trim_watermark``
    (see ``localbot.trimming``), ``kv_cache`` (save/restore llama.cpp's state per session).

    Example:
        .. code-block:: python

            bot = build_chatbot(model, SessionStore(), "Answer in {language}.")
            bot.invoke(
                {"messages": [HumanMessage("hi! I'm Todd")], "language": "Spanish"},
                config={"configurable": {"session_id": "abc"}},
            )
    """
    return Chatbot(model, store, system_prompt, **options)


__all__ = ["DEFAULT_SYSTEM_PROMPT", "Chatbot", "SystemMessage", "build_chatbot"]
