"""The chat service end to end on the real engine, store and tiny model."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
import torch

from bot.app.assembly import open_service
from bot.core.outcomes import Answered, Busy, CommandDone, CutOff, Failed, Refused
from bot.core.prompt import PromptFormat
from bot.core.service import ChatService
from bot.events import Event, ThreadKey
from bot.storage import SQLiteStore
from tests.conftest import SettingsFactory


async def say(service: ChatService, key: ThreadKey, text: str, user: str = "u1") -> str:
    """What the user sees: the text shown, and a notice's words (a cut-off note aside)."""
    turn = service.reply(Event(key, user, user.upper(), text, f"m-{text[:8]}"))
    shown = await turn.text()
    outcome = await turn.outcome()
    if isinstance(outcome, Busy | Refused | Failed):
        shown += outcome.message
    return shown


async def test_a_thread_survives_a_restart(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    key = ThreadKey("test", "persist")
    async with open_service(settings) as service:
        first = await say(service, key, "hello")
    async with open_service(settings) as service:
        await say(service, key, "still there?")
        turn = service.last_turn(key)
        messages = await service.thread_messages(key)
    assert turn is not None and turn.resumed_from == "store"
    assert turn.prompt_tokens < 20  # only the new message was read
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1].text == first.strip()


async def test_two_messages_to_one_thread_are_answered_in_order(service: ChatService) -> None:
    key = ThreadKey("test", "order")
    first, second = await asyncio.gather(say(service, key, "first question"), say(service, key, "second question"))
    messages = await service.thread_messages(key)
    # Both questions are stored the moment they arrive; the answers follow, in the same order.
    assert [(m.role, m.text) for m in messages] == [
        ("user", "first question"), ("user", "second question"),
        ("assistant", first.strip()), ("assistant", second.strip()),
    ]
    turn = service.last_turn(key)
    assert turn is not None and turn.resumed_from == "memory"  # the second read the first's state


