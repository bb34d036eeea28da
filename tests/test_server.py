"""``python -m localbot serve`` against its clients: the official ``openai`` package, LangChain's
``ChatOpenAI``, raw HTTP. A real server process on 127.0.0.1 (a port the kernel picks), the real
SmolLM2 model, compared with the same model run in this process."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from langchain_core.messages import HumanMessage, SystemMessage

pytest.importorskip("fastapi", reason="the server extra is not installed")
openai = pytest.importorskip("openai", reason="the test extra is not installed")

from serving import ServerProcess  # noqa: E402

from localbot.chat_model import ChatLlamaCpp  # noqa: E402
from localbot.chatbot import DEFAULT_SYSTEM_PROMPT, build_chatbot  # noqa: E402
from localbot.sessions import SessionStore  # noqa: E402

CTX = 1024
MAX_TOKENS = 200  # the server's default reply length (the page's replies)
SERVER_ARGS = ["--ctx", str(CTX), "--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"
LONG_REPLY = "Write a long story about a dragon who learns to cook."


@pytest.fixture(scope="module")
def server(smol_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    with ServerProcess(smol_model_path, tmp_path_factory.mktemp("serve"), *SERVER_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_model(smol_model_path: Path) -> ChatLlamaCpp:
    """The same model in this process, with the server's settings."""
    return ChatLlamaCpp(
        model_path=str(smol_model_path), n_ctx=CTX, temperature=0, max_tokens=MAX_TOKENS
    )


def history(server: ServerProcess, session: str):
    return SessionStore(server.sessions).get(session).messages


def sse_events(lines):
    """The JSON events of an SSE stream, as they arrive."""
    for line in lines:
        if line.startswith("data: {"):
            yield json.loads(line[6:])


def sse_data(lines) -> list[dict]:
    return list(sse_events(lines))


# ---------------------------------------------------------------------- the openai package
def test_a_plain_completion_is_the_in_process_greedy_reply_with_exact_usage(
    client, local_model: ChatLlamaCpp
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0
    )
    local = [SystemMessage("Be brief."), HumanMessage(QUESTION)]
    expected = local_model.invoke(local, max_tokens=12)
    assert reply.choices[0].message.content == expected.content
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == local_model.get_num_tokens_from_messages(local)
    assert reply.usage.completion_tokens == expected.usage_metadata["output_tokens"]
    assert reply.choices[0].finish_reason == expected.response_metadata["finish_reason"]


def test_a_streamed_completion_ends_with_exact_usage(client, local_model: ChatLlamaCpp) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == local_model.invoke([HumanMessage(QUESTION)], max_tokens=10).content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.prompt_tokens == local_model.get_num_tokens_from_messages([HumanMessage(QUESTION)])
    assert usage.completion_tokens == 10 or chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])


def test_max_tokens_and_stop_are_honoured(client, local_model: ChatLlamaCpp) -> None:
    messages = [{"role": "user", "content": "Count from one to ten in words."}]
    short = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=3, temperature=0
    )
    assert short.usage.completion_tokens == 3
    assert short.choices[0].finish_reason == "length"

    full = local_model.invoke([HumanMessage(messages[0]["content"])], max_tokens=20).content
    word = full.split()[2]  # a word from the middle of the greedy reply
    stopped = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stop=[word]
    )
    assert stopped.choices[0].message.content == full[: full.index(word)]
    assert stopped.choices[0].finish_reason == "stop"


def test_a_prompt_that_does_not_fit_is_a_400_with_the_numbers(
    client, local_model: ChatLlamaCpp
) -> None:
    text = "word " * 1500
    needed = local_model.get_num_tokens_from_messages([HumanMessage(text)])
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": text}],
                max_tokens=16,
                stream=stream,
            )
        error = caught.value.body
        assert error["code"] == "context_length_exceeded"
        assert f"the prompt is {needed} tokens" in error["message"]
        assert str(CTX) in error["message"]
        assert (error["prompt_tokens"], error["max_tokens"], error["context_window"]) == (
            needed,
            16,
            CTX,
        )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("logit_bias", {"1": 5}),
        ("n", 2),
        ("top_logprobs", 2),
    ],
)
def test_an_unsupported_parameter_is_a_400_that_names_it(client, option: str, value) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], **{option: value}
        )
    assert option in caught.value.body["message"]
    assert caught.value.body["param"] == option


