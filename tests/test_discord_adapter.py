"""The Discord adapter: the real discord.py client against a fake Discord (REST + gateway) on
127.0.0.1, and the real chat service with the tiny random-weight model. The last part covers what a
thread's state makes cheap: the buttons on a reply (Stop, Retry, Continue) and the slash commands
behind them, /fork into a new Discord thread, /forget with its confirmation, adopting a thread Raven
is called into, and text attachments.

Replies are noise, so the tests assert on structure: which REST calls the bot made, where the
messages went, how many there are, how often they were edited, and what the core stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest

from adapters.discord_bot import DiscordAdapter, thread_name
from bot.app.assembly import open_service
from bot.core.service import FORGET_ASK, FORGET_DONE, ChatService
from bot.core.turn import Turn
from bot.errors import ConfigError
from bot.events import Event, ThreadKey
from tests.fakes.discord_server import MESSAGE_CONTENT_INTENT, FakeDiscord
from tests.fakes.scripted import scripted_turn

PLACEHOLDER_TAIL = " …"  # the streaming renderer's "still writing" mark
StartBot = Callable[..., Awaitable[DiscordAdapter]]


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    server.install(monkeypatch)
    yield server
    await server.close()


@pytest.fixture
async def start_bot(fake: FakeDiscord, service: ChatService,
                    settings_factory: Callable[..., Any]) -> AsyncIterator[StartBot]:
    """Start the adapter (optionally on another service and with DiscordSettings overrides) until ready."""
    tasks: list[asyncio.Task[None]] = []

    async def start(chat: Any = None, **overrides: Any) -> DiscordAdapter:
        settings = settings_factory(discord={"token": "fake-token", **overrides})
        adapter = DiscordAdapter(chat or service, settings.discord, guild_ready_timeout=0.05)
        task = asyncio.create_task(adapter.run())
        tasks.append(task)
        await fake.wait_for(lambda: adapter.client.is_ready() or task.done(), within=10)
        if task.done():
            task.result()
        return adapter

    yield start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await service.drain()


class ScriptedService:
    """The real service, except that ``reply`` streams a given text in small timed chunks."""

    def __init__(self, inner: ChatService, text: str, chunk: int = 20, delay_s: float = 0.01,
                 outcome: Any = None) -> None:
        self.inner = inner
        self.text = text
        self.chunk = chunk
        self.delay_s = delay_s
        self.outcome = outcome
        self.events: list[Event] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def reply(self, event: Event, *, confirm: bool = False, history: Any = None) -> Turn:
        self.events.append(event)
        pieces = [self.text[start:start + self.chunk] for start in range(0, len(self.text), self.chunk)]
        return scripted_turn(pieces, self.delay_s, outcome=self.outcome)


# --- helpers -------------------------------------------------------------------------------------

def key(channel_id: str) -> ThreadKey:
    return ThreadKey("discord", channel_id)


async def finished_reply(fake: FakeDiscord, channel_id: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait until the bot has at least ``count`` messages in the channel and the last is final."""
    def probe() -> list[dict[str, Any]] | None:
        messages = fake.bot_messages(channel_id)
        if len(messages) >= count and not messages[-1]["content"].endswith(PLACEHOLDER_TAIL):
            return messages
        return None
    return await fake.wait_for(probe)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def thread_of(fake: FakeDiscord, message: dict[str, Any]) -> str:
    """The id of the thread the bot opened on ``message``."""
    call = (await fake.wait_calls("POST", rf"/channels/\d+/messages/{message['id']}/threads"))[0]
    assert call.status == 201
    return str(message["id"])


def fences_balanced(text: str) -> bool:
    return sum(1 for line in text.split("\n") if line.strip().startswith("```")) % 2 == 0


# --- pure translation ------------------------------------------------------------------------------

def test_thread_names_fit_discord() -> None:
    assert thread_name("  why is\nthe sky   blue? ") == "why is the sky blue?"
    long = thread_name("word " * 60)
    assert len(long) <= 100 and long.endswith("…")
    assert thread_name("   ") == "Raven"


# --- messages ------------------------------------------------------------------------------------

