"""chatux-server-rwkv's endpoint, ``GET /chat_api?text=…``: over real HTTP (the real app under uvicorn,
the real service and store) and in a real Chromium with a stand-in of the seed's page
(tests/chatux/index.html, served at the server's own origin as the seed served its page)."""

from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.web import WebAdapter
from bot.core.service import ChatService
from bot.events import ThreadKey
from tests.fakes.scripted import scripted_turn
from tests.test_web_api import TOKEN, StartWeb, as_stored, start_adapter, stop
from tests.test_web_browser import CHROMIUM, chromium, serving, watch

PAGE = Path(__file__).resolve().parent / "chatux" / "index.html"
HOSTILE = 'a < b & "c"\n<img src=x onerror="window.__pwned = 1">\nlast line'
HOSTILE_VALUE = 'a &lt; b &amp; &quot;c&quot;<br>&lt;img src=x onerror=&quot;window.__pwned = 1&quot;&gt;<br>last line'


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


def value_of(response: httpx.Response) -> str:
    body = response.json()
    assert response.status_code == 200, response.text
    assert [item["type"] for item in body["output"]] == ["text"]
    return str(body["output"][0]["value"])


def as_text(value: str) -> str:
    return html.unescape(value.replace("<br>", "\n"))


async def test_one_conversation_per_browser_session_or_thread(start_web: StartWeb, service: ChatService) -> None:
    url = await start_web()
    async with httpx.AsyncClient(base_url=url, timeout=60) as browser, \
            httpx.AsyncClient(base_url=url, timeout=60) as other:
        first = await browser.get("/chat_api", params={"text": "Why is my join slow?"})
        session = first.cookies["raven_chatux"]
        assert "httponly" in first.headers["set-cookie"].lower()
        second = await browser.get("/chat_api", params={"text": "And with an index?"})
        assert "set-cookie" not in second.headers  # the session goes on
        key = ThreadKey("web", f"chatux/s-{session}")
        stored = await service.thread_messages(key)
        assert [(m.role, m.text) for m in stored if m.role == "user"] == [
            ("user", "Why is my join slow?"), ("user", "And with an index?")]
        replies = [m.text for m in stored if m.role == "assistant"]
        for response, reply in zip((first, second), replies, strict=True):
            value, notice = value_of(response), response.json()["notice"]
            assert response.json()["outcome"] in ("answered", "cut_off") and "\n" not in value
            note = f"\n({notice})" if notice else ""  # a cut-off reply says so, as on the page
            assert as_text(value).endswith(note) and as_stored(as_text(value).removesuffix(note)) == reply

        assert value_of(await other.get("/chat_api", params={"text": "hello"}))
        assert other.cookies["raven_chatux"] != session  # another browser, another conversation
        named = await other.get("/chat_api", params={"text": "hi", "thread": "team-1"})
        assert value_of(named) and "set-cookie" not in named.headers
        assert next(m.text for m in await service.thread_messages(ThreadKey("web", "chatux/team-1"))) == "hi"

        # The rest of the API sees these threads, under the user "chatux".
        listed = {t["discussion_id"] for t in (await other.get("/users/chatux/threads")).json()}
        assert {f"s-{session}", "team-1"} <= listed

        too_long = await browser.get("/chat_api", params={"text": "x" * (service.settings.max_message_chars + 1)})
        assert too_long.json()["outcome"] == "refused" and value_of(too_long)  # said in the page's bubble
        assert (await browser.get("/chat_api", params={"text": " "})).status_code == 422
        assert (await browser.get("/chat_api", params={"text": "x", "thread": "../etc"})).status_code == 422


async def test_the_reply_is_escaped_before_newlines_become_br(
    start_web: StartWeb, service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "reply", lambda event: scripted_turn([HOSTILE[:5], HOSTILE[5:]]))
    async with httpx.AsyncClient(base_url=await start_web(), timeout=60) as http:
        assert value_of(await http.get("/chat_api", params={"text": "hi"})) == HOSTILE_VALUE


async def test_token_host_and_other_sites_rules(start_web: StartWeb, service: ChatService) -> None:
    url = await start_web()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        refused = await http.get("/chat_api", params={"text": "hi", "thread": "x"},
                                 headers={"Sec-Fetch-Site": "cross-site"})
        assert refused.status_code == 403 and refused.json()["reason"] == "cross_site"
        same_site = await http.get("/chat_api", params={"text": "hi", "thread": "x"},
                                   headers={"Sec-Fetch-Site": "same-site"})  # another port of this host
        assert same_site.status_code == 403
        assert await service.thread(ThreadKey("web", "chatux/x")) is None  # nothing was run
        rebinding = await http.get("/chat_api", params={"text": "hi"}, headers={"Host": "evil.example"})
        assert rebinding.status_code == 400 and rebinding.json()["reason"] == "host"
        own = await http.get("/chat_api", params={"text": "hi", "thread": "x"},
                             headers={"Sec-Fetch-Site": "same-origin"})
        assert value_of(own)

    url = await start_web(token=TOKEN)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        assert (await http.get("/chat_api", params={"text": "hi"})).status_code == 401
        assert (await http.get("/chat_api", params={"text": "hi", "token": TOKEN})).status_code == 401
        signed = await http.get("/chat_api", params={"text": "hi"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert value_of(signed)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")
async def test_a_chatux_shaped_page_talks_to_raven(
    service: ChatService, settings_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(service, settings_factory(web={"port": 0}).web) as adapter, chromium() as browser:
        page = await (await browser.new_context()).new_page()
        foreign, errors = watch(page, adapter.url)

        async def the_seeds_page(route: Any) -> None:  # the seed served its page from the same server
            await route.fulfill(status=200, content_type="text/html", body=PAGE.read_text(encoding="utf-8"))

        await page.route(f"{adapter.url}/chatux/", the_seeds_page)
        await page.goto(f"{adapter.url}/chatux/")

        async def ask(text: str, answers: int) -> str:
            await page.fill("#text", text)
            await page.click("#send")
            await page.wait_for_selector(f"body[data-answers='{answers}']", timeout=60_000)
            return str(await page.locator(".bot").last.inner_html())

        first = await ask("Why is my join slow?", 1)
        await ask("And with an index?", 2)
        session = next(c["value"] for c in await page.context.cookies() if c["name"] == "raven_chatux")
        stored = await service.thread_messages(ThreadKey("web", f"chatux/s-{session}"))
        assert [m.text for m in stored if m.role == "user"] == ["Why is my join slow?", "And with an index?"]
        reply = next(m.text for m in stored if m.role == "assistant")
        assert as_stored(as_text(first)).startswith(reply)  # the bubble shows the stored reply (and any note)

        monkeypatch.setattr(service, "reply", lambda event: scripted_turn([HOSTILE]))
        shown = await ask("something hostile", 3)
        assert shown.count("<br>") == 2 and "<img" not in shown  # two line breaks; the tag is text
        assert (await page.locator(".bot").last.inner_text()).splitlines() == HOSTILE.splitlines()
        assert await page.evaluate("window.__pwned") is None
        assert foreign == [] and errors == []
