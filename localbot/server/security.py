"""The server's gatekeeper: one ASGI middleware that every request passes before any route.

In order:

1. **Host** must name this server (``localhost``, a loopback address, the address it is bound to,
   or with a wildcard bind this machine's names and any IP literal). A page on ``evil.example``
   that re-points its DNS name at 127.0.0.1 (DNS rebinding) sends ``Host: evil.example``: refused.
2. **Origin**, when a browser sends one, must be this server's own or one named by
   ``--cors-origin``. That stops other sites' pages from posting to the API (a "simple" cross-site
   POST needs no preflight). Only named origins get ``Access-Control-Allow-Origin``, never with
   credentials; preflights are answered here.
3. **Bodies** must be JSON and at most ``max_body`` bytes (413 past that, checked while reading,
   whatever Content-Length claims).
4. **Bearer key**: with ``--api-key``, every ``/v1`` and ``/api`` route needs
   ``Authorization: Bearer <key>``, compared in constant time. The page itself (``/``, its static
   files) is public: it holds no data, and asks for the key.

Refusals use the OpenAI error shape, like every other error of this server.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Any]

MAX_BODY_BYTES = 4 << 20
"""A request body larger than this is refused (413): no context window holds that much text."""

PROTECTED_PREFIXES = ("/v1/", "/api/")
BODY_METHODS = ("POST", "PUT", "PATCH")
ALLOWED_HEADERS = "Authorization, Content-Type, X-Localbot-Session"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")


def error_body(message: str, kind: str, code: str | None = None, **extra: Any) -> bytes:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    error = {"message": message, "type": kind, "param": None, "code": code, **extra}
    return json.dumps({"error": error}).encode("utf-8")


class Guard:
    """The middleware (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        bind_host: str,
        api_key: str | None = None,
        cors_origins: Iterable[str] = (),
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.cors_origins = {o.rstrip("/") for o in cors_origins}
        self.max_body = max_body
        self.wildcard = is_wildcard(bind_host)
        names = set(LOOPBACK_NAMES)
        if not is_loopback(bind_host) and not self.wildcard:
            names.add(bind_host.strip("[]").lower())
        if self.wildcard:
            names |= _machine_names()
        self.host_names = names

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        if not self._host_allowed(headers.get("host", "")):
            await _refuse(send, 400, "the Host header does not name this server", "bad_host")
            return
        origin = headers.get("origin")
        cors = origin is not None and self._cors_allowed(origin)
        if origin is not None and not cors and not _same_origin(origin, headers.get("host", "")):
            await _refuse(
                send,
                403,
                f"cross-origin request from {origin[:100]} refused: start the server with "
                "--cors-origin ORIGIN to allow that page",
                "origin_not_allowed",
            )
            return
        cors_headers = _cors_headers(origin) if cors else []
        if method == "OPTIONS" and "access-control-request-method" in headers:
            await _preflight(send, cors_headers)
            return
        send = _adding_headers(send, cors_headers)
        needs_key = self.api_key is not None and path.startswith(PROTECTED_PREFIXES)
        if needs_key and not self._key_matches(headers.get("authorization", "")):
            await _refuse(
                send,
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                "the server's --api-key",
                "invalid_api_key",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if method in BODY_METHODS:
            await self._with_body(scope, receive, send, headers)
            return
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ checks
    def _host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        if name is None:
            return False
        if name in self.host_names:
            return True
        return self.wildcard and _is_ip(name)

    def _cors_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/") in self.cors_origins

    def _key_matches(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or self.api_key is None:
            return False
        # compare_digest's time depends only on the lengths, not on where the bytes differ.
        return hmac.compare_digest(token.strip().encode("utf-8"), self.api_key)

    async def _with_body(self, scope: dict, receive: Callable, send: Callable, headers) -> None:
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            await _refuse(
                send, 415, "send the request body as JSON (Content-Type: application/json)", None
            )
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await _refuse(send, 413, self._too_large(), "body_too_large")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await _refuse(send, 413, self._too_large(), "body_too_large")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body >> 20} MiB"


# ---------------------------------------------------------------------- helpers
def _headers(scope: dict) -> dict[str, str]:
    """Request headers, lower-cased names; a repeated header keeps its first value."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _host_name(host: str) -> str | None:
    """The name in a Host header without its port, lower-cased; None if malformed."""
    host = host.strip().lower()
    if not host:
        return None
    try:
        parts = urlsplit("//" + host)
        name = parts.hostname
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _same_origin(origin: str, host: str) -> bool:
    try:
        netloc = urlsplit(origin).netloc.lower()
    except ValueError:
        return False
    return bool(netloc) and netloc == host.strip().lower()


def _machine_names() -> set[str]:
    names = {socket.gethostname().lower()}
    with contextlib.suppress(OSError):  # a broken resolver: the host name alone
        names.add(socket.getfqdn().lower())
    return names


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"vary", b"Origin"),
    ]


async def _preflight(send: Callable, cors_headers: list[tuple[bytes, bytes]]) -> None:
    headers = list(cors_headers)
    if cors_headers:
        headers += [
            (b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE"),
            (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
            (b"access-control-max-age", b"600"),
        ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _adding_headers(send: Callable, extra: list[tuple[bytes, bytes]]) -> Callable:
    if not extra:
        return send

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def _replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that hands over the body already read, then waits on the real one (so a
    disconnect is still seen)."""
    sent = False

    async def wrapped() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


async def _refuse(
    send: Callable,
    status: int,
    message: str,
    code: str | None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = error_body(message, kind, code)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
