"""The Slack adapter: the real slack-bolt app and the real chat service (tiny model) against a local fake
of Slack's Web API and Socket Mode websocket. Events arrive as signed HTTP requests to the adapter's own
aiohttp server (HTTP mode) or as envelopes over the fake's websocket (Socket Mode)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import torch

from adapters.slack_bot import ERROR_NOTICE, SlackAdapter
from adapters.streaming import PLACEHOLDER
from bot.app.settings import Settings
from bot.core.service import ChatService
from bot.core.turn import Turn
from bot.errors import ConfigError
from bot.events import Event, ThreadKey
from tests.fakes.scripted import scripted_turn
from tests.fakes.slack_server import FakeSlack, Message, signed_headers

SECRET = "test-signing-secret"
BOT = "UBOT"
USER = "U1"
SettingsFactory = Callable[..., Settings]
_ids = itertools.count(1)


# --- payloads ----------------------------------------------------------------------------------------
def event_body(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "token": "legacy", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
        "event_id": event_id or f"Ev{next(_ids)}", "event_time": 1700000000, "event": event,
        "authorizations": [{"team_id": "T1", "user_id": BOT, "is_bot": True}],
    }


def mention(ts: str, text: str = "hello there", channel: str = "C1", thread_ts: str | None = None,
            user: str = USER) -> dict[str, Any]:
    event = {"type": "app_mention", "user": user, "text": f"<@{BOT}> {text}", "ts": ts, "channel": channel,
             "event_ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def message(ts: str, text: str, channel: str = "C1", thread_ts: str | None = None, user: str = USER,
            channel_type: str = "channel", **extra: Any) -> dict[str, Any]:
    event = {"type": "message", "user": user, "text": text, "ts": ts, "channel": channel,
             "channel_type": channel_type, "event_ts": ts, **extra}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def command(text: str, fake: FakeSlack, channel: str = "C1", name: str = "/advisor") -> dict[str, str]:
    return {
        "token": "legacy", "team_id": "T1", "team_domain": "fake", "channel_id": channel,
        "channel_name": "general", "user_id": USER, "user_name": "alice", "command": name,
        "text": text, "api_app_id": "A1", "response_url": fake.response_url(str(next(_ids))),
        "trigger_id": f"trig-{next(_ids)}",
    }


# --- delivering to the adapter in either mode ---------------------------------------------------------
class Delivery:
    async def event(self, body: dict[str, Any], retry: int = 0) -> None:
        raise NotImplementedError

    async def command(self, fields: dict[str, str]) -> tuple[float, dict[str, Any]]:
        """Send a slash command; returns the seconds until the ack and the ack's payload."""
        raise NotImplementedError

    async def action(self, payload: dict[str, Any]) -> float:
        """Send an interaction (a button click); returns the seconds until the ack."""
        raise NotImplementedError


class HttpDelivery(Delivery):
    def __init__(self, port: int, path: str) -> None:
        self.url = f"http://127.0.0.1:{port}{path}"

    async def post(self, body: str, headers: dict[str, str]) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, session.post(self.url, data=body.encode(),
                                                                    headers=headers) as response:
            return response.status, await response.text()

    async def event(self, body: dict[str, Any], retry: int = 0) -> None:
        raw = json.dumps(body)
        extra = {"Content-Type": "application/json"}
        if retry:
            extra |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        status, _ = await self.post(raw, signed_headers(SECRET, raw, extra=extra))
        assert status == 200

    async def command(self, fields: dict[str, str]) -> tuple[float, dict[str, Any]]:
        raw = urllib.parse.urlencode(fields)
        headers = signed_headers(SECRET, raw, extra={"Content-Type": "application/x-www-form-urlencoded"})
        started = time.monotonic()
        status, text = await self.post(raw, headers)
        assert status == 200
        return time.monotonic() - started, (json.loads(text) if text else {})

    async def action(self, payload: dict[str, Any]) -> float:
        raw = urllib.parse.urlencode({"payload": json.dumps(payload)})
        headers = signed_headers(SECRET, raw, extra={"Content-Type": "application/x-www-form-urlencoded"})
        started = time.monotonic()
        status, _ = await self.post(raw, headers)
        assert status == 200
        return time.monotonic() - started


class SocketDelivery(Delivery):
    def __init__(self, fake: FakeSlack) -> None:
        self.fake = fake

    async def event(self, body: dict[str, Any], retry: int = 0) -> None:
        envelope = await self.fake.send_envelope("events_api", body, retry_attempt=retry,
                                                 retry_reason="timeout" if retry else None)
        await self.fake.wait_ack(envelope)

    async def command(self, fields: dict[str, str]) -> tuple[float, dict[str, Any]]:
        started = time.monotonic()
        envelope = await self.fake.send_envelope("slash_commands", dict(fields))
        acked_at, payload = await self.fake.wait_ack(envelope)
        return acked_at - started, payload

    async def action(self, payload: dict[str, Any]) -> float:
        started = time.monotonic()
        envelope = await self.fake.send_envelope("interactive", payload)
        acked_at, _ = await self.fake.wait_ack(envelope)
        return acked_at - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Harness:
    def __init__(self, adapter: SlackAdapter, fake: FakeSlack, deliver: Delivery) -> None:
        self.adapter = adapter
        self.fake = fake
        self.deliver = deliver

    async def settle(self) -> None:
        """Wait until every delivery has been answered and the fake has gone quiet."""
        await self.fake.quiet(0.25)
        async with asyncio.timeout(30):
            await self.adapter.wait_idle()
        await self.fake.quiet(0.15)

    def replies(self, channel: str, thread_ts: str) -> list[Message]:
        return self.fake.thread(channel, thread_ts)


