"""One user turn with tools, through the chatbot: ask, run the calls, feed the results back, answer.

``run_tool_loop(bot, input, config)`` on a chatbot built with ``tools=[...]``:

1. the model replies to the user's message, with text or tool calls (``tool_choice`` of the
   first round: "auto" by default, "any" to insist on a call);
2. each call runs its Python tool; its result (or its error, as ``status="error"``) becomes a
   ``ToolMessage`` that answers the call's id;
3. the model sees the results and replies again ("auto"): more calls go round again, text ends
   the turn. After ``max_rounds`` rounds of calls the model must answer in text ("none").

Every message of the loop goes to the session as it happens, through the chatbot (the human turn
before the first reply, each reply with its ``tool_calls``, the ``ToolMessage``\\s before the
next reply), so the file holds the whole exchange in ``FileChatMessageHistory``'s format and a
later turn sees it. Trimming counts the tool definitions, and never starts the kept history at a
tool result (it starts on a human turn).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from langchain_core.messages import BaseMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool

from localbot.chatbot import Chatbot
from localbot.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["run_tool", "run_tool_loop"]


def run_tool(tools: Mapping[str, BaseTool], call: Mapping[str, Any]) -> ToolMessage:
    """Run one tool call; a failing tool is reported to the model, not raised."""
    tool = tools.get(call["name"])
    if tool is None:
        return ToolMessage(
            f"Error: there is no tool named {call['name']!r}",
            tool_call_id=call["id"],
            name=call["name"],
            status="error",
        )
    try:
        result = tool.invoke({**call, "type": "tool_call"})
    except Exception as err:  # the tool's own failure: the model reads it and can recover
        log.info("tool %s failed: %s", call["name"], err)
        return ToolMessage(
            f"Error: {type(err).__name__}: {err}",
            tool_call_id=call["id"],
            name=call["name"],
            status="error",
        )
    if isinstance(result, ToolMessage):
        return result
    return ToolMessage(str(result), tool_call_id=call["id"], name=call["name"])


def _runnable(spec: Any) -> BaseTool | None:
    """A tool that can run: BaseTools as they are, plain functions wrapped; schemas (Pydantic
    classes, dicts) describe calls but have nothing to run."""
    if isinstance(spec, BaseTool):
        return spec
    if callable(spec) and not isinstance(spec, type):
        return tool(spec)
    return None


def run_tool_loop(
    bot: Chatbot,
    input: Mapping[str, Any],
    config: RunnableConfig | None = None,
    *,
    tool_choice: str = "auto",
    max_rounds: int = 4,
    **kwargs: Any,
) -> list[BaseMessage]:
    """Run one turn with tools (see the module docstring); returns the messages the turn added
    after the user's: each reply and each tool result, the final answer last."""
    if not bot.tools:
        raise ConfigError(
            "this chatbot has no tools: build it with build_chatbot(..., tools=[...])"
        )
    by_name = {t.name: t for t in map(_runnable, bot.tools) if t is not None}
    values = {k: v for k, v in input.items() if k != "messages"}
    pending: Any = input["messages"]
    added: list[BaseMessage] = []
    for round_ in range(max_rounds + 1):
        choice = tool_choice if round_ == 0 else "auto"
        if round_ == max_rounds:
            choice = "none"
        reply = bot.invoke({**values, "messages": pending}, config, tool_choice=choice, **kwargs)
        added.append(reply)
        if not reply.tool_calls or reply.response_metadata.get("interrupted"):
            return added
        pending = [run_tool(by_name, call) for call in reply.tool_calls]
        added.extend(pending)
    return added
