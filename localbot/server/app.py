"""The server application: routes, error shapes and the gatekeeper, around one Chatbot.

``create_app(bot, ...)`` returns the ASGI app that ``localbot.server.command`` hands to uvicorn
(tests may too). The model thread starts with the app and stops with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import localbot
from localbot.chatbot import Chatbot
from localbot.errors import (
    ConfigError,
    ContextOverflowError,
    LocalbotError,
    SessionError,
    one_line,
)
from localbot.server.engine import Engine, Job
from localbot.server.openai_request import RequestError
from localbot.server.security import Guard, error_body
from localbot.server.turns import Defaults

log = logging.getLogger(__name__)


@dataclass
class ServerContext:
    """What every route needs: the chatbot, its model thread, the session defaults."""

    bot: Chatbot
    engine: Engine
    defaults: Defaults
    api_key_required: bool = False
    last_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The /stats figures of each session's last reply (since the server started)."""

    @property
    def model_id(self) -> str:
        return self.bot.model.model_name

    @property
    def model_ids(self) -> set[str]:
        """Names a request may give as ``model``: the file name, with or without ``.gguf``."""
        name = self.model_id
        return {name, name.removesuffix(".gguf")}


def context(request: Request) -> ServerContext:
    return request.app.state.localbot


def create_app(
    bot: Chatbot,
    *,
    bind_host: str = "127.0.0.1",
    api_key: str | None = None,
    cors_origins: Iterable[str] = (),
    defaults: Defaults | None = None,
    max_body: int | None = None,
) -> Guard:
    """The ASGI app serving ``bot``: the OpenAI API, the session API and the page."""
    from localbot.server import openai_api, sessions_api

    engine = Engine()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)
            bot.wait_for_saves()

    app = FastAPI(
        title="localbot",
        version=localbot.__version__,
        lifespan=lifespan,
        docs_url=None,  # the docs page loads its scripts from a CDN: not air-gapped
        redoc_url=None,
        openapi_url=None,
    )
    app.state.localbot = ServerContext(bot, engine, defaults or Defaults(), api_key is not None)
    app.include_router(openai_api.router)
    app.include_router(sessions_api.router)
    _add_static_routes(app)
    _add_error_handlers(app)
    options: dict[str, Any] = {"bind_host": bind_host, "api_key": api_key}
    if max_body is not None:
        options["max_body"] = max_body
    guard = Guard(app, cors_origins=cors_origins, **options)
    guard.engine = engine  # type: ignore[attr-defined]  # for a signal handler to stop jobs
    return guard


# ---------------------------------------------------------------------- errors
def error_response(
    status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, **kw
) -> Response:
    return Response(error_body(message, kind, code, **kw), status, media_type="application/json")


def localbot_error_response(err: LocalbotError) -> Response:
    """A LocalbotError's one-line message with the status it deserves."""
    message = one_line(str(err), 1000)
    if isinstance(err, ContextOverflowError):
        return error_response(400, message, code="context_length_exceeded")
    if isinstance(err, (ConfigError, SessionError)):
        return error_response(400, message, code=type(err).__name__)
    return error_response(500, message, "server_error", type(err).__name__)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_request: Request, err: RequestError) -> Response:
        return error_response(err.status, err.message, code=err.code, param=err.param, **err.extra)

    @app.exception_handler(LocalbotError)
    async def localbot_error(_request: Request, err: LocalbotError) -> Response:
        return localbot_error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> Response:
        return error_response(err.status_code, str(err.detail), code="not_found")

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception) -> Response:
        # The traceback goes to the server's log, never to the client.
        log.error("internal error: %s: %s", type(err).__name__, err, exc_info=True)
        return error_response(500, "internal error (see the server's log)", "server_error")


async def read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):
        raise RequestError("the request body is not valid JSON") from None


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def abandon_on_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to go away, then abandon ``job`` (for non-streamed replies: a
    streamed response is cancelled by Starlette itself when its client leaves)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.abandon()
            return


# ---------------------------------------------------------------------- the page
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
STATIC_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Only our own files run: no inline scripts, nothing fetched from elsewhere.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package: a fixed table, so a request can name only
    these (no path is ever joined with what a client sent)."""
    folder = resources.files("localbot.server") / "static"
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in STATIC_TYPES:
            files[entry.name] = (entry.read_bytes(), STATIC_TYPES[suffix])
    return files


def _add_static_routes(app: FastAPI) -> None:
    files = static_files()

    def serve(name: str) -> Response:
        found = files.get(name)
        if found is None:
            return error_response(404, "no such file", code="not_found")
        body, media_type = found
        return Response(body, media_type=media_type, headers=STATIC_HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return serve("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return serve(name)


__all__ = ["ServerContext", "create_app"]
