"""The Store contract as tests: what every store implementation must do, asserted through the protocol
only (``bot.storage.protocol.Store``), never through the database behind it.

Use it by subclassing ``StoreContract`` in a ``test_*.py`` module and defining the ``make_store``
fixture: ``make_store(clock)`` returns a new, unopened handle on the one database of the test (each
call another connection to the same data), whose clock is ``clock``. A second handle opened while
the first is still open plays "another process": what it reads is what was committed. Set
``integrity_errors`` to what the database raises for a NOT NULL violation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import ClassVar

import pytest

from bot.errors import RavenError
from bot.events import ThreadKey
from bot.storage import StateDraft, Store, StoredMessage, StoredState

KEY = ThreadKey("terminal", "t1")
THIRD = ThreadKey("test", "third")
SLACK = ThreadKey("slack", "C1:1.000001")
OTHER = ThreadKey("terminal", "t2")
MakeStore = Callable[["FakeClock"], Store]


class FakeClock:
    """The store's time, moved by hand (the dedupe TTL, ``updated_at`` ordering)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def state(blob: bytes = b"model-state", epoch: int = 0, fingerprint: str = "fp") -> StateDraft:
    return StateDraft(fingerprint=fingerprint, epoch=epoch, token_count=7, blob=blob)


async def turn(store: Store, key: ThreadKey, question: str, answer: str,
               saved: StateDraft | None = None) -> tuple[StoredMessage, StoredMessage]:
    """One answered exchange, as the service stores it."""
    user = await store.add_message(key, "user", question, status="pending")
    return user, await store.finish_turn(key, user.id, answer, saved)


