"""What a thread's saved state makes cheap: retry, continue, stop, fork, forget and rename, through the
core on the real engine, store and tiny model. The ``rwkv`` package is the oracle for every state:
after each of these, the thread's saved state must be exactly the model after reading its log
(the package fed the log's tokens from scratch gives the same logits)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.app.assembly import open_service
from bot.core.outcomes import Answered, CommandDone, CutOff, Refused
from bot.core.prompt import PromptFormat
from bot.core.service import ChatService
from bot.events import Event, ThreadKey
from bot.inference.rwkv_package import load_package_model
from tests.conftest import SettingsFactory

FP32_TOL = 1e-4
"""Our batched fp32 model against the package's, logits over the whole log (as tests/test_rwkv7_batched.py)."""


@pytest.fixture(scope="module")
def package(tiny_v7_path: Path) -> Any:
    _, model = load_package_model(tiny_v7_path, "cpu fp32")
    return model


async def ask(service: ChatService, key: ThreadKey, text: str) -> tuple[str, Any]:
    turn = service.reply(Event(key, "u1", "U1", text, f"m-{text[:10]}"))
    shown = await turn.text()
    return shown, await turn.outcome()


async def log_tokens(service: ChatService, key: ThreadKey) -> list[int]:
    """The token sequence the thread's log stands for: the persona's prompt, then its context."""
    thread = await service.thread(key)
    assert thread is not None
    fmt = PromptFormat(service.tokenizer, service.family, service.persona(thread.persona))
    context = await service.store.context(key, thread.epoch)
    return fmt.system_tokens() + service.states._context_tokens(context, fmt)


async def assert_state_is_the_log(service: ChatService, key: ThreadKey, package: Any) -> None:
    saved = await service.store.load_state(key)
    assert saved is not None and saved.checksum_ok
    model = await service.engine.decode_state(saved.blob)
    tokens = await log_tokens(service, key)
    assert model.token_count == len(tokens)
    expected, _ = package.forward(tokens, None)
    worst = (model.logits.float() - expected.float()).abs().max().item()
    assert worst <= FP32_TOL, f"saved state is not the model after its log: {worst}"


def statuses(db: Path, key: ThreadKey) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return [tuple(r) for r in conn.execute(
            "SELECT role, status, text FROM messages WHERE thread_key = ? ORDER BY id", (str(key),))]


@pytest.fixture
def seeded(settings_factory: SettingsFactory) -> Iterator[Any]:
    yield settings_factory(seed=11, max_reply_tokens=24)


# --- retry ---------------------------------------------------------------------------------------------


async def test_retry_writes_a_new_reply_from_exactly_the_state_before_the_last_one(seeded: Any, package: Any) -> None:
    key = ThreadKey("test", "retry")
    async with open_service(seeded) as service:
        await ask(service, key, "first question")
        await ask(service, key, "second question")
        log = await service.thread_messages(key)
        first_reply, old_reply = log[1], log[3]
        prior = await service.store.load_prior_state(key)
        assert prior is not None and prior.last_message_id == first_reply.id  # kept for this

        shown, outcome = await ask(service, key, "/retry")
        assert isinstance(outcome, Answered | CutOff) and shown
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "memory"
        question_tokens = PromptFormat(service.tokenizer, service.family, service.persona("default")) \
            .user_turn_tokens("second question")
        assert info.prompt_tokens == len(question_tokens)  # only the question re-read, never the log
        rows = statuses(seeded.database_path, key)
        assert [(role, status) for role, status, _ in rows] == [
            ("user", "answered"), ("assistant", "done"), ("user", "answered"), ("assistant", "replaced"),
            ("user", "done"), ("assistant", "done")]
        assert rows[3][2] == old_reply.text and rows[4][2] == "/retry" and rows[5][2] == shown.strip()
        context = await service.store.context(key, 0)
        assert [m.text for m in context] == ["first question", first_reply.text, "second question", shown.strip()]
        await assert_state_is_the_log(service, key, package)
        prior = await service.store.load_prior_state(key)
        assert prior is not None and prior.last_message_id == first_reply.id  # still there for another retry

        again, _ = await ask(service, key, "++")  # ChatRWKV's word for it
        assert again
        await assert_state_is_the_log(service, key, package)
    async with open_service(seeded) as service:  # after a restart, from the store's prior slot
        await ask(service, key, "/retry")
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "store"
        await assert_state_is_the_log(service, key, package)
        await ask(service, key, "and a third question")  # carries on from the last retry's reply
        await assert_state_is_the_log(service, key, package)
        replies = [m for m in await service.thread_messages(key) if m.role == "assistant" and m.status == "done"]
        assert len(replies) == 3


