"""The server's parts that need no model: the request reader, the gatekeeper and the model
thread's queue (driven by plain generators standing in for replies)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed")

from localbot.server.engine import Engine, Job, Stopped
from localbot.server.openai_request import RequestError, parse_request
from localbot.server.security import Guard

MODELS = {"m.gguf", "m"}
USER = [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------------- the request reader
def test_a_plain_request_uses_every_field_it_names() -> None:
    req = parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": "\n",
            "n": 1,
            "user": "someone",
        },
        MODELS,
    )
    assert [m.type for m in req.messages] == ["system", "human"]
    assert req.messages[1].content == "ab"
    assert (req.stream, req.include_usage, req.max_tokens) == (True, True, 7)
    assert req.sampling == {"temperature": 0.0, "top_p": 0.5, "seed": 3, "stop": ["\n"]}


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"n": 2}, "n"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "grammar", "grammar": "root ::= x"}}, "response_format"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
def test_anything_unsupported_is_refused_by_name(extra: dict, named: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request({"messages": USER, **extra}, MODELS)
    assert caught.value.param == named
    assert caught.value.status == 400


def test_another_model_name_is_a_404_listing_what_is_served() -> None:
    with pytest.raises(RequestError) as caught:
        parse_request({"model": "gpt-4o", "messages": USER}, MODELS)
    assert caught.value.status == 404
    assert "m.gguf" in caught.value.message


def test_null_means_not_given() -> None:
    req = parse_request({"messages": USER, "tools": None, "stop": None, "seed": None}, MODELS)
    assert req.sampling == {}


# ---------------------------------------------------------------------- the gatekeeper
async def _ok_app(scope, receive, send) -> None:
    body = b""
    if scope["method"] in ("POST", "PUT"):
        body = (await receive())["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok:" + body})


def _client(**options) -> httpx.AsyncClient:
    guard = Guard(_ok_app, **{"bind_host": "127.0.0.1", **options})
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://127.0.0.1")


async def test_the_key_is_needed_on_api_routes_but_not_for_the_page() -> None:
    async with _client(api_key="s3cret") as client:
        assert (await client.get("/v1/models")).status_code == 401
        wrong = await client.get("/api/sessions", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert wrong.headers["www-authenticate"] == "Bearer"
        right = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200
        assert (await client.get("/")).status_code == 200


@pytest.mark.parametrize(
    ("bind", "host", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1:8080", True),
        ("127.0.0.1", "localhost:8080", True),
        ("127.0.0.1", "[::1]:8080", True),
        ("127.0.0.1", "evil.example:8080", False),
        ("127.0.0.1", "192.168.1.5:8080", False),
        ("127.0.0.1", "", False),
        ("0.0.0.0", "192.168.1.5:8080", True),
        ("0.0.0.0", "evil.example", False),
        ("192.168.1.5", "192.168.1.5", True),
        ("192.168.1.5", "10.0.0.1", False),
    ],
)
async def test_the_host_header_must_name_this_server(bind: str, host: str, allowed: bool) -> None:
    async with _client(bind_host=bind, api_key="k") as client:
        response = await client.get("/", headers={"Host": host})
    assert (response.status_code == 200) is allowed


async def test_other_origins_are_refused_and_get_no_cors_headers() -> None:
    async with _client() as client:
        foreign = await client.post(
            "/v1/chat/completions",
            headers={"Origin": "http://evil.example", "Content-Type": "application/json"},
            content=b"{}",
        )
        assert foreign.status_code == 403
        assert "access-control-allow-origin" not in foreign.headers
        same = await client.get("/api/x", headers={"Origin": "http://127.0.0.1"})
        assert same.status_code == 200
        assert "access-control-allow-origin" not in same.headers


async def test_a_named_origin_gets_cors_without_credentials() -> None:
    async with _client(cors_origins=["http://app.example"], api_key="k") as client:
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-credentials" not in preflight.headers
        refused = await client.get("/v1/models", headers={"Origin": "http://app.example"})
        assert refused.status_code == 401  # CORS lets the page read the refusal; no key, no data
        assert refused.headers["access-control-allow-origin"] == "http://app.example"


async def test_bodies_must_be_json_and_small() -> None:
    async with _client(max_body=1000) as client:
        json_headers = {"Content-Type": "application/json"}
        assert (await client.post("/api/x", content=b"{}", headers=json_headers)).text == "ok:{}"
        text = await client.post("/api/x", content=b"{}", headers={"Content-Type": "text/plain"})
        assert text.status_code == 415

        big = await client.post("/api/x", content=b"x" * 1001, headers=json_headers)
        assert big.status_code == 413

        async def chunks():  # no Content-Length: counted while read
            for _ in range(20):
                yield b"x" * 100

        streamed = await client.post("/api/x", content=chunks(), headers=json_headers)
        assert streamed.status_code == 413


# ---------------------------------------------------------------------- the model thread
def _tokens(name: str, count: int, log: list[str], delay: float = 0.0):
    try:
        for i in range(count):
            time.sleep(delay)
            log.append(f"{name}{i}")
            yield f"{name}{i}"
    except Stopped:
        log.append(f"{name}:stopped")
        raise
    except GeneratorExit:
        log.append(f"{name}:closed")
        raise


async def _collect(job: Job) -> list[tuple[str, object]]:
    return [(e.kind, e.data) async for e in job.events()]


@pytest.fixture
async def engine():
    engine = Engine()
    engine.start()
    yield engine
    await asyncio.get_running_loop().run_in_executor(None, engine.close)


async def test_generations_run_one_at_a_time_in_arrival_order(engine: Engine) -> None:
    log: list[str] = []
    jobs = [engine.submit(Job(begin=lambda n=name: _tokens(n, 3, log, 0.005))) for name in "abc"]
    assert [job.ahead for job in jobs] == [0, 1, 2]
    results = await asyncio.gather(*(_collect(job) for job in jobs))
    assert log == ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1", "c2"]
    for name, events in zip("abc", results, strict=True):
        assert events[0] == ("start", None)
        assert [d for k, d in events if k == "chunk"] == [f"{name}{i}" for i in range(3)]
        assert events[-1] == ("end", "complete")


async def test_quick_calls_run_between_two_tokens(engine: Engine) -> None:
    log: list[str] = []
    job = engine.submit(Job(begin=lambda: _tokens("a", 50, log, 0.01)))
    events = job.events()
    await anext(events)  # started
    await anext(events)
    assert await engine.call(lambda: len(log)) < 50  # answered mid-reply, not after it
    async for _ in events:
        pass


async def test_an_abandoned_job_stops_within_a_token_and_frees_the_model(engine: Engine) -> None:
    log: list[str] = []
    abandoned = threading.Event()

    def reply():
        # The first token, then the rest once the client has left: "within a token" is then
        # exact, however late the event loop sees the first one.
        tokens = _tokens("a", 1000, log, 0.005)
        yield next(tokens)
        abandoned.wait(10)
        yield from tokens

    first = engine.submit(Job(begin=reply))
    second = engine.submit(Job(begin=lambda: _tokens("b", 2, log)))
    events = first.events()
    while (await anext(events)).kind != "chunk":
        pass
    first.abandon()
    abandoned.set()
    rest = [e async for e in events]
    assert rest[-1].kind == "end"
    assert rest[-1].data == "abandoned"
    assert "a:closed" in log
    assert len([e for e in rest if e.kind == "chunk"]) <= 2
    assert (await _collect(second))[-1] == ("end", "complete")


async def test_stop_unwinds_a_reply_like_ctrl_c(engine: Engine) -> None:
    log: list[str] = []
    job = engine.submit(Job(begin=lambda: _tokens("a", 1000, log, 0.005), session="s"))
    events = job.events()
    while (await anext(events)).kind != "chunk":
        pass
    assert engine.stop_session("s") == 1
    rest = [e async for e in events]
    assert rest[-1].data == "interrupted"
    assert "a:stopped" in log


async def test_a_job_abandoned_while_queued_never_starts(engine: Engine) -> None:
    log: list[str] = []
    first = engine.submit(Job(begin=lambda: _tokens("a", 5, log, 0.01)))
    second = engine.submit(Job(begin=lambda: _tokens("b", 5, log)))
    second.abandon()
    await _collect(first)
    events = await _collect(second)
    assert events[-1][0] == "error"
    assert not any(entry.startswith("b") for entry in log)


async def test_a_reader_that_never_reads_does_not_hold_the_model(engine: Engine) -> None:
    log: list[str] = []
    slow = engine.submit(Job(begin=lambda: _tokens("a", 200, log)))
    quick = engine.submit(Job(begin=lambda: _tokens("b", 2, log)))
    # Nobody reads `slow` yet; `quick` still finishes, after all of `slow` was generated.
    assert (await asyncio.wait_for(_collect(quick), 10))[-1] == ("end", "complete")
    assert len([e for e in await _collect(slow) if e[0] == "chunk"]) == 200


async def test_an_error_in_a_reply_is_reported_without_its_traceback(engine: Engine) -> None:
    def broken():
        yield "x"
        raise ValueError("secret internals")

    events = await _collect(engine.submit(Job(begin=broken)))
    kind, error = events[-1]
    assert kind == "error"
    assert "secret" not in str(error)
    assert "internal error" in str(error)


def test_close_abandons_the_running_reply() -> None:
    log: list[str] = []
    engine = Engine()
    engine.start()

    async def run() -> None:
        job = engine.submit(Job(begin=lambda: _tokens("a", 10_000, log, 0.001)))
        events = job.events()
        await anext(events)
        closer = threading.Thread(target=engine.close)
        closer.start()
        rest = [e async for e in events]
        closer.join()
        assert rest[-1].data == "abandoned"

    asyncio.run(run())
    assert "a:closed" in log


# ---------------------------------------------------------------------- the serve command
def _serve(*args: str, prelude: str = "pass") -> subprocess.CompletedProcess:
    code = f"{prelude}; from localbot.__main__ import main; raise SystemExit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(result: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("localbot: error: ")
    assert text in result.stderr


def test_serve_beyond_loopback_without_a_key_is_refused() -> None:
    result = _serve("--host", "0.0.0.0", "--port", "0")
    _one_line_error(result, 2, "refusing to serve on 0.0.0.0 without --api-key")


def test_serve_on_a_taken_port_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _serve("--port", str(port))
    _one_line_error(result, 2, f"cannot listen on 127.0.0.1:{port}")


def test_serve_without_the_server_extra_says_what_to_install() -> None:
    result = _serve(prelude="import sys; sys.modules['fastapi'] = None")
    _one_line_error(result, 1, 'pip install -e ".[server]"')


def test_chat_only_flags_are_refused_by_serve() -> None:
    _one_line_error(_serve("-p", "hi"), 2, "--prompt is for the terminal chat")
    _one_line_error(_serve("--plain"), 2, "--plain is for the terminal chat")


def test_serve_help_lists_the_server_flags_and_not_the_chat_only_ones() -> None:
    result = _serve("--help")
    assert result.returncode == 0
    for flag in ("--host", "--port", "--api-key", "--cors-origin", "--model", "--ctx"):
        assert flag in result.stdout
    for chat_flag in ("--prompt", "--json", "--plain"):
        assert chat_flag not in result.stdout
