"""Render a streamed reply as platform messages: post early, edit at a bounded rate, continue in a
new message when one is full.

Both chat platforms work this way (Discord: message edits, 2,000 characters; Slack: ``chat.update``,
about 4,000). The platform-specific part is two callables: post a new message, edit an old one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from adapters.text_split import FENCE, fence_state, split_message
from bot.core.outcomes import NOTICES, CutOff
from bot.core.turn import Turn

log = logging.getLogger(__name__)
Handle = TypeVar("Handle")
PLACEHOLDER = "…"
MARK = " " + PLACEHOLDER  # appended to the last message while the reply is still being written
CONTINUED = "(continued above)"


@dataclass
class StreamRenderer(Generic[Handle]):
    post: Callable[[str], Awaitable[Handle]]
    edit: Callable[[Handle, str], Awaitable[None]]
    limit: int
    min_interval_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    transform: Callable[[str], str] = lambda text: text
    #: called after each successful post or edit with (position, handle, text shown): delivery records
    shown: Callable[[int, Handle, str], Awaitable[None]] | None = None
    #: called before each new post with (position, text to post): the delivery record made before the
    #: post, so that a crash between the post and ``shown`` leaves a trace for the repair
    posting: Callable[[int, str], Awaitable[None]] | None = None
    messages: list[Handle] = field(default_factory=list)
    _shown: list[str] = field(default_factory=list)
    _last_edit: float = float("-inf")

    async def render(self, chunks: AsyncIterator[str]) -> str:
        """Consume the reply stream and show it in full; returns the text."""
        text = await self.stream(chunks)
        await self.finish(text)
        return text

    async def stream(self, chunks: AsyncIterator[str]) -> str:
        """Show the reply as it arrives (still marked as being written); returns the text so far.
        Nothing is posted until the first chunk."""
        text = ""
        async for chunk in chunks:
            text += chunk
            if self.clock() - self._last_edit >= self.min_interval_s:
                await self._sync(text, final=False)
        return text

    async def finish(self, text: str) -> None:
        """Show ``text`` as the final reply (the streamed text plus whatever the adapter adds, such as
        a cut-off note). A code block the reply left open is closed, so the last message renders."""
        if fence_state(text) is not None:
            text += "\n" + FENCE
        # The last edit also respects the interval: wait out what is left of it.
        remaining = self.min_interval_s - (self.clock() - self._last_edit)
        if self.messages and remaining > 0:
            await self.sleep(remaining)
        await self._sync(text, final=True)

    async def _sync(self, text: str, final: bool) -> None:
        rendered = self.transform(text) if text.strip() else ("" if final else PLACEHOLDER)
        if not rendered:
            rendered = "(no reply)"
        # Split with room for the mark even in the final edit: the split points then stay where they
        # were while streaming, and a reply never needs fewer messages than it already posted.
        pieces = split_message(rendered, self.limit - len(MARK))
        if not final:
            pieces[-1] += MARK
        elif len(pieces) < len(self.messages):  # a transform shortened the text: none may stay "…"
            pieces += [CONTINUED] * (len(self.messages) - len(pieces))
        for index, piece in enumerate(pieces):
            if index < len(self.messages):
                if self._shown[index] == piece:
                    continue
                await self.edit(self.messages[index], piece)
                self._shown[index] = piece
            else:
                if self.posting is not None:
                    await self.posting(index, piece)
                self.messages.append(await self.post(piece))
                self._shown.append(piece)
            if self.shown is not None:
                await self.shown(index, self.messages[index], piece)
        self._last_edit = self.clock()


def final_pieces(text: str, limit: int, transform: Callable[[str], str] = lambda t: t) -> list[str]:
    """The messages a finished reply is shown as (what ``finish`` posts), for repairing a reply that a
    crash left half-shown."""
    if fence_state(text) is not None:
        text += "\n" + FENCE
    rendered = transform(text) if text.strip() else "(no reply)"
    return split_message(rendered, limit - len(MARK))


async def present(renderer: StreamRenderer[Handle], turn: Turn) -> tuple[str, str | None]:
    """Show a turn with ``renderer`` as the chat platforms do: the text as it is written, then the
    final text (a cut-off reply ends with an italic note saying why). Returns the text shown and the
    notice still to show apart from it (busy, refused, failed), if any."""
    text = await renderer.stream(turn)
    outcome = await turn.outcome()
    if isinstance(outcome, CutOff):
        if fence_state(text) is not None:  # cut off inside a code block: close it before the note
            text = text.rstrip("\n") + "\n" + FENCE
        text += f"\n\n_({outcome.message})_"
    if text or not isinstance(outcome, NOTICES):
        await renderer.finish(text)
    notice = outcome.message if isinstance(outcome, NOTICES) and not isinstance(outcome, CutOff) else None
    return text, notice