async def test_retry_of_the_first_reply_starts_from_the_persona_prompt(seeded: Any, package: Any) -> None:
    key = ThreadKey("test", "retry-first")
    async with open_service(seeded) as service:
        await ask(service, key, "only question")
        await ask(service, key, "/retry")
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "new"
        await assert_state_is_the_log(service, key, package)


async def test_retry_with_no_state_kept_rebuilds_the_log_up_to_the_reply_before(seeded: Any, package: Any) -> None:
    key = ThreadKey("test", "retry-rebuild")
    async with open_service(seeded) as service:
        await ask(service, key, "first question")
        await ask(service, key, "second question")
    with sqlite3.connect(seeded.database_path) as db:
        db.execute("DELETE FROM states")
    async with open_service(seeded) as service:
        await ask(service, key, "/retry")
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "rebuild"
        await assert_state_is_the_log(service, key, package)


async def test_retry_or_continue_with_nothing_to_redo_is_refused(service: ChatService) -> None:
    key = ThreadKey("test", "nothing")
    for word in ("/retry", "+++"):
        _, outcome = await ask(service, key, word)
        assert isinstance(outcome, Refused) and outcome.reason == "nothing_to_redo"
    await ask(service, key, "/reset")
    _, outcome = await ask(service, key, "/continue")
    assert isinstance(outcome, Refused)
    turns = [await service.store.get_turn(i) for i in (1, 2)]
    assert all(t is not None and t.phase == "failed" for t in turns)  # nothing left pending


# --- continue ------------------------------------------------------------------------------------------


async def test_continue_extends_the_last_reply_and_the_state_follows_the_longer_reply(
        seeded: Any, package: Any) -> None:
    key = ThreadKey("test", "continue")
    async with open_service(seeded) as service:
        await ask(service, key, "tell me about indexes")
        old = (await service.thread_messages(key))[-1]
        more, outcome = await ask(service, key, "/continue")
        assert isinstance(outcome, Answered | CutOff)
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "new"
        assert old.tokens is not None and info.prompt_tokens > len(old.tokens) - 2  # the old reply re-read
        context = await service.store.context(key, 0)
        assert [m.role for m in context] == ["user", "assistant"]
        longer = context[-1]
        assert longer.text.startswith(old.text[: max(1, len(old.text) - 2)])
        assert more.strip() in longer.text
        assert (await service.store.get_message(old.id)).status == "replaced"  # type: ignore[union-attr]
        await assert_state_is_the_log(service, key, package)
        await ask(service, key, "+++")
        await assert_state_is_the_log(service, key, package)


# --- stop ----------------------------------------------------------------------------------------------


async def test_stop_keeps_what_was_written_and_the_state_matches_it(settings_factory: SettingsFactory,
                                                                    package: Any) -> None:
    settings = settings_factory(seed=3, max_reply_tokens=4000, reply_timeout_s=600)
    key = ThreadKey("test", "stop")
    async with open_service(settings) as service:
        turn = service.reply(Event(key, "u1", "U1", "tell me everything"))
        seen = ""
        async for chunk in turn:
            seen += chunk
            if len(seen) > 40:
                break
        assert service.writing(key) is turn
        _, stopped = await ask(service, key, "/stop")  # answered at once, not after the reply
        assert isinstance(stopped, CommandDone) and stopped.text == "Stopped."
        outcome = await turn.outcome()
        assert isinstance(outcome, CutOff) and outcome.reason == "halted" and outcome.message == "reply stopped"
        reply = await service.store.get_message(outcome.reply_id)
        assert reply is not None and reply.text == outcome.text.strip() and len(reply.text) < 4000
        assert service.writing(key) is None and service.stop(key) is False
        await assert_state_is_the_log(service, key, package)
        record = await service.store.get_turn(turn.turn_id)  # type: ignore[arg-type]
        assert record is not None and record.reason == "halted"
        _, nothing = await ask(service, key, "/stop")
        assert isinstance(nothing, CommandDone) and nothing.text == "Nothing is being written here."
        await ask(service, key, "and then?")  # the next turn builds on the kept part
        await assert_state_is_the_log(service, key, package)


