"""Tools for ``ChatLlamaCpp.bind_tools``: specs, the prompt, the grammar and the reply.

* **Specs**: anything LangChain turns into an OpenAI tool (``@tool`` functions, ``BaseTool``s,
  Pydantic classes, TypedDicts, dicts). Each tool's arguments schema is checked when the tools
  are bound: a schema the grammar cannot enforce is an error then, not a bad call later.
* **The prompt**: a chat template with a ``tools`` variable gets the tools, assistant messages'
  ``tool_calls`` and ``tool`` messages the way Hugging Face passes them (OpenAI's shapes), and
  the model writes calls the way its template shows them (``localbot.tool_format``). Other
  templates get the built-in format: the tools described in the system message, calls written as
  ``<tool_call>`` blocks in the assistant's text, results as ``<tool_response>`` blocks in a
  user turn.
* **No injection**: tool results are message content, and every string inside tool calls and tool
  definitions is marked like message content (``ChatTemplate.pieces``), so control-token text in
  them (``<|im_end|>``) stays text.
* **The reply**: parsed into ``AIMessage.tool_calls`` (with ids), or ``tool_call_chunks`` while
  streaming.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    SystemMessage,
    ToolMessage,
)

from localbot.errors import ConfigError
from localbot.grammar import normalize
from localbot.templates import ChatTemplate, Piece
from localbot.tool_format import BUILTIN, BUILTIN_INSTRUCTIONS, CallFormat, args_json, learn_format
from localbot.tool_parser import CallParser, Event, parse_reply

__all__ = ["ToolSupport", "prompt_pieces", "prompt_turns", "reply_message", "stream_chunks",
           "tool_choice", "tool_specs", "tool_support"]  # fmt: skip

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# ----------------------------------------------------------------------------- specs
def tool_specs(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-shaped tool specs, each arguments schema checked against what the grammar can
    enforce (ConfigError naming the tool otherwise)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    specs: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}
    for tool in tools:
        try:
            spec = convert_to_openai_tool(tool)
        except Exception as err:
            raise ConfigError(f"cannot use {tool!r} as a tool: {err}") from err
        fn = dict(spec.get("function") or {})
        name = fn.get("name", "")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"tool name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        params = dict(fn.get("parameters") or {"type": "object", "properties": {}})
        if name in seen:
            # The same tool given twice (a Pydantic class and its JSON schema): once is enough.
            if seen[name] == _without_titles(params):
                continue
            raise ConfigError(f"two different tools are named {name!r}")
        seen[name] = _without_titles(params)
        params.setdefault("type", "object")
        # A tool takes the arguments it declares: a function tool has no **kwargs to catch more.
        params.setdefault("additionalProperties", False)
        try:
            normalize(params)
        except ConfigError as err:
            raise ConfigError(f"tool {name!r}: {err}") from err
        fn["parameters"] = params
        fn.setdefault("description", "")
        specs.append({"type": "function", "function": fn})
    return specs


def _without_titles(schema: Any) -> Any:
    """``schema`` without ``title`` annotations (Pydantic adds them, LangChain drops them)."""
    if isinstance(schema, list):
        return [_without_titles(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {k: _without_titles(v) for k, v in value.items()}
        else:
            out[key] = _without_titles(value)
    return out


def tool_choice(choice: Any, specs: Sequence[dict[str, Any]]) -> str:
    """Normalize LangChain/OpenAI ``tool_choice`` to "auto", "any", "none" or a tool name."""
    names = [s["function"]["name"] for s in specs]
    if choice in (None, "auto"):
        return "auto"
    if choice in ("any", "required", True):
        return "any"
    if choice in ("none", False):
        return "none"
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or choice.get("name")
    if isinstance(choice, str) and choice in names:
        return choice
    raise ConfigError(
        f"tool_choice {choice!r} is not one of: 'auto', 'any', 'required', 'none', "
        + ", ".join(repr(n) for n in names)
    )


# ----------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class ToolSupport:
    """How tools reach one chat template: natively (its ``tools`` variable) or built in."""

    native: bool
    fmt: CallFormat


def _takes_tools(source: str) -> bool:
    from jinja2 import Environment, meta
    from jinja2.ext import loopcontrols

    try:
        parsed = Environment(extensions=[loopcontrols]).parse(source)
    except Exception:
        return False
    return "tools" in meta.find_undeclared_variables(parsed) and "tool_calls" in source


_support_cache: dict[tuple[str, str, str], ToolSupport] = {}


def tool_support(template: ChatTemplate) -> ToolSupport:
    """Learned once per template (a few renders)."""
    key = (template.source, template.bos_token, template.eos_token)
    found = _support_cache.get(key)
    if found is None:
        fmt = None
        if _takes_tools(template.source):

            def render(messages: list[dict[str, Any]], generation: bool, tools: list) -> str:
                return "".join(p.text for p in template.pieces(messages, generation, tools=tools))

            fmt = learn_format(render)
        found = ToolSupport(native=fmt is not None, fmt=fmt or BUILTIN)
        if len(_support_cache) >= 32:
            _support_cache.clear()
        _support_cache[key] = found
    return found


# ----------------------------------------------------------------------------- the prompt
def template_role(message: BaseMessage, native: bool = True) -> str:
    """The chat-template role of ``message``: tool results are "tool" for templates that know
    tools, else user turns (the built-in format)."""
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool" if native else "user"
    if isinstance(message, ChatMessage) and message.role in ("system", "user", "assistant"):
        return message.role
    return "user"  # human and unknown roles


def _calls(message: BaseMessage) -> list[dict[str, Any]]:
    return (
        list(getattr(message, "tool_calls", None) or []) if isinstance(message, AIMessage) else []
    )


def _native_turns(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    names = {c["id"]: c["name"] for m in messages for c in _calls(m) if c.get("id")}
    for m in messages:
        turn: dict[str, Any] = {"role": template_role(m, native=True), "content": m.text}
        calls = _calls(m)
        if calls:
            turn["tool_calls"] = [
                {
                    "id": c.get("id") or "",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c.get("args") or {}},
                }
                for c in calls
            ]
        if isinstance(m, ToolMessage):
            turn["tool_call_id"] = m.tool_call_id
            turn["name"] = m.name or names.get(m.tool_call_id, "")
        turns.append(turn)
    return turns


def _builtin_turns(
    messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for m in messages:
        calls = _calls(m)
        if isinstance(m, ToolMessage):
            block = f"<tool_response>\n{m.text}\n</tool_response>"
            if turns and turns[-1].get("tool_results"):
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "tool_results": True})
            continue
        text = m.text
        if calls:
            rendered = BUILTIN.render(
                [(c["name"], args_json(c.get("args") or {}), c.get("id") or "") for c in calls]
            )
            text = f"{text}\n{rendered}" if text else rendered
        turns.append({"role": template_role(m, native=False), "content": text})
    for turn in turns:
        turn.pop("tool_results", None)
    if tools:
        described = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        instructions = BUILTIN_INSTRUCTIONS.format(tools=described)
        if turns and turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{instructions}"}
        else:
            turns.insert(0, {"role": "system", "content": instructions})
    return turns


def prompt_turns(
    template: ChatTemplate,
    messages: Sequence[BaseMessage],
    tools: Sequence[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The turns (role, content and the tool keys) and template variables (``tools``) that
    render the prompt for ``messages`` and ``tools``: give them to ``ChatTemplate.pieces``."""
    if not tool_support(template).native:
        return _builtin_turns(messages, tools), {}
    return _native_turns(messages), ({"tools": list(tools)} if tools else {})


