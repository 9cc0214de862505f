"""The loop every chat adapter runs to make its platform match the log after a crash."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable

from bot.core.service import Delivery

log = logging.getLogger(__name__)


async def keep_repairing(platform: str, repair: Callable[[], Awaitable[int]], interval_s: float) -> None:
    """``repair()`` at start, then every ``interval_s`` (a dead process's turns surface as its lease
    ends); a failed round is logged and tried again at the next one."""
    while True:
        try:
            await repair()
        except Exception:
            log.exception("%s: repairs failed; trying again later", platform)
        await asyncio.sleep(interval_s)


def confirm_posts(deliveries: Iterable[Delivery], own_messages: Iterable[tuple[str, str]]) -> list[Delivery]:
    """A dead turn's deliveries with each unconfirmed one (recorded just before its post, the post's
    id never recorded) resolved: it is the bot's newest message in ``own_messages`` (``(id, text)``,
    newest first) that shows exactly its text and is no other delivery; none such: the post never
    happened, and the delivery is dropped (the repair then posts that part afresh)."""
    known = list(deliveries)
    taken = {d.platform_message_id for d in known if d.confirmed}
    candidates = [(message_id, text) for message_id, text in own_messages if message_id not in taken]
    resolved = []
    for delivery in known:
        if not delivery.confirmed:
            match = next((message_id for message_id, text in candidates if text == delivery.shown), None)
            if match is None:
                log.info("repair: turn %s's message %s was never posted", delivery.turn_id, delivery.position)
                continue
            candidates = [(i, t) for i, t in candidates if i != match]
            delivery = dataclasses.replace(delivery, platform_message_id=match)
        resolved.append(delivery)
    return resolved


def has_unconfirmed(deliveries: Iterable[Delivery]) -> bool:
    return any(not d.confirmed for d in deliveries)