@contextlib.asynccontextmanager
async def running(mode: str, service: Any, settings_factory: SettingsFactory, fake: FakeSlack,
                  **overrides: Any) -> AsyncIterator[Harness]:
    values: dict[str, Any] = {"bot_token": "xoxb-test", "api_url": fake.base_url}
    if mode == "socket":
        values["app_token"] = "xapp-test"
    else:
        values |= {"signing_secret": SECRET, "http_host": "127.0.0.1", "http_port": free_port()}
    values.update(overrides)
    adapter = SlackAdapter(service, settings_factory(slack=values).slack)
    await adapter.start()
    try:
        if mode == "socket":
            await fake.wait_connected()
            deliver: Delivery = SocketDelivery(fake)
        else:
            assert adapter.http_port is not None
            deliver = HttpDelivery(adapter.http_port, adapter.settings.http_path)
        yield Harness(adapter, fake, deliver)
    finally:
        await adapter.stop()


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = FakeSlack(bot_user_id=BOT, users={USER: "Alice", "U2": "Bob"})
    await server.start()
    yield server
    await server.close()


class ScriptedService:
    """The real chat service with its reply stream replaced by a scripted one, to drive the renderer
    with replies longer and slower than the tiny model writes."""

    def __init__(self, service: ChatService, chunks: list[str], delay_s: float = 0.0, outcome: Any = None) -> None:
        self._service = service
        self.chunks = chunks
        self.delay_s = delay_s
        self.outcome = outcome
        self.events: list[Event] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)

    def reply(self, event: Event, *, confirm: bool = False) -> Turn:
        self.events.append(event)
        return scripted_turn(self.chunks, self.delay_s, outcome=self.outcome)


def final_texts(messages: list[Message]) -> list[str]:
    return [m.text for m in messages]


# --- mention, thread, follow-up -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["http", "socket"])
async def test_mention_is_answered_in_a_thread_and_followups_need_no_mention(
        mode: str, service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(mode, service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention("100.000001", "hello there")))
        await slack.settle()

        posts = fake.calls_to("chat.postMessage")
        assert len(posts) == 1
        assert posts[0].args["channel"] == "C1"
        assert posts[0].args["thread_ts"] == "100.000001"
        assert posts[0].token == "xoxb-test"
        reply = slack.replies("C1", "100.000001")
        assert len(reply) == 1
        assert fake.calls_to("chat.update"), "the early post is updated with the rest of the reply"
        assert reply[0].text.strip() and not reply[0].text.endswith(PLACEHOLDER)

        key = ThreadKey("slack", "C1:100.000001")
        stored = await service.thread_messages(key)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert stored[0].text == "hello there"  # the mention is stripped
        # users.info is asked in the background: the first message is kept under the id at once
        assert stored[0].author == USER and fake.calls_to("users.info")
        assert stored[0].platform_message_id == "100.000001"

        # a later message in that thread, without a mention, continues from the saved state
        await slack.deliver.event(event_body(message("100.000005", "and what next?", thread_ts="100.000001")))
        await slack.settle()
        assert len(slack.replies("C1", "100.000001")) == 2
        assert (await service.thread_messages(key))[2].author == "Alice"  # the name, now known
        turn = service.last_turn(key)
        assert turn is not None
        assert turn.resumed_from in ("memory", "store")
        assert turn.prompt_tokens < 60

        # not a mention and not in a thread the bot knows: silence
        await slack.deliver.event(event_body(message("100.000007", "chatter")))
        await slack.deliver.event(event_body(message("100.000009", "other thread", thread_ts="100.000008")))
        await slack.settle()
        assert len(fake.calls_to("chat.postMessage")) == 2
        assert not await service.knows_thread(ThreadKey("slack", "C1:100.000008"))
    assert "xoxb-test" not in caplog.text and SECRET not in caplog.text


