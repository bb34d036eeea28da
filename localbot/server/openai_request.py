"""Reading an OpenAI ``/v1/chat/completions`` request body: every field is either used, checked
to be a value that asks for nothing we lack (``n: 1``, ``presence_penalty: 0``), or refused with
a 400 that names it. Nothing is silently ignored."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from localbot.server.openai_tools import ReplyShape, assistant_calls, read_shape, tool_result
from localbot.server.request_error import RequestError, short

__all__ = ["CompletionRequest", "RequestError", "parse_request"]

MAX_STOPS = 4  # as OpenAI


@dataclass
class CompletionRequest:
    messages: list[BaseMessage]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    """temperature, top_p, seed, stop: only those the client gave, as ChatLlamaCpp names them."""
    shape: ReplyShape = field(default_factory=ReplyShape)
    """Tools and response_format (``localbot.server.openai_tools``)."""


# Fields that may be sent with a value that changes nothing here (null always may).
_HARMLESS = {
    "n": lambda v: v == 1,
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logprobs": lambda v: v is False,
    "user": lambda v: isinstance(v, str),  # an end-user id for abuse tracking; nothing to do
    "store": lambda v: v is False,
    "service_tier": lambda v: v in ("auto", "default"),
}
_USED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
}
_NULL_MESSAGE_FIELDS = {"name", "tool_calls", "function_call", "refusal", "audio", "annotations"}
_ROLE_FIELDS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id", "name"}}
"""Message fields used for one role (any other may only be null)."""


def parse_request(body: Any, model_ids: set[str]) -> CompletionRequest:
    """The request, checked; RequestError names the first field we cannot honour."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(body)
    model = body.get("model")
    if model is not None and model not in model_ids:
        raise RequestError(
            f"the model '{short(model)}' is not served here; available: "
            + ", ".join(sorted(model_ids)),
            "model",
            "model_not_found",
            status=404,
        )
    request = CompletionRequest(messages=parse_messages(body.get("messages")))
    request.stream = _bool(body, "stream")
    request.include_usage = _include_usage(body.get("stream_options"), request.stream)
    request.max_tokens = _max_tokens(body)
    request.sampling = _sampling(body)
    request.shape = read_shape(body)
    return request


def _check_fields(body: dict[str, Any]) -> None:
    """Every field is one we use, or one sent with a value that asks for nothing."""
    for key, value in body.items():
        if key in _USED or value is None:
            continue
        check = _HARMLESS.get(key)
        if check is None:
            raise RequestError(f"unsupported parameter '{key}'", key, "unsupported_parameter")
        if not check(value):
            raise RequestError(
                f"unsupported value for '{key}': {short(value)} (localbot supports only the "
                "default)",
                key,
                "unsupported_value",
            )


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError(
            "stream_options supports only include_usage", "stream_options", "unsupported_value"
        )
    return _bool(options, "include_usage", "stream_options.include_usage")


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """temperature, top_p, seed and stop, as ChatLlamaCpp names them: only those given."""
    sampling: dict[str, Any] = {}
    if body.get("temperature") is not None:
        sampling["temperature"] = _number(body, "temperature", 0, 2)
    if body.get("top_p") is not None:
        sampling["top_p"] = _number(body, "top_p", 0, 1)
    if body.get("seed") is not None:
        sampling["seed"] = _int(body, "seed", 0, 2**32 - 1)
    stops = _stops(body.get("stop"))
    if stops:
        sampling["stop"] = stops
    return sampling


def parse_messages(value: Any) -> list[BaseMessage]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list", "messages")
    messages: list[BaseMessage] = []
    call_ids: set[str] = set()  # what a tool message may answer
    for i, item in enumerate(value):
        message = _message(item, f"messages[{i}]", call_ids)
        call_ids.update(c["id"] for c in getattr(message, "tool_calls", None) or [])
        messages.append(message)
    return messages


def _message(item: Any, where: str, call_ids: set[str]) -> BaseMessage:
    if not isinstance(item, dict):
        raise RequestError(f"{where} must be an object with role and content", where)
    role = item.get("role")
    used = _ROLE_FIELDS.get(role, set()) if isinstance(role, str) else set()
    for key, value in item.items():
        if key in ("role", "content") or key in used:
            continue
        if key in _NULL_MESSAGE_FIELDS and value in (None, []):
            continue
        raise RequestError(
            f"unsupported field '{key}' in {where}", f"{where}.{key}", "unsupported_parameter"
        )
    calls = role == "assistant" and item.get("tool_calls") not in (None, [])
    # An assistant message that only calls tools has null content, as OpenAI writes it.
    content = item.get("content")
    text = "" if calls and content is None else _content(content, f"{where}.content")
    if role in ("system", "developer"):
        return SystemMessage(text)
    if role == "user":
        return HumanMessage(text)
    if role == "assistant":
        return assistant_calls(item, where, text) if calls else AIMessage(text)
    if role == "tool":
        return tool_result(item, where, text, call_ids)
    raise RequestError(
        f"unsupported role {short(role)} in {where} (system, developer, user, assistant and "
        "tool are)",
        f"{where}.role",
        "unsupported_value",
    )


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    f"unsupported content part {short(kind)} in {where}[{j}] (only text)",
                    f"{where}[{j}].type",
                    "unsupported_value",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where} must be a string or a list of text parts", where)


def _max_tokens(body: dict[str, Any]) -> int | None:
    values = {
        key: _int(body, key, 1, 2**31 - 1)
        for key in ("max_tokens", "max_completion_tokens")
        if body.get(key) is not None
    }
    if len(set(values.values())) > 1:
        raise RequestError(
            "max_tokens and max_completion_tokens disagree; send one", "max_completion_tokens"
        )
    return next(iter(values.values()), None)


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise RequestError(f"stop takes at most {MAX_STOPS} sequences", "stop")
    return stops


def _bool(body: dict[str, Any], key: str, name: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name or key} must be true or false", name or key)
    return value


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float:
    value = body[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"{key} must be a number from {low} to {high}", key)
    return float(value)


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int:
    value = body[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{key} must be an integer from {low} to {high}", key)
    return value
