"""A scripted turn: the core's real ``Turn`` fed with given text, for adapter tests that need replies
longer, slower or stranger than the tiny model writes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bot.core.outcomes import Answered, Failed, Outcome
from bot.core.turn import Turn

_running: set[asyncio.Task[None]] = set()


def scripted_turn(chunks: Sequence[str], delay_s: float = 0.0, outcome: Outcome | None = None,
                  fail: bool = False) -> Turn:
    """A turn that shows ``chunks`` (``delay_s`` apart), then ends with ``outcome`` (an answer by
    default), or with a failure when ``fail`` is given (as the core reports an exception)."""
    turn = Turn()

    async def feed() -> None:
        for chunk in chunks:
            await asyncio.sleep(delay_s)
            turn.show(chunk)
        if fail:
            turn.end(Failed(partial=turn.shown))
            return
        turn.end(outcome or Answered(turn.shown, 0))

    task = asyncio.create_task(feed())
    _running.add(task)
    task.add_done_callback(_running.discard)
    return turn