class StoreContract:
    integrity_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    @pytest.fixture
    def make_store(self) -> MakeStore:
        raise NotImplementedError("a store's test module defines make_store(clock) -> an unopened Store")

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    async def store(self, make_store: MakeStore, clock: FakeClock) -> AsyncIterator[Store]:
        async with make_store(clock) as opened:
            yield opened

    # --- lifecycle -----------------------------------------------------------------------------------

    async def test_reopening_keeps_data(self, make_store: MakeStore, clock: FakeClock) -> None:
        async with make_store(clock) as first:
            await first.ensure_thread(KEY, "default")
            await first.add_message(KEY, "user", "hello")
        for _ in range(2):  # opening again must not re-create or reset anything
            async with make_store(clock) as again:
                assert [m.text for m in await again.messages(KEY)] == ["hello"]
                thread = await again.get_thread(KEY)
                assert thread is not None and thread.persona == "default" and thread.epoch == 0

    async def test_close_twice_is_harmless(self, make_store: MakeStore, clock: FakeClock) -> None:
        store = make_store(clock)
        await store.open()
        await store.close()
        await store.close()

    # --- threads -------------------------------------------------------------------------------------

    async def test_ensure_thread_creates_once_and_keeps_the_first_persona(self, store: Store, clock: FakeClock) -> None:
        assert await store.get_thread(KEY) is None
        created = await store.ensure_thread(KEY, "default")
        assert (created.key, created.persona, created.epoch, created.title) == (KEY, "default", 0, "")
        assert created.created_at == created.updated_at == clock.now
        clock.now += 5
        again = await store.ensure_thread(KEY, "sql")
        assert again == created
        assert await store.get_thread(KEY) == created
        assert await store.get_thread(OTHER) is None

    async def test_restart_thread_new_epoch_keeps_log_drops_state(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(OTHER, "default")
        await turn(store, KEY, "before", "reply before", state())
        await store.save_state(OTHER, state(b"other"), 0)
        assert await store.load_state(KEY) is not None

        info = await store.restart_thread(KEY, "sql")
        assert (info.epoch, info.persona) == (1, "sql")
        assert await store.get_thread(KEY) == info
        assert await store.load_state(KEY) is None
        other = await store.load_state(OTHER)  # another thread's state is not touched
        assert other is not None and other.blob == b"other"
        assert [(m.text, m.epoch) for m in await store.messages(KEY)] == [("before", 0), ("reply before", 0)]

        await store.add_message(KEY, "user", "after")
        assert [m.text for m in await store.messages(KEY, epoch=1)] == ["after"]
        assert (await store.restart_thread(KEY, "sql")).epoch == 2

    async def test_list_threads_prefix_metacharacters_are_literal(self, store: Store) -> None:
        ids = ["a_b/1", "axb/1", "a%c/1", "aZZc/1", "a\\d/1", "ab/1"]
        for thread_id in ids:
            await store.ensure_thread(ThreadKey("web", thread_id), "default")
        await store.ensure_thread(ThreadKey("slack", "a_b/1"), "default")

        def listed(prefix: str) -> set[str]:
            return {str(t.key) for t in threads[prefix]}

        threads = {prefix: await store.list_threads("web", prefix) for prefix in ("a_", "a%", "a\\", "a", "", "a*")}
        assert listed("a_") == {"web:a_b/1"}
        assert listed("a%") == {"web:a%c/1"}
        assert listed("a\\") == {"web:a\\d/1"}
        assert listed("a*") == set()
        assert listed("a") == {f"web:{i}" for i in ids}
        assert listed("") == {f"web:{i}" for i in ids}  # the other platform is never listed

    async def test_list_threads_prefix_is_case_sensitive_and_exact(self, store: Store) -> None:
        """Thread ids are case-sensitive (``ThreadKey`` compares exactly; Slack channel ids, web user
        ids), so a prefix must not match an id that differs only in case (SQL's LIKE often does)."""
        await store.ensure_thread(ThreadKey("web", "Alice/1"), "default")
        await store.ensure_thread(ThreadKey("web", "alice/2"), "default")
        await store.ensure_thread(ThreadKey("webx", "alice/3"), "default")  # a platform is not a prefix
        assert [str(t.key) for t in await store.list_threads("web", "alice/")] == ["web:alice/2"]
        assert [str(t.key) for t in await store.list_threads("web", "Alice/")] == ["web:Alice/1"]
        assert await store.list_threads("web", "ALICE/") == []
        assert await store.list_threads("web", "alice/2/") == []
        assert {str(t.key) for t in await store.list_threads("web")} == {"web:Alice/1", "web:alice/2"}
        assert [str(t.key) for t in await store.list_threads("we", "")] == []

    async def test_list_threads_title_and_order(self, store: Store, clock: FakeClock) -> None:
        first, second = ThreadKey("web", "u/1"), ThreadKey("web", "u/2")
        await store.ensure_thread(first, "default")
        clock.now += 1
        await store.ensure_thread(second, "default")
        clock.now += 1
        await store.add_message(first, "notice", "not a title")
        await store.add_message(first, "user", "  How do I index this?\nmore detail")
        await store.add_message(first, "user", "a later question")
        listed = await store.list_threads("web", "u/")
        assert [str(t.key) for t in listed] == ["web:u/1", "web:u/2"]  # most recently updated first
        assert listed[0].title == "How do I index this?" and listed[1].title == ""
        assert listed[0].updated_at == clock.now and listed[0].created_at == clock.now - 2
        assert len(await store.list_threads("web", "u/", limit=1)) == 1
        await store.add_message(second, "user", "x" * 200)
        clock.now += 1
        assert (await store.get_thread(second)).title == "x" * 80  # type: ignore[union-attr]

    # --- the log ---------------------------------------------------------------------------------------

    async def test_add_message_is_committed_at_once(self, store: Store, make_store: MakeStore,
                                                    clock: FakeClock) -> None:
        await store.ensure_thread(KEY, "default")
        message = await store.add_message(KEY, "user", "is this durable?", author="ann",
                                          platform_message_id="m-1", status="pending")
        assert (message.thread, message.epoch, message.role, message.author, message.text,
                message.platform_message_id, message.status, message.created_at, message.tokens,
                message.tokenizer) == (KEY, 0, "user", "ann", "is this durable?", "m-1", "pending", clock.now,
                                       None, None)
        # Visible to another connection right away: no later write is needed to commit it.
        async with make_store(clock) as other:
            assert await other.messages(KEY) == [message]
            assert await other.get_message(message.id) == message

    async def test_add_message_defaults(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        message = await store.add_message(KEY, "notice", "hi")
        assert (message.author, message.platform_message_id, message.status) == ("", None, "done")
        assert await store.get_message(message.id) == message
        assert await store.get_message(message.id + 1000) is None

    async def test_messages_in_order_and_by_epoch(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(OTHER, "default")
        for text in ("one", "two", "three"):
            await store.add_message(KEY, "user", text)
        await store.add_message(OTHER, "user", "elsewhere")
        assert [m.text for m in await store.messages(KEY)] == ["one", "two", "three"]
        assert [m.text for m in await store.messages(KEY, epoch=0)] == ["one", "two", "three"]
        assert await store.messages(KEY, epoch=1) == []
        ids = [m.id for m in await store.messages(KEY)]
        assert ids == sorted(ids) and len(set(ids)) == 3

    async def test_set_status(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        message = await store.add_message(KEY, "user", "q", status="pending")
        await store.set_status(message.id, "failed")
        stored = await store.get_message(message.id)
        assert stored is not None and stored.status == "failed"
        await store.set_status(message.id + 1000, "failed")  # an unknown id changes nothing

    async def test_a_messages_position_counts_only_its_own_thread(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(OTHER, "default")
        first = await store.add_message(KEY, "user", "one")
        for text in ("x", "y", "z"):  # another thread writes in between
            await store.add_message(OTHER, "user", text)
        second = await store.add_message(KEY, "user", "two")
        assert [await store.position_in_thread(KEY, m.id) for m in (first, second)] == [0, 1]
        assert second.id - first.id == 4
        others = await store.messages(OTHER)
        assert [await store.position_in_thread(OTHER, m.id) for m in others] == [0, 1, 2]

    async def test_position_counts_every_role_and_epoch(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        user, reply = await turn(store, KEY, "q", "a")
        await store.add_message(KEY, "notice", "n")
        await store.restart_thread(KEY, "sql")  # a new epoch does not restart the count
        after = await store.add_message(KEY, "user", "after")
        assert [await store.position_in_thread(KEY, m.id) for m in (user, reply, after)] == [0, 1, 3]
        # Defined for any id: how many of the thread's messages come before it.
        assert await store.position_in_thread(KEY, after.id + 1000) == 4
        assert await store.position_in_thread(KEY, 0) == 0
        assert await store.position_in_thread(OTHER, after.id) == 0

    async def test_positions_stay_dense_under_concurrent_writes(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(OTHER, "default")
        written = await asyncio.gather(*(store.add_message(KEY if i % 3 else OTHER, "user", str(i)) for i in range(30)))
        assert len({m.id for m in written}) == 30
        for key in (KEY, OTHER):
            log = await store.messages(key)
            assert [await store.position_in_thread(key, m.id) for m in log] == list(range(len(log)))

    # --- last_reply_id and context ---------------------------------------------------------------------

    async def test_last_reply_id_is_zero_without_a_reply(self, store: Store) -> None:
        assert await store.last_reply_id(KEY, 0, 10**9) == 0  # no thread at all
        await store.ensure_thread(KEY, "default")
        assert await store.last_reply_id(KEY, 0, 10**9) == 0
        await store.add_message(KEY, "user", "q", status="answered")
        await store.add_message(KEY, "notice", "n")
        assert await store.last_reply_id(KEY, 0, 10**9) == 0

    async def test_last_reply_id_respects_before_id(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        _, first = await turn(store, KEY, "q1", "a1")
        user, second = await turn(store, KEY, "q2", "a2")
        assert await store.last_reply_id(KEY, 0, first.id) == 0  # strictly below
        assert await store.last_reply_id(KEY, 0, first.id + 1) == first.id
        assert await store.last_reply_id(KEY, 0, user.id) == first.id
        assert await store.last_reply_id(KEY, 0, second.id) == first.id
        assert await store.last_reply_id(KEY, 0, second.id + 1) == second.id
        assert await store.last_reply_id(KEY, 0, 10**9) == second.id

    async def test_last_reply_id_stays_inside_its_epoch_and_thread(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(OTHER, "default")
        _, old = await turn(store, KEY, "q", "a")
        await store.restart_thread(KEY, "sql")
        assert await store.last_reply_id(KEY, 1, 10**9) == 0  # the new epoch has read nothing yet
        user, new = await turn(store, KEY, "q", "a")
        _, elsewhere = await turn(store, OTHER, "q", "a")
        assert await store.last_reply_id(KEY, 1, user.id) == 0
        assert await store.last_reply_id(KEY, 1, 10**9) == new.id
        assert await store.last_reply_id(KEY, 0, 10**9) == old.id
        assert await store.last_reply_id(KEY, 2, 10**9) == 0
        assert await store.last_reply_id(OTHER, 0, 10**9) == elsewhere.id

    async def test_last_reply_id_ignores_notices(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        _, reply = await turn(store, KEY, "q", "a")
        await store.accept(KEY, "default", "lost", owner=None)  # a turn nobody owns
        await store.recover(lease_s=30)  # adds a notice after the reply
        notice = (await store.messages(KEY))[-1]
        assert notice.role == "notice" and notice.author == "raven"
        assert await store.last_reply_id(KEY, 0, 10**9) == reply.id

    async def test_context_is_what_the_model_read(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(OTHER, "default")
        statuses = ("pending", "interrupted", "failed", "done", "answered")
        users = {s: await store.add_message(KEY, "user", s, status=s) for s in statuses}  # type: ignore[arg-type]
        await store.add_message(KEY, "notice", "a notice")
        await turn(store, OTHER, "elsewhere", "elsewhere")
        asked, answered = await turn(store, KEY, "question", "reply")
        assert [(m.role, m.text) for m in await store.context(KEY, 0, 10**9)] == [
            ("user", "answered"), ("user", "question"), ("assistant", "reply")]
        assert await store.context(KEY, 0, answered.id) == [users["answered"], (await store.get_message(asked.id))]
        assert await store.context(KEY, 0, users["answered"].id) == []

    async def test_context_is_one_epoch_oldest_first(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        for i in range(3):
            await turn(store, KEY, f"old q{i}", f"old a{i}")
        await store.restart_thread(KEY, "sql")
        await turn(store, KEY, "new q", "new a")
        pending = await store.add_message(KEY, "user", "being answered", status="pending")
        old = await store.context(KEY, 0, 10**9)
        assert [m.text for m in old] == ["old q0", "old a0", "old q1", "old a1", "old q2", "old a2"]
        new = await store.context(KEY, 1, pending.id)
        assert [m.text for m in new] == ["new q", "new a"] and all(m.epoch == 1 for m in new)
        # The same as filtering the epoch's log by hand.
        by_hand = [m for m in await store.messages(KEY, 1)
                   if m.id < pending.id and (m.role == "assistant" or (m.role == "user" and m.status == "answered"))]
        assert new == by_hand

    # --- the end of a turn -----------------------------------------------------------------------------

    @pytest.mark.parametrize("sabotage", ["blob is not bytes", "fingerprint violates NOT NULL"])
    async def test_finish_turn_is_all_or_nothing(self, store: Store, make_store: MakeStore, clock: FakeClock,
                                                 sabotage: str) -> None:
        await store.ensure_thread(KEY, "default")
        user = await store.add_message(KEY, "user", "question", status="pending")
        before = await store.get_thread(KEY)
        if sabotage == "blob is not bytes":
            # Fails in Python, after the reply's insert and the status update would have run.
            bad = StateDraft("fp", 0, 3, blob=None)  # type: ignore[arg-type]
        else:
            # Fails in the database, in the transaction's last statement.
            bad = StateDraft(None, 0, 3, blob=b"x")  # type: ignore[arg-type]
        clock.now += 1
        with pytest.raises((TypeError, AttributeError, *self.integrity_errors)):
            await store.finish_turn(KEY, user.id, "the reply", bad, tokens=[1, 2], tokenizer="tok")

        # Neither the reply, nor the status change, nor a state — seen here and from another connection.
        async with make_store(clock) as other:
            for view in (store, other):
                assert [(m.role, m.status) for m in await view.messages(KEY)] == [("user", "pending")]
                assert await view.load_state(KEY) is None
                assert await view.last_reply_id(KEY, 0, 10**9) == 0
                assert await view.get_thread(KEY) == before

        # The store is not stuck inside the failed transaction: the next turn commits normally.
        reply = await store.finish_turn(KEY, user.id, "the reply", state(b"good"))
        assert [(m.role, m.status, m.text) for m in await store.messages(KEY)] == [
            ("user", "answered", "question"), ("assistant", "done", "the reply")]
        assert await store.position_in_thread(KEY, reply.id) == 1
        loaded = await store.load_state(KEY)
        assert loaded is not None and loaded.blob == b"good" and loaded.checksum_ok
        assert loaded.last_message_id == reply.id  # finish_turn records the reply it follows

    async def test_finish_turn_stores_reply_status_and_state_together(self, store: Store, make_store: MakeStore,
                                                                      clock: FakeClock) -> None:
        await store.ensure_thread(KEY, "default")
        user = await store.add_message(KEY, "user", "q", status="pending")
        clock.now += 3
        saved = StateDraft("fp", 0, token_count=7, blob=b"\x00\x01state")
        reply = await store.finish_turn(KEY, user.id, "a", saved, status="answered")
        assert (reply.role, reply.author, reply.text, reply.status, reply.epoch) == (
            "assistant", "raven", "a", "done", 0)
        assert (reply.tokens, reply.tokenizer, reply.platform_message_id) == (None, None, None)
        assert reply.created_at == clock.now and (await store.get_thread(KEY)).updated_at == clock.now  # type: ignore[union-attr]
        async with make_store(clock) as other:
            loaded = await other.load_state(KEY)
            assert loaded == StoredState("fp", 0, reply.id, 7, b"\x00\x01state", True)  # its own id, its own checksum
            stored_user = await other.get_message(user.id)
            assert stored_user is not None and stored_user.status == "answered"

    async def test_finish_turn_with_another_status_and_no_state(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        await store.save_state(KEY, state(b"kept"), 0)
        user = await store.add_message(KEY, "user", "q", status="pending")
        await store.finish_turn(KEY, user.id, "partial", None, status="failed")
        assert [m.status for m in await store.messages(KEY)] == ["failed", "done"]
        kept = await store.load_state(KEY)  # no state given: the saved one is left as it was
        assert kept is not None and kept.blob == b"kept"
        assert await store.context(KEY, 0, 10**9) == (await store.messages(KEY))[1:]

    async def test_reply_token_ids_round_trip(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        user = await store.add_message(KEY, "user", "hi")
        ids = [0, 1, 255, 256, 65535, 65536, 70000, 2**31 - 1]
        reply = await store.finish_turn(KEY, user.id, "hello", None, tokens=ids, tokenizer="tok")
        assert (reply.tokens, reply.tokenizer) == (ids, "tok")
        stored = await store.get_message(reply.id)
        assert stored is not None and (stored.tokens, stored.tokenizer) == (ids, "tok")
        assert (await store.context(KEY, 0, 10**9))[-1].tokens == ids
        empty = await store.finish_turn(KEY, user.id, "", None, tokens=[], tokenizer="tok")
        assert (empty.tokens, empty.tokenizer) == ([], "tok")

    # --- crash recovery --------------------------------------------------------------------------------

    async def test_accept_stores_thread_message_and_turn_at_once(self, store: Store, make_store: MakeStore,
                                                                 clock: FakeClock) -> None:
        accepted = await store.accept(KEY, "sql", "why is it slow?", author="Ann", platform_message_id="m1",
                                      owner="A")
        assert accepted.thread.key == KEY and accepted.thread.persona == "sql" and accepted.thread.epoch == 0
        message = accepted.message
        assert (message.role, message.text, message.author, message.status, message.platform_message_id) == (
            "user", "why is it slow?", "Ann", "pending", "m1")
        assert accepted.turn_id is not None
        async with make_store(clock) as other:  # committed: another connection sees all three
            turn = await other.get_turn(accepted.turn_id)
            assert turn is not None and (turn.thread, turn.message_id, turn.phase, turn.owner, turn.reply_id) == (
                KEY, message.id, "received", "A", None)
            assert (await other.get_thread(KEY)) is not None
        command = await store.accept(KEY, "default", "/reset", owner="A", answer=False)
        assert command.turn_id is None and command.message.status == "done"
        assert command.thread.persona == "sql"  # an existing thread keeps its persona

    async def test_a_turn_moves_through_its_phases(self, store: Store, clock: FakeClock) -> None:
        accepted = await store.accept(KEY, "default", "hello", owner="A")
        turn_id = accepted.turn_id
        assert turn_id is not None
        await store.restart_thread(KEY, "default")  # a reset came in before this turn started
        clock.now += 1
        await store.begin_turn(turn_id, epoch=1)
        begun = await store.get_turn(turn_id)
        assert begun is not None and begun.phase == "generating" and begun.updated_at == clock.now
        assert (await store.get_message(accepted.message.id)).epoch == 1  # type: ignore[union-attr]
        reply = await store.finish_turn(KEY, accepted.message.id, "hi", state(), turn_id=turn_id, finish="length")
        done = await store.get_turn(turn_id)
        assert done is not None and (done.phase, done.reply_id, done.reason) == ("generated", reply.id, "length")
        await store.end_turn(turn_id, "delivered")
        delivered = await store.get_turn(turn_id)
        assert delivered is not None and (delivered.phase, delivered.reason) == ("delivered", "length")
        assert (await store.get_message(accepted.message.id)).status == "answered"  # type: ignore[union-attr]

    async def test_context_reads_each_question_just_before_its_answer(self, store: Store) -> None:
        """Two questions sent together are stored as they arrive, before either is answered."""
        q1 = await store.accept(KEY, "default", "first", owner="A")
        q2 = await store.accept(KEY, "default", "second", owner="A")
        r1 = await store.finish_turn(KEY, q1.message.id, "answer one", None, turn_id=q1.turn_id)
        r2 = await store.finish_turn(KEY, q2.message.id, "answer two", None, turn_id=q2.turn_id)
        assert [m.text for m in await store.messages(KEY)] == ["first", "second", "answer one", "answer two"]
        read = await store.context(KEY, 0)
        assert [m.text for m in read] == ["first", "answer one", "second", "answer two"]
        assert [m.text for m in await store.context(KEY, 0, before_id=r2.id)] == ["first", "answer one"]
        assert await store.last_reply_id(KEY, 0) == r2.id
        assert await store.last_reply_id(KEY, 0, before_id=r2.id) == r1.id

    async def test_a_failed_turn_marks_its_message_failed(self, store: Store) -> None:
        accepted = await store.accept(KEY, "default", "hello", owner="A")
        assert accepted.turn_id is not None
        await store.end_turn(accepted.turn_id, "failed", "busy")
        turn = await store.get_turn(accepted.turn_id)
        assert turn is not None and (turn.phase, turn.reason) == ("failed", "busy")
        assert (await store.get_message(accepted.message.id)).status == "failed"  # type: ignore[union-attr]
        assert await store.get_turn(10**9) is None

    async def test_recover_ends_only_the_turns_whose_owner_is_gone(self, store: Store, clock: FakeClock) -> None:
        await store.register_instance("live", "raven run")
        await store.register_instance("dead", "killed")
        await store.register_instance("stopped", "stopped cleanly")
        live = await store.accept(KEY, "default", "being answered", owner="live")
        dead = await store.accept(OTHER, "default", "lost one", owner="dead")
        orphan = await store.accept(OTHER, "default", "nobody's", owner=None)
        stopped = await store.accept(THIRD, "default", "lost two", owner="stopped")
        answered = await store.accept(KEY, "default", "fine", owner="dead")
        assert None not in (live.turn_id, dead.turn_id, orphan.turn_id, stopped.turn_id, answered.turn_id)
        await store.finish_turn(KEY, answered.message.id, "reply", None, turn_id=answered.turn_id)
        await store.stop_instance("stopped")
        clock.now += 20
        await store.heartbeat("live")
        clock.now += 20  # "dead" has not beaten for 40 s, "live" for 20 s

        recovered = await store.recover(lease_s=30)
        assert [t.id for t in recovered] == [dead.turn_id, orphan.turn_id, stopped.turn_id]
        assert all(t.phase == "received" for t in recovered)  # as they were
        for accepted, phase, status in ((live, "received", "pending"), (dead, "interrupted", "interrupted"),
                                        (orphan, "interrupted", "interrupted"),
                                        (stopped, "interrupted", "interrupted"),
                                        (answered, "generated", "answered")):
            turn = await store.get_turn(accepted.turn_id)  # type: ignore[arg-type]
            message = await store.get_message(accepted.message.id)
            assert turn is not None and message is not None and (turn.phase, message.status) == (phase, status)
        other = await store.messages(OTHER)
        assert [(m.role, m.status) for m in other] == [
            ("user", "interrupted"), ("user", "interrupted"), ("notice", "done"), ("notice", "done")]
        assert "restarted" in other[-1].text and other[-1].author == "raven"
        assert [m.role for m in await store.messages(KEY)] == ["user", "user", "assistant"]  # no notice

        assert await store.recover(lease_s=30) == []  # nothing left: no second notice
        clock.now += 20  # now "live" is gone too
        assert [t.id for t in await store.recover(lease_s=30)] == [live.turn_id]

    async def test_a_heartbeat_keeps_a_turn_alive(self, store: Store, clock: FakeClock) -> None:
        await store.register_instance("A")
        accepted = await store.accept(KEY, "default", "long reply", owner="A")
        for _ in range(10):  # ten minutes of beats every 10 s, recovery running all along
            clock.now += 10
            await store.heartbeat("A")
            assert await store.recover(lease_s=30) == []
        assert (await store.get_turn(accepted.turn_id)).phase == "received"  # type: ignore[arg-type,union-attr]

    async def test_a_write_whose_caller_is_cancelled_leaves_the_store_usable(self, store: Store) -> None:
        """Shutdown cancels tasks mid-write (a heartbeat, a repair): the store must go on working."""
        await store.register_instance("A")
        for delay in [0, 0.0002, 0.0005, 0.001, 0.002, 0.003] * 5:
            task = asyncio.create_task(store.heartbeat("A"))
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        accepted = await store.accept(KEY, "default", "still works", owner="A")
        assert (await store.get_message(accepted.message.id)) is not None

    # --- deliveries and repairs --------------------------------------------------------------------------

    async def test_deliveries_record_what_each_platform_message_shows(self, store: Store) -> None:
        accepted = await store.accept(SLACK, "default", "q", owner="A")
        turn_id = accepted.turn_id
        assert turn_id is not None
        await store.record_delivery(turn_id, 0, "ts1", "Hello …")
        await store.record_delivery(turn_id, 1, "ts2", "more …")
        await store.record_delivery(turn_id, 0, "ts1", "Hello, world")  # edited: replaces
        shown = await store.deliveries(turn_id)
        assert [(d.position, d.platform_message_id, d.shown) for d in shown] == [
            (0, "ts1", "Hello, world"), (1, "ts2", "more …")]
        assert await store.deliveries(10**9) == []

    async def test_last_thread_of_a_sender_under_a_prefix(self, store: Store, clock: FakeClock) -> None:
        in_c1 = ThreadKey("slack", "C1:1.000001")
        later_c1 = ThreadKey("slack", "C1:2.000001")
        in_c10 = ThreadKey("slack", "C10:3.000001")  # "slack:C1" is its prefix too, "slack:C1:" is not
        assert await store.last_thread_of("slack:U1", "slack:C1:") is None
        await store.accept(in_c1, "default", "a", owner="A", user_ref="slack:U1")
        clock.now += 1
        await store.accept(later_c1, "default", "b", owner="A", user_ref="slack:U2")  # someone else's
        clock.now += 1
        await store.accept(in_c10, "default", "c", owner="A", user_ref="slack:U1")
        assert await store.last_thread_of("slack:U1", "slack:C1:") == in_c1
        assert await store.last_thread_of("slack:U2", "slack:C1:") == later_c1
        assert await store.last_thread_of("slack:U1", "slack:C10:") == in_c10
        assert await store.last_thread_of("slack:U1", "slack:C_:") is None  # the prefix is literal
        clock.now += 1
        await store.accept(later_c1, "default", "/retry", answer=False, user_ref="slack:U1")  # a command too
        assert await store.last_thread_of("slack:U1", "slack:C1:") == later_c1

    async def test_last_delivery_is_the_newest_posted_message_of_the_thread(self, store: Store) -> None:
        assert await store.last_delivery(SLACK) is None
        first = await store.accept(SLACK, "default", "q1", owner="A")
        await store.record_delivery(first.turn_id, 0, "ts1", "one")  # type: ignore[arg-type]
        await store.record_delivery(first.turn_id, 1, "ts2", "two")  # type: ignore[arg-type]
        other = ThreadKey(SLACK.platform, SLACK.thread_id + "-other")
        elsewhere = await store.accept(other, "default", "q", owner="A")
        await store.record_delivery(elsewhere.turn_id, 0, "ts9", "another thread")  # type: ignore[arg-type]
        last = await store.last_delivery(SLACK)
        assert last is not None and (last.turn_id, last.position, last.platform_message_id, last.shown) == (
            first.turn_id, 1, "ts2", "two")
        second = await store.accept(SLACK, "default", "q2", owner="A")
        await store.record_delivery(second.turn_id, 0, "", "about to be posted")  # type: ignore[arg-type]
        last = await store.last_delivery(SLACK)  # a post not made yet (no id) is not where the buttons are
        assert last is not None and last.platform_message_id == "ts2"
        await store.record_delivery(second.turn_id, 0, "ts3", "posted")  # type: ignore[arg-type]
        last = await store.last_delivery(SLACK)
        assert last is not None and (last.turn_id, last.platform_message_id) == (second.turn_id, "ts3")

    async def test_repairs_are_the_turns_a_gone_process_left_unfinished(self, store: Store, clock: FakeClock) -> None:
        await store.register_instance("live")
        await store.register_instance("dead")
        # generated by a dead process: its last edits may never have happened
        lost_edit = await store.accept(SLACK, "default", "q1", owner="dead")
        reply = await store.finish_turn(SLACK, lost_edit.message.id, "the full reply", None,
                                        turn_id=lost_edit.turn_id)
        await store.record_delivery(lost_edit.turn_id, 0, "ts1", "the full …")  # type: ignore[arg-type]
        # killed while generating: recovered as interrupted, its user not told yet
        killed = await store.accept(SLACK, "default", "q2", owner="dead")
        await store.record_delivery(killed.turn_id, 0, "ts2", "half …")  # type: ignore[arg-type]
        # a live process's reply waiting for its delivery report: not to be touched
        live = await store.accept(SLACK, "default", "q3", owner="live")
        await store.finish_turn(SLACK, live.message.id, "fine", None, turn_id=live.turn_id)
        # another platform's lost turn: not Slack's to repair
        other = await store.accept(KEY, "default", "q4", owner="dead")
        clock.now += 60
        await store.heartbeat("live")
        await store.recover(lease_s=30)

        repairs = await store.repairs("slack", lease_s=30)
        assert [(r.turn.id, r.turn.phase, r.reply) for r in repairs] == [
            (lost_edit.turn_id, "generated", reply.text), (killed.turn_id, "interrupted", None)]
        assert [d.shown for d in repairs[0].deliveries] == ["the full …"]
        assert [d.platform_message_id for d in repairs[1].deliveries] == ["ts2"]
        assert [r.turn.id for r in await store.repairs("terminal", lease_s=30)] == [other.turn_id]

        await store.mark_repaired(lost_edit.turn_id)  # type: ignore[arg-type]
        await store.mark_repaired(killed.turn_id)  # type: ignore[arg-type]
        assert await store.repairs("slack", lease_s=30) == []
        assert (await store.get_turn(lost_edit.turn_id)).phase == "delivered"  # type: ignore[arg-type,union-attr]
        assert (await store.get_turn(killed.turn_id)).phase == "interrupted"  # type: ignore[arg-type,union-attr]

    async def test_a_continued_reply_is_repaired_from_where_its_turn_began(
            self, store: Store, clock: FakeClock) -> None:
        await store.register_instance("dead")
        asked = await store.accept(SLACK, "default", "q", owner="dead")
        first = await store.finish_turn(SLACK, asked.message.id, "the first part", None, turn_id=asked.turn_id)
        await store.mark_repaired(asked.turn_id)  # type: ignore[arg-type]
        more = await store.accept(SLACK, "default", "/continue", owner="dead", answer=False, writes_reply=True)
        await store.finish_turn(SLACK, asked.message.id, "the first part and the rest", None, turn_id=more.turn_id,
                                replaces=first.id, shown_from=len("the first part"))
        clock.now += 60
        [repair] = await store.repairs("slack", lease_s=30)
        assert repair.turn.id == more.turn_id and repair.reply == " and the rest"  # only what it showed

    # --- saved states ----------------------------------------------------------------------------------

    async def test_save_load_replace_and_delete_state(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(OTHER, "default")
        assert await store.load_state(KEY) is None
        blob = b"\x01\x02\x03\x04" * 64
        await store.save_state(KEY, StateDraft("fp", 0, 7, blob), 9)
        good = await store.load_state(KEY)
        assert good == StoredState("fp", 0, 9, 7, blob, True)  # the checksum is the store's, not the caller's
        await store.save_state(KEY, state(b"newer", epoch=2, fingerprint="fp2"), 0)  # one state per thread
        assert await store.load_state(KEY) == StoredState("fp2", 2, 0, 7, b"newer", True)
        await store.save_state(OTHER, state(b"other"), 0)
        await store.delete_state(KEY)
        assert await store.load_state(KEY) is None
        await store.delete_state(KEY)  # deleting nothing is fine
        assert (await store.load_state(OTHER)).blob == b"other"  # type: ignore[union-attr]

    async def test_the_state_before_the_last_reply_stays_as_the_prior_one(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        _, first = await turn(store, KEY, "q1", "a1", state(b"after-a1"))
        assert (await store.load_state(KEY)).blob == b"after-a1"  # type: ignore[union-attr]
        _, second = await turn(store, KEY, "q2", "a2", state(b"after-a2"))
        current, prior = await store.load_state(KEY), await store.load_prior_state(KEY)
        assert current == StoredState("fp", 0, second.id, 7, b"after-a2", True)
        assert prior == StoredState("fp", 0, first.id, 7, b"after-a1", True)
        # a replacement of a2 was written from the prior state: that one stays prior
        question = (await store.last_exchange(KEY, 0)).question  # type: ignore[union-attr]
        assert question.text == "q2"
        again = await store.finish_turn(KEY, question.id, "a2 again", state(b"after-a2-again"), replaces=second.id)
        assert (await store.load_state(KEY)).last_message_id == again.id  # type: ignore[union-attr]
        assert (await store.load_state(KEY)).blob == b"after-a2-again"  # type: ignore[union-attr]
        assert (await store.load_prior_state(KEY)).blob == b"after-a1"  # type: ignore[union-attr]
        assert (await store.get_message(second.id)).status == "replaced"  # type: ignore[union-attr]
        assert [m.text for m in await store.context(KEY, 0)] == ["q1", "a1", "q2", "a2 again"]
        assert await store.last_reply_id(KEY, 0) == again.id
        await store.delete_state(KEY)
        assert await store.load_state(KEY) is None and await store.load_prior_state(KEY) is None

    async def test_last_exchange_is_the_last_question_and_its_reply(self, store: Store) -> None:
        await store.ensure_thread(KEY, "default")
        assert await store.last_exchange(KEY, 0) is None
        await turn(store, KEY, "q1", "a1")
        q2, a2 = await turn(store, KEY, "q2", "a2")
        exchange = await store.last_exchange(KEY, 0)
        assert exchange is not None and (exchange.question.id, exchange.reply.id) == (q2.id, a2.id)
        assert (exchange.question.status, exchange.reply) == ("answered", a2)
        await store.add_message(KEY, "user", "waiting", status="pending")  # not answered: not in the context
        assert (await store.last_exchange(KEY, 0)).reply.id == a2.id  # type: ignore[union-attr]
        await store.restart_thread(KEY, "default")
        assert await store.last_exchange(KEY, 1) is None

    async def test_adopted_messages_are_context_under_their_authors(self, store: Store) -> None:
        asked = await store.accept(KEY, "default", "what now?", author="Carol", owner="me")
        adopted = await store.adopt(KEY, [("Alice", "it got slow"), ("Bob", "no index")])
        assert [(m.role, m.author, m.text, m.status) for m in adopted] == [
            ("user", "Alice", "it got slow", "adopted"), ("user", "Bob", "no index", "adopted")]
        reply = await store.finish_turn(KEY, asked.message.id, "add one", None, turn_id=asked.turn_id)
        # read before the question they came before, which is read just before its answer
        assert [m.author for m in await store.context(KEY, 0)] == ["Alice", "Bob", "Carol", "raven"]
        assert await store.last_reply_id(KEY, 0) == reply.id
        exchange = await store.last_exchange(KEY, 0)
        assert exchange is not None and exchange.question.id == asked.message.id

    async def test_user_activity_is_each_message_with_the_tokens_written_for_it(
            self, store: Store, clock: FakeClock) -> None:
        first = await store.accept(KEY, "default", "q1", owner="me", user_ref="web:alice")
        await store.finish_turn(KEY, first.message.id, "a1", None, turn_id=first.turn_id, generated=12)
        clock.now += 10
        await store.accept(KEY, "default", "/help", answer=False, user_ref="web:alice")  # a command: no tokens
        await store.accept(OTHER, "default", "not hers", owner="me", user_ref="web:bob")
        clock.now += 10
        refused = await store.accept(KEY, "default", "too many", owner="me", user_ref="web:alice", refused=True)
        assert refused.turn_id is None and refused.message.status == "refused"  # kept, not to be answered
        start = clock.now - 20
        assert await store.user_activity("web:alice", start - 1) == [(start, 12), (start + 10, 0)]
        assert await store.user_activity("web:alice", start) == [(start + 10, 0)]  # strictly after
        assert await store.user_activity("web:carol", 0) == []

    async def test_channel_activity_counts_every_sender_in_the_channel_and_only_there(
            self, store: Store, clock: FakeClock) -> None:
        first = await store.accept(KEY, "default", "q1", owner="me", user_ref="web:alice", channel_ref="test:c1")
        await store.finish_turn(KEY, first.message.id, "a1", None, turn_id=first.turn_id, generated=7)
        clock.now += 5
        await store.accept(OTHER, "default", "q2", owner="me", user_ref="web:bob", channel_ref="test:c1")
        await store.accept(THIRD, "default", "elsewhere", owner="me", user_ref="web:bob", channel_ref="test:c2")
        await store.accept(KEY, "default", "refused", owner="me", user_ref="web:bob", channel_ref="test:c1",
                           refused=True)
        await store.accept(KEY, "default", "no channel", owner="me", user_ref="web:carol")
        start = clock.now - 5
        assert await store.channel_activity("test:c1", start - 1) == [(start, 7), (start + 5, 0)]
        assert await store.channel_activity("test:c2", start - 1) == [(start + 5, 0)]
        assert await store.channel_activity("test:c3", 0) == []
        assert [at for at, _ in await store.user_activity("web:bob", 0)] == [start + 5, start + 5]

    async def test_a_turn_accepted_as_not_repairable_never_shows_up_in_repairs(
            self, store: Store, clock: FakeClock) -> None:
        private = await store.accept(KEY, "default", "/summary", owner="dead", answer=False, writes_reply=True,
                                     repairable=False)
        public = await store.accept(OTHER, "default", "q", owner="dead")
        assert private.turn_id is not None and public.turn_id is not None
        for accepted in (private, public):
            await store.begin_turn(accepted.turn_id, 0)
        clock.now += 1000  # the owner never registered: both turns are orphans
        assert {t.id for t in await store.recover(30)} == {private.turn_id, public.turn_id}
        assert [r.turn.id for r in await store.repairs(KEY.platform, 30)] == [public.turn_id]

    async def test_prune_deletes_idle_threads_and_drops_idle_states(self, store: Store, clock: FakeClock) -> None:
        await store.ensure_thread(KEY, "default")
        await turn(store, KEY, "old", "old reply", state(b"old"))
        busy = await store.accept(THIRD, "default", "still being answered", owner="me")  # in flight
        clock.now += 100
        await store.ensure_thread(OTHER, "default")
        await turn(store, OTHER, "new", "new reply", state(b"new"))
        assert await store.prune(None, None) == (0, 0)
        assert await store.prune(None, clock.now - 50) == (0, 1)  # KEY's state only
        assert await store.load_state(KEY) is None and await store.get_thread(KEY) is not None
        assert await store.prune(clock.now - 50, None) == (1, 0)  # KEY; THIRD has a turn in flight
        assert await store.get_thread(KEY) is None and await store.messages(KEY) == []
        assert await store.get_thread(THIRD) is not None and busy.turn_id is not None
        assert (await store.load_state(OTHER)).blob == b"new"  # type: ignore[union-attr]
        await store.end_turn(busy.turn_id, "failed")
        clock.now += 1000
        assert await store.prune(clock.now, clock.now) == (2, 0)  # their states went with them

    async def test_a_command_that_writes_a_reply_gets_a_turn_but_is_not_a_question(self, store: Store) -> None:
        accepted = await store.accept(KEY, "default", "/retry", owner="me", answer=False, writes_reply=True)
        assert accepted.turn_id is not None and accepted.message.status == "done"
        assert (await store.get_turn(accepted.turn_id)).phase == "received"  # type: ignore[union-attr]
        assert await store.context(KEY, 0) == []

    async def test_rename_and_delete_a_thread(self, store: Store, make_store: MakeStore, clock: FakeClock) -> None:
        await store.ensure_thread(KEY, "default")
        await store.ensure_thread(OTHER, "default")
        accepted = await store.accept(KEY, "default", "first line\nsecond", owner="me")
        await store.finish_turn(KEY, accepted.message.id, "reply", state(), turn_id=accepted.turn_id)
        await store.record_delivery(accepted.turn_id, 0, "m1", "reply")  # type: ignore[arg-type]
        await turn(store, OTHER, "other q", "other a", state(b"other"))
        assert (await store.get_thread(KEY)).title == "first line"  # type: ignore[union-attr]
        assert await store.rename_thread(KEY, "Index tuning") is True
        assert (await store.get_thread(KEY)).title == "Index tuning"  # type: ignore[union-attr]
        assert await store.rename_thread(KEY, None) is True
        assert (await store.get_thread(KEY)).title == "first line"  # type: ignore[union-attr]
        assert await store.rename_thread(THIRD, "x") is False

        assert await store.delete_thread(KEY) is True
        assert await store.get_thread(KEY) is None
        assert await store.messages(KEY) == [] and await store.load_state(KEY) is None
        assert await store.get_turn(accepted.turn_id) is None  # type: ignore[arg-type]
        assert await store.deliveries(accepted.turn_id) == []  # type: ignore[arg-type]
        assert await store.delete_thread(KEY) is False
        async with make_store(clock) as again:  # committed, and the other thread is untouched
            assert await again.get_thread(KEY) is None
            assert [m.text for m in await again.messages(OTHER)] == ["other q", "other a"]
            assert (await again.load_state(OTHER)).blob == b"other"  # type: ignore[union-attr]

    async def test_a_fork_copies_the_context_and_the_state_that_follows_it(self, store: Store) -> None:
        await store.ensure_thread(KEY, "sql")
        await turn(store, KEY, "old epoch", "old reply")
        await store.restart_thread(KEY, "sql")
        q1, a1 = await turn(store, KEY, "q1", "a1", state(b"after-a1", epoch=1))
        await store.add_message(KEY, "notice", "a notice")  # not context: not copied
        q2, a2 = await turn(store, KEY, "q2", "a2", state(b"after-a2", epoch=1))
        fork = ThreadKey("terminal", "t1-fork")
        info = await store.fork_thread(KEY, fork)
        assert (info.persona, info.epoch, info.forked_from) == ("sql", 0, KEY)
        copied = await store.messages(fork)
        assert [(m.role, m.text, m.status) for m in copied] == [
            ("user", "q1", "answered"), ("assistant", "a1", "done"), ("user", "q2", "answered"),
            ("assistant", "a2", "done")]
        assert [m.created_at for m in copied] == [q1.created_at, a1.created_at, q2.created_at, a2.created_at]
        saved = await store.load_state(fork)
        assert saved == StoredState("fp", 0, copied[-1].id, 7, b"after-a2", True)
        assert await store.last_reply_id(fork, 0) == copied[-1].id
        # at an earlier reply: the log up to it, and no state (the fork rebuilds from its log)
        early = ThreadKey("terminal", "t1-early")
        await store.fork_thread(KEY, early, upto_reply_id=a1.id)
        assert [m.text for m in await store.messages(early)] == ["q1", "a1"]
        assert await store.load_state(early) is None
        # the source is unchanged
        assert [m.text for m in await store.context(KEY, 1)] == ["q1", "a1", "q2", "a2"]
        for bad in [(KEY, fork, None), (THIRD, ThreadKey("terminal", "x"), None), (KEY, ThreadKey("t", "y"), q1.id)]:
            with pytest.raises(RavenError):
                await store.fork_thread(*bad)

    # --- deduplication ---------------------------------------------------------------------------------

    async def test_claim_event_once_per_ttl(self, store: Store, make_store: MakeStore, clock: FakeClock) -> None:
        assert await store.claim_event("slack:event:E1", ttl_s=600) is True
        assert await store.claim_event("slack:event:E1", ttl_s=600) is False
        assert await store.claim_event("slack:event:E2", ttl_s=600) is True
        assert await store.claim_event("slack:EVENT:E1", ttl_s=600) is True  # keys are exact
        clock.now += 599
        assert await store.claim_event("slack:event:E1", ttl_s=600) is False  # does not extend the claim
        clock.now += 1  # exactly ttl_s after the first claim: still blocked
        assert await store.claim_event("slack:event:E1", ttl_s=600) is False
        clock.now += 1  # 601 s after the first claim
        assert await store.claim_event("slack:event:E1", ttl_s=600) is True
        assert await store.claim_event("slack:event:E1", ttl_s=600) is False
        # Claims are committed: after a restart the event is still known.
        await store.close()
        async with make_store(clock) as again:
            assert await again.claim_event("slack:event:E1", ttl_s=600) is False
            clock.now += 601
            assert await again.claim_event("slack:event:E1", ttl_s=600) is True

    # --- export ----------------------------------------------------------------------------------------

    async def test_all_threads_pages_through_every_platform_in_key_order(self, store: Store) -> None:
        keys = [KEY, OTHER, SLACK, THIRD, ThreadKey("web", "alice/42"), ThreadKey("web", "Alice/42")]
        for key in keys:
            await store.ensure_thread(key, "default")
        await store.add_message(SLACK, "user", "hello there\nsecond line")
        await store.restart_thread(SLACK, "sql")
        expected = sorted(str(key) for key in keys)
        first = await store.all_threads(limit=2)
        assert [str(info.key) for info in first] == expected[:2]
        rest = await store.all_threads(after=first[-1].key, limit=100)
        assert [str(info.key) for info in rest] == expected[2:]
        assert await store.all_threads(after=rest[-1].key) == []
        assert await store.all_threads(after=ThreadKey("web", "alice/4"), limit=1) == [await store.get_thread(
            ThreadKey("web", "alice/42"))]
        [slack] = [info for info in first + rest if info.key == SLACK]
        assert (slack.persona, slack.epoch, slack.title) == ("sql", 1, "hello there")
