"""``raven export``: the conversations in the log as JSON lines or CSV, one row per message, so that
a team gets its data out (the seed wrote every turn to a MySQL table).

Every message is exported, notices and failed ones too, with its status; ``persona`` is the thread's
persona now (a persona switch starts a new ``epoch``). Times are ISO 8601 in UTC. Threads are read one
at a time (``Store.all_threads`` pages through them), and rows are written in a worker thread, so
neither the database nor the output is held in memory at once and the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from bot.errors import RavenError
from bot.events import ThreadKey
from bot.storage import Store, StoredMessage, ThreadInfo

Format = Literal["jsonl", "csv"]
FORMATS: tuple[Format, ...] = ("jsonl", "csv")
FIELDS = ("thread", "persona", "epoch", "message_id", "platform_message_id", "role", "author", "text",
          "status", "created_at")
PAGE = 200


class ExportError(RavenError):
    """An export cannot be made as asked (an unknown thread)."""


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")


def row(thread: ThreadInfo, message: StoredMessage) -> dict[str, Any]:
    return {
        "thread": str(thread.key), "persona": thread.persona, "epoch": message.epoch, "message_id": message.id,
        "platform_message_id": message.platform_message_id, "role": message.role, "author": message.author,
        "text": message.text, "status": message.status, "created_at": timestamp(message.created_at),
    }


class JsonLines:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def begin(self) -> None:
        pass

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self.out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


class Csv:
    """RFC 4180 (the ``csv`` module's Excel dialect); an absent value (``platform_message_id``) is empty."""

    def __init__(self, out: TextIO) -> None:
        self.writer = csv.DictWriter(out, FIELDS)

    def begin(self) -> None:
        self.writer.writeheader()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self.writer.writerows(rows)


async def threads(store: Store, keys: Sequence[ThreadKey] = ()) -> AsyncIterator[ThreadInfo]:
    """The threads named (all of them checked before the first is yielded), or every thread."""
    if keys:
        found = [await store.get_thread(key) for key in keys]
        missing = [str(key) for key, info in zip(keys, found, strict=True) if info is None]
        if missing:
            raise ExportError(f"no such thread: {', '.join(missing)} (a key is platform:id, e.g. web:alice/42)")
        for info in found:
            assert info is not None
            yield info
        return
    after: ThreadKey | None = None
    while page := await store.all_threads(after=after, limit=PAGE):
        for info in page:
            yield info
        after = page[-1].key


async def export(store: Store, out: TextIO, fmt: Format, keys: Sequence[ThreadKey] = ()) -> int:
    """Write the threads' messages to ``out``; returns how many rows were written."""
    writer = JsonLines(out) if fmt == "jsonl" else Csv(out)
    written = 0
    started = False
    async for info in threads(store, keys):
        if not started:
            await asyncio.to_thread(writer.begin)
            started = True
        rows = [row(info, message) for message in await store.messages(info.key)]
        await asyncio.to_thread(writer.write, rows)
        written += len(rows)
    if not started:
        await asyncio.to_thread(writer.begin)
    return written
