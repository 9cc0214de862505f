"""The loop every chat adapter runs to make its platform match the log after a crash."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

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