def prompt_pieces(
    template: ChatTemplate,
    messages: Sequence[BaseMessage],
    tools: Sequence[dict[str, Any]] | None = None,
    control_tokens: Collection[str] = (),
) -> list[Piece]:
    """The prompt for ``messages`` (and ``tools``) as pieces; ``control_tokens``: the control
    texts found in them (``templates.texts_in``), which stay text wherever they are."""
    turns, extra = prompt_turns(template, messages, tools)
    return template.pieces(
        turns, add_generation_prompt=True, control_tokens=control_tokens, **extra
    )


def _message_key(m: BaseMessage) -> tuple[str, ...]:
    # isinstance, not getattr with a default: a missing attribute on a LangChain message costs
    # a raised AttributeError, which dominated this key's cost on long histories.
    if isinstance(m, AIMessage) and m.tool_calls:
        return (m.type, m.text, json.dumps(m.tool_calls, sort_keys=True, default=str))
    if isinstance(m, ToolMessage):
        return (m.type, m.text, m.tool_call_id, m.name or "")
    if isinstance(m, ChatMessage):
        return (m.type, m.text, m.role)
    return (m.type, m.text)


def cache_key(
    messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None
) -> tuple[tuple[tuple[str, ...], ...], str]:
    """What the prompt depends on, hashable. Asked several times a turn over the whole history:
    a plain message costs one small tuple (its strings hash once); only tool calls and tool
    definitions are serialized."""
    parts = tuple(_message_key(m) for m in messages)
    return parts, json.dumps(list(tools), sort_keys=True, default=str) if tools else ""


