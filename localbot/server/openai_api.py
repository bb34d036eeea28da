"""The OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions``.

Without a session the request is stateless, as OpenAI clients expect: its ``messages`` are the
whole conversation. With the header ``X-Localbot-Session: NAME`` the request is one turn of that
localbot session: ``messages`` are only the new message(s), and the server adds the history,
trims, saves both turns and reuses the KV cache, as the REPL does.

Before the reply starts (and so before any 200), the prompt is counted exactly: one that does not
fit is a 400 with the numbers. Replies wait their turn for the model; a streamed one says how many
requests are ahead (``X-Queue-Position`` header, and a ``: queued`` comment first when any are).

Tools and JSON replies (``tools``, ``tool_choice``, ``response_format``) are read and written in
OpenAI's shapes by ``localbot.server.openai_tools``; the chat model does the work.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from langchain_core.messages import BaseMessage

from localbot.chat_model import TurnStats
from localbot.errors import ConfigError, LocalbotError, one_line
from localbot.server.app import (
    ServerContext,
    abandon_on_disconnect,
    context,
    read_json,
    sse,
)
from localbot.server.engine import Event, Job
from localbot.server.openai_request import CompletionRequest, RequestError, parse_request
from localbot.server.openai_tools import CallsOut
from localbot.server.turns import check_turn
from localbot.sessions import validate_session_id

router = APIRouter()

SESSION_HEADER = "x-localbot-session"


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    ctx = context(request)
    return {
        "object": "list",
        "data": [
            {
                "id": ctx.model_id,
                "object": "model",
                "created": 0,
                "owned_by": "localbot",
                "context_window": ctx.bot.model.context_window,
            }
        ],
    }


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    ctx = context(request)
    req = parse_request(await read_json(request), ctx.model_ids)
    session = request.headers.get(SESSION_HEADER)
    if session is not None:
        job = await _session_job(ctx, req, validate_session_id(session))
    else:
        job = await _stateless_job(ctx, req)
    ctx.engine.submit(job)
    headers = {"X-Queue-Position": str(job.ahead)}
    if session is not None:
        headers["X-Localbot-Session"] = session
    reply = _Reply(ctx.model_id, req)
    if req.stream:
        return StreamingResponse(reply.stream(job), media_type="text/event-stream", headers=headers)
    watcher = asyncio.create_task(abandon_on_disconnect(request, job))
    try:
        body = await reply.collect(job)
    finally:
        watcher.cancel()
    if "error" in body:
        return JSONResponse(body, status_code=500, headers=headers)
    return JSONResponse(body, headers=headers)


# ---------------------------------------------------------------------- jobs
async def _stateless_job(ctx: ServerContext, req: CompletionRequest) -> Job:
    model = ctx.bot.model
    options = {**req.sampling, **req.shape.model_options()}
    if req.max_tokens is not None:
        options["max_tokens"] = req.max_tokens
    reply_tokens = req.max_tokens or model.max_tokens

    def check_and_count() -> int:
        grammar = req.shape.grammar(model.template)
        if grammar is not None:
            try:
                model.check_grammar(grammar)  # llama.cpp's parser, before any 200
            except ConfigError as err:
                where = "tools" if req.shape.tools else "response_format"
                raise RequestError(str(err), where, "invalid_json_schema") from err
        return model.get_num_tokens_from_messages(req.messages, tools=req.shape.tools or None)

    prompt_tokens = await ctx.engine.call(check_and_count)
    window = model.context_window
    if reply_tokens is None:
        reply_tokens = max(0, window - prompt_tokens)
    if prompt_tokens + reply_tokens > window or reply_tokens <= 0:
        raise RequestError(
            f"the prompt is {prompt_tokens} tokens and the reply may take {reply_tokens}: "
            f"{prompt_tokens + reply_tokens} > this model's context window of {window} tokens; "
            "shorten the messages or lower max_tokens",
            "messages",
            "context_length_exceeded",
            prompt_tokens=prompt_tokens,
            max_tokens=reply_tokens,
            context_window=window,
        )

    def finish(outcome: str) -> tuple[str, TurnStats | None]:
        return outcome, model.last_stats

    return Job(begin=lambda: model.stream(req.messages, **options), finish=finish)


async def _session_job(ctx: ServerContext, req: CompletionRequest, session: str) -> Job:
    new = _new_messages(req)
    options = dict(req.sampling)
    if req.max_tokens is not None:
        options["max_tokens"] = req.max_tokens

    def prepare():
        bot = ctx.defaults.bot_for(ctx.bot, session)
        check_turn(bot, session, new, req.max_tokens)
        return bot

    bot = await ctx.engine.call(prepare)

    def begin():
        config = {"configurable": {"session_id": session}}
        return bot.stream({"messages": new}, config, **options)

    def finish(outcome: str) -> tuple[str, TurnStats | None]:
        return outcome, bot.model.last_stats

    return Job(begin=begin, finish=finish, session=session)


def _new_messages(req: CompletionRequest) -> list[BaseMessage]:
    messages = req.messages
    if req.shape.constrained:
        raise RequestError(
            "tools and response_format are for stateless requests: send the whole conversation "
            "without X-Localbot-Session",
            "tools" if req.shape.tools else "response_format",
        )
    for i, message in enumerate(messages):
        if message.type == "tool" or getattr(message, "tool_calls", None):
            raise RequestError(
                "with X-Localbot-Session, messages cannot carry tool calls or results",
                f"messages[{i}]",
            )
        if message.type == "system":
            raise RequestError(
                "with X-Localbot-Session the session's own system prompt applies: set it with "
                "PUT /api/sessions/NAME/settings, not in messages",
                f"messages[{i}].role",
            )
    if messages[-1].type != "human":
        raise RequestError(
            "with X-Localbot-Session, messages are the new turn and must end with a user message",
            "messages",
        )
    return messages


# ---------------------------------------------------------------------- the reply
FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length"}


class _Reply:
    """Turns a job's events into OpenAI's response shapes."""

    def __init__(self, model_id: str, req: CompletionRequest) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model_id = model_id
        self.req = req
        self.calls = CallsOut()

    def _base(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": None,
        }

    async def stream(self, job: Job) -> AsyncIterator[bytes]:
        """SSE chunks; the job is abandoned if the client leaves (Starlette cancels us). Events
        that piled up while the client was slow go out in one write."""
        try:
            if job.ahead:
                yield f": queued, {job.ahead} request(s) ahead\n\n".encode()
            async for batch in job.batches():
                data = b"".join(self._sse(event) for event in batch)
                if data:
                    yield data
            yield b"data: [DONE]\n\n"
        finally:
            job.abandon()  # a no-op once it has ended

    def _sse(self, event: Event) -> bytes:
        usage_field = {"usage": None} if self.req.include_usage else {}
        if event.kind == "start":
            return sse(self._chunk({"role": "assistant", "content": ""}, None, usage_field))
        if event.kind == "chunk":
            out = b""
            if event.data.text:
                out = sse(self._chunk({"content": event.data.text}, None, usage_field))
            if deltas := self.calls.deltas(event.data):
                out += sse(self._chunk({"tool_calls": deltas}, None, usage_field))
            return out
        if event.kind == "error":
            return sse(_error_payload(event.data))
        if event.kind == "end":
            outcome, stats = event.data
            last = sse(self._chunk({}, self._finish_reason(outcome, stats), usage_field))
            if self.req.include_usage:
                usage = {
                    **self._base("chat.completion.chunk"),
                    "choices": [],
                    "usage": _usage(stats),
                }
                last += sse(usage)
            return last
        return b""

    async def collect(self, job: Job) -> dict[str, Any]:
        parts: list[str] = []
        async for event in job.events():
            if event.kind == "chunk":
                parts.append(event.data.text)
                self.calls.deltas(event.data)
            elif event.kind == "error":
                return _error_payload(event.data)
            elif event.kind == "end":
                outcome, stats = event.data
                text = "".join(parts)
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                if calls := self.calls.message_calls():
                    # As OpenAI: a reply that only calls tools has null content.
                    message.update(content=text or None, tool_calls=calls)
                return {
                    **self._base("chat.completion"),
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": None,
                            "finish_reason": self._finish_reason(outcome, stats),
                        }
                    ],
                    "usage": _usage(stats),
                }
        return _error_payload(LocalbotError("the reply ended without a result"))

    def _chunk(self, delta: dict, reason: str | None, extra: dict) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {**self._base("chat.completion.chunk"), "choices": [choice], **extra}

    def _finish_reason(self, outcome: str, stats: TurnStats | None) -> str:
        if outcome != "complete" or stats is None:
            return "stop"  # stopped from the page: the reply ends here, as the user asked
        return self.calls.finish_reason(FINISH_REASONS.get(stats.finish_reason, "stop"))


def _usage(stats: TurnStats | None) -> dict[str, Any]:
    stats = stats or TurnStats()
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.output_tokens,
        "total_tokens": stats.prompt_tokens + stats.output_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }


def _error_payload(err: Exception) -> dict[str, Any]:
    kind = "invalid_request_error" if isinstance(err, LocalbotError) else "server_error"
    return {
        "error": {
            "message": one_line(str(err), 1000),
            "type": kind,
            "param": None,
            "code": type(err).__name__,
        }
    }
