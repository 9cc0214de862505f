"""The SQLite store (aiosqlite, WAL): threads, the message log, saved model states, processed events.

Every SQLite detail lives here — pragmas, ``BEGIN IMMEDIATE``, ``INSERT OR IGNORE``, ``lastrowid``, the
``user_version`` migrations (``bot.storage.migrations``); what each method promises is the ``Store``
protocol's (``bot.storage.protocol``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from bot.errors import StoreError
from bot.events import ThreadKey
from bot.storage.migrations import MIGRATIONS, SCHEMA_VERSION
from bot.storage.records import (
    INTERRUPTED_NOTICE,
    Accepted,
    Delivery,
    Exchange,
    Phase,
    Repair,
    Role,
    StateDraft,
    Status,
    StoredMessage,
    StoredState,
    ThreadInfo,
    TurnRecord,
    checksum,
    pack_tokens,
    unpack_tokens,
)

if TYPE_CHECKING:
    from bot.storage.protocol import Store

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

# A thread's states live in two slots; threads.state_slot is the current one, the other holds the state
# from before the last reply (see migration 5). ``_SLOT`` and ``_OTHER_SLOT`` take the thread's key.
_SLOT = "(SELECT state_slot FROM threads WHERE key = ?)"
_OTHER_SLOT = "(SELECT 1 - state_slot FROM threads WHERE key = ?)"


def _upsert_state(slot: str) -> str:
    """Write a state into ``slot`` (an SQL expression taking the thread's key as its one parameter)."""
    return f"""
    INSERT INTO states (thread_key, slot, fingerprint, epoch, last_message_id, token_count, checksum, blob,
                        updated_at)
    VALUES (?, {slot}, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (thread_key, slot) DO UPDATE SET fingerprint = excluded.fingerprint, epoch = excluded.epoch,
      last_message_id = excluded.last_message_id, token_count = excluded.token_count,
      checksum = excluded.checksum, blob = excluded.blob, updated_at = excluded.updated_at"""


_UPSERT_CURRENT_STATE = _upsert_state(_SLOT)
_UPSERT_NEXT_STATE = _upsert_state(_OTHER_SLOT)

_THREAD_COLUMNS = """t.*, (SELECT text FROM messages m WHERE m.thread_key = t.key AND m.role = 'user'
                           ORDER BY id LIMIT 1) AS first_text"""

# The queries every turn runs, named so that tests can check their plans (each one an index seek).
GET_THREAD_QUERY = f"SELECT {_THREAD_COLUMNS} FROM threads t WHERE key = ?"
INSERT_MESSAGE_QUERY = """
    INSERT INTO messages (thread_key, epoch, seq, role, author, text, platform_message_id, status, created_at,
                          tokens, tokenizer, user_ref, channel_ref)
    VALUES (?1, (SELECT epoch FROM threads WHERE key = ?1),
            (SELECT COALESCE(MAX(seq) + 1, 0) FROM messages WHERE thread_key = ?1), ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
# One query per limit: each names its own indexed column (messages_by_user, messages_by_channel).
_ACTIVITY_QUERY = """
    SELECT m.created_at, COALESCE(t.generated, 0) FROM messages m LEFT JOIN turns t ON t.message_id = m.id
    WHERE m.{column} = ? AND m.created_at > ? AND m.status != 'refused' ORDER BY m.created_at"""
USER_ACTIVITY_QUERY = _ACTIVITY_QUERY.format(column="user_ref")
CHANNEL_ACTIVITY_QUERY = _ACTIVITY_QUERY.format(column="channel_ref")
LAST_REPLY_QUERY = """
    SELECT id FROM messages WHERE thread_key = ? AND role = 'assistant' AND epoch = ? AND id < ?
      AND status = 'done'
    ORDER BY id DESC LIMIT 1"""
# seq numbers a thread's messages 0, 1, 2… in id order, so the newest one below ``id`` says how many are.
# the sender's messages newest first (messages_by_user), the first under the prefix
LAST_THREAD_OF_QUERY = """SELECT thread_key FROM messages
    WHERE user_ref = ? AND substr(thread_key, 1, ?) = ?
    ORDER BY created_at DESC LIMIT 1"""
# newest turn first (turns_by_thread), then its messages from the last (the deliveries' primary key)
LAST_DELIVERY_QUERY = """SELECT d.* FROM turns t JOIN deliveries d ON d.turn_id = t.id
    WHERE t.thread_key = ? AND d.platform_message_id != ''
    ORDER BY t.id DESC, d.position DESC LIMIT 1"""
POSITION_QUERY = "SELECT seq + 1 FROM messages WHERE thread_key = ? AND id < ? ORDER BY id DESC LIMIT 1"
# The model reads a question just before its answer. Messages are stored as they arrive, so two
# questions sent together sit before both answers in the log: a question is placed at its answer's id
# (through its turn), and ahead of it. Messages from before turns existed sit at their own ids.
_CONTEXT_QUERY = """
    SELECT m.* FROM messages m LEFT JOIN turns t ON t.message_id = m.id
    WHERE m.thread_key = ? AND m.epoch = ?
      AND ((m.role = 'assistant' AND m.status = 'done') OR (m.role = 'user' AND m.status IN ('answered', 'adopted')))
      AND COALESCE(t.reply_id, m.id) < ?
    ORDER BY COALESCE(t.reply_id, m.id), m.role = 'assistant'"""
_LAST_EXCHANGE_QUERY = """
    SELECT m.* FROM messages m LEFT JOIN turns t ON t.message_id = m.id
    WHERE m.thread_key = ? AND m.epoch = ?
      AND ((m.role = 'assistant' AND m.status = 'done') OR (m.role = 'user' AND m.status IN ('answered', 'adopted')))
    ORDER BY COALESCE(t.reply_id, m.id) DESC, m.role = 'assistant' DESC LIMIT 2"""
_NO_BOUND = 2**63 - 1


class SQLiteStore:
    """One database file. Open with ``async with SQLiteStore(path) as store``."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._db: aiosqlite.Connection | None = None
        # One connection serves every coroutine, so a transaction must not interleave with other
        # writes: each write holds this lock.
        self._write_lock = asyncio.Lock()
        self._running: set[asyncio.Future[Any]] = set()  # transactions under way

    async def __aenter__(self) -> SQLiteStore:
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
        # transactions whose callers were cancelled finish first
        await asyncio.gather(*self._running, return_exceptions=True)
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
        """``work`` in one transaction. Once begun, it runs to its end even if the caller is cancelled
        (shielded): a cancellation between ``BEGIN`` and ``COMMIT`` would leave the one connection
        inside a transaction that no one ends, and every later write would fail."""
        task = asyncio.ensure_future(self._run_transaction(work))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _run_transaction(self, work: Callable[[aiosqlite.Connection], Awaitable[Any]]) -> Any:
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

    async def _scalar(self, sql: str, args: Sequence[object]) -> Any:
        async with self.db.execute(sql, args) as cursor:
            row = await cursor.fetchone()
        return row[0] if row else None

    # --- threads -------------------------------------------------------------------------------------

    async def get_thread(self, key: ThreadKey) -> ThreadInfo | None:
        async with self.db.execute(GET_THREAD_QUERY, (str(key),)) as cursor:
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

    async def rename_thread(self, key: ThreadKey, title: str | None) -> bool:
        return await self._write("UPDATE threads SET title = ?, updated_at = ? WHERE key = ?",
                                 (title, self.clock(), str(key))) == 1

    async def delete_thread(self, key: ThreadKey) -> bool:
        # messages, states, turns and their deliveries go with it (ON DELETE CASCADE)
        return await self._write("DELETE FROM threads WHERE key = ?", (str(key),)) == 1

    async def fork_thread(self, source: ThreadKey, target: ThreadKey, upto_reply_id: int | None = None) -> ThreadInfo:
        now = self.clock()

        async def work(db: aiosqlite.Connection) -> None:
            async with db.execute("SELECT * FROM threads WHERE key = ?", (str(source),)) as cursor:
                origin = await cursor.fetchone()
            if origin is None:
                raise StoreError(f"no thread {source} to fork")
            async with db.execute("SELECT 1 FROM threads WHERE key = ?", (str(target),)) as cursor:
                if await cursor.fetchone() is not None:
                    raise StoreError(f"thread {target} exists already")
            async with db.execute(_CONTEXT_QUERY, (str(source), origin["epoch"], _NO_BOUND)) as cursor:
                context = list(await cursor.fetchall())
            if upto_reply_id is not None:
                ids = [row["id"] for row in context if row["role"] == "assistant"]
                if upto_reply_id not in ids:
                    raise StoreError(f"message {upto_reply_id} is not a reply in the context of {source}")
                context = context[:[row["id"] for row in context].index(upto_reply_id) + 1]
            forked_at = next((row["id"] for row in reversed(context) if row["role"] == "assistant"), None)
            await db.execute(
                """INSERT INTO threads (key, persona, epoch, created_at, updated_at, forked_from, forked_at)
                   VALUES (?, ?, 0, ?, ?, ?, ?)""", (str(target), origin["persona"], now, now, str(source), forked_at))
            copied: dict[int, int] = {}
            for row in context:  # in context order, so the copy's ids keep each question before its answer
                cursor = await db.execute(
                    INSERT_MESSAGE_QUERY,
                    (str(target), row["role"], row["author"], row["text"], None, row["status"], row["created_at"],
                     row["tokens"], row["tokenizer"], None, None))
                assert cursor.lastrowid is not None
                copied[row["id"]] = int(cursor.lastrowid)
            if forked_at is None:
                return
            # The state after the reply forked at, when it is the one saved: one row copied, whatever
            # the thread's length. Otherwise the fork's first turn rebuilds from its (copied) log.
            await db.execute(
                f"""INSERT INTO states (thread_key, slot, fingerprint, epoch, last_message_id, token_count,
                                        checksum, blob, updated_at)
                    SELECT ?, 0, fingerprint, 0, ?, token_count, checksum, blob, ?
                    FROM states WHERE thread_key = ? AND slot = {_SLOT} AND epoch = ? AND last_message_id = ?""",
                (str(target), copied[forked_at], now, str(source), str(source), origin["epoch"], forked_at))

        await self._transaction(work)
        info = await self.get_thread(target)
        assert info is not None
        return info

    async def list_threads(self, platform: str, prefix: str = "", limit: int = 100) -> list[ThreadInfo]:
        start = f"{platform}:{prefix}"  # thread ids are case-sensitive: compare exactly, not with LIKE
        async with self.db.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads t WHERE substr(key, 1, ?) = ? ORDER BY updated_at DESC LIMIT ?",
            (len(start), start, limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_thread(row) for row in rows]

    # --- messages ------------------------------------------------------------------------------------

    async def add_message(
        self, key: ThreadKey, role: Role, text: str, *, author: str = "",
        platform_message_id: str | None = None, status: Status = "done",
    ) -> StoredMessage:
        async def work(db: aiosqlite.Connection) -> int:
            return await self._insert_message(db, key, role, text, author, platform_message_id, status)

        message_id = await self._transaction(work)
        message = await self.get_message(message_id)
        assert message is not None
        return message

    async def _insert_message(
        self, db: aiosqlite.Connection, key: ThreadKey, role: Role, text: str, author: str,
        platform_message_id: str | None, status: Status, tokens: bytes | None = None, tokenizer: str | None = None,
        user_ref: str | None = None, channel_ref: str | None = None,
    ) -> int:
        """Inside a write transaction, so the thread's next ``seq`` cannot be taken meanwhile."""
        now = self.clock()
        cursor = await db.execute(
            INSERT_MESSAGE_QUERY,
            (str(key), role, author, text, platform_message_id, status, now, tokens, tokenizer, user_ref,
             channel_ref),
        )
        await db.execute("UPDATE threads SET updated_at = ? WHERE key = ?", (now, str(key)))
        assert cursor.lastrowid is not None
        return int(cursor.lastrowid)

    async def adopt(self, key: ThreadKey, messages: Sequence[tuple[str, str]]) -> list[StoredMessage]:
        async def work(db: aiosqlite.Connection) -> list[int]:
            return [await self._insert_message(db, key, "user", text, author, None, "adopted")
                    for author, text in messages]

        ids = await self._transaction(work)
        return [message for message in [await self.get_message(i) for i in ids] if message is not None]

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
        return int(await self._scalar(POSITION_QUERY, (str(key), message_id)) or 0)

    async def last_reply_id(self, key: ThreadKey, epoch: int, before_id: int | None = None) -> int:
        bound = _NO_BOUND if before_id is None else before_id
        return int(await self._scalar(LAST_REPLY_QUERY, (str(key), epoch, bound)) or 0)

    async def context(self, key: ThreadKey, epoch: int, before_id: int | None = None) -> list[StoredMessage]:
        bound = _NO_BOUND if before_id is None else before_id
        async with self.db.execute(_CONTEXT_QUERY, (str(key), epoch, bound)) as cursor:
            rows = await cursor.fetchall()
        return [_message(row) for row in rows]

    async def last_exchange(self, key: ThreadKey, epoch: int) -> Exchange | None:
        async with self.db.execute(_LAST_EXCHANGE_QUERY, (str(key), epoch)) as cursor:
            rows = list(await cursor.fetchall())
        if len(rows) < 2 or rows[0]["role"] != "assistant" or rows[1]["role"] != "user":
            return None
        return Exchange(question=_message(rows[1]), reply=_message(rows[0]))

    async def user_activity(self, user_ref: str, since: float) -> list[tuple[float, int]]:
        return await self._activity(USER_ACTIVITY_QUERY, user_ref, since)

    async def channel_activity(self, channel_ref: str, since: float) -> list[tuple[float, int]]:
        return await self._activity(CHANNEL_ACTIVITY_QUERY, channel_ref, since)

    async def _activity(self, query: str, ref: str, since: float) -> list[tuple[float, int]]:
        async with self.db.execute(query, (ref, since)) as cursor:
            return [(float(row[0]), int(row[1])) for row in await cursor.fetchall()]

    async def prune(self, threads_idle_before: float | None, states_idle_before: float | None) -> tuple[int, int]:
        async def work(db: aiosqlite.Connection) -> tuple[int, int]:
            threads = states = 0
            if threads_idle_before is not None:
                cursor = await db.execute(
                    """DELETE FROM threads WHERE updated_at < ? AND NOT EXISTS (
                         SELECT 1 FROM turns t WHERE t.thread_key = threads.key
                           AND t.phase IN ('received', 'generating'))""", (threads_idle_before,))
                threads = cursor.rowcount
            if states_idle_before is not None:
                cursor = await db.execute("DELETE FROM states WHERE updated_at < ?", (states_idle_before,))
                states = cursor.rowcount
            return int(threads), int(states)

        return tuple(await self._transaction(work))  # type: ignore[return-value]

    async def set_status(self, message_id: int, status: Status) -> None:
        await self._write("UPDATE messages SET status = ? WHERE id = ?", (status, message_id))

    # --- instances and turns -------------------------------------------------------------------------

    async def register_instance(self, instance_id: str, label: str = "") -> None:
        now = self.clock()
        await self._write(
            """INSERT INTO instances (id, label, started_at, heartbeat_at) VALUES (?, ?, ?, ?)
               ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, stopped_at = NULL""",
            (instance_id, label, now, now),
        )

    async def heartbeat(self, instance_id: str) -> None:
        await self._write("UPDATE instances SET heartbeat_at = ? WHERE id = ?", (self.clock(), instance_id))

    async def stop_instance(self, instance_id: str) -> None:
        await self._write("UPDATE instances SET stopped_at = ? WHERE id = ?", (self.clock(), instance_id))

    async def accept(
        self, key: ThreadKey, default_persona: str, text: str, *, author: str = "",
        platform_message_id: str | None = None, owner: str | None = None, answer: bool = True,
        writes_reply: bool = False, user_ref: str | None = None, channel_ref: str | None = None,
        refused: bool = False, repairable: bool = True,
    ) -> Accepted:
        now = self.clock()
        answer, writes_reply = answer and not refused, writes_reply and not refused

        async def work(db: aiosqlite.Connection) -> tuple[int, int | None]:
            await db.execute(
                "INSERT OR IGNORE INTO threads (key, persona, epoch, created_at, updated_at) VALUES (?, ?, 0, ?, ?)",
                (str(key), default_persona, now, now),
            )
            status: Status = "refused" if refused else "pending" if answer and not writes_reply else "done"
            message_id = await self._insert_message(db, key, "user", text, author, platform_message_id, status,
                                                    user_ref=user_ref, channel_ref=channel_ref)
            turn_id = None
            if answer or writes_reply:
                cursor = await db.execute(
                    """INSERT INTO turns (thread_key, message_id, phase, owner, created_at, updated_at, notified)
                       VALUES (?, ?, 'received', ?, ?, ?, ?)""",
                    (str(key), message_id, owner, now, now, 0 if repairable else 1),
                )
                turn_id = cursor.lastrowid
            return message_id, turn_id

        message_id, turn_id = await self._transaction(work)
        thread = await self.get_thread(key)
        message = await self.get_message(message_id)
        assert thread is not None and message is not None
        return Accepted(thread, message, turn_id)

    async def begin_turn(self, turn_id: int, epoch: int) -> None:
        async def work(db: aiosqlite.Connection) -> None:
            await db.execute("UPDATE turns SET phase = 'generating', updated_at = ? WHERE id = ?",
                             (self.clock(), turn_id))
            await db.execute("UPDATE messages SET epoch = ? WHERE id = (SELECT message_id FROM turns WHERE id = ?)",
                             (epoch, turn_id))

        await self._transaction(work)

    async def end_turn(self, turn_id: int, phase: Phase, reason: str | None = None) -> None:
        async def work(db: aiosqlite.Connection) -> None:
            await db.execute("UPDATE turns SET phase = ?, reason = COALESCE(?, reason), updated_at = ? WHERE id = ?",
                             (phase, reason, self.clock(), turn_id))
            if phase in ("failed", "interrupted"):
                await db.execute(
                    """UPDATE messages SET status = ? WHERE status = 'pending'
                       AND id = (SELECT message_id FROM turns WHERE id = ?)""", (phase, turn_id))
            elif phase == "delivery_failed":  # never seen: out of the thread's context
                await db.execute("""UPDATE messages SET status = 'undelivered'
                                    WHERE id = (SELECT reply_id FROM turns WHERE id = ?)""", (turn_id,))
                await db.execute("""UPDATE messages SET status = 'failed'
                                    WHERE id = (SELECT message_id FROM turns WHERE id = ?)""", (turn_id,))

        await self._transaction(work)

    async def get_turn(self, turn_id: int) -> TurnRecord | None:
        async with self.db.execute("SELECT * FROM turns WHERE id = ?", (turn_id,)) as cursor:
            row = await cursor.fetchone()
        return _turn(row) if row else None

    async def recover(self, lease_s: float) -> list[TurnRecord]:
        stale = self.clock() - lease_s

        async def work(db: aiosqlite.Connection) -> list[TurnRecord]:
            # In the transaction, so a live owner's heartbeat cannot land between the read and the write.
            async with db.execute(
                """SELECT t.* FROM turns t LEFT JOIN instances i ON i.id = t.owner
                   WHERE t.phase IN ('received', 'generating')
                     AND (i.id IS NULL OR i.stopped_at IS NOT NULL OR i.heartbeat_at < ?)
                   ORDER BY t.id""", (stale,),
            ) as cursor:
                orphans = [_turn(row) for row in await cursor.fetchall()]
            now = self.clock()
            for turn in orphans:
                await db.execute("UPDATE turns SET phase = 'interrupted', reason = 'owner gone', updated_at = ? "
                                 "WHERE id = ?", (now, turn.id))
                await db.execute("UPDATE messages SET status = 'interrupted' WHERE id = ?", (turn.message_id,))
                await self._insert_message(db, turn.thread, "notice", INTERRUPTED_NOTICE, "raven", None, "done")
            return orphans

        return list(await self._transaction(work))

    # --- deliveries and repairs ------------------------------------------------------------------------

    async def record_delivery(self, turn_id: int, position: int, platform_message_id: str, shown: str) -> None:
        await self._write(
            """INSERT INTO deliveries (turn_id, position, platform_message_id, shown, updated_at)
               VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (turn_id, position) DO UPDATE SET platform_message_id = excluded.platform_message_id,
                 shown = excluded.shown, updated_at = excluded.updated_at""",
            (turn_id, position, platform_message_id, shown, self.clock()),
        )

    async def deliveries(self, turn_id: int) -> list[Delivery]:
        async with self.db.execute("SELECT * FROM deliveries WHERE turn_id = ? ORDER BY position",
                                   (turn_id,)) as cursor:
            return [_delivery(row) for row in await cursor.fetchall()]

    async def last_thread_of(self, user_ref: str, prefix: str) -> ThreadKey | None:
        async with self.db.execute(LAST_THREAD_OF_QUERY, (user_ref, len(prefix), prefix)) as cursor:
            row = await cursor.fetchone()
        return ThreadKey.parse(row[0]) if row is not None else None

    async def last_delivery(self, thread: ThreadKey) -> Delivery | None:
        async with self.db.execute(LAST_DELIVERY_QUERY, (str(thread),)) as cursor:
            row = await cursor.fetchone()
        return _delivery(row) if row is not None else None

    async def repairs(self, platform: str, lease_s: float, limit: int = 50) -> list[Repair]:
        start = f"{platform}:"
        async with self.db.execute(
            """SELECT t.*, r.text AS reply_text FROM turns t
               LEFT JOIN instances i ON i.id = t.owner
               LEFT JOIN messages r ON r.id = t.reply_id
               WHERE t.notified = 0 AND t.phase IN ('generated', 'interrupted')
                 AND substr(t.thread_key, 1, ?) = ?
                 AND (t.phase = 'interrupted' OR i.id IS NULL OR i.stopped_at IS NOT NULL
                      OR i.heartbeat_at < ?)
               ORDER BY t.id LIMIT ?""",
            (len(start), start, self.clock() - lease_s, limit),
        ) as cursor:
            rows = await cursor.fetchall()
        found = []
        for row in rows:
            turn = _turn(row)
            reply = row["reply_text"][row["shown_from"]:] if turn.phase == "generated" else None
            found.append(Repair(turn, reply, await self.deliveries(turn.id)))
        return found

    async def mark_repaired(self, turn_id: int) -> None:
        await self._write(
            """UPDATE turns SET notified = 1, updated_at = ?,
                 phase = CASE phase WHEN 'generated' THEN 'delivered' ELSE phase END WHERE id = ?""",
            (self.clock(), turn_id),
        )

    async def finish_turn(
        self, key: ThreadKey, user_message_id: int, reply: str, state: StateDraft | None,
        status: Status = "answered", tokens: list[int] | None = None, tokenizer: str | None = None,
        turn_id: int | None = None, finish: str | None = None, replaces: int | None = None,
        reply_status: Status = "done", generated: int = 0, shown_from: int = 0,
    ) -> StoredMessage:
        packed = pack_tokens(tokens) if tokens is not None else None

        async def work(db: aiosqlite.Connection) -> int:
            reply_id = await self._insert_message(db, key, "assistant", reply, "raven", None, reply_status,
                                                  packed, tokenizer if tokens is not None else None)
            await db.execute("UPDATE messages SET status = ? WHERE id = ?", (status, user_message_id))
            if replaces is not None:
                await db.execute("UPDATE messages SET status = 'replaced' WHERE id = ? AND role = 'assistant'",
                                 (replaces,))
            if turn_id is not None:
                await db.execute(
                    """UPDATE turns SET phase = 'generated', reply_id = ?, reason = ?, generated = ?, shown_from = ?,
                         updated_at = ? WHERE id = ?""",
                    (reply_id, finish, generated, shown_from, self.clock(), turn_id))
            if state is not None:
                # A new reply: into the other slot, which becomes current, so the state this turn
                # started from stays as the prior one. A replacement started from that prior state
                # too, so it overwrites the replaced reply's state and the prior one stays.
                upsert = _UPSERT_CURRENT_STATE if replaces is not None else _UPSERT_NEXT_STATE
                await db.execute(upsert, (str(key), str(key), state.fingerprint, state.epoch, reply_id,
                                          state.token_count, checksum(state.blob), state.blob, self.clock()))
                if replaces is None:
                    await db.execute("UPDATE threads SET state_slot = 1 - state_slot WHERE key = ?", (str(key),))
            return reply_id

        reply_id = await self._transaction(work)
        message = await self.get_message(reply_id)
        assert message is not None
        return message

    # --- states --------------------------------------------------------------------------------------

    async def load_state(self, key: ThreadKey) -> StoredState | None:
        return await self._load_state(key, _SLOT)

    async def load_prior_state(self, key: ThreadKey) -> StoredState | None:
        return await self._load_state(key, _OTHER_SLOT)

    async def _load_state(self, key: ThreadKey, slot: str) -> StoredState | None:
        async with self.db.execute(f"SELECT * FROM states WHERE thread_key = ? AND slot = {slot}",
                                   (str(key), str(key))) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        blob = bytes(row["blob"])
        return StoredState(
            fingerprint=row["fingerprint"], epoch=row["epoch"], last_message_id=row["last_message_id"],
            token_count=row["token_count"], blob=blob, checksum_ok=checksum(blob) == row["checksum"],
        )

    async def save_state(self, key: ThreadKey, state: StateDraft, last_message_id: int) -> None:
        await self._write(
            _UPSERT_CURRENT_STATE,
            (str(key), str(key), state.fingerprint, state.epoch, last_message_id, state.token_count,
             checksum(state.blob), state.blob, self.clock()),
        )

    async def delete_state(self, key: ThreadKey) -> None:
        await self._write("DELETE FROM states WHERE thread_key = ?", (str(key),))

    # --- deduplication -------------------------------------------------------------------------------

    async def claim_event(self, key: str, ttl_s: float) -> bool:
        now = self.clock()

        async def work(db: aiosqlite.Connection) -> bool:
            await db.execute("DELETE FROM processed_events WHERE created_at < ?", (now - ttl_s,))
            cursor = await db.execute(
                "INSERT OR IGNORE INTO processed_events (key, created_at) VALUES (?, ?)", (key, now)
            )
            return cursor.rowcount == 1

        return bool(await self._transaction(work))


    # --- export --------------------------------------------------------------------------------------

    async def all_threads(self, after: ThreadKey | None = None, limit: int = 500) -> list[ThreadInfo]:
        async with self.db.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads t WHERE key > ? ORDER BY key LIMIT ?",
            ("" if after is None else str(after), limit),
        ) as cursor:
            rows = await cursor.fetchall()
        return [_thread(row) for row in rows]


def _thread(row: aiosqlite.Row) -> ThreadInfo:
    title = row["title"] if row["title"] is not None else (row["first_text"] or "").strip().split("\n")[0][:80]
    return ThreadInfo(
        key=ThreadKey.parse(row["key"]), persona=row["persona"], epoch=row["epoch"], title=title,
        created_at=row["created_at"], updated_at=row["updated_at"],
        forked_from=ThreadKey.parse(row["forked_from"]) if row["forked_from"] else None,
    )


def _delivery(row: aiosqlite.Row) -> Delivery:
    return Delivery(turn_id=row["turn_id"], position=row["position"],
                    platform_message_id=row["platform_message_id"], shown=row["shown"], updated_at=row["updated_at"])


def _turn(row: aiosqlite.Row) -> TurnRecord:
    return TurnRecord(
        id=row["id"], thread=ThreadKey.parse(row["thread_key"]), message_id=row["message_id"],
        reply_id=row["reply_id"], phase=row["phase"], owner=row["owner"], reason=row["reason"],
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


if TYPE_CHECKING:
    def _is_a_store(store: SQLiteStore) -> Store:  # mypy checks SQLiteStore against the protocol here
        return store
