"""The SQLite store (aiosqlite, WAL): threads, the message log, saved model states, processed events.

The message log is the source of truth: a saved state is only a cache of "the model after reading
this thread up to message N" and can always be rebuilt from the log. Each thread has an *epoch*
that a persona switch or ``/reset`` increments; the model's context is the current epoch's messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite
import numpy as np

from bot.errors import StoreError
from bot.events import ThreadKey

Role = Literal["user", "assistant", "notice"]
Status = Literal["pending", "answered", "interrupted", "failed", "done"]

MIGRATIONS: list[Sequence[str]] = [
    # version 1
    (
        """CREATE TABLE threads (
            key TEXT PRIMARY KEY,
            persona TEXT NOT NULL,
            epoch INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            thread_key TEXT NOT NULL REFERENCES threads(key) ON DELETE CASCADE,
            epoch INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'notice')),
            author TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            platform_message_id TEXT,
            status TEXT NOT NULL DEFAULT 'done',
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX messages_by_thread ON messages (thread_key, id)",
        """CREATE TABLE states (
            thread_key TEXT PRIMARY KEY REFERENCES threads(key) ON DELETE CASCADE,
            fingerprint TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            last_message_id INTEGER NOT NULL,
            token_count INTEGER NOT NULL,
            checksum TEXT NOT NULL,
            blob BLOB NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE processed_events (
            key TEXT PRIMARY KEY,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX processed_events_by_time ON processed_events (created_at)",
    ),
]
MIGRATIONS.append(
    # version 2: the token ids of a reply as the model read them, and the tokenizer that made them
    (
        "ALTER TABLE messages ADD COLUMN tokens BLOB",
        "ALTER TABLE messages ADD COLUMN tokenizer TEXT",
    )
)
SCHEMA_VERSION = len(MIGRATIONS)

_UPSERT_STATE = """
    INSERT INTO states (thread_key, fingerprint, epoch, last_message_id, token_count, checksum, blob, updated_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (thread_key) DO UPDATE SET fingerprint = excluded.fingerprint, epoch = excluded.epoch,
      last_message_id = excluded.last_message_id, token_count = excluded.token_count,
      checksum = excluded.checksum, blob = excluded.blob, updated_at = excluded.updated_at"""


@dataclass(frozen=True)
class ThreadInfo:
    key: ThreadKey
    persona: str
    epoch: int
    title: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class StoredMessage:
    id: int
    thread: ThreadKey
    epoch: int
    role: Role
    author: str
    text: str
    platform_message_id: str | None
    status: Status
    created_at: float
    tokens: list[int] | None = None
    tokenizer: str | None = None


@dataclass(frozen=True)
class StoredState:
    fingerprint: str
    epoch: int
    last_message_id: int
    token_count: int
    blob: bytes
    checksum_ok: bool


def checksum(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class Store:
    """One database file. Open with ``async with Store(path) as store``."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._db: aiosqlite.Connection | None = None
        # One connection serves every coroutine, so a transaction must not interleave with other
        # writes: each write holds this lock.
        self._write_lock = asyncio.Lock()

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._db.execute("PRAGMA busy_timeout=5000")
        try:
            await self._migrate()
        except BaseException:
            await self.close()  # aiosqlite's thread would otherwise keep the process alive
            raise

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.path} has schema version {version}, newer than this Raven "
                f"understands ({SCHEMA_VERSION}); upgrade Raven or use another RAVEN_DATABASE"
            )
        for index in range(version, SCHEMA_VERSION):
            await self._transaction(self._migration(index))

    def _migration(self, index: int) -> Callable[[aiosqlite.Connection], Awaitable[None]]:
        async def apply(db: aiosqlite.Connection) -> None:
            for statement in MIGRATIONS[index]:
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {index + 1}")

        return apply

    async def _transaction(self, work: Callable[[aiosqlite.Connection], Awaitable[Any]]) -> Any:
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                result = await work(self.db)
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")
            return result

    async def _write(self, sql: str, args: Sequence[object] = ()) -> int:
        """One statement in its own transaction; returns the number of rows it changed."""
        async def work(db: aiosqlite.Connection) -> int:
            cursor = await db.execute(sql, args)
            return int(cursor.rowcount)

        return int(await self._transaction(work))

    # --- threads -------------------------------------------------------------------------------------

    async def get_thread(self, key: ThreadKey) -> ThreadInfo | None:
        async with self.db.execute(
            """SELECT t.*, (SELECT text FROM messages m WHERE m.thread_key = t.key AND m.role = 'user'
                            ORDER BY id LIMIT 1) AS title
               FROM threads t WHERE key = ?""",
            (str(key),),
        ) as cursor:
            row = await cursor.fetchone()
        return _thread(row) if row else None

    async def ensure_thread(self, key: ThreadKey, persona: str) -> ThreadInfo:
        now = self.clock()
        await self._write(
            "INSERT OR IGNORE INTO threads (key, persona, epoch, created_at, updated_at) VALUES (?, ?, 0, ?, ?)",
            (str(key), persona, now, now),
        )
        info = await self.get_thread(key)
        assert info is not None
        return info

    async def restart_thread(self, key: ThreadKey, persona: str) -> ThreadInfo:
        """A new epoch: the model's context starts over from ``persona``; the log is kept."""
        async def work(db: aiosqlite.Connection) -> None:
            await db.execute(
                "UPDATE threads SET persona = ?, epoch = epoch + 1, updated_at = ? WHERE key = ?",
                (persona, self.clock(), str(key)),
            )
            await db.execute("DELETE FROM states WHERE thread_key = ?", (str(key),))

        await self._transaction(work)
        info = await self.get_thread(key)
        assert info is not None
        return info

    async def list_threads(self, platform: str, prefix: str = "", limit: int = 100) -> list[ThreadInfo]:
        start = f"{platform}:{prefix}"  # thread ids are case-sensitive: compare exactly, not with LIKE
        async with self.db.execute(
            """SELECT t.*, (SELECT text FROM messages m WHERE m.thread_key = t.key AND m.role = 'user'
                            ORDER BY id LIMIT 1) AS title
               FROM threads t WHERE substr(key, 1, ?) = ? ORDER BY updated_at DESC LIMIT ?""",
            (len(start), start, limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_thread(row) for row in rows]

    # --- messages ------------------------------------------------------------------------------------

    async def add_message(
        self, key: ThreadKey, role: Role, text: str, *, author: str = "",
        platform_message_id: str | None = None, status: Status = "done",
    ) -> StoredMessage:
        """Append to the log and commit at once (a user's message is durable before it is answered)."""
        async def work(db: aiosqlite.Connection) -> int:
            return await self._insert_message(db, key, role, text, author, platform_message_id, status)

        message_id = await self._transaction(work)
        message = await self.get_message(message_id)
        assert message is not None
        return message

    async def _insert_message(
        self, db: aiosqlite.Connection, key: ThreadKey, role: Role, text: str, author: str,
        platform_message_id: str | None, status: Status,
    ) -> int:
        now = self.clock()
        cursor = await db.execute(
            """INSERT INTO messages (thread_key, epoch, role, author, text, platform_message_id, status, created_at)
               VALUES (?, (SELECT epoch FROM threads WHERE key = ?), ?, ?, ?, ?, ?, ?)""",
            (str(key), str(key), role, author, text, platform_message_id, status, now),
        )
        await db.execute("UPDATE threads SET updated_at = ? WHERE key = ?", (now, str(key)))
        assert cursor.lastrowid is not None
        return int(cursor.lastrowid)

    async def get_message(self, message_id: int) -> StoredMessage | None:
        async with self.db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)) as cursor:
            row = await cursor.fetchone()
        return _message(row) if row else None

    async def messages(self, key: ThreadKey, epoch: int | None = None) -> list[StoredMessage]:
        query, args = "SELECT * FROM messages WHERE thread_key = ?", [str(key)]
        args_typed: list[object] = list(args)
        if epoch is not None:
            query += " AND epoch = ?"
            args_typed.append(epoch)
        async with self.db.execute(query + " ORDER BY id", args_typed) as cursor:
            rows = await cursor.fetchall()
        return [_message(row) for row in rows]

    async def position_in_thread(self, key: ThreadKey, message_id: int) -> int:
        """How many messages of the thread come before this one (0 for its first): a per-thread
        count, unlike the row id, which depends on what every other thread wrote meanwhile."""
        async with self.db.execute("SELECT COUNT(*) FROM messages WHERE thread_key = ? AND id < ?",
                                   (str(key), message_id)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def set_status(self, message_id: int, status: Status) -> None:
        await self._write("UPDATE messages SET status = ? WHERE id = ?", (status, message_id))

    async def mark_interrupted(self) -> list[StoredMessage]:
        """After a crash or kill: user messages still pending were never answered. Mark them and
        add a notice to their thread, so the thread shows what happened instead of hanging."""
        async with self.db.execute("SELECT * FROM messages WHERE status = 'pending' ORDER BY id") as cursor:
            pending = [_message(row) for row in await cursor.fetchall()]

        async def work(db: aiosqlite.Connection) -> None:
            for message in pending:
                await db.execute("UPDATE messages SET status = 'interrupted' WHERE id = ?", (message.id,))
                await self._insert_message(
                    db, message.thread, "notice",
                    "Raven was restarted while answering this message; please send it again.",
                    "raven", None, "done",
                )

        if pending:
            await self._transaction(work)
        return pending

    async def finish_turn(
        self, key: ThreadKey, user_message_id: int, reply: str, state: StoredState | None,
        status: Status = "answered", tokens: list[int] | None = None, tokenizer: str | None = None,
    ) -> StoredMessage:
        """Store the reply (with the token ids the model read), mark the user's message answered and
        save the new state — one transaction, so a crash leaves either the whole turn or none of it."""
        async def work(db: aiosqlite.Connection) -> int:
            reply_id = await self._insert_message(db, key, "assistant", reply, "raven", None, "done")
            if tokens is not None:
                await db.execute("UPDATE messages SET tokens = ?, tokenizer = ? WHERE id = ?",
                                 (pack_tokens(tokens), tokenizer, reply_id))
            await db.execute("UPDATE messages SET status = ? WHERE id = ?", (status, user_message_id))
            if state is not None:
                await db.execute(
                    _UPSERT_STATE,
                    (str(key), state.fingerprint, state.epoch, reply_id, state.token_count,
                     checksum(state.blob), state.blob, self.clock()),
                )
            return reply_id

        reply_id = await self._transaction(work)
        message = await self.get_message(reply_id)
        assert message is not None
        return message

    # --- states --------------------------------------------------------------------------------------

    async def load_state(self, key: ThreadKey) -> StoredState | None:
        async with self.db.execute("SELECT * FROM states WHERE thread_key = ?", (str(key),)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        blob = bytes(row["blob"])
        return StoredState(
            fingerprint=row["fingerprint"], epoch=row["epoch"], last_message_id=row["last_message_id"],
            token_count=row["token_count"], blob=blob, checksum_ok=checksum(blob) == row["checksum"],
        )

    async def save_state(self, key: ThreadKey, state: StoredState) -> None:
        await self._write(
            _UPSERT_STATE,
            (str(key), state.fingerprint, state.epoch, state.last_message_id, state.token_count,
             checksum(state.blob), state.blob, self.clock()),
        )

    async def delete_state(self, key: ThreadKey) -> None:
        await self._write("DELETE FROM states WHERE thread_key = ?", (str(key),))

    # --- deduplication -------------------------------------------------------------------------------

    async def claim_event(self, key: str, ttl_s: float) -> bool:
        """True the first time ``key`` is claimed within ``ttl_s``; expired keys are swept here."""
        now = self.clock()

        async def work(db: aiosqlite.Connection) -> bool:
            await db.execute("DELETE FROM processed_events WHERE created_at < ?", (now - ttl_s,))
            cursor = await db.execute(
                "INSERT OR IGNORE INTO processed_events (key, created_at) VALUES (?, ?)", (key, now)
            )
            return cursor.rowcount == 1

        return bool(await self._transaction(work))


TOKEN_FORMAT = np.dtype("<i4")
"""Reply token ids on disk: little-endian int32, the same bytes on every machine."""


def pack_tokens(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype=TOKEN_FORMAT).tobytes()


def unpack_tokens(blob: bytes | None) -> list[int] | None:
    """The stored ids; None when absent or malformed (a rebuild then re-reads the reply's text)."""
    if blob is None or len(blob) % TOKEN_FORMAT.itemsize:
        return None
    return [int(t) for t in np.frombuffer(bytes(blob), dtype=TOKEN_FORMAT)]


def _thread(row: aiosqlite.Row) -> ThreadInfo:
    title = (row["title"] or "").strip().split("\n")[0][:80]
    return ThreadInfo(
        key=ThreadKey.parse(row["key"]), persona=row["persona"], epoch=row["epoch"], title=title,
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


def _message(row: aiosqlite.Row) -> StoredMessage:
    return StoredMessage(
        id=row["id"], thread=ThreadKey.parse(row["thread_key"]), epoch=row["epoch"], role=row["role"],
        author=row["author"], text=row["text"], platform_message_id=row["platform_message_id"],
        status=row["status"], created_at=row["created_at"],
        tokens=unpack_tokens(row["tokens"]),
        tokenizer=row["tokenizer"],
    )
