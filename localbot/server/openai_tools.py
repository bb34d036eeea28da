"""Tools and JSON replies in OpenAI's wire format, for ``/v1/chat/completions``.

The request's ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format`` become
the same model options ``bind_tools`` and ``with_structured_output`` bind (``localbot.tools``,
``localbot.structured``): the prompt, the grammar and the parsing of calls are the chat model's,
not the server's. This module only reads and writes OpenAI's shapes:

* **In**: function tools (checked like ``bind_tools`` checks them: a schema the grammar cannot
  enforce is a 400 naming the tool), ``tool_choice`` ("auto", "none", "required" or
  ``{"type": "function", "function": {"name": ...}}``), ``response_format``
  (``json_object``: any JSON object; ``json_schema``: a grammar from the schema, a schema it
  cannot express is a 400, never a fallback), assistant messages with ``tool_calls`` and
  ``tool`` messages answering them.
* **Out**: ``message.tool_calls`` with ids and ``arguments`` as a JSON string, streamed as
  ``tool_calls`` deltas (``index``, then id, type and name in a call's first delta, then
  ``arguments`` fragments), and ``finish_reason: "tool_calls"``.

``tools`` together with a JSON ``response_format`` is refused: one grammar shapes a reply, and
OpenAI's meaning (calls free, text in the schema) would need both at once. A tool whose
parameters are the schema, named in ``tool_choice``, gives the same JSON as a call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage

from localbot import structured
from localbot import tools as tools_mod
from localbot.errors import ConfigError
from localbot.server.request_error import RequestError, short
from localbot.templates import ChatTemplate

_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ReplyShape:
    """What shapes the reply besides the messages: tools (OpenAI-shaped specs, checked), the
    tool choice as ``localbot.tools`` names it ("auto", "any", "none" or a tool name), and a
    ``response_format`` (None: free text)."""

    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str = "auto"
    parallel: bool = False
    response_format: dict[str, Any] | None = None

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments for ``ChatLlamaCpp.stream``, as ``bind_tools`` /
        ``with_structured_output`` would bind them."""
        if self.tools:
            return {
                "tools": list(self.tools),
                "tool_choice": self.tool_choice,
                "parallel_tool_calls": self.parallel,
            }
        if self.response_format is not None:
            return {"response_format": self.response_format}
        return {}

    @property
    def constrained(self) -> bool:
        return bool(self.tools) or self.response_format is not None

    def grammar(self, template: ChatTemplate) -> str | None:
        """The grammar the reply will follow (None: free text), as the chat model builds it."""
        if self.tools:
            call = tools_mod.plan(template, self.tools, self.tool_choice, self.parallel)
            return call.grammar if call else None
        return structured.grammar_for(self.response_format)


def read_shape(body: dict[str, Any]) -> ReplyShape:
    """``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format``, checked."""
    specs = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), specs)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RequestError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    response_format = _response_format(body.get("response_format"))
    if specs and response_format is not None:
        raise RequestError(
            "tools cannot be combined with a JSON response_format (one grammar shapes a reply): "
            "send response_format alone, or a tool whose parameters are the schema with "
            "tool_choice naming it",
            "response_format",
            "unsupported_value",
        )
    # OpenAI's default is parallel calls; localbot's (as bind_tools') is one call per reply,
    # because small models repeat a call. Asking for them works where the template shows them.
    return ReplyShape(tuple(specs), choice, bool(parallel), response_format)


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise RequestError("tools must be a list of function tools", "tools")
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise RequestError(
                f"unsupported tool type {short(kind)} in {where} (only 'function')",
                f"{where}.type",
                "unsupported_value",
            )
        if set(tool) - {"type", "function"}:
            extra = sorted(set(tool) - {"type", "function"})[0]
            raise RequestError(f"unsupported field '{extra}' in {where}", f"{where}.{extra}")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"{where}.function must be an object with a name", where)
        if set(fn) - _FUNCTION_KEYS:
            extra = sorted(set(fn) - _FUNCTION_KEYS)[0]
            raise RequestError(
                f"unsupported field '{extra}' in {where}.function", f"{where}.function.{extra}"
            )
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RequestError(
                f"{where}.function.parameters must be a JSON schema object",
                f"{where}.function.parameters",
            )
    # ``strict`` asks for what the grammar always does; it stays out of the prompt.
    functions = [
        {k: v for k, v in t["function"].items() if k != "strict" and v is not None} for t in value
    ]
    try:
        return tools_mod.tool_specs([{"type": "function", "function": f} for f in functions])
    except ConfigError as err:
        raise RequestError(str(err), "tools", "invalid_tool_schema") from err


