"""Per-user rate limits and retention, through the core on the real store (and the real engine and
tiny model where a reply is written). Limits are read off the log, so they hold across restarts."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from bot.app.assembly import open_service
from bot.core.outcomes import Answered, CommandDone, CutOff, Refused
from bot.core.service import ChatService
from bot.events import Event, ThreadKey
from bot.storage import SQLiteStore, StateDraft
from tests.conftest import SettingsFactory
from tests.store_contract import FakeClock


async def send(service: ChatService, key: ThreadKey, text: str, user: str = "alice", *,
               channel: str | None = None, admin: bool = False) -> object:
    turn = service.reply(Event(key, user, user.title(), text, channel=channel, admin=admin))
    await turn.text()
    return await turn.outcome()


def age(db: Path, seconds: float) -> None:
    """Move every message (and turn) back in time, as if it had been sent ``seconds`` earlier."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE messages SET created_at = created_at - ?", (seconds,))
        conn.execute("UPDATE turns SET created_at = created_at - ?, updated_at = updated_at - ?", (seconds, seconds))


def statuses(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return [tuple(r) for r in conn.execute("SELECT text, status FROM messages WHERE role = 'user' ORDER BY id")]


async def test_messages_per_minute_are_limited_per_user_across_restarts(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(rate_messages_per_minute=2, max_reply_tokens=4, admins=["test:boss"])
    key = ThreadKey("test", "limited")
    async with open_service(settings) as service:
        for text in ("one", "two"):
            assert isinstance(await send(service, key, text), Answered | CutOff)
        refused = await send(service, key, "three")
        assert isinstance(refused, Refused) and refused.reason == "rate_limited"
        assert 50 <= refused.retry_after_s <= 60
        assert "2 messages in the last minute (the limit is 2)" in refused.message
        assert isinstance(await send(service, key, "/stop"), CommandDone)  # writes no reply: never held back
        assert isinstance(await send(service, key, "from bob", user="bob"), Answered | CutOff)  # per user
        for n in range(4):  # an admin is exempt
            assert isinstance(await send(service, key, f"boss {n}", user="boss"), Answered | CutOff)
    assert ("three", "refused") in statuses(settings.database_path)  # kept, not answered
    with sqlite3.connect(settings.database_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM turns t JOIN messages m ON m.id = t.message_id "
                            "WHERE m.text = 'three'").fetchone() == (0,)
    async with open_service(settings) as service:  # a restart forgets nothing
        assert isinstance(await send(service, key, "four"), Refused)
        age(settings.database_path, 61)
        assert isinstance(await send(service, key, "five"), Answered | CutOff)  # the minute has passed


async def test_tokens_per_day_are_limited_and_the_notice_says_when_it_resets(
        settings_factory: SettingsFactory) -> None:
    settings = settings_factory(rate_tokens_per_day=10, max_reply_tokens=12, seed=1)
    key = ThreadKey("test", "tokens")
    async with open_service(settings) as service:
        first = await send(service, key, "write a lot")
        assert isinstance(first, Answered | CutOff)
        info = service.last_turn(key)
        assert info is not None and info.generated_tokens >= 10
        before = time.time()
        refused = await send(service, key, "and more")
        assert isinstance(refused, Refused) and refused.reason == "rate_limited"
        assert f"{info.generated_tokens:,} tokens for you in the last 24 hours (the limit is 10)" in refused.message
        assert 86_390 <= refused.retry_after_s <= 86_400 + time.time() - before
        assert "UTC" in refused.message
        age(settings.database_path, 86_401)
        assert isinstance(await send(service, key, "a day later"), Answered | CutOff)
        # a question asked with the persona switch is the sender's too: its tokens count
        other = ThreadKey("test", "tokens-advisor")
        assert isinstance(await send(service, other, "/advisor sql write a lot", user="bob"), Answered | CutOff)
        assert isinstance(await send(service, other, "and more", user="bob"), Refused)


async def test_a_channel_limit_counts_everyone_in_the_channel_and_spares_admins_by_role(
        settings_factory: SettingsFactory) -> None:
    """Per-channel limits: every member's messages in any thread of the channel count; other channels,
    and messages without a channel (the web), do not; a sender the platform calls an admin is exempt,
    while that admin's messages still count for the channel."""
    settings = settings_factory(rate_channel_messages_per_minute=3, max_reply_tokens=4)
    one, two = ThreadKey("test", "c1-thread-a"), ThreadKey("test", "c1-thread-b")
    async with open_service(settings) as service:
        assert isinstance(await send(service, one, "a1", "alice", channel="c1"), Answered | CutOff)
        assert isinstance(await send(service, two, "b1", "bob", channel="c1"), Answered | CutOff)
        assert isinstance(await send(service, two, "boss", "boss", channel="c1", admin=True), Answered | CutOff)
        refused = await send(service, one, "a2", "alice", channel="c1")
        assert isinstance(refused, Refused) and refused.reason == "rate_limited"
        assert "This channel has had 3 messages in the last minute (the limit is 3)" in refused.message
        assert 50 <= refused.retry_after_s <= 60
        assert isinstance(await send(service, two, "carol", "carol", channel="c1"), Refused)  # anyone there
        assert isinstance(await send(service, two, "boss again", "boss", channel="c1", admin=True),
                          Answered | CutOff)  # exempt by role
        other = ThreadKey("test", "c2-thread")
        assert isinstance(await send(service, other, "elsewhere", "alice", channel="c2"), Answered | CutOff)
        assert isinstance(await send(service, ThreadKey("test", "web"), "no channel", "alice"), Answered | CutOff)
    assert [status for text, status in statuses(settings.database_path) if text in ("a2", "carol")] == [
        "refused", "refused"]
    age(settings.database_path, 61)
    async with open_service(settings) as service:
        assert isinstance(await send(service, one, "a3", "alice", channel="c1"), Answered | CutOff)


async def test_channel_tokens_per_day_name_the_channel_and_an_admin_flag_lifts_the_user_limit(
        settings_factory: SettingsFactory) -> None:
    settings = settings_factory(rate_channel_tokens_per_day=6, rate_messages_per_minute=1, max_reply_tokens=8,
                                seed=3)
    key = ThreadKey("test", "c9-thread")
    async with open_service(settings) as service:
        assert isinstance(await send(service, key, "write", "alice", channel="c9"), Answered | CutOff)
        info = service.last_turn(key)
        assert info is not None and info.generated_tokens >= 6
        refused = await send(service, key, "more", "bob", channel="c9")  # bob's own minute is clear
        assert isinstance(refused, Refused)
        assert f"{info.generated_tokens:,} tokens in this channel in the last 24 hours (the limit is 6)" in (
            refused.message)
        # alice is over her own per-minute limit, but the platform says she is an admin
        assert isinstance(await send(service, ThreadKey("test", "dm"), "again", "alice"), Refused)
        assert isinstance(await send(service, ThreadKey("test", "dm"), "again", "alice", admin=True),
                          Answered | CutOff)


async def test_housekeeping_deletes_idle_threads_and_drops_idle_states(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(retention_days=30, state_idle_days=7, max_reply_tokens=4)
    old, idle, fresh = ThreadKey("test", "old"), ThreadKey("test", "idle"), ThreadKey("test", "fresh")
    async with open_service(settings) as service:
        for key in (old, idle, fresh):
            await send(service, key, "hello")
        with sqlite3.connect(settings.database_path) as conn:
            day = 86_400
            conn.execute("UPDATE threads SET updated_at = updated_at - ? WHERE key = ?", (31 * day, str(old)))
            conn.execute("UPDATE states SET updated_at = updated_at - ? WHERE thread_key IN (?, ?)",
                         (8 * day, str(old), str(idle)))
        assert await service.housekeeping() == (1, 1)  # old deleted (its state with it); idle's state dropped
        assert await service.thread(old) is None
        assert await service.store.load_state(idle) is None and await service.thread(idle) is not None
        assert await service.store.load_state(fresh) is not None
        await send(service, idle, "still there?")
        info = service.last_turn(idle)
        assert info is not None and info.resumed_from == "rebuild"  # the log brought it back
        assert await service.housekeeping() == (0, 0)


async def test_retention_keeps_the_database_size_bounded_under_a_soak(tmp_path: Path) -> None:
    """Day after day of new threads with states, 3 days kept: the file stops growing (freed pages are
    reused) instead of growing with every day."""
    clock = FakeClock(1_000_000.0)
    path = tmp_path / "soak.db"
    sizes = []
    blob = bytes(range(256)) * 256  # a 64 KiB state
    async with SQLiteStore(path, clock=clock) as store:
        for day in range(12):
            for n in range(40):
                key = ThreadKey("soak", f"d{day}-t{n}")
                accepted = await store.accept(key, "default", "question " * 20, owner="me", user_ref="soak:u")
                await store.finish_turn(key, accepted.message.id, "answer " * 40, StateDraft("fp", 0, 7, blob),
                                        turn_id=accepted.turn_id)
            deleted, _ = await store.prune(clock.now - 3 * 86_400, None)
            assert deleted == (40 if day >= 4 else 0)  # a day older than the 3 kept
            await store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            sizes.append(path.stat().st_size)
            clock.now += 86_400
    assert len(await store_threads(path)) == 4 * 40  # the last four days
    plateau = sizes[4]
    assert max(sizes[4:]) <= plateau * 1.15, sizes  # bounded
    assert sizes[-1] < 12 * 40 * len(blob) / 2  # far below what keeping everything would take


async def store_threads(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT key FROM threads")]
