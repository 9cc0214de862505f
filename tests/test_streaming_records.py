"""The renderer's delivery records: a new message is recorded (with its text, no id yet) before it is
posted, and with its id after, so that a crash between the two leaves a trace for the repair; and the
repair's matching of such a trace to the bot's own messages (adapters.repairs.confirm_posts)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from adapters.repairs import confirm_posts
from adapters.streaming import MARK, StreamRenderer
from bot.core.service import Delivery


async def chunks(*parts: str) -> AsyncIterator[str]:
    for part in parts:
        yield part


async def test_each_post_is_recorded_before_it_is_made_and_after_with_its_id() -> None:
    events: list[tuple[str, int, str]] = []
    posted: list[str] = []

    async def post(text: str) -> int:
        events.append(("post", len(posted), text))
        posted.append(text)
        return len(posted) - 1

    async def edit(handle: int, text: str) -> None:
        events.append(("edit", handle, text))

    async def posting(position: int, text: str) -> None:
        events.append(("posting", position, text))

    async def shown(position: int, handle: int, text: str) -> None:
        events.append(("shown", position, text))

    renderer: StreamRenderer[int] = StreamRenderer(post=post, edit=edit, limit=80, min_interval_s=0.0,
                                                   posting=posting, shown=shown)
    await renderer.render(chunks("first words, ", "and then enough more words to need a second message, " * 2))
    kinds = [kind for kind, _, _ in events]
    for index, (kind, position, text) in enumerate(events):
        if kind == "post":  # announced just before, with exactly the text posted
            assert events[index - 1] == ("posting", position, text)
            assert events[index + 1] == ("shown", position, text)
    assert kinds.count("post") == kinds.count("posting") == len(posted) == 2
    assert "edit" in kinds  # edits of a message already posted are not announced: only new posts are


def delivery(position: int, platform_id: str, shown: str) -> Delivery:
    return Delivery(turn_id=7, position=position, platform_message_id=platform_id, shown=shown, updated_at=0.0)


def test_an_unconfirmed_post_is_the_newest_own_message_with_its_text_that_no_delivery_holds() -> None:
    known = [delivery(0, "m1", "part one"), delivery(1, "", "part two" + MARK)]
    own = [("m9", "part two" + MARK), ("m5", "part two" + MARK), ("m1", "part one")]  # newest first
    assert [d.platform_message_id for d in confirm_posts(known, own)] == ["m1", "m9"]
    # taken by a delivery already: not a match
    assert [d.platform_message_id for d in confirm_posts([delivery(0, "m9", "x"), delivery(1, "", "x")],
                                                         [("m9", "x")])] == ["m9"]


def test_an_unconfirmed_post_that_nothing_shows_was_never_made_and_is_dropped() -> None:
    known = [delivery(0, "m1", "part one"), delivery(1, "", "part two" + MARK)]
    assert confirm_posts(known, [("m1", "part one"), ("m2", "something else")]) == known[:1]
    assert all(d.confirmed for d in confirm_posts(known, []))
