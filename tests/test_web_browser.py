"""The chat page in a real headless Chromium (Debian's, driven by Playwright), against the real app
under uvicorn and the real chat service, all on this test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.web import WebAdapter
from bot.core.service import ChatService
from bot.events import ThreadKey
from tests.test_web_api import start_adapter

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TOKEN = "browser-token-456"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]

# Counts how often the streaming reply bubble changed: more than a few means tokens arrived one by one.
# Counts the times the streaming bubble's text was redrawn (each redraw clears the body once: one record
# that removes its nodes), not the observer's callbacks: a callback gets every change made since the
# last one, and on a fast machine a whole reply's token events came in two network reads.
COUNT_REPLY_UPDATES = """
window.__replyUpdates = 0;
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver((records) => {
    window.__replyUpdates += records.filter((r) => r.type === "childList" && r.removedNodes.length > 0
      && r.target.nodeType === 1 && r.target.matches(".msg.assistant.streaming .body")).length;
  }).observe(document.getElementById("messages"), { childList: true, subtree: true, characterData: true });
});
"""


@contextlib.asynccontextmanager
async def serving(service: ChatService, settings: Any) -> AsyncIterator[WebAdapter]:
    adapter = WebAdapter(service, settings)
    task = await start_adapter(adapter)
    try:
        yield adapter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def chromium(*extra_args: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield browser
        finally:
            await browser.close()


# A bubble's words beside a text as the server renders it (Markdown, sanitised), both laid out by this
# browser, whitespace aside (the log folds blank lines; Copy buttons add none).
SHOWN_AND_RENDERED = """(el, html) => {
  const shown = el.cloneNode(true);
  shown.querySelectorAll("button").forEach((b) => b.remove());
  const rendered = document.createElement("div");
  rendered.innerHTML = html;
  return [shown.textContent, rendered.textContent].map((t) => t.replace(/\\s+/g, ""));
}"""


async def shown_and_rendered(body: Any, text: str) -> tuple[str, str]:
    """What the reply bubble ``body`` shows, and what it shows if it shows ``text`` (a reply as the
    log stored it). A random reply holds Markdown (``*``, backslashes, ``<``...): its words are
    compared as rendered."""
    from adapters.web_markdown import render

    shown, rendered = await body.evaluate(SHOWN_AND_RENDERED, render(text))
    return str(shown), str(rendered)


def watch(page: Any, base_url: str) -> tuple[list[str], list[str]]:
    """Collect requests to anywhere but our server, and script errors."""
    foreign: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((base_url, "data:")) else foreign.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return foreign, errors


async def test_chat_page_streams_a_reply_and_lists_the_thread(settings_factory: Any) -> None:
    from bot.app.assembly import open_service

    ARTIFACTS.mkdir(exist_ok=True)
    settings = settings_factory(top_k=1, web={"port": 0})  # greedy: the same reply every run, whatever the thread
    async with open_service(settings) as service, serving(service, settings.web) as adapter, \
            chromium() as browser:
        context = await browser.new_context(viewport={"width": 1100, "height": 760})
        page = await context.new_page()
        foreign, errors = watch(page, adapter.url)
        await page.add_init_script(COUNT_REPLY_UPDATES)
        await page.goto(adapter.url + "/")
        await page.wait_for_selector("body[data-ready=true]")
        options = await page.locator("#persona option").evaluate_all("els => els.map(e => e.value)")
        assert {"sql", "project", "default"} <= set(options)

        await page.select_option("#persona", "sql")
        await page.fill("#message", "Why is my join slow?")
        await page.click("#send")
        await page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        shown = await page.locator(".msg.assistant .body").last.inner_text()
        assert shown.startswith("Now talking with SQL advisor")
        updates = await page.evaluate("window.__replyUpdates")

        # The page's thread is an ordinary thread in the core: same store, persona switched.
        user_id = await page.evaluate("localStorage.getItem('raven.userId')")
        discussion = await page.evaluate("localStorage.getItem('raven.discussionId')")
        key = ThreadKey("web", f"{user_id}/{discussion}")
        thread = await service.thread(key)
        assert thread is not None and thread.persona == "sql"
        messages = await service.thread_messages(key)
        assert messages[-1].role == "assistant" and messages[-1].text
        # It grew piece by piece: the persona notice, then the reply's tokens.
        assert len(messages[-1].tokens or []) > 4 and updates > 3, updates
        # The page shows the stored reply (after the persona notice), rendered as Markdown.
        shown_words, reply_words = await shown_and_rendered(page.locator(".msg.assistant .body").last,
                                                            messages[-1].text)
        assert reply_words and shown_words.endswith(reply_words), (shown_words, reply_words)
        await page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

        # Reload: the thread is in the list and reopens with its log.
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]")
        item = page.locator(f'button.thread[data-discussion="{discussion}"]')
        await item.wait_for()
        assert "Why is my join slow?" in await item.inner_text()
        await page.click("#new-thread")
        assert await page.locator(".msg").count() == 0
        await item.click()
        await page.wait_for_selector(".msg.assistant")
        assert await page.locator(".msg.user .body").all_inner_texts() == ["Why is my join slow?"]
        assert await page.input_value("#persona") == "sql"

        # On a phone: no sideways scrolling, the thread list opens from the menu button.
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        await page.wait_for_function(  # the list is tucked away to the left
            "() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
        await page.screenshot(path=str(ARTIFACTS / "web-chat-phone.png"))
        await page.click("#toggle-threads")
        await page.wait_for_function(
            "() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
        assert await item.get_attribute("aria-current") == "true"
        await page.keyboard.press("Escape")
        await page.wait_for_function(
            "() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")

        assert foreign == [], f"the page fetched from elsewhere: {foreign}"
        assert errors == []
        await context.close()


async def test_page_asks_for_the_token_when_one_is_set(service: ChatService, settings_factory: Any) -> None:
    settings = settings_factory(web={"port": 0, "token": TOKEN}).web
    async with serving(service, settings) as adapter, chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        foreign, _ = watch(page, adapter.url)
        response = await page.goto(adapter.url + "/")
        assert response is not None and response.status == 401
        await page.fill("#token", "wrong")
        await page.click("button[type=submit]")
        await page.wait_for_selector(".error")
        await page.fill("#token", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("body[data-ready=true]")
        assert await page.locator("#persona option").count() >= 3  # API calls carry the session

        # A link with ?token= works once, and the token does not stay in the address bar.
        other = await browser.new_context()
        page = await other.new_page()
        await page.goto(f"{adapter.url}/?token={TOKEN}")
        await page.wait_for_selector("body[data-ready=true]")
        assert TOKEN not in page.url
        cookies = await other.cookies()
        assert [c["httpOnly"] for c in cookies] == [True] and TOKEN not in cookies[0]["value"]
        assert foreign == []
        await context.close()
        await other.close()


async def test_a_page_reloaded_mid_reply_shows_the_reply_still_being_written(settings_factory: Any) -> None:
    from bot.app.assembly import open_service

    # Greedy: to this message the reply runs to the token limit every run (a sampled one may end at
    # once), seconds to reload the page in.
    settings = settings_factory(top_k=1, max_reply_tokens=1000, reply_timeout_s=600, web={"port": 0})
    async with open_service(settings) as service, serving(service, settings.web) as adapter, \
            chromium() as browser:
        page = await (await browser.new_context(viewport={"width": 1100, "height": 760})).new_page()
        _, errors = watch(page, adapter.url)
        await page.goto(adapter.url + "/")
        await page.wait_for_selector("body[data-ready=true]")
        await page.fill("#message", "Tell me everything")
        await page.click("#send")
        await reply_under_way(page)
        user_id = await page.evaluate("localStorage.getItem('raven.userId')")
        discussion = await page.evaluate("localStorage.getItem('raven.discussionId')")
        key = ThreadKey("web", f"{user_id}/{discussion}")
        assert service.writing(key) is not None  # still being written when the page goes away
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]")
        # After the reload: the question, and the reply still being written, growing ...
        await page.wait_for_selector(".msg.assistant.streaming", timeout=10_000)
        assert await page.locator(".msg.user .body").last.inner_text() == "Tell me everything"
        await page.screenshot(path=str(ARTIFACTS / "reloaded-mid-reply.png"))
        # ... and then whole: what the log stored.
        await page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
        stored = await service.thread_messages(key)
        assert stored[-1].role == "assistant"
        shown_words, rendered = await shown_and_rendered(page.locator(".msg.assistant .body").last, stored[-1].text)
        assert rendered and shown_words.endswith(rendered), (shown_words, rendered)  # after the persona notice
        assert [e for e in errors if "Failed to fetch" not in e and "network" not in e.lower()] == []


# Another site's name resolving to 127.0.0.1, as DNS rebinding makes it: the browser sends that name.
REBIND = "--host-resolver-rules=MAP attacker.example 127.0.0.1"


async def test_a_page_of_another_site_resolving_to_loopback_gets_nothing(
    service: ChatService, settings_factory: Any
) -> None:
    from bot.events import Event

    await (service.reply(Event(ThreadKey("web", "alice/1"), "alice", "alice", "my secret plan"))).text()
    async with serving(service, settings_factory(web={"port": 0}).web) as adapter, chromium(REBIND) as browser:
        page = await browser.new_page()
        foreign = f"http://attacker.example:{adapter.port}"
        response = await page.goto(foreign + "/")
        assert response is not None and response.status == 400
        assert "loopback names" in (await response.json())["detail"]
        # The attacker's script runs on that origin: same-origin fetches carry its Host and are refused.
        status = await page.evaluate("""async () => {
            const read = await fetch("/users/alice/threads");
            const post = await fetch("/generate-response", {method: "POST",
                headers: {"Content-Type": "application/json"},
                body: JSON.stringify({user_message: "hi", user_id: "alice", discussion_id: "2"})});
            return [read.status, post.status, await read.text()];
        }""")
        assert status[:2] == [400, 400] and "my secret plan" not in status[2]
        assert [t.key.thread_id for t in await service.list_threads("web")] == ["alice/1"]
        # The same server under its own name works.
        await page.goto(adapter.url + "/")
        await page.wait_for_selector("body[data-ready=true]")


async def test_with_a_token_another_host_name_still_needs_the_token(
    service: ChatService, settings_factory: Any
) -> None:
    settings = settings_factory(web={"port": 0, "token": TOKEN}).web
    async with serving(service, settings) as adapter, chromium(REBIND) as browser:
        page = await browser.new_page()
        foreign = f"http://attacker.example:{adapter.port}"
        response = await page.goto(foreign + "/")
        assert response is not None and response.status == 401  # the sign-in form, as anywhere
        assert await page.evaluate('fetch("/users/alice/threads").then(r => r.status)') == 401
        await page.fill("#token", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("body[data-ready=true]")


# --- the page as people expect it -------------------------------------------------------------------------

DESKTOP = {"width": 1100, "height": 760}
PHONE = {"width": 390, "height": 844}

MARKDOWN_REPLY = [
    "# Plan\n", "- first step\n- second step\n\n", "| table | value |\n|---|---|\n| rows | 2 |\n\n",
    "See [the docs](https://example.org/docs).\n\n", "```sql\nSELECT 1;\n```\n",
    "<script>window.__pwned = 1</script>\n", '<img src=x onerror="window.__pwned = 2">\n',
    "[click me](javascript:window.__pwned=3)\n", '<a href="javascript:window.__pwned=4">raw link</a>\n',
    "<svg onload=window.__pwned=5></svg>\n",
]

CONTRAST = """() => {
  const parse = (c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const box = document.getElementById("message");
  const fg = lum(parse(getComputedStyle(box, "::placeholder").color));
  const bg = lum(parse(getComputedStyle(box).backgroundColor));
  return (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
}"""


async def page_at(browser: Any, url: str, viewport: dict[str, int], **context: Any) -> tuple[Any, list[str], list[str]]:
    page = await (await browser.new_context(viewport=viewport, **context)).new_page()
    foreign, errors = watch(page, url)
    await page.goto(url + "/")
    await page.wait_for_selector("body[data-ready=true]")
    return page, foreign, errors


async def thread_key_of(page: Any) -> ThreadKey:
    user_id = await page.evaluate("localStorage.getItem('raven.userId')")
    discussion = await page.evaluate("localStorage.getItem('raven.discussionId')")
    return ThreadKey("web", f"{user_id}/{discussion}")


async def send(page: Any, text: str) -> None:
    done = await page.locator(".msg.assistant[data-state=done]").count()
    await page.fill("#message", text)
    await page.click("#send")
    await page.wait_for_function(
        "(n) => document.querySelectorAll('.msg.assistant[data-state=done]').length > n", arg=done, timeout=60_000)


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
async def test_replies_are_rendered_markdown_with_copy_and_nothing_hostile_runs(
    service: ChatService, settings_factory: Any, monkeypatch: pytest.MonkeyPatch, viewport: dict[str, int]
) -> None:
    from tests.fakes.scripted import scripted_turn

    ARTIFACTS.mkdir(exist_ok=True)
    monkeypatch.setattr(service, "reply", lambda event: scripted_turn(MARKDOWN_REPLY, delay_s=0.02))
    async with serving(service, settings_factory(web={"port": 0}).web) as adapter, chromium() as browser:
        page, foreign, errors = await page_at(browser, adapter.url, viewport)
        await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=adapter.url)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))
        await send(page, "Show me Markdown")
        reply = page.locator(".msg.assistant").last
        body = reply.locator(".body.markdown")
        assert await body.locator("h1").inner_text() == "Plan"
        assert await body.locator("ul > li").all_inner_texts() == ["first step", "second step"]
        assert await body.locator("table td").all_inner_texts() == ["rows", "2"]
        link = body.locator("a", has_text="the docs")
        assert await link.get_attribute("href") == "https://example.org/docs"
        assert await link.get_attribute("rel") == "noopener noreferrer nofollow"
        # Hostile pieces are text or gone: nothing ran, nothing was fetched, no handler or script link.
        assert await page.evaluate("window.__pwned") is None and dialogs == []
        assert await page.locator("#messages script, #messages img, #messages svg").count() == 0
        attributes = await page.locator("#messages *").evaluate_all(
            "els => els.flatMap(e => [...e.attributes].map(a => a.name + '=' + a.value))")
        assert not [a for a in attributes if a.startswith("on") or "javascript:" in a.lower()], attributes
        assert "<script>" in await body.inner_text()  # raw HTML is shown as text
        await page.screenshot(path=str(ARTIFACTS / f"markdown-{viewport['width']}.png"), full_page=True)

        await reply.locator("pre .copy-code").click()
        assert await page.evaluate("navigator.clipboard.readText()") == "SELECT 1;\n"
        await reply.locator(".actions .copy").click()
        assert await page.evaluate("navigator.clipboard.readText()") == "".join(MARKDOWN_REPLY)
        assert foreign == [] and errors == []


COUNT_ANNOUNCEMENTS = """
window.__announcements = 0;
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(() => { window.__announcements += 1; })
    .observe(document.getElementById("announce"), { childList: true, subtree: true, characterData: true });
});
"""


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
async def test_the_page_controls_at_desktop_and_phone_sizes(
    service: ChatService, settings_factory: Any, viewport: dict[str, int]
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    size = "phone" if viewport is PHONE else "desktop"
    phone = viewport is PHONE
    async with serving(service, settings_factory(web={"port": 0}).web) as adapter, chromium() as browser:
        context = await browser.new_context(viewport=viewport)
        await context.add_init_script(COUNT_ANNOUNCEMENTS)
        page = await context.new_page()
        foreign, errors = watch(page, adapter.url)
        await page.goto(adapter.url + "/")
        await page.wait_for_selector("body[data-ready=true]")
        assert await page.get_attribute("#messages", "aria-live") is None  # only #announce speaks
        assert await page.is_hidden("#sign-out")  # no token, nothing to sign out of
        for scheme in ("light", "dark"):
            await page.emulate_media(color_scheme=scheme)
            assert await page.evaluate(CONTRAST) >= 4.5, scheme
        await page.emulate_media(color_scheme="light")

        # The new thread is listed as soon as it is sent, before its reply.
        release = asyncio.Event()

        async def hold(route: Any) -> None:
            await release.wait()
            await route.continue_()

        await page.route("**/generate-response/stream", hold)
        await page.select_option("#persona", "sql")
        await page.fill("#message", "Why is my join slow?")
        await page.click("#send")
        listed = page.locator("button.thread .title", has_text="Why is my join slow?")
        await listed.wait_for(state="attached")
        assert await page.locator(".msg.assistant[data-state=done]").count() == 0
        release.set()
        await page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        await page.unroute("**/generate-response/stream")
        key = await thread_key_of(page)
        announced = await page.inner_text("#announce")
        reply = (await service.thread_messages(key))[-1]
        assert announced.startswith("Raven: ") and await page.evaluate("window.__announcements") == 1
        # Timestamps on every message; dir=auto on every bubble.
        assert await page.locator(".msg time[datetime]").count() == await page.locator(".msg").count() == 2
        assert set(await page.locator(".msg .body").evaluate_all("els => els.map(e => e.dir)")) == {"auto"}
        assert reply.role == "assistant"

        # A typed /advisor: the picker follows, and the next message stays with that persona.
        await send(page, "/advisor project Plan the sprint")
        await page.wait_for_function("() => document.getElementById('persona').value === 'project'")
        await send(page, "And the next one?")
        thread = await service.thread(key)
        assert thread is not None and thread.persona == "project"
        assert sum(m.text.startswith("/advisor") for m in await service.thread_messages(key)) == 2

        # The picker switches the open thread at once, and the thread shows it.
        await page.select_option("#persona", "default")
        await page.wait_for_selector(".divider:has-text('Persona: ')")
        for _ in range(100):
            thread = await service.thread(key)
            if thread is not None and thread.persona == "default":
                break
            await asyncio.sleep(0.05)
        assert thread is not None and thread.persona == "default"
        assert (await service.thread_messages(key))[-1].text == "/advisor default"
        assert "starts the thread over" in await page.inner_text("#persona-hint")

        # Right to left text is laid out right to left.
        await send(page, "مرحبا، كيف حالك؟")
        direction = await page.locator(".msg.user .body").last.evaluate("e => getComputedStyle(e).direction")
        assert direction == "rtl"

        # Too long: a notice (not a Raven reply), the draft kept; exactly the limit is accepted.
        limit = service.settings.max_message_chars
        if phone:
            await page.click("#toggle-threads")
        await page.click("#new-thread")
        users_before = await page.locator(".msg.user").count()
        await page.fill("#message", "b" * (limit + 1))
        await page.click("#send")
        notice = page.locator(".msg.notice")
        await notice.wait_for()
        assert f"{limit + 1:,} characters" in await notice.inner_text()
        assert await notice.locator(".name").inner_text() == "Notice"
        assert await notice.evaluate("e => getComputedStyle(e).backgroundColor") != await page.evaluate(
            "getComputedStyle(document.body).backgroundColor")
        assert len(await page.input_value("#message")) == limit + 1
        assert await page.locator(".msg.user").count() == users_before
        await page.screenshot(path=str(ARTIFACTS / f"notice-{size}.png"))
        await send(page, "c" * limit)
        long_key = await thread_key_of(page)
        assert [m.text for m in await service.thread_messages(long_key) if m.role == "user"][-1] == "c" * limit

        # History is shown rendered; the search box filters the list.
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]")
        if phone:
            await page.click("#toggle-threads")
        await page.fill("#thread-search", "join")
        visible = page.locator("button.thread:visible .title")
        assert await visible.all_inner_texts() == ["Why is my join slow?"]
        await page.fill("#thread-search", "no such words")
        await page.wait_for_selector("#no-matches:visible")
        await page.fill("#thread-search", "")
        await page.locator("button.thread", has_text="Why is my join slow?").click()
        await page.wait_for_selector(".msg.assistant .body.markdown")
        await page.wait_for_function(  # the drawer has slid away (phone)
            "() => innerWidth > 720 || document.getElementById('sidebar').getBoundingClientRect().right <= 0")
        assert await page.locator(".msg.assistant .actions .copy").count() == await page.locator(
            ".msg.assistant").count()
        await page.screenshot(path=str(ARTIFACTS / f"page-{size}.png"), full_page=True)

        if phone:
            # The closed drawer is out of the tab order: Tab never lands in it.
            assert await page.evaluate("document.getElementById('sidebar').inert") is True
            await page.focus("#toggle-threads")
            for _ in range(12):
                await page.keyboard.press("Tab")
                assert not await page.evaluate("document.getElementById('sidebar').contains(document.activeElement)")
            await page.click("#toggle-threads")
            assert await page.evaluate("document.getElementById('sidebar').inert") is False
            assert await page.evaluate("document.activeElement.id") == "thread-search"
            await page.screenshot(path=str(ARTIFACTS / "drawer-phone.png"))
            await page.keyboard.press("Escape")
            assert await page.evaluate("document.getElementById('sidebar').inert") is True
        else:
            assert await page.evaluate("document.getElementById('sidebar').inert") is False
        # The browser itself logs the refused message's 422; the page's script logged nothing.
        assert foreign == [] and [e for e in errors if not e.startswith("Failed to load resource")] == []
        await context.close()


async def test_with_the_server_down_sending_shows_a_notice_and_keeps_the_draft(
    service: ChatService, settings_factory: Any
) -> None:
    async with chromium() as browser:
        async with serving(service, settings_factory(web={"port": 0}).web) as adapter:
            page, _, errors = await page_at(browser, adapter.url, DESKTOP)
        uncaught: list[str] = []
        page.on("pageerror", lambda e: uncaught.append(str(e)))
        await page.fill("#message", "are you there?")
        await page.click("#send")
        notice = page.locator(".msg.notice")
        await notice.wait_for()
        assert "cannot be reached" in await notice.inner_text()
        assert await page.input_value("#message") == "are you there?"
        assert await page.locator(".msg.assistant").count() == 0
        assert not await page.is_disabled("#send")
        await page.wait_for_timeout(300)
        assert uncaught == [] and not [e for e in errors if "TypeError" in e]


async def test_sign_out_is_visible_with_a_token_and_signs_out(service: ChatService, settings_factory: Any) -> None:
    settings = settings_factory(web={"port": 0, "token": TOKEN}).web
    async with serving(service, settings) as adapter, chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"{adapter.url}/?token={TOKEN}")
        await page.wait_for_selector("body[data-ready=true]")
        assert await page.is_visible("#sign-out button")
        await page.click("#sign-out button")
        await page.wait_for_selector("#token")  # the sign-in form again
        assert await page.context.cookies() == []
        assert await page.evaluate('fetch("/personas").then(r => r.status)') == 401


async def reply_under_way(page: Any) -> None:
    """Wait until the streaming bubble shows a few words of the reply itself, after the new thread's
    persona notice (its first line)."""
    streaming = page.locator(".msg.assistant.streaming .body")
    for _ in range(600):  # the page's CSP allows no eval, so poll from here
        shown = await streaming.inner_text() if await streaming.count() else ""
        if len(shown.partition("\n")[2].strip()) > 20:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no reply under way: {shown!r}")


async def shows_a_new_reply(page: Any, service: ChatService, key: ThreadKey, replacing: int) -> list[Any]:
    """After Retry or Continue: the log (once nothing is written there) holds a reply other than
    ``replacing`` (a message id), and the page, which re-reads the thread then, shows that reply."""
    shown = rendered = ""
    for _ in range(1200):
        stored = await service.thread_messages(key)
        if service.writing(key) is None and stored[-1].role == "assistant" and stored[-1].id != replacing \
                and await page.is_hidden("#stop"):
            shown, rendered = await shown_and_rendered(page.locator(".msg.assistant .body").last, stored[-1].text)
            if rendered and shown.endswith(rendered):
                return stored
        await asyncio.sleep(0.1)
    raise AssertionError(f"the page does not show the log's new reply: {shown!r} != {rendered!r}")


# After Continue the page re-reads the thread: only the last reply may keep Retry/Continue (addMessage
# once decided that before the item was in #messages, and the reply before the last kept them).
LONG_REPLY = 1200


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
async def test_stop_retry_continue_rename_and_delete_from_the_page(
    settings_factory: Any, viewport: dict[str, int]
) -> None:
    from bot.app.assembly import open_service

    ARTIFACTS.mkdir(exist_ok=True)
    # Greedy, so every run gets the same reply: to this message it runs to the token limit (a sampled
    # one may end after a few words, before Stop is pressed). Retry then writes it whole, Continue
    # carries it on. The limit leaves Stop seconds to be pressed: at 400 tokens a CI run once saw the
    # reply end first, once sampling got faster.
    settings = settings_factory(top_k=1, max_reply_tokens=LONG_REPLY, reply_timeout_s=600, web={"port": 0})
    async with open_service(settings) as service, serving(service, settings.web) as adapter, \
            chromium() as browser:
        page, foreign, errors = await page_at(browser, adapter.url, viewport)
        await page.fill("#message", "Tell me everything")
        await page.click("#send")
        await reply_under_way(page)
        assert await page.is_hidden("#send")
        await page.click("#stop")
        await page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        key = await thread_key_of(page)
        stored = await service.thread_messages(key)
        assert stored[-1].role == "assistant" and len(stored[-1].tokens or []) < LONG_REPLY  # stopped, and kept
        shown, rendered = await shown_and_rendered(page.locator(".msg.assistant .body").last, stored[-1].text)
        assert rendered and shown.endswith(rendered), (shown, rendered)  # what was kept is shown (after the notice)
        await page.screenshot(path=str(ARTIFACTS / f"stopped-{viewport['width']}.png"))

        before = stored[-1]
        await page.locator(".msg.assistant .actions .retry:visible").last.click()
        stored = await shows_a_new_reply(page, service, key, replacing=before.id)
        assert stored[-1].text != before.text
        count = len(stored)
        await page.locator(".msg.assistant .actions .continue:visible").last.click()
        continued = await shows_a_new_reply(page, service, key, replacing=stored[-1].id)
        assert continued[-1].text.startswith(stored[-1].text) and len(continued[-1].text) > len(stored[-1].text)
        assert len(continued) >= count
        await page.wait_for_function(  # on the last reply only, once the thread is shown as the log has it
            "() => [...document.querySelectorAll('.msg.assistant .retry')].filter(b => !b.hidden).length === 1")

        page.once("dialog", lambda d: asyncio.ensure_future(d.accept("Story time")))
        await page.click("#rename")
        await page.wait_for_selector("button.thread .title:has-text('Story time')", state="attached")
        thread = await service.thread(key)
        assert thread is not None and thread.title == "Story time"

        asked: list[str] = []
        page.once("dialog", lambda d: (asked.append(d.message), asyncio.ensure_future(d.dismiss())))
        await page.click("#delete")
        await page.wait_for_timeout(200)
        assert asked and "cannot be undone" in asked[0] and await service.thread(key) is not None
        page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
        await page.click("#delete")
        await page.wait_for_selector("button.thread .title:has-text('Story time')", state="detached")
        assert await service.thread(key) is None and await service.thread_messages(key) == []
        assert await page.locator(".msg").count() == 0
        assert foreign == [] and errors == []


# A Retry re-renders the thread from the log once its reply is done. The page stayed idle meanwhile, so
# a Continue clicked then hit a button being replaced, and was lost (CI saw Continue do nothing).
async def test_after_retry_the_page_stays_busy_until_the_thread_is_read_again(
    service: ChatService, settings_factory: Any
) -> None:
    settings = settings_factory(web={"port": 0}).web
    async with serving(service, settings) as adapter, chromium() as browser:
        page, foreign, errors = await page_at(browser, adapter.url, DESKTOP)
        await page.fill("#message", "Hello there")
        await page.click("#send")
        await page.wait_for_selector(".msg.assistant[data-state=done]")
        await page.wait_for_selector("#stop", state="hidden")
        key = await thread_key_of(page)
        first = (await service.thread_messages(key))[-1]

        while_read: list[tuple[bool, bool]] = []  # (Stop shown, Continue disabled) while the thread is re-read

        async def slow_read(route: Any) -> None:
            while_read.append((await page.is_visible("#stop"),
                               await page.locator(".msg.assistant .continue:visible").last.is_disabled()))
            await asyncio.sleep(0.5)
            await route.continue_()

        await page.route("**/threads/*/messages", slow_read)
        await page.locator(".msg.assistant .actions .retry:visible").last.click()
        stored = await shows_a_new_reply(page, service, key, replacing=first.id)
        assert while_read == [(True, True)]
        continue_button = page.locator(".msg.assistant .continue:visible")
        assert await continue_button.count() == 1 and not await continue_button.is_disabled()
        assert not await page.is_disabled("#send")
        await page.unroute("**/threads/*/messages")
        await continue_button.click()
        continued = await shows_a_new_reply(page, service, key, replacing=stored[-1].id)
        assert continued[-1].text.startswith(stored[-1].text)
        assert foreign == [] and errors == []
