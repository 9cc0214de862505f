"""The SQLite store on real database files: schema and pragmas, durability of each write, the
atomic end of a turn, epochs, thread listing, event deduplication, crash recovery, state checksums.

A second, plain ``sqlite3`` connection plays "another process" (or the same process after a crash):
what it sees is what is on disk.
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
from bot.storage.sqlite import SCHEMA_VERSION, Store, StoredState

KEY = ThreadKey("terminal", "t1")
OTHER = ThreadKey("terminal", "t2")


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "raven.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    async with Store(db_path) as opened:
        yield opened


def peek(path: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read through an independent connection: only committed data is visible to it."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def state(blob: bytes = b"model-state", epoch: int = 0) -> StoredState:
    return StoredState(fingerprint="fp", epoch=epoch, last_message_id=0, token_count=7, blob=blob, checksum_ok=True)


# --- schema, pragmas, versions ---------------------------------------------------------------------

async def test_open_creates_schema_with_wal_and_user_version(store: Store, db_path: Path) -> None:
    assert db_path.is_file()
    assert SCHEMA_VERSION == 2
    # journal_mode=WAL is a property of the file: a fresh connection sees it too.
    assert peek(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert peek(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {row[0] for row in peek(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"threads", "messages", "states", "processed_events"} <= tables


async def test_a_version_1_database_is_migrated_and_keeps_its_data(db_path: Path) -> None:
    import sqlite3

    from bot.storage.sqlite import MIGRATIONS

    db_path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db_path) as db:  # what Raven's first schema left on disk
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO threads VALUES ('test:t', 'sql', 0, 1.0, 1.0)")
        db.execute("INSERT INTO messages (thread_key, epoch, role, text, created_at) "
                   "VALUES ('test:t', 0, 'user', 'hi', 1.0)")
    async with Store(db_path) as store:
        messages = await store.messages(ThreadKey("test", "t"))
        assert [(m.text, m.tokens) for m in messages] == [("hi", None)]
        reply = await store.finish_turn(ThreadKey("test", "t"), messages[0].id, "hello", None,
                                        tokens=[5, 70000, 261], tokenizer="tok")
        assert (reply.tokens, reply.tokenizer) == ([5, 70000, 261], "tok")
    assert peek(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_reply_token_ids_are_stored_little_endian_and_a_malformed_blob_reads_as_none(
        db_path: Path) -> None:
    async with Store(db_path) as store:
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


async def test_reopening_is_idempotent_and_keeps_data(db_path: Path) -> None:
    async with Store(db_path) as first:
        await first.ensure_thread(KEY, "default")
        await first.add_message(KEY, "user", "hello")
    for _ in range(2):  # migrations must not run again (they would fail on "table already exists")
        async with Store(db_path) as again:
            assert [m.text for m in await again.messages(KEY)] == ["hello"]
            thread = await again.get_thread(KEY)
            assert thread is not None and thread.persona == "default" and thread.epoch == 0
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
        async with Store(db_path):
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
        async with Store(db_path):
            pass


def _connection_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not threading.main_thread()}


async def test_refused_open_leaves_no_connection_open(db_path: Path) -> None:
    """aiosqlite runs each connection in a non-daemon thread: one left open when ``open()`` fails
    keeps the whole process from exiting (``raven chat`` on a newer database hangs forever)."""
    _newer_database(db_path)
    before = _connection_threads()
    store = Store(db_path)  # held, as a traceback or the caller holds it
    try:
        with pytest.raises(Exception, match="newer"):
            await store.open()
        await asyncio.sleep(0.05)
        leaked = _connection_threads() - before
        assert not leaked, f"threads still running after a refused open: {[t.name for t in leaked]}"
    finally:
        await store.close()


# --- messages ------------------------------------------------------------------------------------

async def test_add_message_is_committed_at_once(store: Store, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    message = await store.add_message(KEY, "user", "is this durable?", author="ann",
                                      platform_message_id="m-1", status="pending")
    # Visible to another connection right away: no later write is needed to commit it.
    rows = peek(db_path, "SELECT id, thread_key, epoch, role, author, text, platform_message_id, status "
                         "FROM messages")
    assert rows == [(message.id, "terminal:t1", 0, "user", "ann", "is this durable?", "m-1", "pending")]
    assert message.thread == KEY and message.status == "pending" and message.epoch == 0


async def test_messages_in_order_and_by_epoch(store: Store) -> None:
    await store.ensure_thread(KEY, "default")
    await store.ensure_thread(OTHER, "default")
    for text in ("one", "two", "three"):
        await store.add_message(KEY, "user", text)
    await store.add_message(OTHER, "user", "elsewhere")
    assert [m.text for m in await store.messages(KEY)] == ["one", "two", "three"]
    assert [m.text for m in await store.messages(KEY, epoch=0)] == ["one", "two", "three"]
    assert await store.messages(KEY, epoch=1) == []


@pytest.mark.parametrize("sabotage", ["blob is not bytes", "fingerprint violates NOT NULL"])
async def test_finish_turn_is_all_or_nothing(store: Store, db_path: Path, sabotage: str) -> None:
    await store.ensure_thread(KEY, "default")
    user = await store.add_message(KEY, "user", "question", status="pending")
    if sabotage == "blob is not bytes":
        # Fails in Python after the reply INSERT and the status UPDATE have run.
        bad = StoredState("fp", 0, 0, 3, blob=None, checksum_ok=True)  # type: ignore[arg-type]
    else:
        # Fails in SQLite, in the third statement of the transaction.
        bad = StoredState(None, 0, 0, 3, blob=b"x", checksum_ok=True)  # type: ignore[arg-type]
    with pytest.raises((TypeError, AttributeError, sqlite3.IntegrityError)):
        await store.finish_turn(KEY, user.id, "the reply", bad)

    # Neither the reply, nor the status change, nor a state.
    assert peek(db_path, "SELECT role, status FROM messages ORDER BY id") == [("user", "pending")]
    assert peek(db_path, "SELECT COUNT(*) FROM states") == [(0,)]
    assert [(m.role, m.status) for m in await store.messages(KEY)] == [("user", "pending")]
    assert await store.load_state(KEY) is None

    # The connection is not stuck inside the failed transaction: the next turn commits normally.
    reply = await store.finish_turn(KEY, user.id, "the reply", state(b"good"))
    assert peek(db_path, "SELECT role, status, text FROM messages ORDER BY id") == [
        ("user", "answered", "question"), ("assistant", "done", "the reply")]
    loaded = await store.load_state(KEY)
    assert loaded is not None and loaded.blob == b"good" and loaded.checksum_ok
    assert loaded.last_message_id == reply.id  # finish_turn records the reply it follows


async def test_finish_turn_stores_reply_status_and_state_together(store: Store, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    user = await store.add_message(KEY, "user", "q", status="pending")
    reply = await store.finish_turn(KEY, user.id, "a", state(b"\x00\x01state"), status="answered")
    assert reply.role == "assistant" and reply.author == "raven" and reply.text == "a"
    assert peek(db_path, "SELECT thread_key, last_message_id, token_count, blob FROM states") == [
        ("terminal:t1", reply.id, 7, b"\x00\x01state")]
    assert peek(db_path, "SELECT status FROM messages WHERE id = ?", (user.id,)) == [("answered",)]


# --- epochs --------------------------------------------------------------------------------------

async def test_restart_thread_new_epoch_keeps_log_drops_state(store: Store, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    user = await store.add_message(KEY, "user", "before", status="pending")
    await store.finish_turn(KEY, user.id, "reply before", state())
    assert await store.load_state(KEY) is not None

    info = await store.restart_thread(KEY, "sql")
    assert (info.epoch, info.persona) == (1, "sql")
    assert await store.load_state(KEY) is None
    assert peek(db_path, "SELECT COUNT(*) FROM states") == [(0,)]
    assert [(m.text, m.epoch) for m in await store.messages(KEY)] == [("before", 0), ("reply before", 0)]

    await store.add_message(KEY, "user", "after")
    assert [m.text for m in await store.messages(KEY, epoch=1)] == ["after"]
    assert (await store.restart_thread(KEY, "sql")).epoch == 2


# --- listing -------------------------------------------------------------------------------------

async def test_list_threads_prefix_metacharacters_are_literal(store: Store) -> None:
    ids = ["a_b/1", "axb/1", "a%c/1", "aZZc/1", "a\\d/1", "ab/1"]
    for thread_id in ids:
        await store.ensure_thread(ThreadKey("web", thread_id), "default")
    await store.ensure_thread(ThreadKey("slack", "a_b/1"), "default")

    def listed(prefix: str) -> set[str]:
        return {str(t.key) for t in threads[prefix]}

    threads = {prefix: await store.list_threads("web", prefix) for prefix in ("a_", "a%", "a\\", "a", "")}
    assert listed("a_") == {"web:a_b/1"}
    assert listed("a%") == {"web:a%c/1"}
    assert listed("a\\") == {"web:a\\d/1"}
    assert listed("a") == {f"web:{i}" for i in ids}
    assert listed("") == {f"web:{i}" for i in ids}  # the other platform is never listed


async def test_list_threads_prefix_is_case_sensitive(store: Store) -> None:
    """Thread ids are case-sensitive (``ThreadKey`` compares exactly; Slack channel ids, web user ids),
    so a prefix must not match another id that differs only in case. SQLite's LIKE is
    case-insensitive for ASCII by default."""
    await store.ensure_thread(ThreadKey("web", "Alice/1"), "default")
    await store.ensure_thread(ThreadKey("web", "alice/2"), "default")
    assert [str(t.key) for t in await store.list_threads("web", "alice/")] == ["web:alice/2"]
    assert [str(t.key) for t in await store.list_threads("web", "Alice/")] == ["web:Alice/1"]


async def test_list_threads_title_and_order(db_path: Path) -> None:
    clock = FakeClock()
    async with Store(db_path, clock=clock) as store:
        first, second = ThreadKey("web", "u/1"), ThreadKey("web", "u/2")
        await store.ensure_thread(first, "default")
        clock.now += 1
        await store.ensure_thread(second, "default")
        clock.now += 1
        await store.add_message(first, "user", "How do I index this?\nmore detail")
        listed = await store.list_threads("web", "u/")
        assert [str(t.key) for t in listed] == ["web:u/1", "web:u/2"]  # most recently updated first
        assert listed[0].title == "How do I index this?" and listed[1].title == ""
        assert len(await store.list_threads("web", "u/", limit=1)) == 1


# --- deduplication -------------------------------------------------------------------------------

async def test_claim_event_once_per_ttl(db_path: Path) -> None:
    clock = FakeClock()
    async with Store(db_path, clock=clock) as store:
        assert await store.claim_event("slack:event:E1", ttl_s=600) is True
        assert await store.claim_event("slack:event:E1", ttl_s=600) is False
        assert await store.claim_event("slack:event:E2", ttl_s=600) is True
        clock.now += 599
        assert await store.claim_event("slack:event:E1", ttl_s=600) is False
        clock.now += 2  # 601 s after the first claim
        assert await store.claim_event("slack:event:E1", ttl_s=600) is True
        assert await store.claim_event("slack:event:E1", ttl_s=600) is False
    # Claims are committed: after a restart the event is still known.
    async with Store(db_path, clock=clock) as store:
        assert await store.claim_event("slack:event:E1", ttl_s=600) is False


# --- crash recovery ------------------------------------------------------------------------------

async def test_mark_interrupted_marks_pending_and_adds_notices(store: Store) -> None:
    await store.ensure_thread(KEY, "default")
    await store.ensure_thread(OTHER, "default")
    pending_1 = await store.add_message(KEY, "user", "lost one", status="pending")
    answered = await store.add_message(KEY, "user", "fine", status="pending")
    await store.finish_turn(KEY, answered.id, "reply", None)
    pending_2 = await store.add_message(OTHER, "user", "lost two", status="pending")

    marked = await store.mark_interrupted()
    assert [m.id for m in marked] == [pending_1.id, pending_2.id]

    first = await store.messages(KEY)
    assert [(m.role, m.status) for m in first] == [
        ("user", "interrupted"), ("user", "answered"), ("assistant", "done"), ("notice", "done")]
    assert "restarted" in first[-1].text and first[-1].author == "raven"
    second = await store.messages(OTHER)
    assert [(m.role, m.status) for m in second] == [("user", "interrupted"), ("notice", "done")]

    assert await store.mark_interrupted() == []  # nothing left pending: no second notice
    assert len(await store.messages(KEY)) == 4


# --- states --------------------------------------------------------------------------------------

async def test_load_state_detects_a_corrupted_blob(store: Store, db_path: Path) -> None:
    await store.ensure_thread(KEY, "default")
    await store.save_state(KEY, state(b"\x01\x02\x03\x04" * 64))
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


async def test_a_messages_position_counts_only_its_own_thread(db_path: Path) -> None:
    other = ThreadKey("test", "other")
    async with Store(db_path) as store:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(other, "default")
        first = await store.add_message(KEY, "user", "one")
        for text in ("x", "y", "z"):  # another thread writes in between
            await store.add_message(other, "user", text)
        second = await store.add_message(KEY, "user", "two")
        assert [await store.position_in_thread(KEY, m.id) for m in (first, second)] == [0, 1]
        assert second.id - first.id == 4
