"""The session API behind the page (``/api/...``): the same session files as the CLI and REPL.

| route | does |
|---|---|
| ``GET /api/info`` | model, context window, version |
| ``GET /api/sessions`` | list sessions, newest first |
| ``POST /api/sessions`` ``{"id"?}`` | create one (named by date if no id) |
| ``PATCH /api/sessions/ID`` ``{"id"}`` | rename |
| ``DELETE /api/sessions/ID`` | delete (with its settings and KV state) |
| ``GET /api/sessions/ID/messages`` | the history (``interrupted`` marks a stopped reply) |
| ``POST /api/sessions/ID/messages`` ``{"content"}`` | send; the reply streams as SSE events |
| ``POST /api/sessions/ID/stop`` | stop its reply: saved and marked interrupted, like Ctrl-C |
| ``GET/PUT /api/sessions/ID/settings`` | the system prompt and variables |
| ``GET /api/sessions/ID/tokens`` | the context meter (the REPL's ``/tokens``) |
| ``GET /api/sessions/ID/stats`` | the last reply's figures (the REPL's ``/stats``) |

The reply stream's events are JSON objects with a ``type``: ``queued`` (``ahead``), ``start``,
``token`` (``text``), then ``done`` (``stats``, ``tokens``, ``interrupted``) or ``error``
(``message``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from langchain_core.messages import HumanMessage
from starlette.concurrency import run_in_threadpool

import localbot
from localbot.chatbot import DEFAULT_SYSTEM_PROMPT
from localbot.errors import LocalbotError, one_line
from localbot.server.app import ServerContext, context, read_json, sse
from localbot.server.engine import Event, Job
from localbot.server.openai_request import RequestError
from localbot.server.turns import check_turn, history_entries, meter, stats_figures
from localbot.session_settings import save_settings
from localbot.sessions import validate_session_id

router = APIRouter(prefix="/api")

MAX_MESSAGE_CHARS = 1 << 20


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    ctx = context(request)
    model = ctx.bot.model
    return {
        "model": ctx.model_id,
        "context_window": model.context_window,
        "max_tokens": model.max_tokens,
        "chat_template": model.template_description(),
        "version": localbot.__version__,
        "queued": ctx.engine.queued,
        "default_session": ctx.defaults.session,
    }


@router.get("/sessions")
async def list_sessions(request: Request) -> dict[str, Any]:
    infos = await run_in_threadpool(context(request).bot.store.list)
    return {
        "sessions": [
            {
                "id": info.id,
                "messages": info.message_count,
                "updated": info.updated.isoformat(),
                "problem": info.problem,
            }
            for info in infos
        ]
    }


@router.post("/sessions", status_code=201)
async def create_session(request: Request) -> dict[str, Any]:
    body = await _object(request)
    name = body.get("id") or datetime.now().strftime("chat-%Y%m%d-%H%M%S")
    store = context(request).bot.store
    session = validate_session_id(name)

    def create() -> None:
        if store.exists(session):
            raise RequestError(f"session {session!r} already exists", "id", "exists", status=409)
        store.get(session).clear()  # an empty history file: the session now exists

    await run_in_threadpool(create)
    return {"id": session}


@router.patch("/sessions/{session}")
async def rename_session(request: Request, session: str) -> dict[str, Any]:
    ctx = context(request)
    new = validate_session_id((await _object(request)).get("id"))
    await _require(ctx, session)
    _not_busy(ctx, session)
    await run_in_threadpool(ctx.bot.store.rename, validate_session_id(session), new)
    ctx.last_stats.pop(session, None)
    return {"id": new}


@router.delete("/sessions/{session}", status_code=204)
async def delete_session(request: Request, session: str) -> Response:
    ctx = context(request)
    await _require(ctx, session)
    _not_busy(ctx, session)
    await run_in_threadpool(ctx.bot.store.delete, validate_session_id(session))
    ctx.last_stats.pop(session, None)
    return Response(status_code=204)


@router.get("/sessions/{session}/messages")
async def read_history(request: Request, session: str) -> dict[str, Any]:
    ctx = context(request)
    store = ctx.bot.store
    validate_session_id(session)

    def read() -> dict[str, Any]:
        exists = store.exists(session)
        if exists:  # the page opened it: its next turn gets ready while the user types
            _prepare(ctx, session)
        return {
            "id": session,
            "exists": exists,
            "messages": history_entries(store.get(session).messages),
        }

    return await run_in_threadpool(read)


@router.get("/sessions/{session}/settings")
async def read_settings(request: Request, session: str) -> dict[str, Any]:
    ctx = context(request)
    validate_session_id(session)
    system, variables = await run_in_threadpool(ctx.defaults.settings, ctx.bot, session)
    return {"system": system, "vars": variables, "default_system": DEFAULT_SYSTEM_PROMPT}


@router.put("/sessions/{session}/settings")
async def write_settings(request: Request, session: str) -> dict[str, Any]:
    ctx = context(request)
    validate_session_id(session)
    body = await _object(request)
    system = body.get("system")
    variables = body.get("vars") or {}
    if system is not None and not isinstance(system, str):
        raise RequestError("system must be a string", "system")
    if not isinstance(variables, dict) or not all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, str) for k, v in variables.items()
    ):
        raise RequestError("vars must map names to strings", "vars")
    system = system.strip() if system and system.strip() else DEFAULT_SYSTEM_PROMPT

    def check_and_save() -> None:
        # The REPL's /system refuses a prompt whose {variables} have no value: so does this.
        ctx.bot.with_settings(system, variables).check_variables(variables)
        save_settings(ctx.bot.store, session, {"system": system, "vars": variables})

    await run_in_threadpool(check_and_save)
    await run_in_threadpool(_prepare, ctx, session)  # the prompt's start changed
    return {"system": system, "vars": variables}


@router.get("/sessions/{session}/tokens")
async def tokens(request: Request, session: str) -> dict[str, Any]:
    ctx = context(request)
    validate_session_id(session)
    return await ctx.engine.call(lambda: meter(ctx.defaults.bot_for(ctx.bot, session), session))


@router.get("/sessions/{session}/stats")
async def stats(request: Request, session: str) -> dict[str, Any]:
    validate_session_id(session)
    return context(request).last_stats.get(session, {})


@router.post("/sessions/{session}/stop")
async def stop(request: Request, session: str) -> dict[str, Any]:
    validate_session_id(session)
    return {"stopped": context(request).engine.stop_session(session)}


@router.post("/sessions/{session}/messages")
async def send_message(request: Request, session: str) -> Response:
    ctx = context(request)
    validate_session_id(session)
    content = (await _object(request)).get("content")
    if not isinstance(content, str) or not content.strip():
        raise RequestError("content must be a non-empty string", "content")
    if len(content) > MAX_MESSAGE_CHARS:
        raise RequestError("the message is too long", "content")
    new = [HumanMessage(content)]

    def prepare():
        bot = ctx.defaults.bot_for(ctx.bot, session)
        check_turn(bot, session, new, None)
        return bot

    bot = await ctx.engine.call(prepare)

    def begin():
        return bot.stream({"messages": new}, {"configurable": {"session_id": session}})

    def finish(outcome: str) -> dict[str, Any]:
        stats = bot.model.last_stats
        if outcome != "complete" and stats is not None:
            stats.finish_reason = outcome  # what the user did, as the REPL's /stats says
        figures = stats_figures(stats, bot.last_turn)
        ctx.last_stats[session] = figures
        return {
            "stats": figures,
            "tokens": meter(bot, session),
            "interrupted": outcome != "complete",
        }

    job = ctx.engine.submit(Job(begin=begin, finish=finish, session=session))
    return StreamingResponse(
        _page_events(job),
        media_type="text/event-stream",
        headers={"X-Queue-Position": str(job.ahead)},
    )


async def _page_events(job: Job) -> AsyncIterator[bytes]:
    try:
        yield sse({"type": "queued", "ahead": job.ahead})
        async for batch in job.batches():
            data = b"".join(_page_event(event) for event in batch)
            if data:
                yield data
    finally:
        job.abandon()  # the page went away mid-reply: stop generating (a no-op once ended)


def _page_event(event: Event) -> bytes:
    if event.kind == "start":
        return sse({"type": "start"})
    if event.kind == "chunk" and event.data.text:
        return sse({"type": "token", "text": event.data.text})
    if event.kind == "end":
        return sse({"type": "done", **event.data})
    if event.kind == "error":
        return sse({"type": "error", "message": one_line(str(event.data), 1000)})
    return b""


# ---------------------------------------------------------------------- helpers
async def _object(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _prepare(ctx: ServerContext, session: str) -> None:
    """Start getting the session's next turn ready in the background (``Chatbot.prepare``);
    a session whose settings cannot be read is left alone (its turn will say why)."""
    with contextlib.suppress(LocalbotError):
        ctx.defaults.bot_for(ctx.bot, session).prepare(session)


def _not_busy(ctx: ServerContext, session: str) -> None:
    if validate_session_id(session) in ctx.engine.busy_sessions():
        raise RequestError(
            f"session {session!r} is replying: stop it first", None, "busy", status=409
        )


async def _require(ctx: ServerContext, session: str) -> None:
    if not await run_in_threadpool(ctx.bot.store.exists, validate_session_id(session)):
        raise RequestError(f"no session {session!r}", None, "not_found", status=404)