def test_models_lists_the_served_model(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


# ---------------------------------------------------------------------- LangChain's ChatOpenAI
def test_langchain_chat_openai_invokes_and_streams(server, local_model: ChatLlamaCpp) -> None:
    chat_openai = pytest.importorskip("langchain_openai").ChatOpenAI
    llm = chat_openai(
        base_url=server.url + "/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=8,
        stream_usage=True,
    )
    expected = local_model.invoke([HumanMessage(QUESTION)], max_tokens=8).content
    reply = llm.invoke(QUESTION)
    assert reply.content == expected
    assert reply.usage_metadata["input_tokens"] == local_model.get_num_tokens_from_messages(
        [HumanMessage(QUESTION)]
    )
    chunks = list(llm.stream(QUESTION))
    assert "".join(c.text for c in chunks) == expected
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == 8


# ---------------------------------------------------------------------- session mode
def test_a_request_naming_a_session_is_one_turn_of_it(client, server, local_model) -> None:
    headers = {"X-Localbot-Session": "api-turns"}
    first = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "My name is Ada."}],
        max_tokens=6,
        temperature=0,
        extra_headers=headers,
    )
    assert first.headers["x-localbot-session"] == "api-turns"
    second = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is my name?"}],
        max_tokens=6,
        temperature=0,
        extra_headers=headers,
    )
    saved = history(server, "api-turns")
    assert [m.type for m in saved] == ["human", "ai", "human", "ai"]
    assert saved[1].content == first.parse().choices[0].message.content
    assert saved[3].content == second.choices[0].message.content
    # The second prompt held the whole conversation, counted exactly.
    prompt = [SystemMessage(DEFAULT_SYSTEM_PROMPT), *saved[:3]]
    assert second.usage.prompt_tokens == local_model.get_num_tokens_from_messages(prompt)
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the KV cache was reused


@pytest.mark.parametrize("session", ["../escape", "a/b", ".hidden", "x" * 65])
def test_hostile_session_names_are_refused(client, server, session: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Localbot-Session": session},
        )
    response = httpx.get(f"{server.url}/api/sessions/{session}/messages")
    assert 400 <= response.status_code < 500
    assert not (server.home / "escape.json").exists()


# ---------------------------------------------------------------------- many clients
def _stream(url: str, body: dict, headers: dict | None = None) -> dict:
    result: dict = {"lines": []}
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", url, json=body, headers=headers or {}) as response,
    ):
        result["queue"] = int(response.headers["x-queue-position"])
        for line in response.iter_lines():
            result["lines"].append(line)
    events = sse_data(result["lines"])
    result["text"] = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")
    )
    return result


