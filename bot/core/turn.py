"""The handle an adapter holds while a turn runs: the text to show as it arrives, then the outcome.

The turn itself runs in a task of its own, so a reader that goes away (a closed page, a platform
error) does not stop the reply from being finished and stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from bot.core.outcomes import Outcome

ResumedFrom = Literal["memory", "store", "rebuild", "new"]


@dataclass(frozen=True)
class TurnInfo:
    """What a turn cost: logs, tests and metrics read it."""

    resumed_from: ResumedFrom
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    seconds: float


class Turn:
    """Iterate for the text to show (an answer, or a command's result) as it is written; then
    ``await turn.outcome()`` says how the turn ended. Notices are never part of the text."""

    def __init__(self, confirm: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[str | None] = asyncio.Queue()
        self._outcome: asyncio.Future[Outcome] = loop.create_future()
        self._delivered: asyncio.Future[str | None] = loop.create_future()
        self.confirm = confirm  # the adapter reports whether the reply reached its user
        self._ended = False
        self.shown = ""  # everything shown so far
        self.info: TurnInfo | None = None
        self.turn_id: int | None = None  # the turn's record in the store, once accepted
        self._followers: list[asyncio.Queue[str | None]] = []
        self.started_at = time.monotonic()
        self.first_shown_at: float | None = None  # when the first text was shown (time to first token)

    # --- the reader's side ------------------------------------------------------------------------

    def __aiter__(self) -> Turn:
        return self

    async def __anext__(self) -> str:
        if self._ended:
            raise StopAsyncIteration
        chunk = await self._chunks.get()
        if chunk is None:
            self._ended = True
            raise StopAsyncIteration
        return chunk

    async def outcome(self) -> Outcome:
        """How the turn ended (waits for it; does not consume the text)."""
        return await asyncio.shield(self._outcome)

    async def text(self) -> str:
        """Everything shown, once the turn is over (for callers that do not stream)."""
        return "".join([chunk async for chunk in self])

    async def follow(self) -> AsyncIterator[str]:
        """Another reader (a page reloaded mid-reply): what was shown so far as one chunk, then the
        rest as it is written. Does not take anything from the turn's own reader."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        if self.shown:
            queue.put_nowait(self.shown)
        if self._outcome.done():
            queue.put_nowait(None)
        else:
            self._followers.append(queue)
        try:
            while (chunk := await queue.get()) is not None:
                yield chunk
        finally:
            if queue in self._followers:
                self._followers.remove(queue)

    # --- delivery (``confirm``) ---------------------------------------------------------------------

    def report_delivery(self, failure: str | None) -> None:
        """None: shown in full; otherwise why not."""
        if not self._delivered.done():
            self._delivered.set_result(failure)

    async def delivery(self) -> str | None:
        return await asyncio.shield(self._delivered)

    # --- the core's side ----------------------------------------------------------------------------

    def show(self, text: str) -> None:
        if text:
            if self.first_shown_at is None:
                self.first_shown_at = time.monotonic()
            self.shown += text
            self._chunks.put_nowait(text)
            for follower in self._followers:
                follower.put_nowait(text)

    def end(self, outcome: Outcome) -> None:
        if not self._outcome.done():
            self._chunks.put_nowait(None)
            for follower in self._followers:
                follower.put_nowait(None)
            self._outcome.set_result(outcome)