async def test_mention_opens_thread_and_follow_up_needs_no_mention(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot()
    assert fake.intents is not None and fake.intents & MESSAGE_CONTENT_INTENT

    asked = await fake.user_message(fake.general_id, "why is the sky blue?", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    create = fake.calls_to("POST", rf"/channels/{fake.general_id}/messages/{asked['id']}/threads")[0]
    assert create.body["name"] == "why is the sky blue?"
    first = await finished_reply(fake, thread_id)
    assert first[0]["content"].strip()
    assert fake.bot_messages(fake.general_id) == []  # the answer went into the thread only
    typing = fake.calls_to("POST", rf"/channels/{thread_id}/typing")
    posts = fake.calls_to("POST", rf"/channels/{thread_id}/messages")
    assert typing and typing[0].at <= posts[0].at
    assert all(c.body["allowed_mentions"]["parse"] == [] for c in posts)  # the model never pings

    await fake.dispatch("MESSAGE_CREATE", asked)  # delivered again (as after a gateway resume)
    stored = await service.thread_messages(key(thread_id))
    assert [(m.role, m.text) for m in stored][:1] == [("user", "why is the sky blue?")]
    assert stored[0].platform_message_id == asked["id"]

    # a later message in the thread, without a mention, continues from the saved state
    await fake.user_message(thread_id, "and at sunset?")
    replies = await finished_reply(fake, thread_id, count=len(first) + 1)
    assert len(replies) > len(first)
    turn = service.last_turn(key(thread_id))
    assert turn is not None and turn.resumed_from in ("memory", "store")
    assert turn.prompt_tokens < 60
    users = [m.text for m in await service.thread_messages(key(thread_id)) if m.role == "user"]
    assert users == ["why is the sky blue?", "and at sunset?"]
    assert len(fake.threads_created()) == 1  # the repeated delivery was not answered again

    # a message in a channel without a mention is not for the bot: nothing is posted in the channel and
    # no thread is opened on it (the thread's last reply may still be settling its buttons meanwhile)
    before = len(fake.calls)
    chatting = await fake.user_message(fake.general_id, "just chatting")
    await asyncio.sleep(0.3)
    assert [c for c in fake.calls[before:] if c.method != "GET" and fake.general_id in c.path] == []
    assert len(fake.threads_created()) == 1 and chatting["id"] not in {t["id"] for t in fake.threads_created()}


async def test_other_threads_and_direct_messages(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    thread_id = fake.add_user_thread(fake.general_id)
    adapter = await start_bot()
    await fake.user_message(thread_id, "not for you")
    await asyncio.sleep(0.3)
    assert fake.bot_messages(thread_id) == []

    # a mention in someone else's thread: join it and answer there, then follow it
    await fake.user_message(thread_id, "what do you think?", mention_bot=True)
    await fake.wait_calls("PUT", rf"/channels/{thread_id}/thread-members/@me")
    first = await finished_reply(fake, thread_id)
    await fake.user_message(thread_id, "and now?")
    await finished_reply(fake, thread_id, count=len(first) + 1)
    assert fake.threads_created() == []  # answered in place
    assert await service.knows_thread(key(thread_id))

    # direct messages: answered in the DM, one conversation per DM channel
    await fake.user_message(fake.dm_channel_id, "hello in private")
    dm_replies = await finished_reply(fake, fake.dm_channel_id)
    assert fake.threads_created() == []
    assert await service.knows_thread(key(fake.dm_channel_id))

    adapter.settings = adapter.settings.model_copy(update={"answer_dms": False})
    await fake.user_message(fake.dm_channel_id, "still there?")
    await asyncio.sleep(0.3)
    assert len(fake.bot_messages(fake.dm_channel_id)) == len(dm_replies)


async def test_bots_and_outsiders_are_ignored(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot(allowed_channels=[fake.general_id], allowed_roles=[fake.member_role_id])
    await fake.user_message(fake.general_id, "ping", author=fake.other_bot, mention_bot=True)
    await fake.user_message(fake.other_id, "outside the allow-list", mention_bot=True)
    await fake.user_message(fake.general_id, "guest only", roles=[fake.guest_role_id], mention_bot=True)
    allowed = await fake.user_message(fake.general_id, "a member asks", mention_bot=True)
    thread_id = await thread_of(fake, allowed)
    first = await finished_reply(fake, thread_id)
    await asyncio.sleep(0.2)

    assert [t["id"] for t in fake.threads_created()] == [thread_id]
    assert fake.calls_to("POST", rf"/channels/{fake.other_id}/.*") == []
    assert [t.key for t in await service.list_threads("discord")] == [key(thread_id)]
    # the bot's own messages came back over the gateway and were not answered
    assert len(fake.bot_messages(thread_id)) == len(first)

    # a thread counts as its parent channel
    await fake.user_message(thread_id, "follow-up inside the allowed channel")
    await finished_reply(fake, thread_id, count=len(first) + 1)

    # slash commands outside the allow-list get a private "not here"
    interaction = await fake.slash_command("personas", channel_id=fake.other_id)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{interaction['token']}")
    assert fake.interaction_callbacks(interaction) == [{"type": 5, "data": {"flags": 64}}]
    original = fake.original_response(interaction)
    assert original is not None and "isn't enabled" in fake.shown(original)
    assert original["content"] == "" and len(original["embeds"]) == 1  # a notice, not an answer


# --- commands --------------------------------------------------------------------------------------

async def test_advisor_in_a_channel_starts_a_thread_with_that_persona(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot(command_guilds=[fake.guild_id])
    synced = fake.calls_to("PUT", rf"/applications/{fake.application_id}/guilds/{fake.guild_id}/commands")
    assert len(synced) == 1 and fake.calls_to("PUT", rf"/applications/{fake.application_id}/commands") == []
    commands = {c["name"]: c for c in synced[0].body}
    assert set(commands) == {"advisor", "reset", "retry", "continue", "stop", "fork", "summary", "forget", "personas",
                             "help"}
    persona_option = next(o for o in commands["advisor"]["options"] if o["name"] == "persona")
    assert persona_option["autocomplete"] is True and persona_option["required"] is True

    # autocomplete lists the personas, narrowed by what was typed
    everything = await fake.autocomplete("advisor", "persona", "")
    await fake.wait_calls("POST", rf"/interactions/{everything['id']}/.*/callback")
    answer = fake.interaction_callbacks(everything)[0]
    assert answer["type"] == 8
    assert [c["value"] for c in answer["data"]["choices"]] == [p.name for p in service.personas()]
    narrowed = await fake.autocomplete("advisor", "persona", "SQ")
    await fake.wait_calls("POST", rf"/interactions/{narrowed['id']}/.*/callback")
    assert fake.interaction_callbacks(narrowed)[0]["data"]["choices"] == [
        {"name": "SQL advisor (sql)", "value": "sql"}
    ]

    sent_at = time.monotonic()
    interaction = await fake.slash_command("advisor", {"persona": "sql", "question": "why is my join slow?"})
    callback = (await fake.wait_calls("POST", rf"/interactions/{interaction['id']}/.*/callback"))[0]
    assert callback.body == {"type": 5}  # deferred ("thinking"), public
    assert callback.at - sent_at < 3.0

    thread_call = (await fake.wait_calls("POST", rf"/channels/{fake.general_id}/messages/\d+/threads"))[0]
    thread_id = thread_call.path.split("/")[4]
    assert thread_call.body["name"] == "why is my join slow?"
    starter = fake.original_response(interaction)  # the follow-up filled the "thinking" message
    assert starter is not None and starter["id"] == thread_id
    assert "**SQL advisor**" in starter["content"] and "why is my join slow?" in starter["content"]

    replies = await finished_reply(fake, thread_id)
    assert replies[0]["content"].startswith("Now talking with **SQL advisor**")
    threads = {t.key: t for t in await service.list_threads("discord")}
    assert threads[key(thread_id)].persona == "sql"
    users = [m.text for m in await service.thread_messages(key(thread_id)) if m.role == "user"]
    assert users[-1] == "why is my join slow?"

    # /personas: a private list
    listing = await fake.slash_command("personas")
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{listing['token']}")
    assert fake.interaction_callbacks(listing) == [{"type": 5, "data": {"flags": 64}}]
    original = fake.original_response(listing)
    assert original is not None
    assert all(f"`{p.name}`" in original["content"] for p in service.personas())


async def test_text_commands_and_slash_commands_inside_a_thread(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot()
    asked = await fake.user_message(fake.general_id, "advisor sql", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    replies = await finished_reply(fake, thread_id)
    assert replies[0]["content"].startswith("Now talking with **SQL advisor**")
    info = await service.thread(key(thread_id))
    assert info is not None and info.persona == "sql"

    await fake.user_message(thread_id, "personas", mention_bot=True)
    replies = await finished_reply(fake, thread_id, count=len(replies) + 1)
    assert "`sql`" in replies[-1]["content"]

    # /advisor inside a bot thread switches that thread's persona, answering as follow-ups
    interaction = await fake.slash_command("advisor", {"persona": "default"}, channel_id=thread_id)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{interaction['token']}")
    assert fake.interaction_callbacks(interaction) == [{"type": 5}]
    original = fake.original_response(interaction)
    assert original is not None
    await fake.wait_for(lambda: not original["content"].endswith(PLACEHOLDER_TAIL))
    assert original["content"].startswith("Now talking with")
    info = await service.thread(key(thread_id))
    assert info is not None and info.persona == "default"
    assert len(fake.threads_created()) == 1  # no new thread

    reset = await fake.slash_command("reset", channel_id=thread_id)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{reset['token']}")
    reset_reply = fake.original_response(reset)
    assert reset_reply is not None
    await fake.wait_for(lambda: "Started over with" in reset_reply["content"])

    # /reset in a plain channel: a private hint, nothing sent to the core
    hint = await fake.slash_command("reset")
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{hint['token']}")
    assert fake.interaction_callbacks(hint) == [{"type": 5, "data": {"flags": 64}}]
    assert [t.key for t in await service.list_threads("discord")] == [key(thread_id)]


@pytest.mark.parametrize("phrase", ["help me with this join", "reset the counter please"])
async def test_a_command_word_followed_by_free_text_is_an_ordinary_message(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService, phrase: str
) -> None:
    await start_bot()
    asked = await fake.user_message(fake.general_id, "advisor sql", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    first = await finished_reply(fake, thread_id)
    before = await service.thread(key(thread_id))
    await fake.user_message(thread_id, phrase, mention_bot=True)
    await finished_reply(fake, thread_id, count=len(first) + 1)
    after = await service.thread(key(thread_id))
    stored = await service.thread_messages(key(thread_id))
    assert before is not None and after is not None and after.epoch == before.epoch  # no reset
    assert [m.text for m in stored if m.role == "user"][-1] == phrase
    assert stored[-1].role == "assistant"  # the model answered it
    assert not any("Commands:" in fake.shown(m) for m in fake.bot_messages(thread_id))


async def test_help_is_a_slash_command_answered_privately(fake: FakeDiscord, start_bot: StartBot) -> None:
    await start_bot()
    interaction = await fake.slash_command("help")
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{interaction['token']}")
    assert fake.interaction_callbacks(interaction) == [{"type": 5, "data": {"flags": 64}}]
    original = fake.original_response(interaction)
    assert original is not None and "/advisor" in original["content"] and "/reset" in original["content"]


async def test_busy_is_a_notice_embed_not_an_answer(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    await start_bot()
    monkeypatch.setattr(service.engine, "max_queue", 0)  # every new reply finds the queue full
    asked = await fake.user_message(fake.general_id, "are you there?", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    await fake.wait_for(lambda: bool(fake.bot_messages(thread_id)))
    [notice] = fake.bot_messages(thread_id)
    assert notice["content"] == "" and "busy" in fake.shown(notice) and notice["embeds"][0]["color"]
    stored = await service.thread_messages(key(thread_id))
    assert [(m.role, m.status) for m in stored] == [("user", "failed")]


# --- streaming -------------------------------------------------------------------------------------

def long_reply() -> str:
    prose = [f"Line {i}: the quick brown fox jumps over the lazy dog, again and again." for i in range(16)]
    code = [f"SELECT {i} AS n, 'padding padding padding padding' AS filler FROM t;" for i in range(40)]
    text = "\n".join([*prose, "```sql", *code, "```", *prose])
    assert 4500 < len(text) < 6000
    return text


async def test_long_reply_is_split_with_balanced_fences_and_throttled_edits(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    text = long_reply()
    scripted = ScriptedService(service, text, chunk=25, delay_s=0.012)
    await start_bot(scripted, edit_interval_s=1.0)
    asked = await fake.user_message(fake.general_id, "write me a long answer", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    messages = await finished_reply(fake, thread_id, count=3)
    await asyncio.sleep(0.2)
    messages = fake.bot_messages(thread_id)

    assert len(messages) == 3
    contents = [m["content"] for m in messages]
    assert all(len(c) <= 2000 for c in contents)
    assert all(fences_balanced(c) for c in contents)
    joined = "\n".join(contents)
    assert all(line in joined for line in text.split("\n"))
    assert scripted.events[0].text == "write me a long answer"

    edits = 0
    for message in messages:
        times = fake.edit_times(message["id"])
        edits += len(times)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= 0.99 for gap in gaps), gaps
    assert edits >= 2  # it was streamed, not posted once at the end
    patch_bodies = [c.body["content"] for c in fake.calls_to("PATCH", rf"/channels/{thread_id}/messages/\d+")
                    if "content" in c.body]
    assert all(len(body) <= 2000 for body in patch_bodies)

    # a stream whose first piece nearly fills a message still fits the limit with the "…" mark
    scripted.text = "a" * 1999 + "\nmore"
    scripted.chunk = 2000
    follow = await fake.user_message(fake.general_id, "another", mention_bot=True)
    follow_thread = await thread_of(fake, follow)
    await finished_reply(fake, follow_thread)
    posts = fake.calls_to("POST", rf"/channels/{follow_thread}/messages")
    assert posts and all(c.status == 200 for c in posts)


# --- errors ----------------------------------------------------------------------------------------

async def test_start_up_failures_name_the_fix(
    fake: FakeDiscord, settings_factory: Callable[..., Any]
) -> None:
    settings = settings_factory(discord={"token": "fake-token"}).discord
    fake.fail_next("GET", r"/users/@me", 401, code=0, message="401: Unauthorized")
    with pytest.raises(ConfigError, match="DISCORD_TOKEN was rejected"):
        await asyncio.wait_for(DiscordAdapter(cast(ChatService, None), settings).run(), 10)

    fake.message_content_enabled = False
    with pytest.raises(ConfigError, match="Message Content Intent"):
        await asyncio.wait_for(DiscordAdapter(cast(ChatService, None), settings).run(), 10)

    with pytest.raises(ConfigError, match="DISCORD_COMMAND_GUILDS"):
        DiscordAdapter(cast(ChatService, None), settings_factory(discord={"command_guilds": "general"}).discord)


async def test_forbidden_send_is_survived(fake: FakeDiscord, start_bot: StartBot, service: ChatService) -> None:
    await start_bot()
    fake.fail_next("POST", r"/channels/\d+/messages", 403, code=50013, message="Missing Permissions")
    first = await fake.user_message(fake.general_id, "first question", mention_bot=True)
    first_thread = await thread_of(fake, first)
    await fake.wait_for(lambda: [c for c in fake.calls_to("POST", r"/channels/\d+/messages") if c.status == 403])

    second = await fake.user_message(fake.general_id, "second question", mention_bot=True)
    second_thread = await thread_of(fake, second)
    await finished_reply(fake, second_thread)
    assert fake.bot_messages(first_thread) == []  # no retry storm into a channel that said 403

    async def first_question_logged() -> bool:
        stored = await service.thread_messages(key(first_thread))
        return [m.text for m in stored if m.role == "user"] == ["first question"]
    await eventually(first_question_logged)


async def test_rate_limit_and_deleted_message_get_a_notice(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    scripted = ScriptedService(service, "word " * 400, chunk=20, delay_s=0.01)
    await start_bot(scripted, retry_budget_s=5)
    # a 429 discord.py gives up on, asking for longer than the retry budget: the user is told
    fake.fail_next("POST", r"/channels/\d+/messages", 429, via=False, retry_after=30)
    asked = await fake.user_message(fake.general_id, "one", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    notice = await finished_reply(fake, thread_id)
    assert "rate-limiting" in fake.shown(notice[-1]) and notice[-1]["embeds"]

    # the message being streamed is deleted: the edit answers 404 and the user is told
    fake.fail_next("PATCH", r"/channels/\d+/messages/\d+", 404, code=10008, message="Unknown Message")
    await fake.user_message(thread_id, "two", mention_bot=True)
    await fake.wait_for(lambda: any("was deleted" in fake.shown(m) for m in fake.bot_messages(thread_id)))

    def words_since(first: int) -> list[str]:  # a reply's first message may be final before its second
        return " ".join(m["content"] for m in fake.bot_messages(thread_id)[first:]).split()

    # a Discord server error discord.py does not retry: retried with backoff, and the reply goes out
    fake.fail_next("POST", r"/channels/\d+/messages", 503, message="upstream connect error")
    before = len(fake.bot_messages(thread_id))
    posts_before = len(fake.calls_to("POST", rf"/channels/{thread_id}/messages"))
    await fake.user_message(thread_id, "two and a half", mention_bot=True)
    await finished_reply(fake, thread_id, count=before + 1)
    # the reply spans two messages: wait for its second, or the next step's 503s would be shared with it
    # (the scripted turns here do not hold the thread until the previous reply is delivered, as the core does)
    await fake.wait_for(lambda: words_since(before) == ["word"] * 400)
    assert not any("server error" in fake.shown(m) for m in fake.bot_messages(thread_id)[before:])
    posts = [c.status for c in fake.calls_to("POST", rf"/channels/{thread_id}/messages")][posts_before:]
    assert posts[:2] == [503, 200]

    # persistent server errors outlast the budget: the user is told
    fake.fail_next("POST", r"/channels/\d+/messages", 503, message="upstream connect error", times=6)
    before = len(fake.bot_messages(thread_id))
    await fake.user_message(thread_id, "two and three quarters", mention_bot=True)
    await fake.wait_for(lambda: any("server error" in fake.shown(m) for m in fake.bot_messages(thread_id)[before:]),
                        within=30)  # six 503s outlasting a 5 s budget

    # a 429 that discord.py waits out is invisible to the user
    fake.fail_next("POST", r"/channels/\d+/messages", 429, retry_after=0.05)
    before = len(fake.bot_messages(thread_id))
    posts_before = len(fake.calls_to("POST", rf"/channels/{thread_id}/messages"))
    await fake.user_message(thread_id, "three", mention_bot=True)
    await finished_reply(fake, thread_id, count=before + 1)

    await fake.wait_for(lambda: words_since(before) == ["word"] * 400)  # all of it
    posts = [c.status for c in fake.calls_to("POST", rf"/channels/{thread_id}/messages")][posts_before:]
    assert posts[:2] == [429, 200] and set(posts[2:]) <= {200}  # retried, then the rest of the reply



async def test_a_403_on_thread_creation_keeps_the_message_and_tells_the_user(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot()
    fake.fail_next("POST", r"/channels/\d+/messages/\d+/threads", 403, code=50013, message="Missing Permissions")
    asked = await fake.user_message(fake.general_id, "why is my join slow?", mention_bot=True)
    await fake.wait_for(lambda: bool(fake.bot_messages(fake.general_id)))
    [notice] = fake.bot_messages(fake.general_id)
    assert "couldn't open a thread" in fake.shown(notice) and notice["embeds"]

    async def kept() -> bool:
        stored = await service.thread_messages(key(asked["id"]))
        return [(m.role, m.text, m.status) for m in stored] == [("user", "why is my join slow?", "failed")]
    await eventually(kept)


async def test_on_start_it_repairs_what_a_dead_process_left_half_written(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    """What SIGKILL mid-reply leaves (a message still marked " …"), repaired by the next process."""
    import time

    from adapters.streaming import MARK
    from bot.storage import SQLiteStore

    finished, lost = fake.add_user_thread(fake.general_id), fake.add_user_thread(fake.general_id)
    # killed between a post and its record: the message is there, the log knows only that it was
    # about to be posted (and what it shows); and killed just before a post that never happened
    unrecorded, unposted = fake.add_user_thread(fake.general_id), fake.add_user_thread(fake.general_id)
    half = {}
    for thread_id, text in ((finished, "The full re" + MARK), (lost, "half" + MARK), (unrecorded, "posted" + MARK)):
        payload = fake._message_payload(thread_id, fake.bot_user, text)
        fake.messages[payload["id"]] = payload
        half[thread_id] = payload
    # The dead process's records: its lease ran out an hour ago.
    db_path = service.store.path  # type: ignore[attr-defined]
    async with SQLiteStore(db_path, clock=lambda: time.time() - 3600) as dead:
        await dead.register_instance("dead")
        done = await dead.accept(key(finished), "default", "question one", owner="dead")
        await dead.finish_turn(key(finished), done.message.id, "The full reply, all of it.", None,
                               turn_id=done.turn_id)
        await dead.record_delivery(done.turn_id, 0, half[finished]["id"], "The full re" + MARK)  # type: ignore[arg-type]
        cut = await dead.accept(key(lost), "default", "question two", owner="dead")
        await dead.record_delivery(cut.turn_id, 0, half[lost]["id"], "half" + MARK)  # type: ignore[arg-type]
        other = await dead.accept(key(unrecorded), "default", "question three", owner="dead")
        await dead.record_delivery(other.turn_id, 0, "", "posted" + MARK)  # type: ignore[arg-type]
        ghost = await dead.accept(key(unposted), "default", "question four", owner="dead")
        await dead.finish_turn(key(unposted), ghost.message.id, "All of the ghost reply.", None,
                               turn_id=ghost.turn_id)
        await dead.record_delivery(ghost.turn_id, 0, "", "All of the gh" + MARK)  # type: ignore[arg-type]
    await service.store.recover(lease_s=30)  # what the running process's lease loop does

    await start_bot()
    await fake.wait_for(lambda: half[finished]["content"] == "The full reply, all of it."
                        and half[lost]["content"] == "half"
                        and any("restarted while answering" in fake.shown(m) for m in fake.bot_messages(lost)))
    await fake.wait_for(lambda: half[unrecorded]["content"] == "posted"  # found by its text, mark removed
                        and any("restarted while answering" in fake.shown(m) for m in fake.bot_messages(unrecorded)))
    await fake.wait_for(lambda: [m["content"] for m in fake.bot_messages(unposted)] == ["All of the ghost reply."])

    async def nothing_left() -> bool:
        return await service.store.repairs("discord", lease_s=30) == []
    await eventually(nothing_left)
    phases = [(await service.store.get_turn(t)).phase  # type: ignore[arg-type,union-attr]
              for t in (done.turn_id, cut.turn_id, other.turn_id, ghost.turn_id)]
    assert phases == ["delivered", "interrupted", "interrupted", "delivered"]
    assert len(fake.bot_messages(lost)) == 2 and len(fake.bot_messages(finished)) == 1  # told once each
    assert len(fake.bot_messages(unrecorded)) == 2 and len(fake.bot_messages(unposted)) == 1


async def test_a_reply_cut_off_inside_a_code_block_leaves_every_message_balanced(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    from bot.core.outcomes import CutOff

    text = long_reply().split("```\n")[0]  # ends inside the sql block: the token limit struck there
    assert text.count("```") == 1
    cut = CutOff(text, 0, "length", 400)
    await start_bot(ScriptedService(service, text, chunk=40, delay_s=0.005, outcome=cut))
    asked = await fake.user_message(fake.general_id, "write it all", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    await fake.wait_for(lambda: any("token limit" in m["content"] for m in fake.bot_messages(thread_id)))
    messages = await finished_reply(fake, thread_id)
    assert len(messages) >= 2
    for message in messages:
        assert message["content"].count("```") % 2 == 0, message["content"][-200:]
    assert messages[-1]["content"].endswith("_(reply cut off at the 400-token limit)_")


# --- what a thread's state makes cheap: buttons, /retry /continue /stop /fork /forget, adoption, files ---

Message = dict[str, Any]


def cid(action: str, thread_id: str) -> str:
    return f"raven:{action}:{thread_id}"


async def last_with_buttons(fake: FakeDiscord, channel_id: str, *actions: str, after: int = 0) -> Message:
    """Wait until the bot's newest message (past the first ``after``) is final and shows exactly
    these buttons."""
    wanted = [cid(action, channel_id) for action in actions]

    def probe() -> Message | None:
        messages = [m for m in public(fake, channel_id)[after:] if m["content"]]
        if messages and not messages[-1]["content"].endswith(PLACEHOLDER_TAIL) \
                and fake.buttons(messages[-1]) == wanted:
            return messages[-1]
        return None
    return await fake.wait_for(probe)


def with_buttons(fake: FakeDiscord, channel_id: str) -> list[str]:
    return [m["id"] for m in fake.bot_messages(channel_id) if fake.buttons(m)]


def public(fake: FakeDiscord, channel_id: str) -> list[Message]:
    """The bot's messages everyone in the channel sees (not the ephemeral ones)."""
    return [m for m in fake.bot_messages(channel_id) if not m["flags"] & 64]


async def acknowledged(fake: FakeDiscord, interaction: Message, sent_at: float) -> dict[str, Any]:
    callback = (await fake.wait_calls("POST", rf"/interactions/{interaction['id']}/.*/callback"))[0]
    assert callback.at - sent_at < 3.0
    return dict(callback.body)


async def test_retry_and_continue_buttons_on_the_newest_reply_only(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot(allowed_roles=[fake.member_role_id])
    asked = await fake.user_message(fake.general_id, "why is the sky blue?", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    first = await last_with_buttons(fake, thread_id, "retry", "continue")
    assert with_buttons(fake, thread_id) == [first["id"]]
    [old_reply] = [m for m in await service.thread_messages(key(thread_id)) if m.role == "assistant"]

    # someone outside the allowed roles is told no, privately, and nothing happens
    count = len(public(fake, thread_id))
    sent = time.monotonic()
    refused = await fake.press(first, cid("retry", thread_id), roles=[fake.guest_role_id])
    assert (await acknowledged(fake, refused, sent))["data"]["flags"] == 64
    await asyncio.sleep(0.3)
    assert len(public(fake, thread_id)) == count

    # Retry: acknowledged at once, a new reply below; the old one loses its buttons, the log keeps it
    sent = time.monotonic()
    pressed = await fake.press(first, cid("retry", thread_id))
    assert await acknowledged(fake, pressed, sent) == {"type": 6}
    second = await last_with_buttons(fake, thread_id, "retry", "continue", after=count)
    assert with_buttons(fake, thread_id) == [second["id"]]
    assert fake.buttons(fake.messages[first["id"]]) == []
    replies = [m for m in await service.thread_messages(key(thread_id)) if m.role == "assistant"]
    assert (replies[0].id, replies[0].status) == (old_reply.id, "replaced")
    assert replies[-1].status != "replaced" and replies[-1].text.strip() in second["content"]
    users = [m.text for m in await service.thread_messages(key(thread_id)) if m.role == "user"]
    assert users == ["why is the sky blue?", "/retry"]

    # Continue: the continuation is posted after the reply; the log's reply is the old text and more
    count = len(public(fake, thread_id))
    before = replies[-1]
    await fake.press(second, cid("continue", thread_id))
    third = await last_with_buttons(fake, thread_id, "retry", "continue", after=count)
    assert third["id"] != second["id"] and with_buttons(fake, thread_id) == [third["id"]]
    assert fake.messages[second["id"]]["content"] == second["content"]  # the old reply is not rewritten
    longer = [m for m in await service.thread_messages(key(thread_id)) if m.role == "assistant"][-1]
    assert longer.id != before.id and longer.text.startswith(before.text.rstrip())
    assert len(longer.text) > len(before.text)
    continuation = "".join(m["content"] for m in public(fake, thread_id)[count:])
    continuation = re.sub(r"\n\n_\(reply cut off[^)]*\)_$", "", continuation)  # the note is no text
    assert longer.text.rstrip().endswith(continuation.rstrip()[-20:])


async def test_stop_button_while_writing_keeps_what_was_written(
    fake: FakeDiscord, start_bot: StartBot, settings_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_service(settings_factory(max_reply_tokens=200)) as slow:
        engine: Any = slow.engine
        step = engine._decode_step

        def slow_step() -> None:  # on the engine's thread: each token takes a while
            time.sleep(0.1)
            step()
        monkeypatch.setattr(engine, "_decode_step", slow_step)
        await start_bot(slow)
        asked = await fake.user_message(fake.general_id, "tell me a long story", mention_bot=True)
        thread_id = await thread_of(fake, asked)
        writing = await fake.wait_for(lambda: next(
            (m for m in fake.bot_messages(thread_id) if fake.buttons(m) == [cid("stop", thread_id)]), None))
        assert writing["content"].endswith(PLACEHOLDER_TAIL)

        sent = time.monotonic()
        pressed = await fake.press(writing, cid("stop", thread_id))
        assert await acknowledged(fake, pressed, sent) == {"type": 6}
        done = await last_with_buttons(fake, thread_id, "retry", "continue")
        assert done["content"].endswith("_(reply stopped)_")
        [reply] = [m for m in await slow.thread_messages(key(thread_id)) if m.role == "assistant"]
        turn = slow.last_turn(key(thread_id))
        assert turn is not None and turn.finish_reason == "halted" and turn.generated_tokens < 150
        assert reply.text.strip() and reply.text.strip() in done["content"]

        # a Stop button that is no longer on the message does nothing (Discord sends what the message shows)
        count = len(fake.calls)
        await fake.press(done, cid("stop", thread_id))
        await asyncio.sleep(0.3)
        assert [c for c in fake.calls[count:] if c.method != "GET"] == []
        await slow.drain()


async def test_slash_commands_retry_stop_and_forget_with_its_confirmation(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot(command_guilds=[fake.guild_id])
    asked = await fake.user_message(fake.general_id, "what is a join?", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    first = await last_with_buttons(fake, thread_id, "retry", "continue")

    # /retry: a private acknowledgement; the new reply goes into the thread with the buttons
    count = len(public(fake, thread_id))
    retry = await fake.slash_command("retry", channel_id=thread_id)
    assert await acknowledged(fake, retry, time.monotonic() - 0.1) == {"type": 5, "data": {"flags": 64}}
    second = await last_with_buttons(fake, thread_id, "retry", "continue", after=count)
    assert with_buttons(fake, thread_id) == [second["id"]] and first["id"] != second["id"]
    original = fake.original_response(retry)
    assert original is not None
    await fake.wait_for(lambda: "new reply is below" in original["content"])
    statuses = [m.status for m in await service.thread_messages(key(thread_id)) if m.role == "assistant"]
    assert statuses[0] == "replaced" and len(statuses) == 2

    # /stop with nothing being written: said privately by the core
    stop = await fake.slash_command("stop", channel_id=thread_id)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{stop['token']}")
    stopped = fake.original_response(stop)
    assert stopped is not None and stopped["content"] == "Nothing is being written here."

    # commands outside a thread Raven talks in: a private hint, nothing stored
    hint = await fake.slash_command("forget")
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{hint['token']}")
    hinted = fake.original_response(hint)
    assert hinted is not None and "inside a thread" in fake.shown(hinted)

    # /forget asks, privately, with a button; pressing it deletes the thread's log and state
    forget = await fake.slash_command("forget", channel_id=thread_id)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{forget['token']}")
    question = fake.original_response(forget)
    assert question is not None
    await fake.wait_for(lambda: question["content"] == FORGET_ASK)
    assert fake.buttons(question) == [cid("forget", thread_id)] and question["flags"] & 64
    assert await service.knows_thread(key(thread_id))
    pressed = await fake.press(question, cid("forget", thread_id))
    await fake.wait_calls("PATCH", rf"/webhooks/{fake.application_id}/{pressed['token']}/messages/@original")
    assert question["content"] == FORGET_DONE and fake.buttons(question) == []
    assert not await service.knows_thread(key(thread_id))
    assert await service.thread_messages(key(thread_id)) == []
    assert with_buttons(fake, thread_id) == []  # the last reply's buttons went with it

    # typed in a thread, /forget asks with the same button on the core's question
    again = await fake.user_message(fake.general_id, "a new question", mention_bot=True)
    other = await thread_of(fake, again)
    await last_with_buttons(fake, other, "retry", "continue")
    await fake.user_message(other, "/forget")
    asking = await last_with_buttons(fake, other, "forget")
    assert asking["content"] == FORGET_ASK
    # /forget confirm:True deletes at once
    confirm = await fake.slash_command("forget", {"confirm": True}, channel_id=other)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{confirm['token']}")
    confirmed = fake.original_response(confirm)
    assert confirmed is not None
    await fake.wait_for(lambda: confirmed["content"] == FORGET_DONE)
    assert not await service.knows_thread(key(other))


async def test_fork_opens_a_linked_thread_that_goes_on_from_the_same_state(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot()
    asked = await fake.user_message(fake.general_id, "plan the schema", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    await last_with_buttons(fake, thread_id, "retry", "continue")
    source_log = [(m.role, m.text) for m in await service.thread_messages(key(thread_id))]

    fork = await fake.slash_command("fork", channel_id=thread_id)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{fork['token']}")
    [create] = fake.calls_to("POST", rf"/channels/{fake.general_id}/threads")
    assert create.status == 201 and create.body["name"] == "plan the schema (fork)"
    new_id = next(t["id"] for t in fake.threads_created() if t["name"] == "plan the schema (fork)")
    link = fake.original_response(fork)
    assert link is not None and link["content"] == f"Forked into <#{new_id}>."  # in the old thread
    [hello] = fake.bot_messages(new_id)
    assert hello["content"].startswith(f"Forked from <#{thread_id}>")  # and in the new one
    assert fake.thread_members[new_id] == [fake.alice["id"]]
    info = await service.thread(key(new_id))
    assert info is not None and info.forked_from == key(thread_id)
    assert [(m.role, m.text) for m in await service.thread_messages(key(new_id))] == source_log

    # the fork is followed without a mention and goes on from the copied state, not a rebuild
    await fake.user_message(new_id, "and the indexes?")
    await last_with_buttons(fake, new_id, "retry", "continue")
    turn = service.last_turn(key(new_id))
    assert turn is not None and turn.resumed_from in ("memory", "store")
    assert [m.text for m in await service.thread_messages(key(thread_id))] == [t for _, t in source_log]

    # typed: "/fork" in the thread forks it again; the link is posted in both threads
    await fake.user_message(thread_id, "/fork")
    await fake.wait_for(lambda: len(fake.threads_created()) == 3)
    third = fake.threads_created()[-1]["id"]
    await fake.wait_for(lambda: any(m["content"] == f"Forked into <#{third}>." for m in fake.bot_messages(thread_id)))
    assert await service.knows_thread(key(third))
    assert "/fork" not in [m.text for m in await service.thread_messages(key(thread_id))]

    # nothing to fork in a thread Raven does not talk in, nor in a DM
    stranger = fake.add_user_thread(fake.general_id)
    nothing = await fake.slash_command("fork", channel_id=stranger)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{nothing['token']}")
    said = fake.original_response(nothing)
    assert said is not None and "nothing to fork" in fake.shown(said) and said["embeds"]
    assert len(fake.threads_created()) == 3


async def test_called_into_a_thread_it_reads_the_earlier_messages_once(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    thread_id = fake.add_user_thread(fake.general_id, "release planning")
    await start_bot()
    await fake.user_message(thread_id, "we ship on friday", author=fake.alice)
    await fake.user_message(thread_id, "the migration is not ready", author=fake.bob)
    await asyncio.sleep(0.3)
    assert fake.bot_messages(thread_id) == []  # not called in yet

    mention = await fake.user_message(thread_id, "what do you think?", mention_bot=True)
    await last_with_buttons(fake, thread_id, "retry", "continue")
    [read] = fake.calls_to("GET", rf"/channels/{thread_id}/messages")
    assert read.query == {"limit": str(service.settings.adopt_max_messages), "before": mention["id"]}
    stored = await service.thread_messages(key(thread_id))
    assert [(m.author, m.text, m.status) for m in stored if m.status == "adopted"] == [
        ("alice", "we ship on friday", "adopted"), ("bob", "the migration is not ready", "adopted")]
    assert [m.text for m in stored if m.role == "user" and m.status != "adopted"] == ["what do you think?"]
    assert stored[-1].role == "assistant"
    turn = service.last_turn(key(thread_id))
    assert turn is not None and turn.resumed_from == "rebuild"  # the reply's turn read the discussion first

    # later messages cost nothing extra: the history is not read again
    await fake.user_message(thread_id, "and the rollback plan?")
    await fake.wait_for(lambda: len([m for m in fake.bot_messages(thread_id) if m["content"]]) >= 2
                        and not fake.bot_messages(thread_id)[-1]["content"].endswith(PLACEHOLDER_TAIL))
    assert len(fake.calls_to("GET", rf"/channels/{thread_id}/messages")) == 1


async def test_text_attachments_are_read_and_others_noted(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    await start_bot()
    limit = service.settings.attachment_max_bytes
    files = {
        "schema.sql": b"CREATE TABLE users (id int primary key);\n",
        "diagram.png": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "huge.log": b"x" * (limit + 1),
    }
    asked = await fake.user_message(fake.general_id, "why is this slow?", mention_bot=True, files=files)
    thread_id = await thread_of(fake, asked)
    await finished_reply(fake, thread_id)
    assert [path.split("/", 1)[1] for path in fake.downloads] == ["schema.sql"]  # only what is read
    [question] = [m for m in await service.thread_messages(key(thread_id)) if m.role == "user"]
    assert question.text.startswith("why is this slow?")
    assert "[Attached file schema.sql]\n```\nCREATE TABLE users (id int primary key);" in question.text
    assert "[Attached file diagram.png: not read — not a text file Raven reads]" in question.text
    assert f"[Attached file huge.log: not read — {limit + 1:,} bytes, over the {limit:,}-byte limit]" in question.text

    # a file alone, without a word: the thread is named after it, and it is still read
    alone = await fake.user_message(fake.general_id, "", mention_bot=True, files={"notes.md": b"# todo\n"})
    other = await thread_of(fake, alone)
    create = fake.calls_to("POST", rf"/channels/{fake.general_id}/messages/{alone['id']}/threads")[0]
    assert create.body["name"] == "notes.md"
    await finished_reply(fake, other)
    [note] = [m for m in await service.thread_messages(key(other)) if m.role == "user"]
    assert note.text.startswith("[Attached file notes.md]")


async def test_buttons_posted_before_a_restart_still_work_and_move_to_the_newest_reply(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    first_run = await start_bot()
    asked = await fake.user_message(fake.general_id, "remember this", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    reply = await last_with_buttons(fake, thread_id, "retry", "continue")
    await first_run.client.close()  # the process goes; its buttons stay on Discord
    await fake.wait_for(lambda: not fake._sockets)

    await start_bot()  # a new process knows nothing of that message but what the log recorded
    count = len(public(fake, thread_id))
    await fake.press(fake.messages[reply["id"]], cid("retry", thread_id))
    newer = await last_with_buttons(fake, thread_id, "retry", "continue", after=count)
    statuses = [m.status for m in await service.thread_messages(key(thread_id)) if m.role == "assistant"]
    assert statuses[0] == "replaced" and len(statuses) == 2
    # the buttons moved to the newest reply, as without the restart (the log says where they were)
    assert with_buttons(fake, thread_id) == [newer["id"]]
    assert fake.buttons(fake.messages[reply["id"]]) == [] and fake.messages[reply["id"]]["content"] == reply["content"]


async def test_summary_of_a_channel_or_a_thread_is_answered_privately(
    fake: FakeDiscord, start_bot: StartBot, service: ChatService
) -> None:
    adapter = await start_bot(command_guilds=[fake.guild_id])
    for text in ("the nightly deploy failed", "the migration locked the orders table"):
        await fake.user_message(fake.general_id, text)
    channel_summary = await fake.slash_command("summary")
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{channel_summary['token']}")
    answer = fake.original_response(channel_summary)
    assert answer is not None and answer["flags"] & 64  # only the user sees it
    await fake.wait_for(lambda: bool(fake.shown(answer).strip()))
    channel_log = await service.thread_messages(key(fake.general_id))
    assert [(m.role, m.status) for m in channel_log] == [("user", "done"), ("assistant", "aside")]
    assert channel_log[1].text == fake.shown(answer).strip()  # what the user saw is what the log keeps
    assert fake.calls_to("GET", rf"/channels/{fake.general_id}/messages")  # the channel was read
    # had the process died mid-summary, no repair would post in the channel: it was the user's alone
    with sqlite3.connect(service.settings.database_path) as db:
        db.execute("UPDATE turns SET phase = 'interrupted'")
    assert await adapter.repair() == 0
    assert fake.calls_to("POST", rf"/channels/{fake.general_id}/messages") == []

    asked = await fake.user_message(fake.general_id, "what is a join?", mention_bot=True)
    thread_id = await thread_of(fake, asked)
    await last_with_buttons(fake, thread_id, "retry", "continue")
    before = await service.store.load_state(key(thread_id))
    thread_summary = await fake.slash_command("summary", channel_id=thread_id)
    await fake.wait_calls("POST", rf"/webhooks/{fake.application_id}/{thread_summary['token']}")
    private = fake.original_response(thread_summary)
    assert private is not None and private["flags"] & 64
    await fake.wait_for(lambda: bool(fake.shown(private).strip()))
    assert await service.store.load_state(key(thread_id)) == before  # the thread is unchanged
    statuses = [m.status for m in await service.thread_messages(key(thread_id)) if m.role == "assistant"]
    assert statuses == ["done", "aside"]


async def test_channel_limits_count_its_threads_and_an_admin_role_is_exempt(
    fake: FakeDiscord, start_bot: StartBot, settings_factory: Callable[..., Any]
) -> None:
    """RAVEN_RATE_CHANNEL_MESSAGES_PER_MINUTE over real discord.py objects: a message in a thread counts
    for the thread's parent channel, another channel has its own count, and a member holding one of
    DISCORD_ADMIN_ROLES (the fake's "guests" role here) is exempt; a refused message is kept."""
    async with open_service(settings_factory(rate_channel_messages_per_minute=2, max_reply_tokens=4)) as limited:
        await start_bot(limited, admin_roles=[fake.guest_role_id])
        asked = await fake.user_message(fake.general_id, "one", mention_bot=True)
        thread_id = await thread_of(fake, asked)
        first = await finished_reply(fake, thread_id)
        await fake.user_message(thread_id, "two")  # inside the thread: counts for #general
        await finished_reply(fake, thread_id, count=len(first) + 1)

        refused = await fake.user_message(fake.general_id, "three", author=fake.bob, mention_bot=True)
        refused_thread = await thread_of(fake, refused)
        notice = await finished_reply(fake, refused_thread)
        assert "This channel has had 2 messages in the last minute (the limit is 2)" in fake.shown(notice[-1])
        assert notice[-1]["embeds"]  # a notice, not an answer
        stored = await limited.thread_messages(key(refused_thread))
        assert [(m.text, m.status) for m in stored if m.role == "user"] == [("three", "refused")]

        boss = await fake.user_message(fake.general_id, "four", author=fake.bob, roles=[fake.guest_role_id],
                                       mention_bot=True)
        boss_thread = await thread_of(fake, boss)
        answered = await finished_reply(fake, boss_thread)
        assert not answered[-1]["embeds"] and answered[-1]["content"].strip()  # answered: the role exempts
        assert [m.status for m in await limited.thread_messages(key(boss_thread)) if m.role == "user"] == ["answered"]

        elsewhere = await fake.user_message(fake.other_id, "five", mention_bot=True)
        other_thread = await thread_of(fake, elsewhere)
        assert not (await finished_reply(fake, other_thread))[-1]["embeds"]  # #random has its own count
        await limited.drain()
