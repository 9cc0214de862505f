"""What a thread's state makes cheap, on Slack: the buttons on Raven's reply (Stop, Retry, Continue), the
slash commands, ``/fork``, ``/forget``, adopting a thread Raven is called into, and files. The real
slack-bolt app and the real chat service (tiny model) against the local fake of Slack."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from adapters.slack_bot import NO_THREAD, NOTHING_WRITTEN, STALE_BUTTONS
from adapters.slack_mrkdwn import to_mrkdwn
from bot.app.assembly import open_service
from bot.core.service import ChatService
from bot.events import ThreadKey
from tests.fakes.slack_server import FakeSlack, Message
from tests.test_slack_adapter import (
    BOT,
    USER,
    SettingsFactory,
    command,
    event_body,
    fake,
    mention,
    message,
    running,
)

__all__ = ["fake"]  # the fixture, shared with the adapter's other tests
_ids = itertools.count(1)
RETRY_CONTINUE = ["raven_retry", "raven_continue"]


def click(fake: FakeSlack, shown: Message | None, action_id: str, *, value: str | None = None,
          channel: str = "C1", user: str = USER, trigger: str | None = None,
          ephemeral: bool = False) -> dict[str, Any]:
    """The ``block_actions`` payload Slack sends when ``user`` clicks a button of ``shown``."""
    element: dict[str, Any] = {"action_id": action_id, "value": value or ""}
    if value is None and shown is not None:
        [element] = [e for b in shown.blocks or [] if b["type"] == "actions" for e in b["elements"]
                     if e["action_id"] == action_id]
    container: dict[str, Any] = {"type": "message", "channel_id": channel, "is_ephemeral": ephemeral}
    payload: dict[str, Any] = {
        "type": "block_actions", "api_app_id": "A1", "token": "legacy",
        "user": {"id": user, "username": "alice", "name": "alice", "team_id": "T1"},
        "team": {"id": "T1", "domain": "fake"}, "channel": {"id": channel, "name": "general"},
        "trigger_id": trigger or f"trig-{next(_ids)}", "response_url": fake.response_url(f"a{next(_ids)}"),
        "container": container,
        "actions": [{**element, "block_id": "raven_controls", "type": "button", "action_ts": "1700000001.1"}],
    }
    if shown is not None:
        container |= {"message_ts": shown.ts, "thread_ts": shown.thread_ts}
        payload["message"] = {"type": "message", "ts": shown.ts, "text": shown.text, "blocks": shown.blocks,
                              "thread_ts": shown.thread_ts, "user": BOT}
    return payload


def shows(shown: Message, reply: str) -> bool:
    """The message says the stored reply (and perhaps how it ended), in its text and in its blocks
    (the log keeps the reply with blank lines tidied)."""
    return shown.text == shown.shown_text() and words(to_mrkdwn(reply)) in words(shown.text)


def words(text: str) -> str:
    return " ".join(text.split())


def with_buttons(messages: list[Message]) -> list[tuple[str, list[str]]]:
    return [(m.ts, m.buttons()) for m in messages if m.buttons()]


async def stale_then_continue(slack: Any, fake: FakeSlack, thread: str, old: Message, new: Message) -> list[Message]:
    """A click on the older reply's Continue is refused as stale (nothing posted); one on the newest
    reply's works, and only its continuation's last message then shows buttons. The thread's messages."""
    await slack.deliver.action(click(fake, old, "raven_continue", value=f"C1:{thread}"))
    await slack.settle()
    assert len(slack.replies("C1", thread)) == 2 and STALE_BUTTONS in fake.ephemerals[-1].text
    await slack.deliver.action(click(fake, new, "raven_continue"))
    await slack.settle()
    messages: list[Message] = slack.replies("C1", thread)
    assert len(messages) >= 3 and [b for _, b in with_buttons(messages)] == [RETRY_CONTINUE]
    assert messages[-1].buttons() == RETRY_CONTINUE
    return messages


async def stored(service: ChatService, key: ThreadKey) -> list[tuple[str, str, str]]:
    return [(m.role, m.status, m.text) for m in await service.thread_messages(key)]


