"""The web API over real HTTP: the real app under uvicorn on 127.0.0.1, the real chat service (tiny
random-weight model, SQLite store), httpx as the client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from adapters.web import SESSION_COOKIE, STATIC_DIR, WebAdapter
from bot.core.service import ChatService
from bot.errors import ConfigError
from bot.events import ThreadKey
from tests.fakes.scripted import scripted_turn

StartWeb = Callable[..., Awaitable[str]]
TOKEN = "s3cret-web-token-123"




async def start_adapter(adapter: WebAdapter) -> asyncio.Task[None]:
    """Run the adapter as `raven run` does (a task in this loop); return once it accepts connections."""
    task = asyncio.create_task(adapter.run())
    ready = asyncio.create_task(adapter.wait_started())
    done, _ = await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            task.result()  # raises what run() raised
        raise AssertionError("the web adapter did not start within 10 s")
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
async def start_web(service: ChatService, settings_factory: Any) -> AsyncIterator[StartWeb]:
    tasks: list[asyncio.Task[None]] = []

    async def start(**overrides: Any) -> str:
        adapter = WebAdapter(service, settings_factory(web={"port": 0, **overrides}).web)
        tasks.append(await start_adapter(adapter))
        return adapter.url

    yield start
    for task in tasks:
        await stop(task)


@pytest.fixture
async def client(start_web: StartWeb) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=await start_web(), timeout=60) as http:
        yield http


def ask(message: str, user: str = "alice", discussion: Any = "1", persona: str | None = "SQLAdvisor") -> dict[str, Any]:
    body: dict[str, Any] = {"user_message": message, "user_id": user, "discussion_id": discussion}
    if persona is not None:
        body["prompt_file"] = persona
    return body


async def read_sse(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, list[tuple[str, Any]]]:
    """POST to the stream endpoint; the events in arrival order, as (name, parsed JSON data)."""
    events: list[tuple[str, Any]] = []
    async with client.stream("POST", "/generate-response/stream", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response, events
        name = "message"
        data: list[str] = []
        async for line in response.aiter_lines():
            if line == "":
                if data:
                    events.append((name, json.loads("\n".join(data))))
                name, data = "message", []
            elif line.startswith(":"):
                continue
            elif line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))
    return response, events


def as_stored(text: str) -> str:
    """The store keeps a reply stripped, with blank lines folded (a blank line ends a turn)."""
    return re.sub(r"\n\s*\n+", "\n", text.strip())


# --- the seed's endpoint --------------------------------------------------------------------------------


async def test_seed_request_returns_generated_text_in_an_sql_thread(
    client: httpx.AsyncClient, service: ChatService
) -> None:
    key = ThreadKey("web", "alice/1")
    response = await client.post("/generate-response", json=ask("Why is my join slow?", discussion=1))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"generated_text", "outcome", "notice"}  # the seed's field, and how the turn ended
    assert isinstance(body["generated_text"], str) and body["generated_text"].strip()
    assert body["outcome"] in ("answered", "cut_off")
    assert (body["notice"] is None) == (body["outcome"] == "answered")

    thread = await service.thread(key)
    assert thread is not None and thread.persona == "sql"
    messages = await service.thread_messages(key)
    assert [m.role for m in messages] == ["user", "user", "assistant"]
    assert messages[0].text == "/advisor sql Why is my join slow?"  # new thread: switch and ask at once
    assert messages[1].text == "Why is my join slow?"
    assert messages[1].author == "alice"
    assert body["generated_text"].endswith(messages[2].text)

    # Same persona again: the message goes through as it is and continues from the saved state.
    response = await client.post("/generate-response", json=ask("And with an index?", discussion="1"))
    assert response.status_code == 200, response.text
    messages = await service.thread_messages(key)
    assert [m.text for m in messages if m.role == "user"][-1] == "And with an index?"
    assert sum(m.text.startswith("/advisor") for m in messages) == 1
    assert as_stored(response.json()["generated_text"]) == messages[-1].text
    turn = service.last_turn(key)
    assert turn is not None and turn.resumed_from in ("memory", "store")

    # Another persona switches the thread; a plain persona name works as well as the seed's file name.
    response = await client.post("/generate-response", json=ask("Plan the migration", persona="ProjectAdvisor"))
    assert response.status_code == 200, response.text
    thread = await service.thread(key)
    assert thread is not None and thread.persona == "project"
    response = await client.post("/generate-response", json=ask("Back to SQL", persona="sql"))
    assert response.status_code == 200
    thread = await service.thread(key)
    assert thread is not None and thread.persona == "sql"
    messages = await service.thread_messages(key)
    assert [m.text for m in messages if m.text.startswith("/advisor")] == [
        "/advisor sql Why is my join slow?", "/advisor project Plan the migration", "/advisor sql Back to SQL",
    ]


async def test_commands_pass_through_and_no_persona_keeps_the_threads(
    client: httpx.AsyncClient, service: ChatService
) -> None:
    key = ThreadKey("web", "alice/cmd")
    assert (await client.post("/generate-response", json=ask("hello", discussion="cmd"))).status_code == 200
    response = await client.post("/generate-response", json=ask("/reset", discussion="cmd"))
    assert response.status_code == 200
    assert "Started over" in response.json()["generated_text"]
    response = await client.post("/generate-response", json=ask("go on", discussion="cmd", persona=None))
    assert response.status_code == 200
    thread = await service.thread(key)
    assert thread is not None and thread.persona == "sql"
    user_texts = [m.text for m in await service.thread_messages(key) if m.role == "user"]
    assert user_texts == ["/advisor sql hello", "hello", "/reset", "go on"]


# --- streaming ---------------------------------------------------------------------------------------


async def test_stream_delivers_tokens_in_order_and_ends_with_done(
    client: httpx.AsyncClient, service: ChatService
) -> None:
    key = ThreadKey("web", "alice/s1")
    first = await client.post("/generate-response", json=ask("Index advice please", discussion="s1"))
    assert first.status_code == 200

    response, events = await read_sse(client, ask("Tell me more", discussion="s1"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in events]
    assert names[-1] == "done" and names.count("done") == 1
    assert set(names[:-1]) == {"token"} and len(names) > 3
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert events[-1][1]["generated_text"] == streamed
    messages = await service.thread_messages(key)
    assert messages[-1].role == "assistant"
    assert messages[-1].text == as_stored(streamed)
    assert messages[-2].text == "Tell me more"


async def test_a_reader_who_leaves_mid_stream_does_not_break_the_thread(
    client: httpx.AsyncClient, service: ChatService
) -> None:
    key = ThreadKey("web", "alice/gone")
    async with client.stream("POST", "/generate-response/stream", json=ask("hi", discussion="gone")) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event: token"):
                break  # close the connection after the first token
    await service.drain()  # the core finishes and stores the reply anyway
    assert [m.role for m in await service.thread_messages(key)] == ["user", "user", "assistant"]
    response = await client.post("/generate-response", json=ask("still there?", discussion="gone"))
    assert response.status_code == 200 and response.json()["generated_text"]
    assert [m.role for m in await service.thread_messages(key)][-2:] == ["user", "assistant"]


async def test_stream_on_a_new_thread_switches_persona_first(
    client: httpx.AsyncClient, service: ChatService
) -> None:
    response, events = await read_sse(client, ask("Plan a sprint", discussion="s2", persona="ProjectAdvisor"))
    assert response.status_code == 200
    assert events[-1][0] == "done"
    streamed = "".join(data["text"] for name, data in events if name == "token")
    assert streamed.startswith("Now talking with **Project advisor**")
    thread = await service.thread(ThreadKey("web", "alice/s2"))
    assert thread is not None and thread.persona == "project"
    messages = await service.thread_messages(ThreadKey("web", "alice/s2"))
    assert streamed.endswith(messages[-1].text) and messages[-1].role == "assistant"


async def test_an_unexpected_failure_gets_a_short_notice_and_a_logged_traceback(
    client: httpx.AsyncClient, service: ChatService, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A model step that fails after the first token: the core logs the traceback and reports a failure.
    backend = service.engine.backend
    real_decode = backend.decode

    def broken(tokens: Any) -> Any:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(backend, "decode", broken)
    response = await client.post("/generate-response", json=ask("hi", discussion="boom"))
    assert response.status_code == 500 and "try again" in response.json()["detail"]
    assert response.json()["reason"] == "failed"
    failures = [r for r in caplog.records if r.exc_info and "engine exploded" in str(r.exc_info[1])]
    assert failures  # the traceback is in the server log
    monkeypatch.setattr(backend, "decode", real_decode)

    # A failure after text was streamed: the stream carries it, then an error event, then done.
    monkeypatch.setattr(service, "reply", lambda event: scripted_turn(["par", "tial"], fail=True))
    response, events = await read_sse(client, ask("hi", discussion="boom2"))
    assert response.status_code == 200
    assert [name for name, _ in events] == ["token", "token", "error", "done"]
    assert "try again" in events[2][1]["detail"] and events[3][1]["generated_text"] == "partial"
    monkeypatch.undo()
    assert (await client.get("/healthz")).status_code == 200  # still serving
    ok = await client.post("/generate-response", json=ask("hi again", discussion="boom"))
    assert ok.status_code == 200


# --- reading threads -------------------------------------------------------------------------------


async def test_history_endpoint_returns_the_thread_log(client: httpx.AsyncClient, service: ChatService) -> None:
    await client.post("/generate-response", json=ask("first question", discussion="h1"))
    await client.post("/generate-response", json=ask("second question", discussion="h1"))

    response = await client.get("/users/alice/threads/h1/messages")
    assert response.status_code == 200
    body = response.json()
    assert body["discussion_id"] == "h1" and body["persona"] == "sql"
    stored = await service.thread_messages(ThreadKey("web", "alice/h1"))
    assert [(m["role"], m["text"]) for m in body["messages"]] == [(m.role, m.text) for m in stored]
    assert [m["role"] for m in body["messages"]] == ["user", "user", "assistant", "user", "assistant"]
    assert body["messages"][3]["text"] == "second question"
    assert all(isinstance(m["created_at"], float) for m in body["messages"])

    assert (await client.get("/users/alice/threads/nope/messages")).status_code == 404
    assert (await client.get("/users/bob/threads/h1/messages")).status_code == 404
    bad = await client.get("/users/al%20ice/threads/h1/messages")
    assert bad.status_code == 422 and "user_id" in bad.json()["detail"]


async def test_threads_list_is_per_user_newest_first(client: httpx.AsyncClient) -> None:
    await client.post("/generate-response", json=ask("alice one", discussion="a1"))
    await client.post("/generate-response", json=ask("alice two", discussion="a2", persona="ProjectAdvisor"))
    await client.post("/generate-response", json=ask("bob one", user="bob", discussion="a1"))
    await client.post("/generate-response", json=ask("alice2 one", user="alice2", discussion="z"))

    threads = (await client.get("/users/alice/threads")).json()
    assert [t["discussion_id"] for t in threads] == ["a2", "a1"]
    assert [t["persona"] for t in threads] == ["project", "sql"]
    assert [t["title"] for t in threads] == ["alice two", "alice one"]  # the question, not the /advisor
    assert threads[0]["updated_at"] >= threads[1]["updated_at"]

    # a message moves a thread to the top
    await client.post("/generate-response", json=ask("alice again", discussion="a1"))
    assert [t["discussion_id"] for t in (await client.get("/users/alice/threads")).json()] == ["a1", "a2"]

    assert [t["discussion_id"] for t in (await client.get("/users/bob/threads")).json()] == ["a1"]
    assert (await client.get("/users/carol/threads")).json() == []
    assert (await client.get("/users/a%2Fb/threads")).status_code in (404, 422)


async def test_personas_endpoint(client: httpx.AsyncClient, service: ChatService) -> None:
    response = await client.get("/personas")
    assert response.status_code == 200
    personas = response.json()
    assert {p["name"] for p in personas} == {p.name for p in service.personas()}
    assert {"sql", "project", "default"} <= {p["name"] for p in personas}
    sql = next(p for p in personas if p["name"] == "sql")
    assert sql["display_name"] == "SQL advisor" and sql["description"]


# --- bad requests ------------------------------------------------------------------------------------


async def test_bad_requests_get_clear_4xx(start_web: StartWeb, service: ChatService) -> None:
    base = await start_web(max_body_bytes=2048)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        headers = {"Content-Type": "application/json"}

        response = await client.post("/generate-response", content=b"{not json", headers=headers)
        assert response.status_code == 400 and "not valid JSON" in response.json()["detail"]

        response = await client.post("/generate-response", content=b"[1, 2]", headers=headers)
        assert response.status_code == 400 and "JSON object" in response.json()["detail"]

        response = await client.post("/generate-response", json={"user_id": "alice", "discussion_id": "1"})
        assert response.status_code == 422
        assert response.json()["detail"] == "user_message: Field required"

        response = await client.post("/generate-response", json=ask("   "))
        assert response.status_code == 422 and "must not be empty" in response.json()["detail"]

        response = await client.post("/generate-response", json=ask("hi", user="a/b"))
        assert response.status_code == 422 and "user_id" in response.json()["detail"]

        response = await client.post("/generate-response", json=ask("hi", discussion="x" * 65))
        assert response.status_code == 422 and "discussion_id" in response.json()["detail"]

        response = await client.post("/generate-response", json=ask("hi", discussion=True))
        assert response.status_code == 422

        response = await client.post("/generate-response", json=ask("hi", persona="Oracle"))
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert "unknown persona 'Oracle'" in detail
        assert all(name in detail for name in ("sql", "project", "default"))

        response = await client.post("/generate-response", content=json.dumps(ask("hi")).encode(),
                                     headers={"Content-Type": "text/plain"})
        assert response.status_code == 415 and "application/json" in response.json()["detail"]

        big = ask("x" * 3000)
        response = await client.post("/generate-response", json=big)
        assert response.status_code == 413 and "2048 bytes" in response.json()["detail"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
            for _ in range(4):
                yield b" " * 1024

        response = await client.post("/generate-response", content=chunks(), headers=headers)
        assert response.status_code == 413

        response, events = await read_sse(client, big)  # the stream endpoint checks before streaming
        assert response.status_code == 413 and events == []
        response, events = await read_sse(client, ask("hi", persona="Oracle"))
        assert response.status_code == 422 and events == [] and "Oracle" in response.json()["detail"]

    assert await service.list_threads("web") == []  # nothing reached the core


# --- security ----------------------------------------------------------------------------------------


async def test_token_required_when_configured(
    start_web: StartWeb, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = await start_web(token=TOKEN)
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        response = await client.post("/generate-response", json=ask("hi"))
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "RAVEN_WEB_TOKEN" in response.json()["detail"]
        response = await client.post("/generate-response", json=ask("hi"),
                                     headers={"Authorization": f"Bearer {TOKEN}x"})
        assert response.status_code == 401
        response = await client.post("/generate-response", json=ask("hi"), headers=good)
        assert response.status_code == 200 and response.json()["generated_text"]

        for path in ("/personas", "/users/alice/threads", "/users/alice/threads/1/messages", "/openapi.json"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers=good)).status_code == 200, path
        response, events = await read_sse(client, ask("more"))
        assert response.status_code == 401 and events == []

        # The page: a sign-in form without the token; "?token=" once swaps it for a session cookie.
        response = await client.get("/")
        assert response.status_code == 401 and 'action="/login"' in response.text
        response = await client.get("/", params={"token": "wrong"})
        assert response.status_code == 401 and "Wrong token" in response.text
        response = await client.get("/", params={"token": TOKEN})
        assert response.status_code == 303 and response.headers["location"] == "/"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower() and TOKEN not in cookie
        response = await client.get("/")  # the client kept the cookie
        assert response.status_code == 200 and 'id="composer"' in response.text
        assert (await client.get("/users/alice/threads")).status_code == 200
        assert (await client.post("/logout")).status_code == 303
        assert (await client.get("/users/alice/threads")).status_code == 401

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.post("/login", data={"token": "nope"})
        assert response.status_code == 401
        response = await client.post("/login", data={"token": TOKEN})
        assert response.status_code == 303
        assert (await client.get("/personas")).status_code == 200

    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logged = "\n".join(r.getMessage() for r in server_side)
    assert "web POST /generate-response -> 200" in logged  # requests are logged ...
    assert TOKEN not in logged  # ... but never the token


async def test_cors_only_for_configured_origins(start_web: StartWeb) -> None:
    preflight = {"Origin": "http://tools.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    async with httpx.AsyncClient(base_url=await start_web(), timeout=30) as client:
        response = await client.options("/generate-response", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        response = await client.get("/personas", headers={"Origin": "http://tools.example"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers

    base = await start_web(cors_origins="http://tools.example")
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        response = await client.options("/generate-response", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://tools.example"
        response = await client.options("/generate-response", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in response.headers


# --- the page and the docs ----------------------------------------------------------------------------


async def test_page_loads_only_its_own_assets(client: httpx.AsyncClient) -> None:
    assert str(client.base_url).startswith("http://127.0.0.1:")
    response = await client.get("/")  # no token configured: open, on loopback only
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    page = response.text
    assert '<meta name="viewport"' in page
    for name in ("index.html", "app.js", "style.css", "login.html"):
        text = (STATIC_DIR / name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), f"{name} refers to another site"
    for asset in ("/static/app.js", "/static/style.css"):
        assert f'"{asset}"' in page
        served = await client.get(asset)
        assert served.status_code == 200 and served.content == (STATIC_DIR / asset.rsplit("/", 1)[1]).read_bytes()
    assert "@media (max-width" in (STATIC_DIR / "style.css").read_text()  # the phone layout

    # The API's description, and FastAPI's docs page (the only page that loads a CDN script).
    schema = (await client.get("/openapi.json")).json()
    assert {"/generate-response", "/generate-response/stream", "/personas", "/users/{user_id}/threads",
            "/users/{user_id}/threads/{discussion_id}/messages"} <= set(schema["paths"])
    request = schema["paths"]["/generate-response"]["post"]["requestBody"]["content"]["application/json"]
    assert {"user_message", "user_id", "discussion_id"} <= set(request["schema"]["required"])
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


# --- lifecycle ---------------------------------------------------------------------------------------


async def test_adapter_stops_when_cancelled_and_reports_a_busy_port(
    service: ChatService, settings_factory: Any
) -> None:
    adapter = WebAdapter(service, settings_factory(web={"port": 0}).web)
    task = await start_adapter(adapter)
    url = adapter.url
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}

        busy = WebAdapter(service, settings_factory(web={"port": adapter.port}).web)
        with pytest.raises(ConfigError, match="RAVEN_WEB_PORT"):
            await busy.run()

        await stop(task)
        with pytest.raises(httpx.ConnectError):
            await client.get("/healthz")

    with pytest.raises(ConfigError, match="RAVEN_WEB_TOKEN"):  # beyond localhost only with a token
        WebAdapter(service, settings_factory(web={"host": "0.0.0.0"}).web)
    assert WebAdapter(service, settings_factory(web={"host": "0.0.0.0", "token": TOKEN}).web).app is not None


# --- outcomes as HTTP ------------------------------------------------------------------------------


async def test_busy_is_503_with_retry_after_and_the_message_is_kept(settings_factory: Any) -> None:
    from bot.app.assembly import open_service
    from bot.events import Event

    settings = settings_factory(max_batch=1, max_queue=1, max_reply_tokens=300, web={"port": 0})
    async with open_service(settings) as service:
        adapter = WebAdapter(service, settings.web)
        task = await start_adapter(adapter)
        try:
            streaming = service.reply(Event(ThreadKey("web", "x/a"), "x", "x", "hi"))
            await anext(streaming)  # holds the only place in the batch
            queued = service.reply(Event(ThreadKey("web", "x/b"), "x", "x", "hi"))
            for _ in range(500):  # until it waits in the engine's queue
                if service.engine.queued:
                    break
                await asyncio.sleep(0.01)
            assert service.engine.queued == 1
            async with httpx.AsyncClient(base_url=adapter.url, timeout=60) as http:
                # no persona switch: the turn ends before showing anything
                plain = await http.post("/generate-response", json=ask("me too", discussion="c", persona=None))
                stream = await http.post("/generate-response/stream",
                                         json=ask("me three", discussion="d", persona=None))
            for response in (plain, stream):
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "60"
                body = response.json()
                assert body["reason"] == "busy" and "ahead of you" in body["detail"]
            for discussion, text in (("c", "me too"), ("d", "me three")):
                stored = await service.thread_messages(ThreadKey("web", f"alice/{discussion}"))
                assert [(m.role, m.text, m.status) for m in stored if m.role == "user"][-1] == ("user", text, "failed")
            await streaming.text()
            await queued.text()
        finally:
            await stop(task)


async def test_refused_input_is_422_with_its_reason(client: httpx.AsyncClient) -> None:
    response = await client.post("/generate-response", json=ask("/advisor", persona=None, discussion="r1"))
    assert response.status_code == 422 and response.json()["reason"] == "no_persona"
    response = await client.post("/generate-response/stream", json=ask("/advisor nope", persona=None, discussion="r2"))
    assert response.status_code == 422 and response.json()["reason"] == "unknown_persona"
    assert "`sql`" in response.json()["detail"]


# --- a page reloaded mid-reply ---------------------------------------------------------------------


async def read_events(response: httpx.Response) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    name, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))
    return events


async def test_a_reply_being_written_can_be_followed_from_another_page(settings_factory: Any) -> None:
    from bot.app.assembly import open_service

    settings = settings_factory(max_reply_tokens=300, web={"port": 0})
    async with open_service(settings) as service:
        adapter = WebAdapter(service, settings.web)
        task = await start_adapter(adapter)
        try:
            async with httpx.AsyncClient(base_url=adapter.url, timeout=60) as first, \
                    httpx.AsyncClient(base_url=adapter.url, timeout=60) as reloaded:
                messages = "/users/alice/threads/live1/messages"
                assert (await reloaded.get("/users/alice/threads/live1/live")).status_code == 204
                async with first.stream("POST", "/generate-response/stream",
                                        json=ask("tell me a long story", discussion="live1", persona=None)) as sent:
                    lines = sent.aiter_lines()
                    async for line in lines:  # until the reply has begun
                        if line.startswith("event: token"):
                            break
                    view = (await reloaded.get(messages)).json()
                    assert view["writing"] is True and view["messages"][-1]["role"] == "user"
                    async with reloaded.stream("GET", "/users/alice/threads/live1/live") as live:
                        assert live.headers["content-type"].startswith("text/event-stream")
                        followed = await read_events(live)
                    async for _ in lines:
                        pass
                followed_text = "".join(data["text"] for name, data in followed if name == "token")
                assert followed[-1][0] == "done" and followed[-1][1]["generated_text"] == followed_text
                stored = (await reloaded.get(messages)).json()
                assert stored["writing"] is False
                assert stored["messages"][-1]["text"] == as_stored(followed_text)
                assert (await reloaded.get("/users/alice/threads/live1/live")).status_code == 204
        finally:
            await stop(task)


# --- the Host header (DNS rebinding) -------------------------------------------------------------------


async def test_without_a_token_only_loopback_host_names_are_served(start_web: StartWeb, service: ChatService) -> None:
    base = await start_web()
    port = base.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "localhost.evil",
                     "192.168.1.20", "[::2]", "", "[::1"):
            for method, path in (("GET", "/users/alice/threads"), ("GET", "/"), ("GET", "/static/app.js"),
                                 ("POST", "/generate-response")):
                response = await client.request(method, path, headers={"Host": host}, json=ask("hi"))
                assert response.status_code == 400, (host, path, response.text)
                body = response.json()
                assert body["reason"] == "host" and "RAVEN_WEB_TOKEN" in body["detail"], body
        assert await service.list_threads("web") == []  # nothing reached the core

        for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "localhost.",
                     f"[::1]:{port}", "[::1]"):
            response = await client.get("/users/alice/threads", headers={"Host": host})
            assert response.status_code == 200, (host, response.text)
        response = await client.post("/generate-response", json=ask("hi", discussion="h"),
                                     headers={"Host": "localhost"})
        assert response.status_code == 200


async def test_with_a_token_any_host_name_but_the_token_rules_apply(start_web: StartWeb) -> None:
    base = await start_web(token=TOKEN)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        elsewhere = {"Host": "raven.example.org"}
        assert (await client.get("/users/alice/threads", headers=elsewhere)).status_code == 401
        good = {**elsewhere, "Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/users/alice/threads", headers=good)).status_code == 200
        assert (await client.get("/", headers=elsewhere)).status_code == 401  # the sign-in form


async def test_deeply_nested_json_is_a_400_not_a_traceback(client: httpx.AsyncClient) -> None:
    headers = {"Content-Type": "application/json"}
    for body in (b"[" * 30_000, b'{"a":' * 10_000, b'{"user_message": ' + b"[" * 30_000):
        for path in ("/generate-response", "/generate-response/stream"):
            response = await client.post(path, content=body, headers=headers)
            assert response.status_code == 400, response.text
            assert response.headers["content-type"] == "application/json"
            assert "nested too deeply" in response.json()["detail"]
    assert (await client.get("/healthz")).status_code == 200


async def test_the_message_limit_counts_only_the_users_text(client: httpx.AsyncClient, service: ChatService) -> None:
    limit = service.settings.max_message_chars
    exact = "a" * (limit - 1) + "?"
    # A new thread: the persona switch cannot ride along, so it goes first as its own turn.
    response = await client.post("/generate-response", json=ask(exact, discussion="long"))
    assert response.status_code == 200, response.text[:300]
    assert response.json()["generated_text"].startswith("Now talking with **SQL advisor**")
    key = ThreadKey("web", "alice/long")
    thread = await service.thread(key)
    assert thread is not None and thread.persona == "sql"
    user_texts = [m.text for m in await service.thread_messages(key) if m.role == "user"]
    assert user_texts == ["/advisor sql", exact]
    assert [m.role for m in await service.thread_messages(key)][-1] == "assistant"

    # The stream too, switching to another persona: the switch's line first, then the reply.
    response, events = await read_sse(client, ask(exact, discussion="long", persona="project"))
    assert response.status_code == 200 and events[-1][0] == "done"
    assert events[0][1]["text"].startswith("Now talking with **Project advisor**")
    assert events[-1][1]["generated_text"] == "".join(d["text"] for n, d in events if n == "token")
    user_texts = [m.text for m in await service.thread_messages(key) if m.role == "user"]
    assert user_texts[-2:] == ["/advisor project", exact]

    # One character more is refused, counted as the user wrote it, and nothing is switched.
    response = await client.post("/generate-response", json=ask(exact + "!", discussion="long", persona="sql"))
    assert response.status_code == 422 and response.json()["reason"] == "too_long"
    assert f"{limit + 1:,} characters" in response.json()["detail"]
    thread = await service.thread(key)
    assert thread is not None and thread.persona == "project"


# --- stop, retry, continue, rename, delete -------------------------------------------------------------


async def test_stop_keeps_the_partial_reply_and_retry_and_continue_go_through_the_usual_path(
    settings_factory: Any,
) -> None:
    from bot.app.assembly import open_service

    settings = settings_factory(max_reply_tokens=400, reply_timeout_s=600, web={"port": 0})
    async with open_service(settings) as service:
        adapter = WebAdapter(service, settings.web)
        task = await start_adapter(adapter)
        key = ThreadKey("web", "alice/st")
        try:
            async with httpx.AsyncClient(base_url=adapter.url, timeout=60) as http:
                assert (await http.post("/generate-response", json=ask("hi", discussion="st"))).status_code == 200
                stop_path = "/users/alice/threads/st/stop"
                assert (await http.post(stop_path, json={})).json() == {"stopped": False}
                assert (await http.post(stop_path, content=b"x")).status_code == 415  # no form posts
                events: list[tuple[str, Any]] = []
                async with http.stream("POST", "/generate-response/stream",
                                       json=ask("tell me a long story", discussion="st")) as response:
                    tokens = 0
                    async for name, data in read_stream_events(response):
                        events.append((name, data))
                        tokens += name == "token"
                        if tokens == 3:
                            assert (await http.post(stop_path, json={})).json() == {"stopped": True}
                streamed = "".join(d["text"] for n, d in events if n == "token")
                assert events[-1][0] == "done" and events[-1][1]["outcome"] == "cut_off"
                stored = await service.thread_messages(key)
                assert stored[-1].role == "assistant" and stored[-1].text == as_stored(streamed)
                assert len(stored[-1].tokens or []) < 400

                before = [m.text for m in await service.thread_messages(key)]
                retried = await http.post("/generate-response", json=ask("/retry", discussion="st", persona=None))
                assert retried.status_code == 200, retried.text
                after = await service.thread_messages(key)
                assert after[-1].role == "assistant" and [m.text for m in after] != before
                continued = await http.post("/generate-response", json=ask("/continue", discussion="st", persona=None))
                assert continued.status_code == 200, continued.text
                assert (await service.thread_messages(key))[-1].role == "assistant"
        finally:
            await stop(task)


async def read_stream_events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    name, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))


async def test_rename_and_delete_a_thread(client: httpx.AsyncClient, service: ChatService) -> None:
    assert (await client.post("/generate-response", json=ask("first question", discussion="rn"))).status_code == 200
    path = "/users/alice/threads/rn"
    response = await client.patch(path, json={"title": "Join tuning\nsecond line"})
    assert response.status_code == 200 and response.json()["title"] == "Join tuning"
    assert [t["title"] for t in (await client.get("/users/alice/threads")).json()] == ["Join tuning"]
    assert (await client.patch("/users/alice/threads/none", json={"title": "x"})).status_code == 404
    assert (await client.patch(path, content=b'{"title": "x"}')).status_code == 415

    assert (await client.delete(path)).status_code == 204
    assert await service.thread_messages(ThreadKey("web", "alice/rn")) == []
    assert await service.thread(ThreadKey("web", "alice/rn")) is None
    assert (await client.get(f"{path}/messages")).status_code == 404
    assert (await client.get("/users/alice/threads")).json() == []
    assert (await client.delete(path)).status_code == 404
    schema = (await client.get("/openapi.json")).json()["paths"]
    assert {"patch", "delete"} <= set(schema["/users/{user_id}/threads/{discussion_id}"])
    assert "post" in schema["/users/{user_id}/threads/{discussion_id}/stop"]


async def test_retry_and_continue_endpoints_replace_and_extend_the_last_reply(
        client: httpx.AsyncClient, service: ChatService) -> None:
    key = ThreadKey("web", "alice/redo")
    missing = await client.post("/users/alice/threads/redo/retry", json={})
    assert missing.status_code == 404
    first = await client.post("/generate-response", json=ask("why is it slow?", discussion="redo", persona=None))
    assert first.status_code == 200, first.text
    old_reply = [m for m in await service.thread_messages(key) if m.role == "assistant"][-1]
    retried = await client.post("/users/alice/threads/redo/retry", json={})
    assert retried.status_code == 200, retried.text
    log = await service.thread_messages(key)
    assert (await service.store.get_message(old_reply.id)).status == "replaced"  # type: ignore[union-attr]
    new_reply = log[-1]
    assert (new_reply.role, new_reply.status) == ("assistant", "done")
    assert new_reply.text == retried.json()["generated_text"].strip()
    continued = await client.post("/users/alice/threads/redo/continue", json={})
    assert continued.status_code == 200, continued.text
    longer = [m for m in await service.store.context(key, 0) if m.role == "assistant"]
    assert len(longer) == 1 and longer[0].text.startswith(new_reply.text[:10])
    assert continued.json()["generated_text"].strip() in longer[0].text
    docs = (await client.get("/openapi.json")).json()["paths"]
    assert "/users/{user_id}/threads/{discussion_id}/retry" in docs
    assert "/users/{user_id}/threads/{discussion_id}/continue" in docs


async def test_a_user_over_the_rate_limit_gets_429_with_retry_after(settings_factory: Any) -> None:
    from bot.app.assembly import open_service

    settings = settings_factory(rate_messages_per_minute=1, max_reply_tokens=5, web={"port": 0})
    async with open_service(settings) as service:
        adapter = WebAdapter(service, settings.web)
        task = await start_adapter(adapter)
        try:
            async with httpx.AsyncClient(base_url=adapter.url, timeout=60) as http:
                ok = await http.post("/generate-response", json=ask("one", discussion="lim", persona=None))
                limited = await http.post("/generate-response", json=ask("two", discussion="lim", persona=None))
                other = await http.post("/generate-response", json=ask("hi", user="bob", discussion="lim",
                                                                         persona=None))
        finally:
            await stop(task)
        stored = await service.thread_messages(ThreadKey("web", "alice/lim"))
    assert ok.status_code == 200 and other.status_code == 200
    assert limited.status_code == 429, limited.text
    assert limited.json()["reason"] == "rate_limited" and 1 <= int(limited.headers["retry-after"]) <= 60
    assert [(m.text, m.status) for m in stored if m.role == "user"] == [("one", "answered"), ("two", "refused")]
