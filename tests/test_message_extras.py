"""What a message can bring besides its text: attached files, and — when Raven is called into a thread
that was going on without it — the thread's earlier messages (adoption). Through the core on the real
engine, store and tiny model; the ``rwkv`` package is the oracle for the adopted thread's state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from bot.app.assembly import open_service
from bot.core.attachments import READABLE_SUFFIXES, render, wanted
from bot.core.outcomes import Answered, CutOff, Refused
from bot.core.service import ChatService
from bot.events import Attachment, EarlierMessage, Event, ThreadKey
from tests.conftest import SettingsFactory
from tests.test_reply_controls import assert_state_is_the_log, package  # noqa: F401  (the oracle fixture)

LIMIT = 100_000


# --- files ---------------------------------------------------------------------------------------------


def test_only_text_files_within_the_limit_are_fetched() -> None:
    assert wanted("query.sql", 1200, LIMIT) and wanted("NOTES.MD", 10, LIMIT) and wanted("a.tar.json", 0, LIMIT)
    assert not wanted("photo.png", 1200, LIMIT)
    assert not wanted("big.log", LIMIT + 1, LIMIT)
    assert not wanted("archive.zip", 10, LIMIT) and not wanted("noextension", 10, LIMIT)
    assert {".sql", ".py", ".json", ".csv", ".log", ".txt", ".md"} <= READABLE_SUFFIXES


def test_each_kind_of_file_has_its_outcome() -> None:
    files = [
        Attachment("schema.sql", 24, b"CREATE TABLE t (id int);"),
        Attachment("photo.png", 2048, None),
        Attachment("huge.log", LIMIT + 5, None),
        Attachment("lies.txt", 9, b"ab\x00\x01cdefg"),
        Attachment("latin1.csv", 6, "café".encode("latin-1") + b",1"),
        Attachment("gone.md", 10, None),
        Attachment("../../etc/passwd.txt", 4, b"root"),
    ]
    text = render(files, LIMIT, 10)
    assert "[Attached file schema.sql]\n```\nCREATE TABLE t (id int);\n```" in text
    assert "[Attached file photo.png: not read — not a text file Raven reads]" in text
    assert f"[Attached file huge.log: not read — {LIMIT + 5:,} bytes, over the {LIMIT:,}-byte limit]" in text
    assert "[Attached file lies.txt: not read — it looks binary]" in text
    assert "[Attached file latin1.csv: not read — it is not UTF-8 text]" in text
    assert "[Attached file gone.md: not read — it could not be fetched]" in text
    assert "[Attached file passwd.txt]\n```\nroot\n```" in text and "etc/" not in text
    assert render([], LIMIT, 10) == ""


def test_a_file_cannot_close_its_own_fence_and_too_many_files_are_noted() -> None:
    tricky = Attachment("readme.md", 40, b"before\n```\nnot the end\n````\nstill inside")
    text = render([tricky], LIMIT, 10)
    assert text.startswith("[Attached file readme.md]\n`````\n") and text.endswith("\n`````")
    many = [Attachment(f"f{i}.txt", 1, b"x") for i in range(4)]
    text = render(many, LIMIT, 2)
    assert text.count("[Attached file f") == 4 and text.count("only 2 files are read from one message") == 2


async def test_files_are_read_into_the_stored_message_and_the_limit_counts_only_the_typed_text(
        service: ChatService) -> None:
    key = ThreadKey("test", "files")
    typed = "x" * service.settings.max_message_chars  # exactly at the limit
    files = (Attachment("q.sql", 17, b"SELECT * FROM t;\n"), Attachment("shot.png", 99, None))
    turn = service.reply(Event(key, "u1", "U1", typed, "m1", attachments=files))
    await turn.text()
    assert isinstance(await turn.outcome(), Answered | CutOff)
    stored = (await service.thread_messages(key))[0]
    assert stored.text.startswith(typed + "\n\n[Attached file q.sql]\n```\nSELECT * FROM t;\n```")
    assert stored.text.endswith("[Attached file shot.png: not read — not a text file Raven reads]")
    # a file alone is a message; nothing at all is not
    alone = service.reply(Event(key, "u1", "U1", "", "m2", attachments=(Attachment("a.txt", 2, b"hi"),)))
    await alone.text()
    assert isinstance(await alone.outcome(), Answered | CutOff)
    empty = service.reply(Event(key, "u1", "U1", "  ", "m3"))
    assert isinstance(await empty.outcome(), Refused)
    too_long = service.reply(Event(key, "u1", "U1", typed + "y", "m4", attachments=files))
    outcome = await too_long.outcome()
    assert isinstance(outcome, Refused) and outcome.reason == "too_long"


# --- adopting a thread -----------------------------------------------------------------------------------


EARLIER = [EarlierMessage("Alice", "our nightly report query got slow"),
           EarlierMessage("Bob", "it joins orders to customers, no index on customer_id"),
           EarlierMessage("Deploy Bot", "deployed v2.3", from_bot=True)]


def history_of(messages: Sequence[EarlierMessage], calls: list[int] | None = None) -> Any:
    async def fetch() -> Sequence[EarlierMessage]:
        if calls is not None:
            calls.append(1)
        return messages
    return fetch


async def test_an_adopted_thread_is_answered_knowing_its_earlier_messages(
        settings_factory: SettingsFactory, package: Any) -> None:  # noqa: F811
    key = ThreadKey("test", "adopted")
    async with open_service(settings_factory(seed=5, max_reply_tokens=20)) as service:
        turn = service.reply(Event(key, "u1", "Carol", "what do you suggest?", addressed=True),
                             history=history_of(EARLIER))
        await turn.text()
        assert isinstance(await turn.outcome(), Answered | CutOff)
        log = await service.thread_messages(key)
        assert [(m.role, m.author, m.status) for m in log] == [
            ("user", "Carol", "answered"), ("user", "Alice", "adopted"), ("user", "Bob", "adopted"),
            ("user", "Deploy Bot", "adopted"), ("assistant", "raven", "done")]
        context = await service.store.context(key, 0)
        assert [m.author for m in context] == ["Alice", "Bob", "Deploy Bot", "Carol", "raven"]  # read in that order
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "rebuild"  # the earlier messages were read once
        await assert_state_is_the_log(service, key, package)

        calls: list[int] = []
        follow = service.reply(Event(key, "u1", "Carol", "and then?"), history=history_of(EARLIER, calls))
        await follow.text()
        assert calls == []  # a thread Raven has talked in is not adopted again
        info = service.last_turn(key)
        assert info is not None and info.resumed_from == "memory"  # later turns cost nothing extra
        await assert_state_is_the_log(service, key, package)
        await service.store.delete_state(key)
        service.states.forget(key)
        again = service.reply(Event(key, "u1", "Carol", "and a rebuild?"))
        await again.text()
        await assert_state_is_the_log(service, key, package)  # a rebuild from the log reads them too

        await service.reply(Event(key, "u1", "Carol", "/retry")).outcome()  # a retry keeps them too
        await assert_state_is_the_log(service, key, package)


@pytest.mark.parametrize(("max_messages", "max_chars", "kept"), [
    (2, 20_000, ["Bob", "Deploy Bot"]),  # the newest ones
    (50, 40, ["Deploy Bot"]),  # within the character budget, newest first
    (0, 20_000, []),  # adoption off
])
async def test_adoption_is_bounded(settings_factory: SettingsFactory, max_messages: int, max_chars: int,
                                   kept: list[str]) -> None:
    settings = settings_factory(adopt_max_messages=max_messages, adopt_max_chars=max_chars, max_reply_tokens=5)
    async with open_service(settings) as service:
        key = ThreadKey("test", "bounded")
        turn = service.reply(Event(key, "u1", "Carol", "hi"), history=history_of(EARLIER))
        await turn.outcome()
        adopted = [m.author for m in await service.thread_messages(key) if m.status == "adopted"]
    assert adopted == kept


async def test_a_history_that_cannot_be_read_still_gets_an_answer(service: ChatService) -> None:
    async def broken() -> Sequence[EarlierMessage]:
        raise ConnectionError("platform unreachable")

    key = ThreadKey("test", "broken-history")
    turn = service.reply(Event(key, "u1", "Carol", "hello"), history=broken)
    await turn.text()
    assert isinstance(await turn.outcome(), Answered | CutOff)
    assert [m.status for m in await service.thread_messages(key)] == ["answered", "done"]


async def test_a_channel_summary_reads_the_recent_messages_without_keeping_them(
        settings_factory: SettingsFactory, package: Any) -> None:  # noqa: F811
    from bot.core.prompt import PromptFormat
    from bot.core.service import SUMMARY_REQUEST

    settings = settings_factory(top_k=1, max_reply_tokens=6)  # greedy: the first word depends on the state only
    key = ThreadKey("test", "channel")
    async with open_service(settings) as service:
        turn = service.reply(Event(key, "u1", "Carol", "/summary"), history=history_of(EARLIER))
        summary = await turn.text()
        assert isinstance(await turn.outcome(), Answered | CutOff) and summary.strip()
        log = await service.thread_messages(key)
        assert [(m.role, m.status) for m in log] == [("user", "done"), ("assistant", "aside")]  # nothing adopted
        fmt = PromptFormat(service.tokenizer, service.family, service.persona("default"))
        tokens = fmt.system_tokens()
        for message in EARLIER:
            tokens += fmt.earlier_message_tokens(message.author, message.text)
        tokens += fmt.user_turn_tokens(SUMMARY_REQUEST)
        logits, _ = package.forward(tokens, None)
        assert summary.startswith(service.tokenizer.decode([int(logits.argmax().item())]))
        empty = service.reply(Event(ThreadKey("test", "quiet"), "u1", "Carol", "/summary"), history=history_of([]))
        outcome = await empty.outcome()
        assert isinstance(outcome, Refused) and outcome.reason == "nothing_to_summarize"
