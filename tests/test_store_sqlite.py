"""The SQLite store on real database files: the whole Store contract, then what only SQLite has —
WAL and pragmas, ``user_version`` migrations from older files, refusing a newer one, what is on disk
byte for byte, damaged rows, and query plans that keep a turn independent of the thread's length.

A plain ``sqlite3`` connection plays "another process" (or the same process after a crash): what it
sees is what is on disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.errors import RavenError
from bot.events import ThreadKey
from bot.storage import SQLiteStore, StateDraft, StoredState
from bot.storage.migrations import MIGRATIONS, SCHEMA_VERSION
from bot.storage.records import checksum
from bot.storage.sqlite import (
    CHANNEL_ACTIVITY_QUERY,
    GET_THREAD_QUERY,
    INSERT_MESSAGE_QUERY,
    LAST_DELIVERY_QUERY,
    LAST_REPLY_QUERY,
    LAST_THREAD_OF_QUERY,
    POSITION_QUERY,
    USER_ACTIVITY_QUERY,
)
from tests.store_contract import KEY, MakeStore, StoreContract, state, turn


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "raven.db"


class TestSQLiteStoreContract(StoreContract):
    integrity_errors = (sqlite3.IntegrityError,)

    @pytest.fixture
    def make_store(self, db_path: Path) -> MakeStore:
        return lambda clock: SQLiteStore(db_path, clock=clock)


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(db_path) as opened:
        yield opened


def peek(path: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read through an independent connection: only committed data is visible to it."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def old_database(path: Path, version: int) -> sqlite3.Connection:
    """A file as Raven's schema ``version`` left it (its migrations exactly as they were released)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    for migration in MIGRATIONS[:version]:
        for statement in migration:
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {version}")
    return db


# --- schema, pragmas, versions ---------------------------------------------------------------------