# --- /advisor ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["http", "socket"])
async def test_advisor_command_acks_fast_then_answers_in_a_new_thread(
        mode: str, service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    async with running(mode, service, settings_factory, fake) as slack:
        seconds, payload = await slack.deliver.command(command("sql why?", fake))
        assert seconds < 3.0
        assert not payload.get("text")  # a plain ack; the answer comes in the channel
        await slack.settle()

        root_post, *thread_posts = fake.calls_to("chat.postMessage")
        assert root_post.args["channel"] == "C1"
        assert not root_post.args.get("thread_ts")
        assert "SQL advisor" in root_post.args["text"] and "why?" in root_post.args["text"]
        root = next(m for m in fake.messages.values() if m.thread_ts is None)
        assert thread_posts and all(p.args["thread_ts"] == root.ts for p in thread_posts)

        key = ThreadKey("slack", f"C1:{root.ts}")
        info = await service.thread(key)
        assert info is not None and info.persona == "sql"
        stored = await service.thread_messages(key)
        assert stored[0].text == "/advisor sql why?"
        assert any(m.role == "user" and m.text == "why?" for m in stored)
        assert stored[-1].role == "assistant"

        # without a name: the persona list, to the user only; an unknown name: the same, with a notice
        _, listing = await slack.deliver.command(command("", fake))
        _, unknown = await slack.deliver.command(command("nosuch tell me", fake))
        await slack.settle()
        for answer in (listing, unknown):
            assert answer.get("response_type", "ephemeral") == "ephemeral"
            assert all(f"`{name}`" in answer["text"] for name in ("sql", "project", "default"))
        assert "nosuch" in unknown["text"]
        assert len(fake.calls_to("chat.postMessage")) == 1 + len(thread_posts)


# --- exactly once -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["http", "socket"])
async def test_retries_and_double_delivery_give_one_reply(
        mode: str, service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    async with running(mode, service, settings_factory, fake) as slack:
        body = event_body(mention("300.000001", "only once please"), event_id="EvOnce")
        twin = event_body(message("300.000001", f"<@{BOT}> only once please"), event_id="EvTwin")
        await slack.deliver.event(body)
        await slack.deliver.event(twin)
        for retry in (1, 2, 3):
            await slack.deliver.event(body, retry=retry)
        await slack.settle()
        assert len(slack.replies("C1", "300.000001")) == 1
        users = [m for m in await service.thread_messages(ThreadKey("slack", "C1:300.000001"))
                 if m.role == "user"]
        assert len(users) == 1

        # a retry whose first delivery never arrived (or was never processed) is answered
        await slack.deliver.event(event_body(mention("300.000009", "lost first"), event_id="EvLost"), retry=1)
        await slack.settle()
        assert len(slack.replies("C1", "300.000009")) == 1


class Untouchable:
    """Stands in for the core where no event may reach it (the adapter's own start-up look for
    repairs finds nothing to do)."""

    repair_interval_s = 3600.0

    async def repairs(self, platform: str) -> list[Any]:
        return []

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the core was reached ({name})")


async def test_bad_signature_is_rejected_before_anything_happens(settings_factory: SettingsFactory,
                                                                 fake: FakeSlack) -> None:
    async with running("http", Untouchable(), settings_factory, fake) as slack:
        assert isinstance(slack.deliver, HttpDelivery)
        calls_before = len(fake.calls)
        raw = json.dumps(event_body(mention("400.000001")))
        forged = signed_headers("wrong-secret", raw, extra={"Content-Type": "application/json"})
        stale = signed_headers(SECRET, raw, timestamp=int(time.time()) - 600,
                               extra={"Content-Type": "application/json"})
        unsigned = {"Content-Type": "application/json"}
        for headers in (forged, stale, unsigned):
            assert (await slack.deliver.post(raw, headers))[0] == 401
        await slack.settle()
        assert len(fake.calls) == calls_before


# --- streaming ---------------------------------------------------------------------------------------------
async def test_updates_are_throttled_and_a_rate_limit_is_survived(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    fake.fail("chat.update", "ratelimited", status=429, headers={"Retry-After": "1"})  # the first update
    words = [f"word{i} " for i in range(30)]
    scripted = ScriptedService(service, words, delay_s=0.1)  # about 3 s of streaming
    async with running("socket", scripted, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention("500.000001", "stream please")))
        await slack.settle()
    [reply] = fake.thread("C1", "500.000001")
    assert len(reply.writes) >= 3
    gaps = [b - a for a, b in itertools.pairwise(reply.writes)]
    assert min(gaps) >= 1.2 - 0.01, gaps
    updates = fake.calls_to("chat.update")
    assert updates[1].at - updates[0].at >= 1.0  # the 429 was retried after Retry-After
    assert reply.text.strip() == "".join(words).strip()
    assert scripted.events[0].text == "stream please"


async def test_a_long_reply_continues_in_new_messages(service: ChatService, settings_factory: SettingsFactory,
                                                      fake: FakeSlack) -> None:
    paragraph = "A **bold** line with `code` & more text to fill the message up.\n"
    body = paragraph * 12 + "```sql\n" + "SELECT a, b FROM t WHERE a < 10;\n" * 30 + "```\n" + paragraph * 5
    chunks = [body[i:i + 40] for i in range(0, len(body), 40)]
    async with running("socket", ScriptedService(service, chunks), settings_factory, fake,
                       max_message_chars=500) as slack:
        await slack.deliver.event(event_body(mention("600.000001", "long please")))
        await slack.settle()
    messages = fake.thread("C1", "600.000001")
    assert len(messages) >= 4
    for m in messages:
        assert len(m.text) <= 500
        assert m.text.count("```") % 2 == 0, m.text
        assert not m.text.endswith(PLACEHOLDER)
    shown = "\n".join(m.text for m in messages)
    assert shown.count("SELECT a, b FROM t WHERE a &lt; 10;") == 30
    assert shown.count("A *bold* line with `code` &amp; more") == 17


async def test_msg_too_long_continues_in_a_new_message(service: ChatService,
                                                       settings_factory: SettingsFactory,
                                                       fake: FakeSlack) -> None:
    fake.max_text_chars = 300  # Slack refuses longer texts than the adapter was told
    line = "plain words without any markup at all, line number {:02d}"
    body = "\n".join(line.format(i) for i in range(16))  # ~930 characters, one renderer piece
    chunks = [body[i:i + 120] for i in range(0, len(body), 120)]
    async with running("socket", ScriptedService(service, chunks, delay_s=0.3), settings_factory, fake,
                       max_message_chars=3000) as slack:
        await slack.deliver.event(event_body(mention("700.000001", "long please")))
        await slack.settle()
    messages = fake.thread("C1", "700.000001")
    assert len(messages) >= 4
    assert all(len(m.text) <= 300 for m in messages)
    assert "\n".join(m.text for m in messages) == body
    later = [m for m in messages if len(m.writes) > 1]
    assert all(b - a >= 1.2 - 0.01 for m in later for a, b in itertools.pairwise(m.writes))


# --- access, errors, what is ignored --------------------------------------------------------------------------
async def test_allow_list_dms_commands_after_a_mention_and_ignored_messages(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    async with running("socket", service, settings_factory, fake,
                       allowed_channels=["C1", "D1"]) as slack:
        # outside the allow-list: silence, and an ephemeral word for a slash command
        await slack.deliver.event(event_body(mention("900.000001", "anyone?", channel="C2")))
        _, answer = await slack.deliver.command(command("sql hi", fake, channel="C2"))
        assert "not enabled" in answer["text"]

        # a direct message is answered in the conversation itself
        await slack.deliver.event(event_body(message("900.000003", "hi in private", channel="D1",
                                                     channel_type="im")))
        await slack.settle()
        assert [c.args["channel"] for c in fake.calls_to("chat.postMessage")] == ["D1"]
        assert not fake.calls_to("chat.postMessage")[0].args.get("thread_ts")
        assert await service.knows_thread(ThreadKey("slack", "D1:dm"))
        assert not await service.knows_thread(ThreadKey("slack", "C2:900.000001"))

        # commands after a mention: "advisor <name>", "reset"
        thread = "900.000005"
        key = ThreadKey("slack", f"C1:{thread}")
        await slack.deliver.event(event_body(mention(thread, "advisor project plan my week")))
        await slack.settle()
        info = await service.thread(key)
        assert info is not None and info.persona == "project"
        await slack.deliver.event(event_body(mention("900.000006", "reset", thread_ts=thread)))
        await slack.settle()
        texts = [m.text for m in await service.thread_messages(key) if m.role == "user"]
        assert texts[0] == "/advisor project plan my week" and texts[-1] == "/reset"
        assert "Started over" in slack.replies("C1", thread)[-1].text

        # in a thread the bot knows: bots, itself and edits/deletions are ignored
        posted = len(fake.calls_to("chat.postMessage"))
        ignored = [
            message("900.000016", "bot talk", thread_ts=thread, user="U9", bot_id="B9"),
            message("900.000017", "my own words", thread_ts=thread, user=BOT),
            message("900.000018", "", thread_ts=thread, subtype="message_changed",
                    message={"text": "edited", "user": USER}),
            message("900.000019", "", thread_ts=thread, subtype="message_deleted"),
            message("900.000020", "joined", thread_ts=thread, subtype="channel_join"),
        ]
        for event in ignored:
            await slack.deliver.event(event_body(event))
        await slack.settle()
        assert len(fake.calls_to("chat.postMessage")) == posted
        assert len(fake.calls_to("users.info")) == 1  # names are cached


async def test_api_errors_are_logged_and_the_bot_keeps_running(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack,
        caplog: pytest.LogCaptureFixture) -> None:
    fake.outside_channels.add("C9")
    async with running("http", service, settings_factory, fake, retry_budget_s=2) as slack:
        await slack.deliver.event(event_body(mention("950.000001", "are you there?", channel="C9")))
        await slack.settle()
        assert re.search(r"not_in_channel", caplog.text)
        stored = await service.thread_messages(ThreadKey("slack", "C9:950.000001"))
        assert stored and stored[0].text == "are you there?"  # the user's message stays in the log

        fake.fail("chat.postMessage", "internal_error", status=500, times=1000)  # outlasts the retry budget
        await slack.deliver.event(event_body(mention("950.000003", "and now?")))
        await slack.settle()
        fake.heal()
        assert fake.thread("C1", "950.000003") == []  # the reply could not be posted ...
        notice = fake.ephemerals[-1]  # ... and the user is told, privately, as a notice
        assert (notice.channel, notice.thread_ts) == ("C1", "950.000003") and ERROR_NOTICE in notice.text
        assert notice.blocks[0]["type"] == "context"

        await slack.deliver.event(event_body(mention("950.000005", "still alive?")))
        await slack.settle()
        assert len(fake.thread("C1", "950.000005")) == 1


async def test_run_serves_http_until_cancelled(settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    port = free_port()
    adapter = SlackAdapter(Untouchable(), settings_factory(slack={  # type: ignore[arg-type]
        "bot_token": "xoxb-test", "signing_secret": SECRET, "api_url": fake.base_url,
        "http_host": "127.0.0.1", "http_port": port, "http_path": "/hooks/slack"}).slack)
    task = asyncio.create_task(adapter.run())
    deliver = HttpDelivery(port, "/hooks/slack")
    raw = json.dumps({"token": "legacy", "challenge": "abc123", "type": "url_verification"})
    for _ in range(500):
        if adapter.http_port is not None:
            break
        await asyncio.sleep(0.02)
    headers = signed_headers(SECRET, raw, extra={"Content-Type": "application/json"})
    status, text = await deliver.post(raw, headers)
    assert (status, json.loads(text)) == (200, {"challenge": "abc123"})  # Slack's Request URL check
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adapter.http_port is None
    with pytest.raises(aiohttp.ClientConnectionError):
        await deliver.post(raw, {})


# --- configuration ---------------------------------------------------------------------------------------------
async def test_configuration_errors_fail_at_start(settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN"):
        SlackAdapter(object(), settings_factory().slack)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"SLACK_APP_TOKEN.*SLACK_SIGNING_SECRET"):
        SlackAdapter(object(), settings_factory(slack={"bot_token": "xoxb-test"}).slack)  # type: ignore[arg-type]
    fake.fail("auth.test", "invalid_auth")
    adapter = SlackAdapter(object(), settings_factory(slack={  # type: ignore[arg-type]
        "bot_token": "xoxb-test", "app_token": "xapp-test", "api_url": fake.base_url}).slack)
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN was refused"):
        await adapter.start()
    fake.fail("apps.connections.open", "invalid_auth")
    with pytest.raises(ConfigError, match="SLACK_APP_TOKEN was refused"):
        await adapter.start()
    await adapter.stop()
    assert [c.token for c in fake.calls_to("apps.connections.open")] == ["xapp-test"]


# --- the one command mapper, /help, notices ----------------------------------------------------------
@pytest.mark.parametrize("phrase", ["help me with this join", "reset the counter please"])
async def test_a_command_word_followed_by_free_text_is_an_ordinary_message(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack, phrase: str) -> None:
    async with running("http", service, settings_factory, fake) as slack:
        thread = "960.000001"
        key = ThreadKey("slack", f"C1:{thread}")
        await slack.deliver.event(event_body(mention(thread, "advisor sql")))
        await slack.settle()
        before = await service.thread(key)
        await slack.deliver.event(event_body(mention("960.000002", phrase, thread_ts=thread)))
        await slack.settle()
        after = await service.thread(key)
        stored = await service.thread_messages(key)
    assert before is not None and after is not None and after.epoch == before.epoch  # not a reset
    assert [m.text for m in stored if m.role == "user"][-1] == phrase and stored[-1].role == "assistant"
    assert not any("Commands:" in m.text for m in slack.replies("C1", thread))


@pytest.mark.parametrize("mode", ["http", "socket"])
async def test_help_is_a_slash_command_answered_privately(
        mode: str, service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    async with running(mode, service, settings_factory, fake) as slack:
        took, answer = await slack.deliver.command(command("", fake, name="/help"))
    assert took < 3.0 and answer.get("response_type") == "ephemeral"
    assert "/advisor" in answer["text"] and "/reset" in answer["text"]
    assert fake.calls_to("chat.postMessage") == []


async def test_busy_is_an_ephemeral_notice_and_the_message_is_kept(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service.engine, "max_queue", 0)  # every new reply finds the queue full
    async with running("http", service, settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention("970.000001", "are you there?")))
        await slack.settle()
    assert fake.thread("C1", "970.000001") == []  # nothing that looks like an answer
    [notice] = fake.ephemerals
    assert notice.user == USER and notice.thread_ts == "970.000001" and "busy" in notice.text
    assert notice.blocks[0]["type"] == "context"
    stored = await service.thread_messages(ThreadKey("slack", "C1:970.000001"))
    assert [(m.role, m.status) for m in stored] == [("user", "failed")]


async def test_a_follow_up_right_after_the_mention_is_answered_while_users_info_is_rate_limited(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    fake.fail("users.info", "ratelimited", status=429, headers={"Retry-After": "2"}, times=5)
    async with running("http", service, settings_factory, fake) as slack:
        thread = "980.000001"
        mention_sent = asyncio.create_task(slack.deliver.event(event_body(mention(thread, "first question"))))
        await asyncio.sleep(0.05)
        await slack.deliver.event(event_body(message("980.000002", "and a follow-up", thread_ts=thread)))
        await mention_sent
        await slack.settle()
        stored = await service.thread_messages(ThreadKey("slack", f"C1:{thread}"))
    assert [m.text for m in stored if m.role == "user"] == ["first question", "and a follow-up"]
    assert [m.role for m in stored].count("assistant") == 2
    assert {m.author for m in stored if m.role == "user"} == {USER}  # the id, until the name is known


async def test_a_connection_error_in_users_info_loses_nothing(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    fake.drop("users.info", times=10)  # outlasts the connection-error retries (a 2 s budget here)
    async with running("http", service, settings_factory, fake, retry_budget_s=2) as slack:
        await slack.deliver.event(event_body(mention("981.000001", "are you there?")))
        await slack.settle()
        stored = await service.thread_messages(ThreadKey("slack", "C1:981.000001"))
    assert [(m.role, m.text) for m in stored][:1] == [("user", "are you there?")]
    assert stored[-1].role == "assistant" and len(fake.thread("C1", "981.000001")) >= 1
    assert fake.calls_to("users.info")  # it was tried, and failed


# --- one retry policy; no unseen context -----------------------------------------------------------------
async def test_429_429_then_500_on_one_update_is_retried_and_the_reply_completes(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    fake.fail("chat.update", "ratelimited", status=429, headers={"Retry-After": "1"}, times=2)
    fake.fail("chat.update", "internal_error", status=500)
    words = [f"word{i} " for i in range(30)]
    async with running("socket", ScriptedService(service, words, delay_s=0.1), settings_factory, fake) as slack:
        await slack.deliver.event(event_body(mention("510.000001", "stream please")))
        await slack.settle()
    [reply] = fake.thread("C1", "510.000001")
    assert reply.text.strip() == "".join(words).strip()  # every word reached the user
    statuses = [c for c in fake.calls_to("chat.update")]
    assert len(statuses) >= 4  # 429, 429, 500, then the update that went through (and any later ones)
    assert fake.ephemerals == []  # no failure notice


async def test_every_slack_call_and_retried_attempt_is_reported_for_metrics(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    from adapters.retry import PlatformCall, call_observers

    seen: list[PlatformCall] = []
    call_observers.append(seen.append)
    try:
        fake.fail("chat.update", "ratelimited", status=429, headers={"Retry-After": "1"}, times=1)
        words = [f"word{i} " for i in range(20)]
        async with running("socket", ScriptedService(service, words, delay_s=0.1), settings_factory, fake) as slack:
            await slack.deliver.event(event_body(mention("511.000001", "stream please")))
            await slack.settle()
    finally:
        call_observers.remove(seen.append)
    calls = [(c.platform, c.what, c.result) for c in seen]
    assert ("slack", "chat.update", "429") in calls  # the attempt that was retried
    assert calls.count(("slack", "chat.postMessage", "ok")) == len(fake.calls_to("chat.postMessage"))
    assert calls.count(("slack", "chat.update", "ok")) == len(fake.calls_to("chat.update")) - 1


async def test_persistent_500s_end_with_a_notice_and_the_reply_leaves_the_context(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    key = ThreadKey("slack", "C1:520.000001")
    async with running("http", service, settings_factory, fake, retry_budget_s=3) as slack:
        await slack.deliver.event(event_body(mention("520.000001", "first question")))
        await slack.settle()
        saved = await service.store.load_state(key)
        assert saved is not None
        before = await service.engine.decode_state(saved.blob)
        first_reply_id = saved.last_message_id

        fake.fail("chat.postMessage", "internal_error", status=500, times=1000)  # Slack is down for good
        await slack.deliver.event(event_body(mention("520.000002", "second question", thread_ts="520.000001")))
        await slack.settle()
        fake.heal()  # Slack is back

        # The user was told, privately; the log says the reply was not delivered ...
        assert any("went wrong" in e.text and e.thread_ts == "520.000001" for e in fake.ephemerals)
        log = await service.thread_messages(key)
        assert [(m.role, m.status) for m in log[-2:]] == [("user", "failed"), ("assistant", "undelivered")]
        # ... and the thread's state is the one from before it: the next turn does not read it.
        rolled = await service.store.load_state(key)
        assert rolled is not None and rolled.last_message_id == first_reply_id
        restored = await service.engine.decode_state(rolled.blob)
        assert all(torch.equal(a, b) for a, b in zip(restored.state, before.state, strict=True))

        await slack.deliver.event(event_body(mention("520.000003", "third question", thread_ts="520.000001")))
        await slack.settle()
        turn = service.last_turn(key)
        assert turn is not None and turn.resumed_from == "memory"
    assert len(fake.thread("C1", "520.000001")) == 2  # the first and the third replies


async def test_a_reply_cut_off_inside_a_code_block_leaves_every_message_balanced(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    from bot.core.outcomes import CutOff

    body = "Here is the query:\n```sql\n" + "SELECT a, b FROM t WHERE a < 10;\n" * 40  # never closed
    chunks = [body[i:i + 40] for i in range(0, len(body), 40)]
    cut = CutOff(body, 0, "length", 400)
    async with running("socket", ScriptedService(service, chunks, outcome=cut), settings_factory, fake,
                       max_message_chars=500) as slack:
        await slack.deliver.event(event_body(mention("990.000001", "write it all")))
        await slack.settle()
    messages = fake.thread("C1", "990.000001")
    assert len(messages) >= 2
    for message in messages:
        assert message.text.count("```") % 2 == 0, message.text[-200:]
    assert messages[-1].text.endswith("_(reply cut off at the 400-token limit)_")


async def test_a_user_over_the_rate_limit_gets_a_private_notice_and_the_message_is_kept(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    from bot.app.assembly import open_service

    async with open_service(settings_factory(rate_messages_per_minute=1, max_reply_tokens=8)) as service:
        async with running("http", service, settings_factory, fake) as slack:
            await slack.deliver.event(event_body(mention("980.000001", "first")))
            await slack.settle()
            await slack.deliver.event(event_body(message("980.000002", "second", thread_ts="980.000001")))
            await slack.settle()
        stored = await service.thread_messages(ThreadKey("slack", "C1:980.000001"))
    assert [(m.role, m.status) for m in stored] == [("user", "answered"), ("assistant", "done"), ("user", "refused")]
    [notice] = [e for e in fake.ephemerals if "limit" in e.text]
    assert notice.user == USER and notice.thread_ts == "980.000001"
    assert "1 messages in the last minute (the limit is 1)" in notice.text and "Please wait" in notice.text
    assert len([m for m in fake.thread("C1", "980.000001") if m.user is None]) == 1  # one answer only


async def test_a_channel_limit_counts_every_member_and_workspace_admins_are_exempt(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    """RAVEN_RATE_CHANNEL_MESSAGES_PER_MINUTE through signed HTTP requests: Alice's two messages fill
    C1's minute, so Bob is refused there (kept, told privately) while C2 answers him; with
    SLACK_ADMINS_EXEMPT, a workspace admin (users.info's is_admin) is answered in the full C1."""
    from bot.app.assembly import open_service

    fake.users["U3"] = "Carol"
    fake.admins.add("U3")
    async with open_service(settings_factory(rate_channel_messages_per_minute=2, max_reply_tokens=4)) as service:
        async with running("http", service, settings_factory, fake, admins_exempt=True) as slack:
            await slack.deliver.event(event_body(mention("990.000001", "first")))
            await slack.settle()
            await slack.deliver.event(event_body(message("990.000002", "second", thread_ts="990.000001")))
            await slack.settle()
            await slack.deliver.event(event_body(mention("990.000003", "bob here", user="U2")))
            await slack.settle()
            await slack.deliver.event(event_body(mention("990.000004", "carol here", user="U3")))
            await slack.settle()
            await slack.deliver.event(event_body(mention("990.000005", "bob elsewhere", channel="C2", user="U2")))
            await slack.settle()
            await slack.deliver.event(event_body(message("990.000006", "in private", channel="D9", user="U2",
                                                         channel_type="im")))
            await slack.settle()
            await slack.deliver.event(event_body(message("990.000007", "again", channel="D9", user="U2",
                                                         channel_type="im")))
            await slack.settle()
        bob = await service.thread_messages(ThreadKey("slack", "C1:990.000003"))
        carol = await service.thread_messages(ThreadKey("slack", "C1:990.000004"))
        elsewhere = await service.thread_messages(ThreadKey("slack", "C2:990.000005"))
        with sqlite3.connect(service.settings.database_path) as db:
            direct = db.execute("SELECT status, channel_ref FROM messages WHERE text IN ('in private', 'again')"
                                " ORDER BY id").fetchall()
    assert [(m.role, m.status) for m in bob] == [("user", "refused")]
    [notice] = [e for e in fake.ephemerals if "limit" in e.text]
    assert notice.user == "U2" and "This channel has had 2 messages in the last minute (the limit is 2)" in notice.text
    assert [(m.role, m.author) for m in carol] == [("user", "Carol"), ("assistant", "raven")]  # exempt, named
    assert direct == [("answered", None), ("answered", None)]  # a DM is no channel: two in a row are fine
    assert [m.role for m in elsewhere] == ["user", "assistant"]  # C2 has its own count
    assert [c.args["user"] for c in fake.calls_to("users.info")].count("U3") == 1  # looked up once


async def test_summary_of_the_channel_is_for_the_user_alone(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    from bot.app.assembly import open_service

    fake.say("C1", "990.000001", USER, "the nightly deploy failed")
    fake.say("C1", "990.000002", USER, "the migration locked the orders table")
    async with open_service(settings_factory(max_reply_tokens=8)) as service:
        async with running("http", service, settings_factory, fake) as slack:
            took, ack = await slack.deliver.command(command("", fake, name="/summary"))
            await slack.settle()
            await fake.wait_for(lambda: bool(fake.responses), within=30)
            # had the process died mid-summary, no repair would post in the channel: the answer was
            # the user's alone (and the key "C1:channel" is no Slack thread)
            with sqlite3.connect(service.settings.database_path) as db:
                db.execute("UPDATE turns SET phase = 'interrupted'")
            assert await slack.adapter.repair() == 0
        log = await service.thread_messages(ThreadKey("slack", "C1:channel"))
    assert took < 3.0 and ack["response_type"] == "ephemeral" and "Summarizing" in ack["text"]
    [answer] = fake.responses
    assert answer["response_type"] == "ephemeral" and answer["text"].strip()
    assert [(m.role, m.status) for m in log] == [("user", "done"), ("assistant", "aside")]  # the channel: not kept
    assert fake.calls_to("conversations.history")
    assert fake.thread("C1", "990.000001") == [] and fake.calls_to("chat.postMessage") == []  # nothing public


async def test_a_post_whose_ts_a_crash_kept_from_the_log_is_found_by_its_text_and_repaired(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    """Killed between chat.postMessage and its delivery record: the log knows only that a message
    showing "posted …" was about to be posted. The repair finds it among the app's own messages in the
    thread (conversations.replies) and takes the mark off, then tells the thread; a post that never
    happened (nothing shows its text) is made afresh, once, for a reply stored in full."""
    import time

    from adapters.streaming import MARK
    from bot.app.assembly import open_service
    from bot.storage import SQLiteStore
    from tests.fakes.slack_server import Message

    fake.say("C1", "995.000001", USER, "question three")
    fake.say("C1", "996.000001", USER, "question four")
    now = time.monotonic()
    fake.messages[("C1", "995.000002")] = Message("C1", "995.000002", "posted" + MARK, "995.000001", now, [now])
    settings = settings_factory()
    async with SQLiteStore(settings.database_path, clock=lambda: time.time() - 3600) as dead:
        await dead.register_instance("dead")
        lost = await dead.accept(ThreadKey("slack", "C1:995.000001"), "default", "question three", owner="dead")
        await dead.record_delivery(lost.turn_id, 0, "", "posted" + MARK)  # type: ignore[arg-type]
        key = ThreadKey("slack", "C1:996.000001")
        ghost = await dead.accept(key, "default", "question four", owner="dead")
        await dead.finish_turn(key, ghost.message.id, "All of the ghost reply.", None, turn_id=ghost.turn_id)
        await dead.record_delivery(ghost.turn_id, 0, "", "All of the gh" + MARK)  # type: ignore[arg-type]
    async with open_service(settings) as service:
        async with running("http", service, settings_factory, fake):
            await fake.wait_for(lambda: [m.text for m in fake.thread("C1", "996.000001")] == ["All of the ghost reply."]
                                and len(fake.thread("C1", "995.000001")) == 2)
            for _ in range(200):  # each turn is marked repaired just after its last call
                if not await service.repairs("slack"):
                    break
                await asyncio.sleep(0.05)
            assert await service.repairs("slack") == []
    found = fake.thread("C1", "995.000001")
    assert found[0].ts == "995.000002" and found[0].text == "posted"  # the same message, mark removed
    assert "restarted while answering" in found[1].text
    assert fake.calls_to("conversations.replies")


async def test_two_messages_at_once_from_someone_new_make_one_users_info_call(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    """With limits set and SLACK_ADMINS_EXEMPT, each message waits (briefly) for its sender's users.info.
    Two at once from someone Raven has not seen share the one call under way (it is rate-limited):
    both learn from it that she is an admin, and both are answered under her name."""
    from bot.app.assembly import open_service

    fake.users["U3"] = "Carol"
    fake.admins.add("U3")
    gate = fake.hold("users.info")
    async with open_service(settings_factory(rate_messages_per_minute=1, max_reply_tokens=4)) as service:
        async with running("http", service, settings_factory, fake, admins_exempt=True) as slack:
            await slack.deliver.event(event_body(mention("985.000001", "first", user="U3")))
            await slack.deliver.event(event_body(mention("985.000002", "second", user="U3")))
            await fake.wait_for(lambda: len(fake.calls_to("users.info")) >= 1)
            await asyncio.sleep(0.3)  # the second message has reached its lookup by now
            gate.set()
            await slack.settle()
        threads = [await service.thread_messages(ThreadKey("slack", f"C1:985.00000{i}")) for i in (1, 2)]
    assert [c.args["user"] for c in fake.calls_to("users.info")] == ["U3"]
    assert [[(m.role, m.author) for m in thread] for thread in threads] == \
        [[("user", "Carol"), ("assistant", "raven")]] * 2  # both exempt from the limit of 1, both named


async def test_a_repair_puts_off_finding_its_posts_until_it_knows_which_messages_are_its_own(
        settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    """auth.test failed at start (and again at the first repair round): the app cannot tell its own
    messages from anyone's, so a post whose ts a crash kept from the log would look never made and be
    posted a second time. The repair is put off instead, and the next round (auth.test answered)
    edits the message that was posted."""
    import time

    from adapters.streaming import MARK
    from bot.app.assembly import open_service
    from bot.storage import SQLiteStore
    from tests.fakes.slack_server import Message

    fake.say("C1", "998.000001", USER, "question five")
    now = time.monotonic()
    fake.messages[("C1", "998.000002")] = Message("C1", "998.000002", "All of the gh" + MARK, "998.000001", now, [now])
    settings = settings_factory()
    key = ThreadKey("slack", "C1:998.000001")
    async with SQLiteStore(settings.database_path, clock=lambda: time.time() - 3600) as dead:
        await dead.register_instance("dead")
        ghost = await dead.accept(key, "default", "question five", owner="dead")
        await dead.finish_turn(key, ghost.message.id, "All of the ghost reply.", None, turn_id=ghost.turn_id)
        await dead.record_delivery(ghost.turn_id, 0, "", "All of the gh" + MARK)  # type: ignore[arg-type]
    fake.fail("auth.test", "internal_error", times=2)
    async with open_service(settings) as service:
        async with running("http", service, settings_factory, fake) as slack:
            await fake.wait_for(lambda: len(fake.calls_to("auth.test")) >= 2 or bool(fake.calls_to("chat.postMessage")))
            await asyncio.sleep(0.3)  # what the first round would post or edit, it has by now
            assert [(m.ts, m.text) for m in fake.thread("C1", "998.000001")] == [("998.000002", "All of the gh" + MARK)]
            assert len(await service.repairs("slack")) == 1  # put off, not given up
            assert await slack.adapter.repair() == 1
    assert [(m.ts, m.text) for m in fake.thread("C1", "998.000001")] == [("998.000002", "All of the ghost reply.")]
    assert fake.calls_to("chat.postMessage") == []


async def test_with_no_limits_set_no_message_waits_to_learn_whether_its_sender_is_an_admin(
        service: ChatService, settings_factory: SettingsFactory, fake: FakeSlack) -> None:
    """SLACK_ADMINS_EXEMPT without any RAVEN_RATE_* limit: nothing to be exempt from, so the message is
    answered at once and stored under the sender's id, the name being looked up in the background
    (waiting for users.info would have stored "Alice")."""
    async with running("http", service, settings_factory, fake, admins_exempt=True) as slack:
        await slack.deliver.event(event_body(mention("997.000001", "hello")))
        await slack.settle()
    stored = await service.thread_messages(ThreadKey("slack", "C1:997.000001"))
    assert [(m.role, m.author) for m in stored] == [("user", USER), ("assistant", "raven")]