# --- Retry and Continue ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["http", "socket"])
async def test_retry_and_continue_buttons_are_acked_at_once_and_only_the_last_reply_has_them(
        mode: str, service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    thread, key = "600.000001", ThreadKey("slack", "C1:600.000001")
    async with running(mode, service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention(thread, "tell me about joins")))
        await slack.settle()
        [first] = slack.replies("C1", thread)
        assert first.buttons() == RETRY_CONTINUE
        [(_, _, question), (_, _, answer)] = await stored(service, key)
        # The buttons are blocks: the message's text is still the reply, and so is what it shows.
        assert shows(first, answer)

        took = await slack.deliver.action(click(fake, first, "raven_retry", trigger="trig-retry"))
        assert took < 3.0
        await slack.deliver.action(click(fake, first, "raven_retry", trigger="trig-retry"))  # delivered twice
        await slack.settle()
        messages = slack.replies("C1", thread)
        assert len(messages) == 2  # one new reply, posted after the old one
        old, new = messages
        assert old.buttons() == [] and shows(old, answer)
        assert new.buttons() == RETRY_CONTINUE
        log = await stored(service, key)
        assert [(role, status) for role, status, _ in log] == [
            ("user", "answered"), ("assistant", "replaced"), ("user", "done"), ("assistant", "done")]
        assert log[2][2] == "/retry" and shows(new, log[3][2])
        retried = log[3][2]

        # the old reply's buttons, still shown somewhere (a client that did not refresh): refused
        messages = await stale_then_continue(slack, fake, thread, first, new)
        assert shows(messages[1], retried)
        log = await stored(service, key)
        assert log[-2][2] == "/continue" and log[-1][0] == "assistant"
        longer = log[-1][2]
        assert longer.startswith(retried) and len(longer) > len(retried)  # the log: old text + continuation
        continuation = "".join(m.text for m in messages[2:])
        assert continuation.strip() and words(to_mrkdwn(longer)).startswith(words(to_mrkdwn(retried)))
        assert words(continuation).removesuffix(" _(reply cut off at the 40-token limit)_") in words(to_mrkdwn(longer))
    assert question == "tell me about joins"


async def test_stop_button_keeps_what_was_written_and_then_offers_retry(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    thread, key = "610.000001", ThreadKey("slack", "C1:610.000001")
    settings = settings_factory(max_reply_tokens=4000, reply_timeout_s=600)
    async with open_service(settings) as service, running("socket", service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention(thread, "tell me everything")))
        await fake.wait_for(lambda: any(m.buttons() == ["raven_stop"] for m in slack.replies("C1", thread)))
        [writing] = [m for m in slack.replies("C1", thread) if m.buttons()]
        assert writing.text.endswith("…")  # still being written
        took = await slack.deliver.action(click(fake, writing, "raven_stop"))
        assert took < 3.0
        await slack.settle()
        messages = slack.replies("C1", thread)
        assert messages[-1].text.endswith("_(reply stopped)_")
        assert with_buttons(messages) == [(messages[-1].ts, RETRY_CONTINUE)]  # no Stop left anywhere
        log = await stored(service, key)
        assert log[-1][0] == "assistant" and 0 < len(log[-1][2]) < 4000
        assert words(to_mrkdwn(log[-1][2])) in words("".join(m.text for m in messages))  # shown = kept

        # nothing being written: the user alone is told so
        await slack.deliver.action(click(fake, None, "raven_stop", value=f"C1:{thread}"))
        await slack.settle()
        assert fake.ephemerals[-1].user == USER and NOTHING_WRITTEN in fake.ephemerals[-1].text


