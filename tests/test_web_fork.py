"""Forking a thread through the web API (``POST …/fork`` and a typed ``/fork``), over real HTTP against
the real app, service, SQLite store and tiny model. Greedy sampling (top_k=1), so a reply depends only
on the state it starts from: a fork and its source, asked the same, must answer the same."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from adapters.web import WebAdapter
from bot.app.assembly import open_service
from bot.core.service import ChatService
from bot.events import ThreadKey
from tests.test_web_api import ask, read_sse, start_adapter, stop


@pytest.fixture
async def greedy(settings_factory: Any) -> AsyncIterator[tuple[ChatService, httpx.AsyncClient]]:
    settings = settings_factory(top_k=1, max_reply_tokens=8, web={"port": 0})
    async with open_service(settings) as service:
        adapter = WebAdapter(service, settings.web)
        task = await start_adapter(adapter)
        try:
            async with httpx.AsyncClient(base_url=adapter.url, timeout=60) as http:
                yield service, http
        finally:
            await stop(task)


async def say(http: httpx.AsyncClient, discussion: str, text: str) -> str:
    response = await http.post("/generate-response", json=ask(text, discussion=discussion, persona=None))
    assert response.status_code == 200, response.text
    return str(response.json()["generated_text"])


def log_of(messages: list[Any]) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in messages]


async def test_a_fork_copies_the_context_and_continues_from_the_copied_state(
    greedy: tuple[ChatService, httpx.AsyncClient],
) -> None:
    service, http = greedy
    source = ThreadKey("web", "alice/src")
    await say(http, "src", "first question")
    await say(http, "src", "second question")
    shown = (await http.get("/users/alice/threads/src/messages")).json()
    replies = [m for m in shown["messages"] if m["role"] == "assistant"]
    assert [m["in_context"] for m in shown["messages"]] == [True, True, True, True]
    assert shown["forked_from"] is None

    response = await http.post("/users/alice/threads/src/fork", json={})
    assert response.status_code == 201, response.text
    whole = response.json()
    assert whole["forked_from"] == "src" and whole["title"] == "first question"
    assert whole["discussion_id"] != "src"
    forked = ThreadKey("web", f"alice/{whole['discussion_id']}")
    thread = await service.thread(source)
    assert thread is not None
    context = log_of(await service.store.context(source, thread.epoch))
    assert log_of(await service.thread_messages(forked)) == context and len(context) == 4

    response = await http.post("/users/alice/threads/src/fork",
                               json={"at_reply": replies[0]["id"], "discussion_id": "early"})
    assert response.status_code == 201, response.text
    assert response.json()["discussion_id"] == "early" and response.json()["forked_from"] == "src"
    early = ThreadKey("web", "alice/early")
    assert log_of(await service.thread_messages(early)) == context[:2]

    listed = {t["discussion_id"]: t["forked_from"] for t in (await http.get("/users/alice/threads")).json()}
    assert listed == {"src": None, whole["discussion_id"]: "src", "early": "src"}
    assert (await http.get("/users/alice/threads/early/messages")).json()["forked_from"] == "src"

    # The fork goes on from the copied state (no rebuild) exactly as the source does.
    in_fork = await say(http, whole["discussion_id"], "third question")
    info = service.last_turn(forked)
    assert info is not None and info.resumed_from in ("memory", "store")
    assert await say(http, "src", "third question") == in_fork
    assert await say(http, "fresh", "third question") != in_fork  # the state decides the answer
    # The one forked at the first reply goes on as a thread that only ever had that exchange.
    await say(http, "ref", "first question")
    assert await say(http, "early", "another question") == await say(http, "ref", "another question")
    assert len(await service.thread_messages(source)) == 6  # the source only has its own turns


async def test_fork_errors(greedy: tuple[ChatService, httpx.AsyncClient]) -> None:
    _, http = greedy
    await say(http, "e", "hello")
    question = (await http.get("/users/alice/threads/e/messages")).json()["messages"][0]
    path = "/users/alice/threads/e/fork"
    assert (await http.post("/users/alice/threads/none/fork", json={})).status_code == 404
    for body in ({"at_reply": question["id"]}, {"at_reply": 10**9}):  # a question, or no message of it
        response = await http.post(path, json=body)
        assert response.status_code == 422 and "at_reply" in response.json()["detail"], response.text
    assert (await http.post(path, json={"discussion_id": "e"})).status_code == 409
    assert (await http.post(path, json={"discussion_id": "a/b"})).status_code == 422
    assert (await http.post(path, json={"other": 1})).status_code == 422
    assert (await http.post(path, content=b"{}")).status_code == 415  # no form posts
    assert (await http.post(path, json={"discussion_id": "e2"})).status_code == 201
    assert (await http.post(path, json={"discussion_id": "e2"})).status_code == 409
    assert [t["discussion_id"] for t in (await http.get("/users/alice/threads")).json()].count("e2") == 1
    schema = (await http.get("/openapi.json")).json()["paths"]
    assert "post" in schema["/users/{user_id}/threads/{discussion_id}/fork"]


async def test_a_typed_fork_opens_a_new_thread_and_leaves_the_source_alone(
    greedy: tuple[ChatService, httpx.AsyncClient],
) -> None:
    service, http = greedy
    await say(http, "t", "hello")
    source = ThreadKey("web", "alice/t")
    before = log_of(await service.thread_messages(source))

    response = await http.post("/generate-response", json=ask("/fork", discussion="t", persona="SQLAdvisor"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["outcome"] == "command" and body["thread"]["forked_from"] == "t"
    assert body["thread"]["discussion_id"] in body["generated_text"]
    first = ThreadKey("web", f"alice/{body['thread']['discussion_id']}")
    assert log_of(await service.thread_messages(first)) == before

    response, events = await read_sse(http, ask("/fork", discussion="t", persona=None))
    assert response.status_code == 200
    assert [name for name, _ in events] == ["token", "done"]
    done = events[-1][1]
    assert done["outcome"] == "command" and done["thread"]["forked_from"] == "t"
    assert done["thread"]["discussion_id"] != body["thread"]["discussion_id"]
    assert log_of(await service.thread_messages(source)) == before  # no /fork turn in the source
    thread = await service.thread(source)
    assert thread is not None and thread.persona == "default"  # prompt_file did not switch it

    response = await http.post("/generate-response", json=ask("/fork", discussion="new", persona=None))
    assert response.status_code == 422 and response.json()["reason"] == "nothing_to_fork"
    assert await service.thread(ThreadKey("web", "alice/new")) is None

    # A streamed reply's done event names the reply, for a fork at it.
    response, events = await read_sse(http, ask("more", discussion="t", persona=None))
    reply_id = events[-1][1]["reply_id"]
    messages = await service.thread_messages(source)
    assert reply_id == messages[-1].id and messages[-1].role == "assistant"