# ----------------------------------------------------------------------------- the reply
@dataclass(frozen=True)
class ToolCall:
    """What one generation with tools needs: the tools, the choice, the format, the grammar."""

    specs: tuple[dict[str, Any], ...]
    choice: str
    fmt: CallFormat
    parallel: bool = False

    @property
    def grammar(self) -> str:
        return _call_grammar(self.fmt, json.dumps(list(self.specs)), self.choice, self.parallel)

    def parser(self) -> CallParser:
        return CallParser(self.fmt)


@lru_cache(maxsize=32)
def _call_grammar(fmt: CallFormat, specs_json: str, choice: str, parallel: bool) -> str:
    return fmt.grammar(json.loads(specs_json), choice, parallel)


def reply_message(text: str, call: ToolCall | None, **fields: Any) -> AIMessage:
    """The AIMessage for a whole reply: text, and tool calls when tools were bound."""
    if call is None or call.choice == "none":
        return AIMessage(content=text, **fields)
    content, parser = parse_reply(call.fmt, text)
    tool_calls, invalid = finished_calls(parser)
    return AIMessage(content=content, tool_calls=tool_calls, invalid_tool_calls=invalid, **fields)


def finished_calls(parser: CallParser) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    good, bad = [], []
    for c in parser.calls:
        try:
            args = json.loads(c.args) if c.complete else None
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict):
            good.append({"name": c.name, "args": args, "id": c.id, "type": "tool_call"})
        else:
            bad.append(
                {
                    "name": c.name or None,
                    "args": c.args,
                    "id": c.id or None,
                    "error": "the reply ended inside this call (raise max_tokens)",
                    "type": "invalid_tool_call",
                }
            )
    return good, bad


def stream_chunks(events: Sequence[Event]) -> Iterator[AIMessageChunk]:
    """AIMessageChunks for parser events: text, or ``tool_call_chunks``."""
    for event in events:
        if event.kind == "text":
            yield AIMessageChunk(content=event.text)
        elif event.kind == "call" and event.call is not None:
            chunk = {"name": event.call.name, "args": "", "id": event.call.id, "index": event.index}
            yield AIMessageChunk(content="", tool_call_chunks=[chunk])
        elif event.kind == "args":
            chunk = {"name": None, "args": event.text, "id": None, "index": event.index}
            yield AIMessageChunk(content="", tool_call_chunks=[chunk])


def plan(
    template: ChatTemplate,
    specs: Sequence[dict[str, Any]] | None,
    choice: Any,
    parallel: bool | None = False,
) -> ToolCall | None:
    """The tool-call plan of one generation, or None without tools."""
    if not specs:
        return None
    fmt = tool_support(template).fmt
    return ToolCall(tuple(specs), tool_choice(choice, specs), fmt, bool(parallel))
