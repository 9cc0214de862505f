"""Fork from the page in a real headless Chromium: the header's Fork, Fork on an earlier reply, and a
typed /fork each open the new thread in the list, whose log is the source's context up to there."""

from __future__ import annotations

from typing import Any

import pytest

from bot.app.assembly import open_service
from bot.events import ThreadKey
from tests.test_web_browser import (
    ARTIFACTS,
    CHROMIUM,
    DESKTOP,
    PHONE,
    chromium,
    page_at,
    send,
    serving,
    thread_key_of,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]


def log_of(messages: list[Any]) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in messages]


async def opened_another(page: Any, before: ThreadKey) -> ThreadKey:
    await page.wait_for_function("(d) => localStorage.getItem('raven.discussionId') !== d",
                                 arg=before.thread_id.split("/", 1)[1], timeout=30_000)
    await page.wait_for_selector(".divider:has-text('Forked from')")
    return await thread_key_of(page)


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
async def test_fork_from_the_page_opens_the_new_thread(settings_factory: Any, viewport: dict[str, int]) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    size = "phone" if viewport is PHONE else "desktop"
    settings = settings_factory(top_k=1, max_reply_tokens=8, web={"port": 0})
    async with open_service(settings) as service, serving(service, settings.web) as adapter, \
            chromium() as browser:
        page, foreign, errors = await page_at(browser, adapter.url, viewport)
        await send(page, "first question")
        await send(page, "second question")
        source = await thread_key_of(page)
        thread = await service.thread(source)
        assert thread is not None
        context = log_of(await service.store.context(source, thread.epoch))
        assert await page.locator(".msg.assistant .actions .fork").count() == 2  # on every reply

        # Fork on the first reply: the new thread opens with the first exchange only.
        await page.locator(".msg.assistant .actions .fork").first.click()
        early = await opened_another(page, source)
        info = await service.thread(early)
        assert info is not None and info.forked_from == source
        assert log_of(await service.thread_messages(early)) == context[:2]
        assert await page.locator(".msg.user .body").all_inner_texts() == ["first question"]
        item = page.locator(f'button.thread[data-discussion="{early.thread_id.split("/", 1)[1]}"]')
        await item.wait_for(state="attached")
        assert "Fork of “first question”" in await item.inner_text()
        assert await item.get_attribute("aria-current") == "true"
        await page.screenshot(path=str(ARTIFACTS / f"fork-{size}.png"))

        # The fork answers from the copied state; its streamed reply can be forked from too.
        await send(page, "another question")
        assert await page.locator(".msg.assistant .actions .fork").count() == 2
        assert log_of(await service.thread_messages(early))[:2] == context[:2]

        # The header's Fork: a fork of the open thread as it is now.
        await page.click("#fork")
        whole = await opened_another(page, early)
        assert log_of(await service.thread_messages(whole)) == log_of(await service.thread_messages(early))

        # A typed /fork in the source does the same, and leaves no /fork in the source's log.
        if viewport is PHONE:
            await page.click("#toggle-threads")
        await page.locator(f'button.thread[data-discussion="{source.thread_id.split("/", 1)[1]}"]').click()
        await page.wait_for_function("(d) => localStorage.getItem('raven.discussionId') === d",
                                     arg=source.thread_id.split("/", 1)[1])
        await page.fill("#message", "/fork")
        await page.click("#send")
        typed = await opened_another(page, source)
        assert log_of(await service.thread_messages(typed)) == context
        assert await page.locator(".msg.user .body").all_inner_texts() == ["first question", "second question"]
        assert log_of(await service.store.context(source, thread.epoch)) == context
        assert not any(text == "/fork" for _, text in log_of(await service.thread_messages(source)))
        threads = await service.list_threads("web", prefix=source.thread_id.split("/", 1)[0] + "/")
        assert {t.key: t.forked_from for t in threads} == {source: None, early: source, whole: early,
                                                           typed: source}
        if viewport is PHONE:
            assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert foreign == [] and errors == []