async def test_open_creates_schema_with_wal_and_user_version(store: SQLiteStore, db_path: Path) -> None:
    assert db_path.is_file()
    assert SCHEMA_VERSION == 8
    # journal_mode=WAL is a property of the file: a fresh connection sees it too.
    assert peek(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert peek(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {row[0] for row in peek(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"threads", "messages", "states", "processed_events", "instances", "turns"} <= tables
    assert "message_seq" not in tables  # the migration's scratch table is temporary
    indexes = {row[0] for row in peek(db_path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"messages_by_thread", "messages_by_thread_seq", "messages_by_role", "turns_in_flight",
            "messages_by_user", "messages_by_channel"} <= indexes
    async with store.db.execute("PRAGMA foreign_keys") as cursor:
        assert tuple(await cursor.fetchone() or ()) == (1,)
    async with store.db.execute("PRAGMA busy_timeout") as cursor:
        assert tuple(await cursor.fetchone() or ()) == (5000,)


async def test_a_version_1_database_is_migrated_and_keeps_its_data(db_path: Path) -> None:
    with old_database(db_path, 1) as db:  # what Raven's first schema left on disk
        db.execute("INSERT INTO threads VALUES ('test:t', 'sql', 0, 1.0, 1.0)")
        db.execute("INSERT INTO messages (thread_key, epoch, role, text, created_at) "
                   "VALUES ('test:t', 0, 'user', 'hi', 1.0)")
    db.close()
    async with SQLiteStore(db_path) as store:
        messages = await store.messages(ThreadKey("test", "t"))
        assert [(m.text, m.tokens) for m in messages] == [("hi", None)]
        reply = await store.finish_turn(ThreadKey("test", "t"), messages[0].id, "hello", None,
                                        tokens=[5, 70000, 261], tokenizer="tok")
        assert (reply.tokens, reply.tokenizer) == ([5, 70000, 261], "tok")
        assert await store.position_in_thread(ThreadKey("test", "t"), reply.id) == 1
        assert await store.last_reply_id(ThreadKey("test", "t"), 0, reply.id + 1) == reply.id
    assert peek(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_a_version_2_database_gets_positions_backfilled(db_path: Path) -> None:
    """v3 numbers each thread's existing messages 0, 1, 2… in id order; new ones carry on from there."""
    a, b = ThreadKey("test", "a"), ThreadKey("test", "b")
    with old_database(db_path, 2) as db:
        db.execute("INSERT INTO threads VALUES ('test:a', 'sql', 1, 1.0, 1.0), ('test:b', 'sql', 0, 1.0, 1.0)")
        rows = [("test:a", 0, "user", "answered"), ("test:b", 0, "user", "answered"),
                ("test:a", 0, "assistant", "done"), ("test:a", 0, "notice", "done"),
                ("test:b", 0, "assistant", "done"), ("test:a", 1, "user", "answered"),
                ("test:a", 1, "assistant", "done"), ("test:b", 0, "user", "pending")]
        db.executemany("INSERT INTO messages (thread_key, epoch, role, text, status, created_at) "
                       "VALUES (?, ?, ?, 'x', ?, 1.0)", rows)
    db.close()
    async with SQLiteStore(db_path) as store:
        log_a, log_b = await store.messages(a), await store.messages(b)
        assert [await store.position_in_thread(a, m.id) for m in log_a] == [0, 1, 2, 3, 4]
        assert [await store.position_in_thread(b, m.id) for m in log_b] == [0, 1, 2]
        assert await store.last_reply_id(a, 1, 10**9) == log_a[4].id
        assert await store.last_reply_id(a, 0, 10**9) == log_a[1].id
        assert [m.id for m in await store.context(a, 1, 10**9)] == [log_a[3].id, log_a[4].id]
        added = await store.add_message(b, "user", "new")
        assert await store.position_in_thread(b, added.id) == 3
    assert peek(db_path, "SELECT thread_key, seq FROM messages ORDER BY id") == [
        ("test:a", 0), ("test:b", 0), ("test:a", 1), ("test:a", 2), ("test:b", 1), ("test:a", 3), ("test:a", 4),
        ("test:b", 2), ("test:b", 3)]


async def test_a_version_3_database_turns_its_pending_messages_into_ownerless_turns(db_path: Path) -> None:
    """A message a Raven of schema 3 was answering when it stopped: recoverable by the next one."""
    with old_database(db_path, 3) as db:
        db.execute("INSERT INTO threads VALUES ('test:t', 'sql', 0, 1.0, 1.0)")
        db.executemany("INSERT INTO messages (thread_key, epoch, seq, role, text, status, created_at) "
                       "VALUES ('test:t', 0, ?, ?, ?, ?, 1.0)",
                       [(0, "user", "answered one", "answered"), (1, "assistant", "reply", "done"),
                        (2, "user", "was being answered", "pending")])
    db.close()
    async with SQLiteStore(db_path) as store:
        assert peek(db_path, "SELECT message_id, phase, owner FROM turns") == [(3, "received", None)]
        [recovered] = await store.recover(lease_s=30)
        assert recovered.message_id == 3 and recovered.owner is None
        log = await store.messages(ThreadKey("test", "t"))
        assert [(m.role, m.status) for m in log][-2:] == [("user", "interrupted"), ("notice", "done")]


async def test_a_version_4_database_keeps_its_saved_states_as_the_current_ones(db_path: Path) -> None:
    """Migration 5 moves each thread's one state into slot 0, which a thread starts with as current."""
    blob = b"state-bytes" * 10
    with old_database(db_path, 4) as db:
        db.execute("INSERT INTO threads VALUES ('test:t', 'sql', 0, 1.0, 1.0)")
        db.execute("INSERT INTO messages (thread_key, epoch, seq, role, text, status, created_at) "
                   "VALUES ('test:t', 0, 0, 'assistant', 'reply', 'done', 1.0)")
        db.execute("INSERT INTO states VALUES ('test:t', 'fp', 0, 1, 7, ?, ?, 1.0)", (checksum(blob), blob))
    db.close()
    async with SQLiteStore(db_path) as store:
        key = ThreadKey("test", "t")
        assert await store.load_state(key) == StoredState("fp", 0, 1, 7, blob, True)
        assert await store.load_prior_state(key) is None
        thread = await store.get_thread(key)
        assert thread is not None and thread.forked_from is None and thread.title == ""


async def test_recovery_finds_turns_in_flight_through_its_partial_index(store: SQLiteStore, db_path: Path) -> None:
    await store.register_instance("A")
    for n in range(50):
        await store.accept(KEY, "default", f"q{n}", owner="A")
    plan = " ".join(str(row[-1]) for row in peek(
        db_path, "EXPLAIN QUERY PLAN SELECT * FROM turns WHERE phase IN ('received', 'generating') AND owner = 'A'"))
    assert "turns_in_flight" in plan


async def test_seq_is_unique_per_thread(store: SQLiteStore, db_path: Path) -> None:
    """The database itself refuses two messages at one place in a thread."""
    await store.ensure_thread(KEY, "default")
    await store.add_message(KEY, "user", "one")
    conn = sqlite3.connect(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO messages (thread_key, epoch, seq, role, text, created_at) "
                         "VALUES (?, 0, 0, 'user', 'dup', 1.0)", (str(KEY),))
    finally:
        conn.close()


async def test_reply_token_ids_are_stored_little_endian_and_a_malformed_blob_reads_as_none(
        store: SQLiteStore, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    user = await store.add_message(KEY, "user", "hi")
    reply = await store.finish_turn(KEY, user.id, "hello", None, tokens=[1, 65535, 70000], tokenizer="tok")
    # The same bytes on any machine, whatever its byte order.
    assert peek(db_path, f"SELECT tokens FROM messages WHERE id = {reply.id}") == [(
        b"\x01\x00\x00\x00" b"\xff\xff\x00\x00" b"\x70\x11\x01\x00",)]
    await store.db.execute("UPDATE messages SET tokens = ? WHERE id = ?", (b"\x01\x00\x00", reply.id))
    await store.db.commit()
    stored = await store.get_message(reply.id)
    assert stored is not None and stored.tokens is None  # a rebuild re-reads the text instead
    assert stored.tokenizer == "tok"


async def test_reopening_is_idempotent(db_path: Path) -> None:
    for _ in range(3):  # migrations must not run again (they would fail on "table already exists")
        async with SQLiteStore(db_path) as again:
            await again.ensure_thread(KEY, "default")
    assert peek(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert peek(db_path, "PRAGMA journal_mode") == [("wal",)]


def _newer_database(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 98}")
    conn.commit()
    conn.close()


async def test_newer_schema_is_refused_with_a_clear_error(db_path: Path) -> None:
    _newer_database(db_path)
    with pytest.raises(Exception, match="newer") as info:
        async with SQLiteStore(db_path):
            pass
    message = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 98}" in message
    assert str(db_path) in message
    # Nothing was migrated or created in the refused file.
    assert peek(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'") == []
    assert peek(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 98,)]


async def test_newer_schema_refusal_is_a_raven_error(db_path: Path) -> None:
    """The CLI reports RavenError as one line; anything else becomes a traceback."""
    _newer_database(db_path)
    with pytest.raises(RavenError, match="newer"):
        async with SQLiteStore(db_path):
            pass


def _connection_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not threading.main_thread()}


async def test_refused_open_leaves_no_connection_open(db_path: Path) -> None:
    """aiosqlite runs each connection in a non-daemon thread: one left open when ``open()`` fails
    keeps the whole process from exiting (``raven chat`` on a newer database hangs forever)."""
    _newer_database(db_path)
    before = _connection_threads()
    store = SQLiteStore(db_path)  # held, as a traceback or the caller holds it
    try:
        with pytest.raises(Exception, match="newer"):
            await store.open()
        await asyncio.sleep(0.05)
        leaked = _connection_threads() - before
        assert not leaked, f"threads still running after a refused open: {[t.name for t in leaked]}"
    finally:
        await store.close()


# --- what is on disk -------------------------------------------------------------------------------

async def test_add_message_is_on_disk_at_once(store: SQLiteStore, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    message = await store.add_message(KEY, "user", "is this durable?", author="ann",
                                      platform_message_id="m-1", status="pending")
    rows = peek(db_path, "SELECT id, thread_key, epoch, seq, role, author, text, platform_message_id, status "
                         "FROM messages")
    assert rows == [(message.id, "terminal:t1", 0, 0, "user", "ann", "is this durable?", "m-1", "pending")]


@pytest.mark.parametrize("sabotage", ["blob is not bytes", "fingerprint violates NOT NULL"])
async def test_a_failed_finish_turn_leaves_nothing_on_disk(store: SQLiteStore, db_path: Path, sabotage: str) -> None:
    await store.ensure_thread(KEY, "default")
    user = await store.add_message(KEY, "user", "question", status="pending")
    if sabotage == "blob is not bytes":
        bad = StateDraft("fp", 0, 3, blob=None)  # type: ignore[arg-type]
    else:
        bad = StateDraft(None, 0, 3, blob=b"x")  # type: ignore[arg-type]
    with pytest.raises((TypeError, AttributeError, sqlite3.IntegrityError)):
        await store.finish_turn(KEY, user.id, "the reply", bad)
    assert peek(db_path, "SELECT role, status FROM messages ORDER BY id") == [("user", "pending")]
    assert peek(db_path, "SELECT COUNT(*) FROM states") == [(0,)]
    await store.finish_turn(KEY, user.id, "the reply", state(b"good"))
    assert peek(db_path, "SELECT role, status, text, seq FROM messages ORDER BY id") == [
        ("user", "answered", "question", 0), ("assistant", "done", "the reply", 1)]


async def test_finish_turn_writes_one_state_row(store: SQLiteStore, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    user = await store.add_message(KEY, "user", "q", status="pending")
    reply = await store.finish_turn(KEY, user.id, "a", state(b"\x00\x01state"), status="answered")
    assert peek(db_path, "SELECT thread_key, last_message_id, token_count, blob FROM states") == [
        ("terminal:t1", reply.id, 7, b"\x00\x01state")]
    assert peek(db_path, "SELECT status FROM messages WHERE id = ?", (user.id,)) == [("answered",)]
    await store.restart_thread(KEY, "sql")
    assert peek(db_path, "SELECT COUNT(*) FROM states") == [(0,)]


async def test_load_state_detects_a_corrupted_blob(store: SQLiteStore, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    await store.save_state(KEY, state(b"\x01\x02\x03\x04" * 64), 0)
    good = await store.load_state(KEY)
    assert good is not None and good.checksum_ok and good.blob == b"\x01\x02\x03\x04" * 64
    assert (good.fingerprint, good.token_count) == ("fp", 7)

    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE states SET blob = ? WHERE thread_key = ?", (b"\x01\x02\x03\x05" * 64, str(KEY)))
    conn.commit()
    conn.close()

    bad = await store.load_state(KEY)
    assert bad is not None and bad.checksum_ok is False and bad.blob == b"\x01\x02\x03\x05" * 64
    await store.delete_state(KEY)
    assert await store.load_state(KEY) is None


async def test_a_torn_state_blob_fails_its_checksum(store: SQLiteStore, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    await store.save_state(KEY, state(b"\x07" * 1000), 0)
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE states SET blob = substr(blob, 1, 500) WHERE thread_key = ?", (str(KEY),))
    conn.commit()
    conn.close()
    torn = await store.load_state(KEY)
    assert torn is not None and len(torn.blob) == 500 and torn.checksum_ok is False


# --- query plans: a turn does not walk the thread ---------------------------------------------------

def plan(path: Path, sql: str, args: tuple[object, ...]) -> list[str]:
    return [str(row[3]) for row in peek(path, "EXPLAIN QUERY PLAN " + sql, args)]


async def _long_thread(store: SQLiteStore, db_path: Path, length: int = 3000) -> None:
    """Thousands of messages over two epochs, written directly (the store would take seconds)."""
    await store.ensure_thread(KEY, "default")
    await turn(store, KEY, "q", "a")
    conn = sqlite3.connect(db_path)
    try:
        conn.executemany(
            "INSERT INTO messages (thread_key, epoch, seq, role, text, status, created_at) "
            "VALUES (?, ?, ?, ?, 'x', ?, 1.0)",
            [(str(KEY), i * 2 // length, 2 + i, "user" if i % 2 else "assistant", "answered" if i % 2 else "done")
             for i in range(length)])
        conn.execute("UPDATE threads SET epoch = 1 WHERE key = ?", (str(KEY),))
        conn.commit()
    finally:
        conn.close()


async def test_last_reply_id_is_one_index_seek(store: SQLiteStore, db_path: Path) -> None:
    await _long_thread(store, db_path)
    steps = plan(db_path, LAST_REPLY_QUERY, (str(KEY), 1, 10**9))
    assert len(steps) == 1 and steps[0].startswith("SEARCH messages USING COVERING INDEX messages_by_role"), steps
    assert "epoch=?" in steps[0] and "id<?" in steps[0]
    assert "TEMP B-TREE" not in " ".join(steps)  # the index already yields newest first
    newest = peek(db_path, "SELECT MAX(id) FROM messages WHERE role = 'assistant' AND epoch = 1")[0][0]
    assert await store.last_reply_id(KEY, 1, 10**9) == newest


async def test_the_other_queries_of_a_turn_are_index_seeks(store: SQLiteStore, db_path: Path) -> None:
    await _long_thread(store, db_path)
    for name, sql, args in [
        ("position", POSITION_QUERY, (str(KEY), 10**9)),
        ("last delivery", LAST_DELIVERY_QUERY, (str(KEY),)),  # turns_by_thread, newest first
        ("last thread of", LAST_THREAD_OF_QUERY, ("web:alice", 9, "terminal:")),  # messages_by_user
        ("insert", INSERT_MESSAGE_QUERY, (str(KEY), "user", "", "x", None, "pending", 1.0, None, None, None, None)),
        ("thread", GET_THREAD_QUERY, (str(KEY),)),
        ("user activity", USER_ACTIVITY_QUERY, ("web:alice", 0.0)),
        ("channel activity", CHANNEL_ACTIVITY_QUERY, ("discord:1", 0.0)),
    ]:
        steps = plan(db_path, sql, args)
        assert steps and all(s.startswith(("SEARCH", "SCALAR SUBQUERY", "CORRELATED SCALAR SUBQUERY"))
                             for s in steps), (name, steps)
        assert "TEMP B-TREE" not in " ".join(steps), (name, steps)
    assert "USING COVERING INDEX messages_by_thread_seq" in " ".join(plan(db_path, INSERT_MESSAGE_QUERY, (
        str(KEY), "user", "", "x", None, "pending", 1.0, None, None, None, None)))
    assert await store.position_in_thread(KEY, 10**9) == 3002
    added = await store.add_message(KEY, "user", "next")
    assert await store.position_in_thread(KEY, added.id) == 3002