async def test_buttons_act_only_in_allowed_channels_and_on_their_own_conversation(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    async with running("http", service, settings_factory, fake, allowed_channels=["C1"]) as slack:
        await slack.deliver.event(event_body(mention("620.000001", "hello")))
        await slack.settle()
        [reply] = slack.replies("C1", "620.000001")
        posted = len(fake.calls_to("chat.postMessage"))
        await slack.deliver.action(click(fake, None, "raven_retry", value="C2:620.000001", channel="C2"))
        await slack.deliver.action(click(fake, None, "raven_retry", value="C1:620.000001", channel="C3"))
        await slack.settle()
        assert fake.responses and "not enabled" in fake.responses[-1]["text"]
        assert len(fake.calls_to("chat.postMessage")) == posted  # nothing retried
        assert reply.buttons() == RETRY_CONTINUE


# --- slash commands ---------------------------------------------------------------------------------
async def test_slash_commands_act_on_the_users_last_thread_and_forget_asks_first(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    thread, key = "630.000001", ThreadKey("slack", "C1:630.000001")
    async with running("http", service, settings_factory, fake) as slack:
        for name in ("/retry", "/stop", "/forget"):  # no thread yet: how to use them instead
            took, answer = await slack.deliver.command(command("", fake, name=name))
            assert took < 3.0 and answer["text"] == NO_THREAD.format(command=name)

        await slack.deliver.event(event_body(mention(thread, "first question")))
        await slack.settle()
        took, answer = await slack.deliver.command(command("", fake, name="/retry"))
        assert took < 3.0 and answer.get("response_type") == "ephemeral" and "first question" in answer["text"]
        await slack.settle()
        assert len(slack.replies("C1", thread)) == 2
        assert [text for role, _, text in await stored(service, key) if role == "user"] == ["first question",
                                                                                           "/retry"]
        _, answer = await slack.deliver.command(command("", fake, name="/stop"))
        assert answer["text"] == NOTHING_WRITTEN

        # /forget: a private question with a button; the thread is kept until it is clicked
        took, answer = await slack.deliver.command(command("", fake, name="/forget"))
        assert took < 3.0 and answer.get("response_type") == "ephemeral" and "/forget confirm" in answer["text"]
        [button] = [e for b in answer["blocks"] if b["type"] == "actions" for e in b["elements"]]
        assert (button["action_id"], button["value"]) == ("raven_forget", f"C1:{thread}")
        await slack.settle()
        assert await service.thread(key) is not None
        await slack.deliver.action(click(fake, None, "raven_forget", value=button["value"], ephemeral=True))
        await slack.settle()
        assert {"delete_original": True}.items() <= fake.responses[-1].items()  # the question goes away
        assert await service.thread_messages(key) == [] and await service.thread(key) is None
        assert "Forgotten" in slack.replies("C1", thread)[-1].text
        assert with_buttons(slack.replies("C1", thread)) == []  # nothing left to retry

        # "/forget confirm" forgets at once; so does the button under the core's question in a thread
        other, other_key = "630.000011", ThreadKey("slack", "C1:630.000011")
        await slack.deliver.event(event_body(mention(other, "second thread")))
        await slack.deliver.event(event_body(mention("630.000012", "forget", thread_ts=other)))
        await slack.settle()
        question = slack.replies("C1", other)[-1]
        assert question.buttons() == ["raven_forget"] and "/forget confirm" in question.text
        assert slack.replies("C1", other)[0].buttons() == []  # the answer's buttons went with it
        await slack.deliver.action(click(fake, question, "raven_forget"))
        await slack.settle()
        assert await service.thread(other_key) is None and question.buttons() == []


# --- /fork -------------------------------------------------------------------------------------------
async def test_fork_opens_a_new_thread_that_goes_on_from_the_old_one(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    thread, key = "640.000001", ThreadKey("slack", "C1:640.000001")
    async with running("http", service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention(thread, "plan a migration")))
        await slack.settle()
        await slack.deliver.event(event_body(mention("640.000002", "fork", thread_ts=thread)))
        await slack.settle()
        roots = [m for m in fake.messages.values() if m.thread_ts is None and m.user is None]
        [root] = roots
        new_key = ThreadKey("slack", f"C1:{root.ts}")
        assert f"<@{USER}> forked" in root.text and "/archives/C1/p640000001" in root.text
        assert f"/archives/C1/p{root.ts.replace('.', '')}" in slack.replies("C1", thread)[-1].text
        info = await service.thread(new_key)
        assert info is not None and info.forked_from == key
        old_log = [(m.role, m.text) for m in await service.thread_messages(key)]
        assert [(m.role, m.text) for m in await service.thread_messages(new_key)] == old_log
        assert all("fork" not in text for _, text in old_log)  # the command is not part of either

        # the new thread is followed without a mention, and goes on from the copied state
        await slack.deliver.event(event_body(message("640.000009", "and the rollback?", thread_ts=root.ts)))
        await slack.settle()
        assert len(slack.replies("C1", root.ts)) == 1 and service.last_turn(new_key) is not None
        assert service.last_turn(new_key).resumed_from in ("memory", "store")  # type: ignore[union-attr]

        # /fork acts on the last thread the user talked in: now the new one
        took, answer = await slack.deliver.command(command("", fake, name="/fork"))
        await slack.settle()
        assert took < 3.0 and "Forking" in answer["text"]
        newest = [m for m in fake.messages.values() if m.thread_ts is None and m.user is None and m is not root]
        assert len(newest) == 1
        forked = await service.thread(ThreadKey("slack", f"C1:{newest[0].ts}"))
        assert forked is not None and forked.forked_from == new_key


# --- adopting a thread ---------------------------------------------------------------------------------
async def test_a_mention_in_a_thread_raven_does_not_know_reads_its_earlier_messages(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    root = "650.000001"
    fake.say("C1", root, "U2", "our nightly report query got slow")
    fake.say("C1", "650.000002", USER, "which table?", thread_ts=root)
    fake.say("C1", "650.000003", "U2", "`orders`, about *40M* rows", thread_ts=root)
    fake.say("C1", "650.000004", USER, "did the plan change?", thread_ts=root)
    fake.say("C1", "650.000005", "U2", "no idea", thread_ts=root)
    ask = fake.say("C1", "650.000006", USER, f"<@{BOT}> what should we check first?", thread_ts=root)
    key = ThreadKey("slack", f"C1:{root}")
    settings = settings_factory(adopt_max_messages=4)
    async with open_service(settings) as service, running("http", service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body({**ask, "type": "app_mention"}))
        await slack.deliver.event(event_body(ask))  # the same message as a plain message event
        await slack.settle()
        [read] = fake.calls_to("conversations.replies")
        assert (read.args["channel"], read.args["ts"], read.args["latest"]) == ("C1", root, "650.000006")
        log = [(m.role, m.status, m.author, m.text) for m in await service.thread_messages(key)]
        # the thread's first message and the latest before the mention, under their authors' names
        assert [(author, text) for _, status, author, text in log if status == "adopted"] == [
            ("Bob", "our nightly report query got slow"),
            ("Bob", "`orders`, about *40M* rows"),
            ("Alice", "did the plan change?"),
            ("Bob", "no idea"),
        ]
        assert [(role, text) for role, status, _, text in log if status != "adopted"] == [
            ("user", "what should we check first?"), ("assistant", log[-1][3])]  # the mention once, answered
        assert len(slack.replies("C1", root)) == 1

        # known from now on: a later mention reads nothing again, and the state carries the thread
        await slack.deliver.event(event_body(mention("650.000009", "and then?", thread_ts=root)))
        await slack.settle()
        assert len(fake.calls_to("conversations.replies")) == 1
        assert service.last_turn(key).resumed_from in ("memory", "store")  # type: ignore[union-attr]


# --- files -------------------------------------------------------------------------------------------
async def test_files_are_read_into_the_message_or_noted_as_not_read(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    sql = b"SELECT o.id FROM orders o JOIN users u ON u.id = o.user_id WHERE u.region = 'eu';\n"
    files = [
        fake.add_file("slow.sql", sql),
        fake.add_file("screenshot.png", b"\x89PNG\r\n\x1a\n" + bytes(200), mimetype="image/png"),
        fake.add_file("huge.log", b"x" * 10, size=5_000_000),
        {**fake.add_file("elsewhere.sql", b"SELECT 1;"), "url_private_download": "http://203.0.113.9/e.sql",
         "url_private": "http://203.0.113.9/e.sql"},
    ]
    thread, key = "660.000001", ThreadKey("slack", "C1:660.000001")
    settings = settings_factory(attachment_max_bytes=50_000)
    async with open_service(settings) as service, running("http", service, settings_factory, fake) as slack:
        event = {**mention(thread, "why is this slow?"), "files": files}
        await slack.deliver.event(event_body(event))
        await slack.settle()
        # only the .sql file within the limit was fetched, with the bot token; nothing else was asked
        assert fake.downloads == [("slow.sql", "Bearer xoxb-test")]
        [(_, _, text), _] = await stored(service, key)
        assert text.startswith("why is this slow?\n\n[Attached file slow.sql]\n```\n" + sql.decode().strip())
        assert "[Attached file screenshot.png: not read — not a text file Raven reads]" in text
        assert "[Attached file huge.log: not read — 5,000,000 bytes, over the 50,000-byte limit]" in text
        assert "[Attached file elsewhere.sql: not read — it could not be fetched]" in text
        assert len(slack.replies("C1", thread)) == 1

        # a file alone, in a followed thread, is a message too; a token Slack refuses gets nothing read
        fake.bot_token = "xoxb-other"
        await slack.deliver.event(event_body(message("660.000002", "", thread_ts=thread, subtype="file_share",
                                                     files=[fake.add_file("notes.md", b"# notes")])))
        await slack.settle()
        assert fake.downloads[-1] == ("notes.md", "Bearer xoxb-test")
        last_question = [t for role, _, t in await stored(service, key) if role == "user"][-1]
        assert last_question == "[Attached file notes.md: not read — it could not be fetched]"
    await asyncio.sleep(0)


async def test_after_a_restart_the_buttons_still_move_to_the_newest_reply(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    """Which message shows a thread's buttons is read back from the log's deliveries by a process that
    did not post it: the next reply takes them off the older one, as without the restart."""
    thread = "640.000001"
    async with running("http", service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention(thread, "tell me about joins")))
        await slack.settle()
        [first] = slack.replies("C1", thread)
        assert first.buttons() == RETRY_CONTINUE
        first_ts, first_text = first.ts, first.text
    async with running("http", service, settings_factory, fake) as slack:  # restarted
        await slack.deliver.event(event_body(message("640.000002", "and indexes?", thread_ts=thread)))
        await slack.settle()
        old, new = slack.replies("C1", thread)
        assert (old.ts, old.text, old.buttons()) == (first_ts, first_text, [])  # the same words, no buttons
        assert new.buttons() == RETRY_CONTINUE
    async with running("http", service, settings_factory, fake) as slack:  # and again
        await slack.deliver.action(click(fake, new, "raven_continue"))
        await slack.settle()
        messages = slack.replies("C1", thread)
        assert len(messages) >= 3 and [b for _, b in with_buttons(messages)] == [RETRY_CONTINUE]
        assert messages[-1].buttons() == RETRY_CONTINUE and new.buttons() == []


async def test_a_command_that_keeps_the_buttons_leaves_them_to_be_moved_by_the_next_answer(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    """``help`` between two answers leaves the first answer's buttons where they are (they still act on
    its exchange); the second answer then takes them off the first and is the only one showing them."""
    thread = "650.000001"
    async with running("http", service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention(thread, "tell me about joins")))
        await slack.settle()
        [answer] = slack.replies("C1", thread)
        await slack.deliver.event(event_body(mention("650.000002", "help", thread_ts=thread)))
        await slack.settle()
        assert len(slack.replies("C1", thread)) == 2 and answer.buttons() == RETRY_CONTINUE
        await slack.deliver.event(event_body(message("650.000003", "and indexes?", thread_ts=thread)))
        await slack.settle()
        messages = slack.replies("C1", thread)
        assert with_buttons(messages) == [(messages[-1].ts, RETRY_CONTINUE)] and answer.buttons() == []


async def test_after_a_restart_slash_commands_still_find_the_users_last_thread(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    """The thread a slash command acts on is read from the log when the process did not see the user's
    message (restarted since): the user's newest message in that channel, not another user's, not
    another channel's."""
    thread, key = "660.000001", ThreadKey("slack", "C1:660.000001")
    async with running("http", service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention(thread, "first question")))
        await slack.deliver.event(event_body(mention("660.000002", "bob's question", user="U2")))
        await slack.deliver.event(event_body(mention("660.000003", "elsewhere", channel="C2")))
        await slack.settle()
    async with running("http", service, settings_factory, fake) as slack:  # restarted
        took, answer = await slack.deliver.command(command("", fake, name="/retry"))
        assert took < 3.0 and answer.get("response_type") == "ephemeral" and "first question" in answer["text"]
        await slack.settle()
        assert [text for role, _, text in await stored(service, key) if role == "user"] == ["first question",
                                                                                           "/retry"]
        assert len(slack.replies("C1", thread)) == 2
        _, answer = await slack.deliver.command(command("", fake, name="/stop", channel="C3"))
        assert answer["text"] == NO_THREAD.format(command="/stop")  # nothing of hers in C3