async def test_a_rebuild_reads_questions_sent_together_each_before_its_answer(
        settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    key = ThreadKey("test", "together")
    async with open_service(settings) as service:
        await asyncio.gather(say(service, key, "first question"), say(service, key, "second question"))
        saved = await service.store.load_state(key)
        assert saved is not None
        expected = await service.engine.decode_state(saved.blob)
        with sqlite3.connect(settings.database_path) as db:
            db.execute("DELETE FROM states")
        service.states.forget(key)
        thread = await service.thread(key)
        assert thread is not None
        fmt = PromptFormat(service.tokenizer, service.family, service.persona(thread.persona))
        rebuilt = await service.states.rebuild(thread, fmt)
    assert rebuilt.token_count == expected.token_count
    worst = max((a - b).abs().max().item() for a, b in zip(rebuilt.state, expected.state, strict=True))
    assert worst <= 1e-5  # read in the order the turns were answered, not the order of the log


async def test_threads_never_share_state_or_text(service: ChatService) -> None:
    a, b = ThreadKey("test", "a"), ThreadKey("test", "b")
    await asyncio.gather(say(service, a, "alpha one"), say(service, b, "beta one"))
    await asyncio.gather(say(service, a, "alpha two"), say(service, b, "beta two"))
    texts_a = [m.text for m in await service.thread_messages(a)]
    texts_b = [m.text for m in await service.thread_messages(b)]
    assert texts_a[0::2] == ["alpha one", "alpha two"]
    assert texts_b[0::2] == ["beta one", "beta two"]
    state_a, state_b = await service.store.load_state(a), await service.store.load_state(b)
    assert state_a is not None and state_b is not None and state_a.blob != state_b.blob


async def test_same_seed_same_reply_alone_or_alongside_others(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(seed=42)
    key = ThreadKey("test", "repro")
    async with open_service(settings) as service:
        alone = await say(service, key, "tell me a story")
    settings2 = settings_factory(seed=42, data_dir=settings.data_dir.parent / "other")
    async with open_service(settings2) as service:
        others = [say(service, ThreadKey("test", f"noise{i}"), f"noise {i}") for i in range(4)]
        results = await asyncio.gather(say(service, key, "tell me a story"), *others)
        assert service.engine.stats.max_batch_seen == 5
    assert results[0] == alone
    # Arriving after the others: written to the log after theirs, read into a batch already busy.
    settings3 = settings_factory(seed=42, data_dir=settings.data_dir.parent / "third")
    async with open_service(settings3) as service:
        noise = [asyncio.create_task(say(service, ThreadKey("test", f"noise{i}"), f"noise {i}")) for i in range(4)]
        for _ in range(5000):  # until the others are decoding
            if service.engine.stats.decode_steps:
                break
            await asyncio.sleep(0.002)
        late = await say(service, key, "tell me a story")
        await asyncio.gather(*noise)
        assert service.engine.stats.max_batch_seen == 5
    assert late == alone


async def test_persona_switch_restarts_the_context_and_keeps_the_log(service: ChatService) -> None:
    key = ThreadKey("test", "switch")
    await say(service, key, "hello")
    notice = await say(service, key, "/advisor sql how do I find duplicate rows?")
    assert "SQL advisor" in notice
    thread = await service.thread(key)
    assert thread is not None and thread.persona == "sql" and thread.epoch == 1
    turn = service.last_turn(key)
    assert turn is not None and turn.resumed_from == "new"  # context restarted from the persona prompt
    messages = await service.thread_messages(key)
    assert [m.text for m in messages if m.role == "user"] == [
        "hello", "/advisor sql how do I find duplicate rows?", "how do I find duplicate rows?"]
    assert messages[0].epoch == 0 and messages[-1].epoch == 1


async def test_reset_keeps_persona_and_starts_over(service: ChatService) -> None:
    key = ThreadKey("test", "reset")
    await say(service, key, "/advisor project")
    await say(service, key, "plan a migration")
    reply = await say(service, key, "/reset")
    assert "Started over" in reply and "Project advisor" in reply
    thread = await service.thread(key)
    assert thread is not None and thread.persona == "project" and thread.epoch == 2
    assert await service.store.load_state(key) is None
    await say(service, key, "again")
    assert service.last_turn(key).resumed_from == "new"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["nope", "../x", "..%2fx", "SQL/../../etc"])
async def test_unknown_or_malicious_persona_is_refused_with_the_list(service: ChatService, name: str) -> None:
    key = ThreadKey("test", "bad-persona")
    reply = await say(service, key, f"/advisor {name}")
    assert "Personas:" in reply and "`sql`" in reply
    assert ("unknown persona" in reply) or ("not a valid persona name" in reply)
    thread = await service.thread(key)
    # What the user wrote is in the log (stored on arrival); nothing was switched.
    assert thread is not None and (thread.persona, thread.epoch) == ("default", 0)
    assert [(m.role, m.status) for m in await service.thread_messages(key)] == [("user", "done")]


async def test_help_and_personas_commands(service: ChatService) -> None:
    key = ThreadKey("test", "help")
    assert "/advisor" in await say(service, key, "/help")
    listing = await say(service, key, "/personas")
    assert all(f"`{name}`" in listing for name in ("default", "sql", "project"))


async def test_empty_and_oversized_messages_get_a_notice_and_store_nothing(settings_factory: SettingsFactory) -> None:
    async with open_service(settings_factory(max_message_chars=100)) as service:
        key = ThreadKey("test", "limits")
        assert "empty" in await say(service, key, "  \x00 \n ")
        assert "limit is 100" in await say(service, key, "x" * 101)
        assert await service.thread(key) is None
        assert await service.thread_messages(key) == []


async def test_control_characters_are_cleaned_before_storing(service: ChatService) -> None:
    key = ThreadKey("test", "clean")
    await say(service, key, "hel\x00lo\x1b[31m red\r\nline")
    messages = await service.thread_messages(key)
    assert messages[0].text == "hello[31m red\nline"


async def test_corrupt_state_blob_is_rebuilt_from_the_log(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    key = ThreadKey("test", "corrupt")
    async with open_service(settings) as service:
        await say(service, key, "hello")
    with sqlite3.connect(settings.database_path) as db:
        db.execute("UPDATE states SET blob = X'00112233' WHERE thread_key = ?", (str(key),))
    async with open_service(settings) as service:
        reply = await say(service, key, "are you ok?")
        turn = service.last_turn(key)
        stored = await service.store.load_state(key)
    assert reply.strip() and "went wrong" not in reply
    assert turn is not None and turn.resumed_from == "rebuild"
    assert stored is not None and stored.checksum_ok and len(stored.blob) > 1000


@pytest.mark.parametrize("blob", [b"\x01\x02\x03", b"\xff\xff\xff\x7f" * 3], ids=["torn", "out-of-vocabulary"])
async def test_damaged_reply_token_ids_are_rebuilt_from_the_reply_text(
        settings_factory: SettingsFactory, blob: bytes) -> None:
    settings = settings_factory()
    key = ThreadKey("test", "damaged-tokens")
    async with open_service(settings) as service:
        await say(service, key, "hello")
    with sqlite3.connect(settings.database_path) as db:
        db.execute("UPDATE messages SET tokens = ? WHERE role = 'assistant'", (blob,))
        db.execute("DELETE FROM states")  # the next turn must rebuild from the log
    async with open_service(settings) as service:
        reply = await say(service, key, "still there?")
        turn = service.last_turn(key)
    assert reply.strip() and "went wrong" not in reply
    assert turn is not None and turn.resumed_from == "rebuild"


async def test_state_with_a_valid_checksum_but_garbage_content_is_rebuilt(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    key = ThreadKey("test", "garbage")
    async with open_service(settings) as service:
        await say(service, key, "hello")
    import hashlib

    blob = b"not a torch file"
    with sqlite3.connect(settings.database_path) as db:
        db.execute("UPDATE states SET blob = ?, checksum = ? WHERE thread_key = ?",
                   (blob, hashlib.sha256(blob).hexdigest(), str(key)))
    async with open_service(settings) as service:
        await say(service, key, "still fine?")
        assert service.last_turn(key).resumed_from == "rebuild"  # type: ignore[union-attr]


async def test_a_persona_edit_makes_saved_states_stale(settings_factory: SettingsFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "coach.md").write_text("---\nname: Coach\n---\nYou are a running coach.\n")
    settings = settings_factory(personas_dir=personas)
    key = ThreadKey("test", "stale")
    async with open_service(settings) as service:
        await say(service, key, "/advisor coach hi")
    (personas / "coach.md").write_text("---\nname: Coach\n---\nYou are a swimming coach.\n")
    async with open_service(settings) as service:
        await say(service, key, "next")
        assert service.last_turn(key).resumed_from == "rebuild"  # type: ignore[union-attr]


async def test_a_crash_mid_reply_leaves_the_message_marked_interrupted(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    key = ThreadKey("test", "crash")
    async with open_service(settings) as service:
        await say(service, key, "hello")
    # What a kill during generation leaves behind: the user's message and its turn committed, owned by
    # a process whose lease ran out an hour ago.
    async with SQLiteStore(settings.database_path, clock=lambda: time.time() - 3600) as store:
        await store.register_instance("killed")
        await store.accept(key, "default", "this one was being answered", author="U1", owner="killed")
    async with open_service(settings) as service:
        messages = await service.thread_messages(key)
        assert [m.status for m in messages if m.role == "user"] == ["answered", "interrupted"]
        assert messages[-1].role == "notice" and "send it again" in messages[-1].text
        await say(service, key, "this one was being answered")
        turn = service.last_turn(key)
    assert turn is not None and turn.resumed_from == "store"  # the saved state was never torn


async def test_persona_prefix_is_read_once_per_persona(service: ChatService) -> None:
    await say(service, ThreadKey("test", "p1"), "hi")
    after_first = service.engine.stats.prefilled_tokens
    await say(service, ThreadKey("test", "p2"), "hi")
    turn = service.last_turn(ThreadKey("test", "p2"))
    assert turn is not None and turn.resumed_from == "new"
    read = service.engine.stats.prefilled_tokens - after_first
    generated = turn.generated_tokens
    # the second thread read its own message and its reply (re-read for the saved state), no prompt
    assert read <= turn.prompt_tokens + generated + 8, read


async def test_a_rebuild_from_the_log_continues_exactly_like_the_saved_state(
    settings_factory: SettingsFactory, tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    import shutil

    from bot.inference.state_codec import decode_state

    key = ThreadKey("test", "rebuild-equal")
    original = settings_factory(data_dir=tmp_path / "a")
    async with open_service(original) as service:
        await say(service, key, "hello there")
        await say(service, key, "tell me more")
    # A one-token third reply, so the final state still holds the history in detail.
    original = settings_factory(data_dir=tmp_path / "a", max_reply_tokens=1)
    copy = settings_factory(data_dir=tmp_path / "b", max_reply_tokens=1)
    copy.database_path.parent.mkdir(parents=True)
    shutil.copy(original.database_path, copy.database_path)
    with sqlite3.connect(copy.database_path) as db:
        db.execute("DELETE FROM states")  # the copy must rebuild from the log

    finals = []
    for settings, expected in ((original, "store"), (copy, "rebuild")):
        async with open_service(settings) as service:
            reply = await say(service, key, "and then?")
            assert service.last_turn(key).resumed_from == expected  # type: ignore[union-attr]
            stored = await service.store.load_state(key)
            assert stored is not None
            finals.append((reply, decode_state(stored.blob, service.engine.backend.zero_state(),
                                               service.engine.backend.vocab_size)))
    (reply_a, state_a), (reply_b, state_b) = finals
    assert reply_a == reply_b
    assert state_a.token_count == state_b.token_count
    assert (state_a.logits - state_b.logits).abs().max().item() <= 1e-4
    # The recurrent state keeps the history long after the logits forget it: compare it too.
    worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(state_a.state, state_b.state, strict=True))
    assert worst <= 1e-5  # observed ~1e-6; re-tokenizing the replies instead of their ids gives ~6e-4


async def test_persona_files_are_reread_off_the_event_loop_on_each_turn(
        settings_factory: SettingsFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import threading

    personas = tmp_path / "personas"
    personas.mkdir()
    settings = settings_factory(personas_dir=personas)
    async with open_service(settings) as service:
        readers: list[str] = []
        load_all = service.library.load_all

        def recording_load_all():  # type: ignore[no-untyped-def]
            readers.append(threading.current_thread().name)
            return load_all()

        service.library.load_all = recording_load_all  # type: ignore[method-assign]
        key = ThreadKey("test", "live-personas")
        assert "unknown persona 'coach'" in await say(service, key, "/advisor coach")
        # Added, then broken, while the bot runs: the next turn sees each change.
        (personas / "coach.md").write_text("---\nname: Coach\n---\nYou are a running coach.\n")
        assert "Now talking with **Coach**" in await say(service, key, "/advisor coach")
        (personas / "broken.md").write_text("---\nname: [unclosed\n---\nx\n")
        reply = await say(service, key, "/advisor broken")
        assert "broken" in reply and "Now talking" not in reply
        assert {p.name for p in service.personas()} == {"coach", "default", "project", "sql"}
        assert readers and threading.main_thread().name not in readers  # never on the loop's thread


# --- outcomes as data ------------------------------------------------------------------------------


async def outcome_of(service: ChatService, key: ThreadKey, text: str, addressed: bool = False):  # type: ignore[no-untyped-def]
    turn = service.reply(Event(key, "u1", "U1", text, addressed=addressed))
    shown = await turn.text()
    return shown, await turn.outcome()


async def test_an_answer_is_reported_with_its_row_in_the_log(settings_factory: SettingsFactory) -> None:
    async with open_service(settings_factory(max_reply_tokens=400)) as service:
        key = ThreadKey("test", "outcome-answer")
        shown, outcome = await outcome_of(service, key, "hello")
        messages = await service.thread_messages(key)
    assert isinstance(outcome, Answered | CutOff)
    assert outcome.reply_id == messages[-1].id and messages[-1].role == "assistant"
    assert outcome.text == shown


async def test_a_reply_at_the_token_limit_is_cut_off(settings_factory: SettingsFactory) -> None:
    async with open_service(settings_factory(max_reply_tokens=1)) as service:
        key = ThreadKey("test", "outcome-length")
        turn = service.reply(Event(key, "u1", "U1", "hello"))
        await turn.text()
        outcome = await turn.outcome()
        stored = (await service.thread_messages(key))[-1]
        record = await service.store.get_turn(turn.turn_id)  # type: ignore[arg-type]
    assert isinstance(outcome, CutOff) and outcome.reason == "length" and outcome.limit == 1
    assert "1-token limit" in outcome.message
    assert record is not None and record.reason == "length"  # the log says how the reply ended
    assert stored.role == "assistant" and "cut off" not in stored.text  # the log keeps the model's words


@pytest.mark.parametrize(("text", "reason"), [("   ", "empty"), ("x" * 101, "too_long")])
async def test_refused_input_is_a_notice_and_nothing_is_stored(
        settings_factory: SettingsFactory, text: str, reason: str) -> None:
    async with open_service(settings_factory(max_message_chars=100)) as service:
        key = ThreadKey("test", f"refused-{reason}")
        shown, outcome = await outcome_of(service, key, text)
        assert await service.thread(key) is None
    assert shown == "" and isinstance(outcome, Refused) and outcome.reason == reason


@pytest.mark.parametrize(("name", "reason"), [("nope", "unknown_persona"), ("../x", "invalid_persona")])
async def test_a_bad_persona_is_refused_with_its_reason(service: ChatService, name: str, reason: str) -> None:
    shown, outcome = await outcome_of(service, ThreadKey("test", "bad"), f"/advisor {name}")
    assert shown == "" and isinstance(outcome, Refused) and outcome.reason == reason
    assert "`sql`" in outcome.message


async def test_commands_are_command_results(service: ChatService) -> None:
    key = ThreadKey("test", "command-result")
    shown, outcome = await outcome_of(service, key, "/help")
    assert isinstance(outcome, CommandDone) and outcome.command == "help" and outcome.text == shown
    _, switched = await outcome_of(service, key, "/advisor sql")
    assert isinstance(switched, CommandDone) and "SQL advisor" in switched.text


@pytest.mark.parametrize(("text", "command"), [
    ("help", "help"), ("reset", "reset"), ("", "help"), ("advisor sql", "advisor"),
    ("help me with this join", None), ("reset the counter please", None),
])
async def test_addressed_text_goes_through_the_one_command_mapper(
        service: ChatService, text: str, command: str | None) -> None:
    key = ThreadKey("test", f"mapper-{len(text)}")
    _, outcome = await outcome_of(service, key, text, addressed=True)
    if command is None:
        assert isinstance(outcome, Answered | CutOff)  # an ordinary message, answered by the model
        assert [m.text for m in await service.thread_messages(key) if m.role == "user"] == [text]
    else:
        assert isinstance(outcome, CommandDone) and outcome.command == command


async def test_a_failing_model_step_is_a_failure_outcome_and_the_message_stays(service: ChatService) -> None:
    key = ThreadKey("test", "fails")
    backend = service.engine.backend
    real_decode = backend.decode

    def broken(tokens):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated out of memory")

    backend.decode = broken  # type: ignore[method-assign]
    try:
        shown, outcome = await outcome_of(service, key, "hello")
    finally:
        backend.decode = real_decode  # type: ignore[method-assign]
    assert isinstance(outcome, Failed) and "try again" in outcome.message
    assert outcome.partial == shown
    assert [(m.role, m.status) for m in await service.thread_messages(key)] == [("user", "failed")]


# --- turns with an owner ----------------------------------------------------------------------------------


async def test_a_second_process_never_interrupts_the_first_ones_turns(settings_factory: SettingsFactory) -> None:
    """``raven chat`` started beside ``raven run``, on one database."""
    settings = settings_factory()
    key = ThreadKey("test", "two-processes")
    async with open_service(settings) as first:
        in_flight = await first.store.accept(key, "default", "being answered", owner=first.instance_id)
        async with open_service(settings) as second:
            assert second.instance_id != first.instance_id
            turn = await second.store.get_turn(in_flight.turn_id)  # type: ignore[arg-type]
            assert turn is not None and turn.phase == "received"  # untouched: its owner is alive
        turn = await first.store.get_turn(in_flight.turn_id)  # type: ignore[arg-type]
        assert turn is not None and turn.phase == "received"
    # The first stopped with that turn unfinished: the next process to start closes it.
    async with open_service(settings) as third:
        turn = await third.store.get_turn(in_flight.turn_id)  # type: ignore[arg-type]
        assert turn is not None and turn.phase == "interrupted"
        assert (await third.thread_messages(key))[-1].role == "notice"


async def test_every_turn_of_this_process_is_owned_and_ends_in_a_final_phase(service: ChatService) -> None:
    key = ThreadKey("test", "owned")
    turn = service.reply(Event(key, "u1", "U1", "hello"))
    await turn.text()
    await turn.outcome()
    assert turn.turn_id is not None
    record = await service.store.get_turn(turn.turn_id)
    assert record is not None and record.owner == service.instance_id and record.phase == "generated"
    messages = await service.thread_messages(key)
    assert record.reply_id == messages[-1].id and record.message_id == messages[0].id


async def test_a_failure_while_resuming_leaves_nothing_pending(
        service: ChatService, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk I/O error while loading the state")

    monkeypatch.setattr(service.states, "resume", broken)
    key = ThreadKey("test", "stuck")
    turn = service.reply(Event(key, "u1", "U1", "hello"))
    await turn.text()
    assert isinstance(await turn.outcome(), Failed)
    record = await service.store.get_turn(turn.turn_id)  # type: ignore[arg-type]
    assert record is not None and (record.phase, record.reason) == ("failed", "error")
    assert [(m.role, m.status) for m in await service.thread_messages(key)] == [("user", "failed")]


async def test_a_follow_up_right_after_the_first_message_finds_the_thread(service: ChatService) -> None:
    key = ThreadKey("test", "follow-up")
    assert not await service.knows_thread(key)
    turn = service.reply(Event(key, "u1", "U1", "hello"))
    assert await service.knows_thread(key)  # before the turn's task has written anything
    await turn.text()
    assert await service.knows_thread(key)


# --- no unseen context --------------------------------------------------------------------------------


async def test_an_undelivered_reply_is_not_what_the_next_turn_builds_on(settings_factory: SettingsFactory) -> None:
    async with open_service(settings_factory()) as service:
        key = ThreadKey("test", "undelivered")
        await say(service, key, "first question")
        first_reply = (await service.thread_messages(key))[-1]
        saved = await service.store.load_state(key)
        assert saved is not None and saved.last_message_id == first_reply.id
        before = await service.engine.decode_state(saved.blob)

        turn = service.reply(Event(key, "u1", "U1", "second question"), confirm=True)
        await turn.text()
        assert isinstance(await turn.outcome(), Answered | CutOff)
        await service.undelivered(turn, "slack HTTP 500")  # the platform never took it
        await service.drain()

        record = await service.store.get_turn(turn.turn_id)  # type: ignore[arg-type]
        assert record is not None and (record.phase, record.reason) == ("delivery_failed", "slack HTTP 500")
        log = await service.thread_messages(key)
        assert [(m.role, m.status) for m in log[2:]] == [("user", "failed"), ("assistant", "undelivered")]
        # The thread is back to its state before that reply, in memory and in the store: exactly.
        rolled = await service.store.load_state(key)
        assert rolled is not None and rolled.last_message_id == first_reply.id
        restored = await service.engine.decode_state(rolled.blob)
        assert restored.token_count == before.token_count
        assert all(torch.equal(a, b) for a, b in zip(restored.state, before.state, strict=True))
        assert await service.store.last_reply_id(key, 0) == first_reply.id

        await say(service, key, "third question")
        turn_info = service.last_turn(key)
        assert turn_info is not None and turn_info.resumed_from == "memory"  # no rebuild needed
        # A rebuild from the log (which skips the undelivered reply) reaches the same state.
        after_third = await service.store.load_state(key)
        assert after_third is not None
        expected = await service.engine.decode_state(after_third.blob)
        thread = await service.thread(key)
        assert thread is not None
        fmt = PromptFormat(service.tokenizer, service.family, service.persona(thread.persona))
        rebuilt = await service.states.rebuild(thread, fmt)
    worst = max((a - b).abs().max().item() for a, b in zip(rebuilt.state, expected.state, strict=True))
    assert rebuilt.token_count == expected.token_count and worst <= 1e-5


async def test_a_delivered_reply_ends_the_turn_and_the_next_one_waits_for_it(service: ChatService) -> None:
    key = ThreadKey("test", "confirmed")
    first = service.reply(Event(key, "u1", "U1", "one"), confirm=True)
    await first.text()
    await first.outcome()
    second = service.reply(Event(key, "u1", "U1", "two"), confirm=True)
    await asyncio.sleep(0.3)
    waiting = await service.store.get_turn(first.turn_id)  # type: ignore[arg-type]
    assert waiting is not None and waiting.phase == "generated"  # not yet confirmed
    assert second.turn_id is not None and (await service.store.get_turn(second.turn_id)).phase == "received"  # type: ignore[union-attr]
    await service.delivered(first)
    await second.text()
    await service.delivered(second)
    await service.drain()
    for turn in (first, second):
        record = await service.store.get_turn(turn.turn_id)  # type: ignore[arg-type]
        assert record is not None and record.phase == "delivered"


async def test_a_delivery_never_reported_does_not_block_the_thread_forever(
        settings_factory: SettingsFactory) -> None:
    async with open_service(settings_factory(delivery_timeout_s=0.3)) as service:
        key = ThreadKey("test", "unreported")
        first = service.reply(Event(key, "u1", "U1", "one"), confirm=True)
        await first.text()
        await say(service, key, "two")  # answered once the wait for the first one's report ran out
        record = await service.store.get_turn(first.turn_id)  # type: ignore[arg-type]
        assert record is not None and record.phase == "delivered"
        assert [m.role for m in await service.thread_messages(key)].count("assistant") == 2


async def test_observers_hear_of_every_turn_with_what_it_cost(service: ChatService) -> None:
    from bot.core.service import TurnReport

    heard: list[TurnReport] = []
    service.observers.append(heard.append)
    service.observers.append(lambda report: 1 / 0)  # a broken watcher changes nothing
    key = ThreadKey("test", "observed")
    await say(service, key, "hello")
    await say(service, key, "/help")
    await say(service, key, "")
    answered, command, refused = heard
    assert (answered.platform, answered.resumed_from) == ("test", "new")
    assert answered.outcome in ("answered", "cut_off")
    assert answered.generated_tokens > 0 and answered.first_text_s is not None
    assert 0 < answered.first_text_s <= answered.seconds
    assert (command.outcome, command.resumed_from, command.generated_tokens) == ("command", None, 0)
    assert refused.outcome == "refused" and refused.first_text_s is None