async def test_stop_before_the_first_word_keeps_nothing_and_leaves_nothing_pending(
        settings_factory: SettingsFactory) -> None:
    settings = settings_factory(max_reply_tokens=4000, reply_timeout_s=600, max_batch=1)
    key, other = ThreadKey("test", "stop-early"), ThreadKey("test", "busy")
    async with open_service(settings) as service:
        busy = service.reply(Event(other, "u", "U", "tell me everything"))
        async for _ in busy:  # the one batch row is taken: the next reply waits for it
            break
        turn = service.reply(Event(key, "u1", "U1", "hello"))
        for _ in range(2000):
            if key in service._generations:
                break
            await asyncio.sleep(0.005)
        assert service.stop(key)
        outcome = await turn.outcome()
        assert isinstance(outcome, CutOff) and (outcome.reason, outcome.text) == ("halted", "")
        assert service.stop(other)
        assert isinstance(await busy.outcome(), CutOff)
        log = await service.thread_messages(key)
        assert [(m.role, m.status) for m in log] == [("user", "failed")]
        record = await service.store.get_turn(turn.turn_id)  # type: ignore[arg-type]
        assert record is not None and (record.phase, record.reason) == ("failed", "halted")


# --- fork, forget, rename ----------------------------------------------------------------------------------


async def test_a_fork_continues_exactly_like_its_parent_would(seeded: Any, package: Any) -> None:
    parent, child = ThreadKey("test", "parent"), ThreadKey("test", "child")
    async with open_service(seeded) as service:
        await ask(service, parent, "first question")
        await ask(service, parent, "second question")
        info = await service.fork(parent, child)
        assert info.forked_from == parent and info.epoch == 0
        saved_parent, saved_child = await service.store.load_state(parent), await service.store.load_state(child)
        assert saved_parent is not None and saved_child is not None and saved_child.blob == saved_parent.blob
        await assert_state_is_the_log(service, child, package)
        # The same next message in both, from the same state: the same logits before the reply.
        for key in (parent, child):
            await ask(service, key, "third question")
            assert service.last_turn(key).resumed_from == "memory"  # type: ignore[union-attr]
        await assert_state_is_the_log(service, child, package)
        await assert_state_is_the_log(service, parent, package)
        assert [m.text for m in await service.thread_messages(parent)][:4] == \
            [m.text for m in await service.thread_messages(child)][:4]
    async with open_service(seeded) as service:  # a fork at an earlier reply rebuilds from its copied log
        first_reply = (await service.thread_messages(parent))[1]
        early = ThreadKey("test", "early")
        await service.fork(parent, early, upto_reply_id=first_reply.id)
        await ask(service, early, "another second question")
        assert service.last_turn(early).resumed_from == "rebuild"  # type: ignore[union-attr]
        await assert_state_is_the_log(service, early, package)


async def test_forget_asks_first_then_deletes_the_log_and_state(service: ChatService) -> None:
    key = ThreadKey("test", "forget")
    await ask(service, key, "something private")
    _, asked = await ask(service, key, "/forget")
    assert isinstance(asked, CommandDone) and "/forget confirm" in asked.text
    assert len(await service.thread_messages(key)) == 3  # nothing deleted yet
    _, done = await ask(service, key, "/forget confirm")
    assert isinstance(done, CommandDone) and done.command == "forget"
    assert await service.thread(key) is None
    assert await service.thread_messages(key) == [] and await service.store.load_state(key) is None
    assert key not in service.states
    await ask(service, key, "hello again")  # a new, empty thread
    assert [m.role for m in await service.thread_messages(key)] == ["user", "assistant"]


async def test_forget_thread_stops_a_reply_being_written(settings_factory: SettingsFactory) -> None:
    async with open_service(settings_factory(max_reply_tokens=4000, reply_timeout_s=600)) as service:
        key = ThreadKey("test", "forget-mid")
        turn = service.reply(Event(key, "u1", "U1", "tell me everything"))
        async for _ in turn:
            break
        assert await service.forget_thread(key) is True
        assert isinstance(await turn.outcome(), CutOff)
        assert await service.thread(key) is None and await service.thread_messages(key) == []
        assert await service.forget_thread(key) is False


async def test_rename_gives_a_thread_a_title_and_blank_takes_it_back(service: ChatService) -> None:
    key = ThreadKey("test", "rename")
    await ask(service, key, "why is my join slow\nsecond line")
    assert (await service.thread(key)).title == "why is my join slow"  # type: ignore[union-attr]
    assert await service.rename_thread(key, "  Join tuning\x00  \nignored ") is True
    assert (await service.thread(key)).title == "Join tuning"  # type: ignore[union-attr]
    assert await service.rename_thread(key, "x" * 500) is True
    assert len((await service.thread(key)).title) == 80  # type: ignore[union-attr]
    assert await service.rename_thread(key, "   ") is True
    assert (await service.thread(key)).title == "why is my join slow"  # type: ignore[union-attr]
    assert await service.rename_thread(ThreadKey("test", "none"), "x") is False



# --- asides: /summary and the one-shot modes -------------------------------------------------------------


async def test_summary_answers_from_the_threads_state_and_leaves_the_thread_unchanged(
        seeded: Any, package: Any) -> None:
    key = ThreadKey("test", "summary")
    async with open_service(seeded) as service:
        _, refused = await ask(service, key, "/summary")
        assert isinstance(refused, Refused) and refused.reason == "nothing_to_summarize"
        await ask(service, key, "first question")
        await ask(service, key, "second question")
        before = await service.store.load_state(key)
        summary, outcome = await ask(service, key, "/summary")
        assert isinstance(outcome, Answered | CutOff) and summary.strip()
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "memory"  # the second question's own reply state
        after = await service.store.load_state(key)
        assert after == before  # the thread's saved state is untouched
        rows = statuses(seeded.database_path, key)
        assert rows[-2:] == [("user", "done", "/summary"), ("assistant", "aside", summary.strip())]
        assert summary.strip() not in [m.text for m in await service.store.context(key, 0)]
        await ask(service, key, "third question")
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "memory"  # the state in memory is still the thread's
        await assert_state_is_the_log(service, key, package)


async def test_one_shot_modes_answer_from_a_fresh_state(settings_factory: SettingsFactory, package: Any) -> None:
    settings = settings_factory(top_k=1, max_reply_tokens=6)  # greedy: the answer depends only on the state
    async with open_service(settings) as service:
        busy, fresh = ThreadKey("test", "with-history"), ThreadKey("test", "fresh")
        await ask(service, busy, "a long story about databases")
        before = await service.store.load_state(busy)
        answers = [await ask(service, key, "+qa what is an index?") for key in (busy, fresh)]
        assert answers[0][0] == answers[1][0] and answers[0][0].strip()  # the thread's history played no part
        assert await service.store.load_state(busy) == before
        # the first word is the package's greedy choice after ChatRWKV's question format, read from scratch
        logits, _ = package.forward(service.tokenizer.encode("Question: what is an index?\n\nAnswer:"), None)
        first = service.tokenizer.decode([int(torch.argmax(logits).item())])
        assert answers[1][0].startswith(first)
        _, refused = await ask(service, fresh, "+gen")
        assert isinstance(refused, Refused) and refused.reason == "empty" and "+gen" in refused.message
        _, outcome = await ask(service, fresh, "+gen SELECT name FROM")
        assert isinstance(outcome, CutOff) and outcome.reason == "length"  # free generation runs to the limit
        rows = statuses(settings.database_path, fresh)
        assert [status for role, status, _ in rows if role == "assistant"] == ["aside", "aside"]
        assert await service.store.context(fresh, 0) == []