def test_eight_concurrent_streams_each_get_their_solo_reply(client, server) -> None:
    topics = ["cats", "rain", "bread", "music", "trains", "snow", "tea", "stars"]
    questions = [f"Tell me one fact about {topic}." for topic in topics]
    solo = [
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": question},
            ],
            max_tokens=8,
            temperature=0,
        )
        .choices[0]
        .message.content
        for question in questions
    ]
    results: list[dict | None] = [None] * len(questions)

    def run(i: int) -> None:
        body = {
            "messages": [{"role": "user", "content": questions[i]}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
        headers = {"X-Localbot-Session": f"crowd-{i}"}
        results[i] = _stream(server.url + "/v1/chat/completions", body, headers)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(r is not None for r in results), "a client did not finish"
    assert [r["text"] for r in results] == solo
    for i, question in enumerate(questions):  # no cross-talk: each session has its own turn
        saved = history(server, f"crowd-{i}")
        assert [(m.type, m.content) for m in saved] == [("human", question), ("ai", solo[i])]
    waited = [r for r in results if r["queue"] > 0]
    assert waited, "no request ever queued"
    for r in waited:  # a queued stream says so first
        assert r["lines"][0].startswith(": queued")


def test_a_client_killed_mid_stream_frees_the_model_within_a_second(
    client, server, local_model: ChatLlamaCpp
) -> None:
    body = {
        "messages": [{"role": "user", "content": LONG_REPLY}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    http = httpx.Client(timeout=60)
    request = http.build_request(
        "POST",
        server.url + "/v1/chat/completions",
        json=body,
        headers={"X-Localbot-Session": "killed"},
    )
    response = http.send(request, stream=True)
    pieces = 0
    for event in sse_events(response.iter_lines()):
        pieces += bool(event["choices"] and event["choices"][0]["delta"].get("content"))
        if pieces == 3:
            break
    response.close()  # the client vanishes mid-reply
    http.close()
    killed_at = time.perf_counter()
    # The next request starts (its first event is sent as its turn begins, before its own
    # prompt is read) within a second: the killed reply no longer holds the model.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as following:
        lines = following.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        started = time.perf_counter() - killed_at
        assert '"role": "assistant"' in first
        assert "data: [DONE]" in list(lines)
    assert started < 1.0, f"the next request started {started:.2f} s after the kill"
    saved = history(server, "killed")
    assert saved[-1].response_metadata["interrupted"] is True
    assert saved[-1].response_metadata["finish_reason"] == "abandoned"
    # Stopped soon after (the reply would run to 400 tokens); slack for a busy CPU.
    assert local_model.get_num_tokens(saved[-1].content) < 40


def test_a_non_streamed_client_that_leaves_frees_the_model_too(server) -> None:
    body = {"messages": [{"role": "user", "content": LONG_REPLY}], "max_tokens": 400}
    with pytest.raises(httpx.ReadTimeout):  # gives up waiting and closes the connection
        httpx.post(
            server.url + "/v1/chat/completions",
            json=body,
            headers={"X-Localbot-Session": "gave-up"},
            timeout=1.5,
        )
    left_at = time.perf_counter()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as following:
        lines = following.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert time.perf_counter() - left_at < 1.0
        assert "data: [DONE]" in list(lines)
    saved = history(server, "gave-up")
    assert saved[-1].response_metadata["finish_reason"] == "abandoned"


def test_a_reader_that_reads_nothing_does_not_hold_the_model(client, server) -> None:
    body = {
        "messages": [{"role": "user", "content": LONG_REPLY}],
        "max_tokens": 150,
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json=body,
            headers={"X-Localbot-Session": "slow-reader"},
        ) as response,
    ):
        # Not reading. Another client is served meanwhile, and the slow one's reply is
        # generated and saved in full: the model never waited for its reader.
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        deadline = time.monotonic() + 30
        while len(history(server, "slow-reader")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        saved = history(server, "slow-reader")
        assert len(saved) == 2
        assert not saved[1].response_metadata.get("interrupted")
        text = "".join(
            e["choices"][0]["delta"].get("content") or ""
            for e in sse_data(response.iter_lines())
            if e.get("choices")
        )
    assert text == saved[1].content


# ---------------------------------------------------------------------- the page's API
def test_the_session_api_lists_creates_renames_and_deletes(server) -> None:
    api = server.url + "/api/sessions"
    assert httpx.post(api, json={"id": "page-a"}).status_code == 201
    assert httpx.post(api, json={"id": "page-a"}).status_code == 409
    ids = [s["id"] for s in httpx.get(api).json()["sessions"]]
    assert "page-a" in ids
    assert httpx.patch(f"{api}/page-a", json={"id": "page-b"}).json() == {"id": "page-b"}
    assert httpx.get(f"{api}/page-b/messages").json()["exists"] is True
    assert httpx.delete(f"{api}/page-b").status_code == 204
    assert httpx.delete(f"{api}/page-b").status_code == 404
    assert not (server.sessions / "page-b.json").exists()


def test_a_page_turn_streams_and_its_meter_matches_the_repl(server, local_model) -> None:
    from localbot.repl_commands import ReplState, cmd_tokens

    api = server.url + "/api/sessions/meter"
    settings = {"system": "Answer in {language}.", "vars": {"language": "French"}}
    assert httpx.put(f"{api}/settings", json=settings).status_code == 200
    with httpx.stream("POST", f"{api}/messages", json={"content": "Hello!"}, timeout=60) as r:
        events = sse_data(r.iter_lines())
    assert [e["type"] for e in events[:2]] == ["queued", "start"]
    done = events[-1]
    assert done["type"] == "done"
    assert done["interrupted"] is False
    text = "".join(e["text"] for e in events if e["type"] == "token")
    assert history(server, "meter")[-1].content == text
    assert done["stats"]["output_tokens"] > 0
    assert httpx.get(f"{api}/stats").json() == done["stats"]

    # The REPL's /tokens on the same session file, with the same model settings.
    bot = build_chatbot(
        local_model,
        SessionStore(server.sessions),
        "Answer in {language}.",
        variables={"language": "French"},
    )
    out = io.StringIO()
    cmd_tokens(ReplState(bot=bot, session="meter", out=out), "")
    meter = done["tokens"]
    assert httpx.get(f"{api}/tokens").json() == meter
    assert (
        f"context window {meter['context_window']} tokens = prompt budget "
        f"{meter['prompt_budget']} + reply {meter['reply_budget']}" in out.getvalue()
    )
    assert f"{meter['messages']} messages, {meter['prompt_tokens']} prompt tokens" in out.getvalue()


def test_stop_saves_the_partial_reply_marked_interrupted_like_ctrl_c(server) -> None:
    api = server.url + "/api/sessions/stopped"
    events = []
    with (
        httpx.Client(timeout=60) as stopper,  # connected before: Stop is one quick request
        httpx.stream("POST", f"{api}/messages", json={"content": LONG_REPLY}, timeout=60) as r,
    ):
        for event in sse_events(r.iter_lines()):
            events.append(event)
            if event["type"] == "token" and sum(e["type"] == "token" for e in events) == 3:
                assert stopper.post(f"{api}/stop", json={}).json() == {"stopped": 1}
    assert events[-1]["type"] == "done"
    assert events[-1]["interrupted"] is True
    assert events[-1]["stats"]["finish_reason"] == "interrupted"
    saved = history(server, "stopped")
    assert saved[-1].response_metadata["interrupted"] is True
    assert saved[-1].response_metadata["finish_reason"] == "interrupted"  # as Ctrl-C saves it
    tokens = sum(e["type"] == "token" for e in events)
    assert tokens < 40  # stopped soon after (the reply would run to 200); slack for a busy CPU
    assert saved[-1].content == "".join(e["text"] for e in events if e["type"] == "token")
    page_view = httpx.get(f"{api}/messages").json()["messages"]
    assert page_view[-1]["interrupted"] is True


# ---------------------------------------------------------------------- security, live
def test_a_foreign_host_header_is_refused(server) -> None:
    response = httpx.get(server.url + "/v1/models", headers={"Host": "rebound.example"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_host"


def test_an_oversized_body_is_a_413(server) -> None:
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * (5 << 20) + b'"}]}'
    response = httpx.post(
        server.url + "/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2Fapp.py",
        "/static/%2e%2e/serve.py",
        "/static/../../serve.py",
        "/static/app.js%00.py",
        "/static/__init__.py",
        "/..%2F..%2Fpyproject.toml",
    ],
)
def test_static_routes_serve_only_the_page_files(server, path: str) -> None:
    response = httpx.get(server.url + path)
    assert 400 <= response.status_code < 500
    assert b"import" not in response.content


def test_the_page_and_its_files_are_served_with_a_strict_policy(server) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "markdown.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 200


def test_no_cors_header_unless_configured(server) -> None:
    response = httpx.get(server.url + "/v1/models", headers={"Origin": "http://other.example"})
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers


def test_errors_carry_no_traceback(server) -> None:
    for response in (
        httpx.post(
            server.url + "/v1/chat/completions",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        ),
        httpx.post(server.url + "/v1/chat/completions", json=[1, 2]),
        httpx.get(server.url + "/nowhere"),
    ):
        assert 400 <= response.status_code < 500
        assert "Traceback" not in response.text
        assert set(response.json()["error"]) >= {"message", "type", "code"}


def test_with_a_key_every_api_route_needs_it(smol_model_path, tmp_path) -> None:
    with ServerProcess(
        smol_model_path,
        tmp_path,
        "--ctx",
        "512",
        "--max-tokens",
        "16",
        env={"LOCALBOT_API_KEY": "k3y"},
    ) as keyed:
        assert httpx.get(keyed.url + "/v1/models").status_code == 401
        assert httpx.get(keyed.url + "/api/sessions").status_code == 401
        wrong = {"Authorization": "Bearer wrong"}
        assert httpx.get(keyed.url + "/v1/models", headers=wrong).status_code == 401
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="k3y", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(keyed.url + "/").status_code == 200  # the page, which asks for the key


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_the_server_cleanly_saving_the_partial_reply(
    smol_model_path, tmp_path, sig: int
) -> None:
    with ServerProcess(smol_model_path, tmp_path, *SERVER_ARGS) as short_lived:
        body = {
            "messages": [{"role": "user", "content": LONG_REPLY}],
            "max_tokens": 400,
            "stream": True,
        }
        got_done = False
        with httpx.stream(
            "POST",
            short_lived.url + "/v1/chat/completions",
            json=body,
            timeout=60,
            headers={"X-Localbot-Session": "terminated"},
        ) as response:
            for count, line in enumerate(response.iter_lines()):
                if count == 6:
                    short_lived.process.send_signal(sig)
                got_done = got_done or line == "data: [DONE]"
        assert got_done  # the stream was ended properly, not cut
        assert short_lived.stop(timeout=20) == 0
        assert "localbot: stopped" in short_lived.output
        assert "Traceback" not in short_lived.output
    saved = SessionStore(tmp_path / "sessions").get("terminated").messages
    assert [m.type for m in saved] == ["human", "ai"]
    assert saved[1].response_metadata["interrupted"] is True
    assert not list((tmp_path / "sessions").glob(".*tmp-*"))