def _tool_choice(value: Any, specs: list[dict[str, Any]]) -> str:
    if value is None:
        return "auto"
    if not specs:
        raise RequestError("tool_choice is only allowed when tools are given", "tool_choice")
    if value in ("auto", "none", "required"):
        return tools_mod.tool_choice(value, specs)
    name = None
    if isinstance(value, dict) and value.get("type") == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    names = [s["function"]["name"] for s in specs]
    if not isinstance(name, str):
        raise RequestError(
            f"tool_choice {short(value)} is not 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in names:
        raise RequestError(
            f"tool_choice names {short(name)}, which is not among the tools: " + ", ".join(names),
            "tool_choice",
        )
    return name


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object" and set(value) == {"type"}:
        return {"type": "json_object"}
    if kind != "json_schema":
        raise RequestError(
            f"unsupported response_format {short(value)} (text, json_object and json_schema are)",
            "response_format",
            "unsupported_value",
        )
    spec = value.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise RequestError(f'{where} must be {{"name": ..., "schema": {{...}}}}', where)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise RequestError(
            f"{where}.name must be 1-64 letters, digits, '_' or '-'", f"{where}.name"
        )
    if not isinstance(spec.get("strict"), (bool, type(None))):
        raise RequestError(f"{where}.strict must be true or false", f"{where}.strict")
    # ``strict`` changes nothing: the grammar always holds the reply to the schema.
    shaped = {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": spec["schema"]},
    }
    try:
        structured.grammar_for(shaped)
    except ConfigError as err:
        raise RequestError(str(err), f"{where}.schema", "invalid_json_schema") from err
    return shaped


# ---------------------------------------------------------------------- messages in
def assistant_calls(item: dict[str, Any], where: str, text: str) -> AIMessage:
    """An assistant message with ``tool_calls`` (arguments as a JSON string, as OpenAI sends
    them) as the AIMessage the chat model renders through the template."""
    calls = item.get("tool_calls")
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    parsed = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(fn, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id"), str)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments"), str)
        ):
            raise RequestError(
                f'{at} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                '"arguments": "<JSON>"}}',
                at,
            )
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            raise RequestError(
                f"{at}.function.arguments must be a JSON object, as a string",
                f"{at}.function.arguments",
            )
        parsed.append({"name": fn["name"], "args": args, "id": call["id"], "type": "tool_call"})
    return AIMessage(content=text, tool_calls=parsed)


def tool_result(item: dict[str, Any], where: str, text: str, ids: Collection[str]) -> ToolMessage:
    """A ``tool`` message: the result of an earlier assistant message's call ``tool_call_id``."""
    call_id = item.get("tool_call_id")
    if not isinstance(call_id, str) or call_id not in ids:
        raise RequestError(
            f"{where} must answer an earlier assistant tool call: its tool_call_id "
            f"{short(call_id)} is not one",
            f"{where}.tool_call_id",
        )
    name = item.get("name")
    if name is not None and not isinstance(name, str):
        raise RequestError(f"{where}.name must be a string", f"{where}.name")
    return ToolMessage(text, tool_call_id=call_id, **({"name": name} if name else {}))


# ---------------------------------------------------------------------- calls out
class CallsOut:
    """The calls of one reply, from the model's ``tool_call_chunks``: as OpenAI's streamed
    deltas while they come, and as ``message.tool_calls`` at the end."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def deltas(self, chunk: AIMessageChunk) -> list[dict[str, Any]]:
        """The ``delta.tool_calls`` entries for ``chunk`` (none for a text chunk)."""
        out = []
        for part in getattr(chunk, "tool_call_chunks", None) or []:
            index = part.get("index") or 0
            args = part.get("args") or ""
            call = self.calls.get(index)
            if call is None:
                call = {"id": part.get("id") or "", "type": "function"}
                name = part.get("name") or ""
                out.append({"index": index, **call, "function": {"name": name, "arguments": args}})
                self.calls[index] = {**call, "function": {"name": name, "arguments": ""}}
                call = self.calls[index]
            elif args:
                out.append({"index": index, "function": {"arguments": args}})
            call["function"]["arguments"] += args
        return out

    def message_calls(self) -> list[dict[str, Any]]:
        """``message.tool_calls``: arguments as JSON text, as the model wrote them (a reply cut
        off by ``max_tokens`` leaves them unfinished, with ``finish_reason: "length"``)."""
        return [self.calls[i] for i in sorted(self.calls)]

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason
