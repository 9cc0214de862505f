"""Slack adapter: slack-bolt (async) in Socket Mode or HTTP mode, translating Slack events into core
``Event``s and the core's streamed reply into ``chat.postMessage``/``chat.update`` calls.

What reaches the core:

- a mention in a channel (``app_mention``), answered in a thread on that message;
- any later message in a thread the bot has answered in (``service.knows_thread``), without a mention;
- direct messages (``channel_type == "im"``): top-level DMs are one conversation per DM, replies in a
  DM thread are that thread's conversation;
- ``/advisor <persona> [question]``: acknowledged at once, then a root message naming the persona is
  posted in the channel and the conversation continues in its thread;
- the buttons on Raven's last reply (Block Kit actions: Stop while it is written, Retry and Continue
  once done; see ``adapters.slack_blocks``), acked at once, the work done after the ack;
- ``/retry``, ``/continue``, ``/stop``, ``/fork``, ``/forget [confirm]``: Slack sends a slash command
  without its thread, so these act on the thread the user last talked with Raven in, in that channel
  (since this process started); without one, the answer says how to use the buttons or the words in
  the thread (``@Raven retry``, ``++``, ``+++``, ``@Raven fork``, ``@Raven forget``).

``/fork`` (the command, or the words in a thread) posts a new top-level message whose thread continues
from the old one's state (``service.fork``) and links the two. A mention inside a thread Raven does not
know *adopts* it: its earlier messages (``conversations.replies``) reach the core with the mention.
Files on a message are fetched with the bot token (only those the core reads) and passed on.

Every thread is ``ThreadKey("slack", f"{channel}:{thread_ts}")`` (``f"{channel}:dm"`` for top-level DMs).
Slack delivers a message more than once (retries; ``app_mention`` and ``message`` for one message), so
each is claimed in the core's processed-event table on its ``event_id`` and on ``(channel, ts)`` when
processing starts — never on receipt of a retry header, so a retry whose first delivery was lost is
still answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from cachetools import LRUCache, TTLCache
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from adapters.repairs import confirm_posts, has_unconfirmed, keep_repairing
from adapters.retry import RetryPolicy, report_call
from adapters.settings import SlackSettings
from adapters.slack_blocks import (
    ACTION_IDS,
    CONTINUE,
    FORGET,
    RETRY,
    STOP,
    Controls,
    forget_prompt,
    message_blocks,
)
from adapters.slack_mrkdwn import escape, from_slack, to_mrkdwn
from adapters.streaming import CONTINUED, MARK, StreamRenderer, final_pieces, present
from adapters.text_split import split_message
from bot.core.attachments import wanted
from bot.core.commands import FORGET_CONFIRMATION, HELP_TEXT, Command
from bot.core.outcomes import NOTICES, Answered, CutOff
from bot.core.service import FORGET_ASK, INTERRUPTED_NOTICE, History
from bot.errors import ConfigError, PersonaError, RavenError
from bot.events import Attachment, EarlierMessage, Event, ThreadKey

if TYPE_CHECKING:
    from bot.core.service import ChatService, Repair

log = logging.getLogger(__name__)

PLATFORM = "slack"
# Message subtypes written by a person; every other subtype (message_changed, message_deleted,
# channel_join, bot_message ...) is ignored.
_USER_SUBTYPES = {None, "thread_broadcast", "file_share"}
# Errors after which a notice cannot be posted in that conversation either.
_UNREACHABLE = {"not_in_channel", "channel_not_found", "is_archived", "restricted_action",
                "invalid_auth", "account_inactive", "token_revoked", "missing_scope"}
_BAD_TOKEN = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "not_allowed_token_type"}
_MIN_CHARS = 100  # never split finer than this while learning Slack's length limit
ERROR_NOTICE = "Sorry, something went wrong while answering. Please try again."
SUB_MESSAGES = 100  # delivery positions: piece * 100 + the Slack message within it (msg_too_long splits)
ADMIN_LOOKUP_S = 5.0  # how long a message waits for users.info to say whether its sender is an admin
NAME_CACHE_SIZE = 4096  # display names kept (users.info is rate-limited; people rename themselves)
NAME_CACHE_TTL_S = 3600
THREADS_KEPT = 4096  # the last reply (with buttons) per thread, and each user's last thread per channel
ADOPT_PAGE = 200  # conversations.replies page size (Slack's maximum is 1,000; it suggests 200)
ADOPT_MAX_PAGES = 20  # a thread longer than this many pages is read from its start and its latest part
NAME_LOOKUP_S = 5.0  # adopting waits at most this long for the authors' names (ids otherwise)
POST_SEARCH_LIMIT = 100  # newest messages a repair reads to find a post whose ts a crash kept from the log
FILE_TIMEOUT_S = 30.0
FILES_HOST = "files.slack.com"  # the only host (besides SLACK_API_URL's) that ever sees the bot token
NO_THREAD = ("Slack does not say which thread a slash command was typed in, so `{command}` acts on the "
             "thread you last talked with Raven in, in this channel, and there is none yet. In a thread, "
             "use the buttons on Raven's last reply, or mention Raven: `@Raven retry` (or `++`), "
             "`@Raven continue` (or `+++`), `@Raven stop`, `@Raven fork`, `@Raven forget`.")
STALE_BUTTONS = "These buttons belong to an earlier reply; use the ones on the last reply."
NOTHING_WRITTEN = "Nothing is being written in that thread."
# Commands whose answer leaves the thread's last reply (and its buttons) as they were.
_KEEPS_BUTTONS = {"help", "personas", "stop", "fork"}


def split_advisor(text: str) -> tuple[str, str]:
    """``"sql why is it slow?"`` → ``("sql", "why is it slow?")``."""
    name, _, question = text.strip().partition(" ")
    return name.strip().lower(), question.strip()


@dataclass
class _Message:
    """One message the bot wrote in Slack."""

    ts: str
    text: str
    last_write: float  # monotonic time of the post or the last accepted update
    controls: Controls | None = None  # the buttons it shows


@dataclass
class _Reply:
    """One reply being shown: which buttons it gets, and its pieces so far."""

    key: ThreadKey
    kind: Controls | None  # "done": an answer (Stop while written); "forget": the /forget question
    retires: bool  # takes the buttons off the thread's previous reply
    pieces: list[_Posted] = field(default_factory=list)
    final: bool = False  # the stream has ended: the renderer shows the final text

    def controls(self, posted: _Posted, piece: str) -> Controls | None:
        """The buttons the last Slack message of ``posted`` should show, given its text."""
        if self.kind is None:
            return None
        if self.final:
            return self.kind if self.pieces and self.pieces[-1] is posted else None
        return "writing" if self.kind == "done" and piece.endswith(MARK) else None

    def messages(self) -> list[_Message]:
        return [message for piece in self.pieces for message in piece.messages]


@dataclass
class _Posted:
    """The stream renderer's handle for one piece of a reply: normally one Slack message; more when
    Slack refused the piece as too long (``msg_too_long``) and it continues in new messages."""

    channel: str
    thread_ts: str | None
    messages: list[_Message]
    reply: _Reply | None = None


@dataclass
class _ReplyRenderer(StreamRenderer[_Posted]):
    """Tells the reply when the final text is being shown (the buttons change from Stop)."""

    reply: _Reply | None = None

    async def finish(self, text: str) -> None:
        if self.reply is not None:
            self.reply.final = True
        await super().finish(text)


def _api_error(exc: SlackApiError) -> str:
    """Slack's error code (``not_in_channel``, ``ratelimited`` ...) of a failed Web API call."""
    try:
        return str(exc.response.get("error") or exc.response.status_code)
    except Exception:  # a response without a body
        return "unknown_error"


def _api_method(exc: SlackApiError) -> str:
    url = str(getattr(exc.response, "api_url", "") or "")
    return url.rstrip("/").rsplit("/", 1)[-1] or "a Web API call"


def _retry_after(headers: Mapping[str, list[str] | str] | None) -> float | None:
    for name, values in (headers or {}).items():
        if name.lower() == "retry-after" and values:
            try:
                return max(0.0, float(values if isinstance(values, str) else values[0]))
            except ValueError:
                return None
    return None


class ObservedWebClient(AsyncWebClient):
    """slack_sdk's client, telling ``report_call`` how each Web API call ended (metrics count Slack's
    calls and errors like the other platforms'); the retried attempts are reported by the handler."""

    async def api_call(self, api_method: str, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            response = await super().api_call(api_method, **kwargs)
        except SlackApiError as exc:
            report_call("slack", api_method, str(exc.response.get("error") or exc.response.status_code))
            raise
        except Exception:
            report_call("slack", api_method, "connection")
            raise
        report_call("slack", api_method, "ok")
        return response


class SlackRetryHandler(AsyncRetryHandler):
    """slack_sdk's handler interface over ``RetryPolicy``: the one handler the Web API client uses."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_retry_count=1_000_000)  # the budget decides, not a count
        self.policy = policy
        self.clock = clock

    def _next_wait(self, state: RetryState, response: HttpResponse | None, error: Exception | None) -> float | None:
        values = state.custom_values if state.custom_values is not None else {}
        state.custom_values = values
        started = values.setdefault("raven_started", self.clock())
        if "raven_wait" not in values:
            status = response.status_code if response is not None else None
            retry_after = _retry_after(response.headers) if response is not None else None
            connection = (error is not None and isinstance(error, OSError | asyncio.TimeoutError)) or (
                error is not None and type(error).__module__.startswith("aiohttp"))
            values["raven_wait"] = self.policy.delay(state.current_attempt, self.clock() - started, status,
                                                     retry_after, connection)
        wait = values["raven_wait"]
        return None if wait is None else float(wait)

    async def _can_retry_async(self, *, state: RetryState, request: HttpRequest,
                               response: HttpResponse | None = None, error: Exception | None = None) -> bool:
        return self._next_wait(state, response, error) is not None

    async def prepare_for_next_attempt_async(self, *, state: RetryState, request: HttpRequest,
                                             response: HttpResponse | None = None,
                                             error: Exception | None = None) -> None:
        wait = self._next_wait(state, response, error) or 0.0
        assert state.custom_values is not None
        state.custom_values.pop("raven_wait", None)  # decided afresh after the next answer
        report_call("slack", request.url.rsplit("/", 1)[-1],
                    str(response.status_code) if response is not None else "connection")
        log.info("slack: %s answered %s; retrying in %.1f s", request.url.rsplit("/", 1)[-1],
                 response.status_code if response is not None else type(error).__name__, wait)
        state.next_attempt_requested = True
        await asyncio.sleep(wait)
        state.increment_current_attempt()



def _buttons_for(command: Command | None) -> Controls | None:
    """What a reply's last message offers: Retry and Continue under an answer (Stop while it is
    written), the confirm button under the ``/forget`` question, nothing under other commands."""
    if command is None or command.name in ("retry", "continue") or (command.name == "advisor" and command.rest):
        return "done"
    if command.name == "forget" and command.argument != FORGET_CONFIRMATION:
        return "forget"
    return None


class SlackAdapter:
    """Runs the bolt app until cancelled: Socket Mode when ``SLACK_APP_TOKEN`` is set, otherwise an
    aiohttp server for the Events API, verified with ``SLACK_SIGNING_SECRET``."""

    def __init__(self, service: ChatService, settings: SlackSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if settings.bot_token is None:
            raise ConfigError("SLACK_BOT_TOKEN is not set")
        if settings.app_token is None and settings.signing_secret is None:
            raise ConfigError("Slack needs SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET "
                              "(HTTP mode); neither is set")
        self.service = service
        self.settings = settings
        self.clock = clock
        self.socket_mode = settings.app_token is not None
        api_url = settings.api_url.rstrip("/") + "/"  # slack_sdk joins method names onto it
        self.client = ObservedWebClient(
            token=settings.bot_token.get_secret_value(),
            base_url=api_url,
            # One handler for 429, 5xx and broken connections alike, with a budget in time (see
            # adapters/retry.py): slack_sdk's built-in handlers share one attempt counter per call, so
            # 429, 429, then 500 used to give up on the 500.
            retry_handlers=[SlackRetryHandler(RetryPolicy(budget_s=settings.retry_budget_s))],
        )
        secret = settings.signing_secret.get_secret_value() if settings.signing_secret else ""
        self.app = AsyncApp(client=self.client, signing_secret=secret, name="raven",
                            request_verification_enabled=not self.socket_mode)
        self.app.event("app_mention")(self._on_mention)
        self.app.event("message")(self._on_message)
        self.app.command("/advisor")(ack=self._ack_advisor, lazy=[self._run_advisor])
        self.app.command("/help")(self._on_help)
        self.app.command("/stop")(self._on_stop_command)
        self.app.command("/summary")(ack=self._ack_summary, lazy=[self._run_summary])
        for name in ("/retry", "/continue", "/fork", "/forget"):
            self.app.command(name)(ack=self._ack_thread_command, lazy=[self._run_thread_command])
        self.app.action(ACTION_IDS)(ack=self._ack_action, lazy=[self._run_action])
        self.app.error(self._on_bolt_error)
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._names: TTLCache[str, str] = TTLCache(maxsize=NAME_CACHE_SIZE, ttl=NAME_CACHE_TTL_S)
        self._lookups: dict[str, asyncio.Task[None]] = {}  # users.info under way, shared by who waits for it
        self._admins: TTLCache[str, bool] = TTLCache(maxsize=NAME_CACHE_SIZE, ttl=NAME_CACHE_TTL_S)
        self._opening: Counter[ThreadKey] = Counter()
        self._repairer: asyncio.Task[None] | None = None  # threads a mention is opening (see _answer_event)
        self._max_chars: int | None = None  # learned from msg_too_long: Slack's real limit is lower
        self._tasks: set[asyncio.Task[Any]] = set()
        # Each thread's last reply message with buttons (taken off when a newer reply comes; None: its
        # last reply has none), and each user's last thread per channel (what a slash command acts on).
        # What is not in here (from before a restart) is looked up in the log.
        self._last_reply: LRUCache[ThreadKey, tuple[str, _Message] | None] = LRUCache(maxsize=THREADS_KEPT)
        self._recent: LRUCache[tuple[str, str], tuple[ThreadKey, str | None]] = LRUCache(maxsize=THREADS_KEPT)
        self._bot_id: str | None = None  # this app's bot id (auth.test): its own messages when adopting
        self._bot_user: str | None = None  # and its bot user (auth.test's user_id)
        self._files: aiohttp.ClientSession | None = None  # downloads of files shared with Raven

    # --- lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect (or listen) and serve until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        await self._check_token()
        if self.socket_mode:
            assert self.settings.app_token is not None
            app_token = self.settings.app_token.get_secret_value()
            try:  # ask for the first websocket URL here, so a bad app token fails at start-up
                opened = await self.client.apps_connections_open(app_token=app_token)
            except SlackApiError as exc:
                raise ConfigError(f"SLACK_APP_TOKEN was refused by Slack ({_api_error(exc)})") from None
            self._socket = AsyncSocketModeHandler(self.app, app_token=app_token, web_client=self.client)
            self._socket.client.wss_uri = opened["url"]
            await self._socket.connect_async()
            log.info("slack: connected in Socket Mode")
        else:
            path = self.settings.http_path
            self._runner = web.AppRunner(self.app.web_app(path=path, port=self.settings.http_port),
                                         handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port)
            await site.start()
            log.info("slack: listening for events on http://%s:%s%s", self.settings.http_host,
                     self.http_port, path)
        self._repairer = asyncio.create_task(
            keep_repairing(PLATFORM, self.repair, self.service.repair_interval_s), name="slack repairs")

    async def repair(self) -> int:
        """Finish what a process that died left on Slack: a reply stored in full but shown with the
        still-writing mark is edited to the full reply (the rest posted); a turn lost mid-way gets its
        mark removed and a notice in its thread. Returns how many turns were repaired."""
        done = 0
        for repair in await self.service.repairs(PLATFORM):
            channel, _, thread = repair.turn.thread.thread_id.partition(":")
            thread_ts = None if thread == "dm" else thread
            try:
                await self._repair_turn(channel, thread_ts, repair)
            except SlackApiError as exc:
                log.warning("slack: could not repair turn %s in %s (%s)", repair.turn.id, channel, _api_error(exc))
                continue
            await self.service.repaired(repair)
            done += 1
        return done

    async def _repair_turn(self, channel: str, thread_ts: str | None, repair: Repair) -> None:
        delivered = list(repair.deliveries)
        if has_unconfirmed(delivered):  # a post whose ts a crash kept from the log: find it by its text
            delivered = confirm_posts(delivered, await self._own_messages(channel, thread_ts, repair.turn.created_at))
        if repair.reply is not None:
            pieces = final_pieces(repair.reply, self.settings.max_message_chars, to_mrkdwn)
            for index, piece in enumerate(pieces):
                if index < len(delivered):
                    if delivered[index].shown != piece:
                        await self.client.chat_update(channel=channel, ts=delivered[index].platform_message_id,
                                                      text=piece, blocks=message_blocks(piece))
                else:
                    await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=piece,
                                                       blocks=message_blocks(piece),
                                                       unfurl_links=False, unfurl_media=False)
            for extra in delivered[len(pieces):]:
                await self.client.chat_update(channel=channel, ts=extra.platform_message_id, text=CONTINUED,
                                              blocks=message_blocks(CONTINUED))
            log.info("slack: repaired turn %s in %s (the reply shown in full)", repair.turn.id, channel)
            return
        for delivery in delivered:  # what was shown stays, without the still-writing mark
            if delivery.shown.endswith(MARK):  # (and without its Stop button)
                kept = delivery.shown.removesuffix(MARK) or "…"
                await self.client.chat_update(channel=channel, ts=delivery.platform_message_id,
                                              text=kept, blocks=message_blocks(kept))
        shown = f":warning: {escape(INTERRUPTED_NOTICE)}"
        blocks = [{"type": "context", "elements": [{"type": "mrkdwn", "text": shown}]}]
        await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=shown, blocks=blocks)
        log.info("slack: told %s that turn %s was interrupted", channel, repair.turn.id)

    async def _own_messages(self, channel: str, thread_ts: str | None, since: float) -> list[tuple[str, str]]:
        """This app's messages in the thread (or DM) from ``since`` on, newest first: ``(ts, text)``.

        Without knowing which messages are this app's (auth.test failed at start), every post would look
        as if it never happened and be made again: ask again, and let a failure put the repair off."""
        if not (self._bot_id or self._bot_user):
            await self._identify()
        oldest = f"{since - 1:.6f}"
        if thread_ts is None:
            found = await self.client.conversations_history(channel=channel, oldest=oldest, limit=POST_SEARCH_LIMIT)
        else:
            found = await self.client.conversations_replies(channel=channel, ts=thread_ts, oldest=oldest,
                                                            limit=POST_SEARCH_LIMIT)
        messages = sorted(found.get("messages") or [], key=lambda m: float(m.get("ts", 0)), reverse=True)
        return [(str(m["ts"]), str(m.get("text", ""))) for m in messages
                if m.get("ts") and self._own(m, self._bot_user)]

    async def stop(self) -> None:
        if self._repairer is not None:
            self._repairer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repairer
            self._repairer = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._files is not None:
            await self._files.close()
            self._files = None

    @property
    def http_port(self) -> int | None:
        if self._runner is None or not self._runner.addresses:
            return None
        return int(self._runner.addresses[0][1])

    async def wait_idle(self) -> None:
        """Wait until no event is being answered (tests bound it with ``asyncio.timeout``)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _check_token(self) -> None:
        try:
            await self._identify()
        except SlackApiError as exc:
            error = _api_error(exc)
            if error in _BAD_TOKEN:
                raise ConfigError(f"SLACK_BOT_TOKEN was refused by Slack ({error})") from None
            log.warning("slack: auth.test failed (%s); starting anyway", error)

    async def _identify(self) -> None:
        """Learn this app's bot id and bot user (auth.test); raises SlackApiError when Slack says no."""
        found = await self.client.auth_test()
        self._bot_id, self._bot_user = found.get("bot_id"), found.get("user_id")

    async def _tracked(self, work: Awaitable[None]) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await work
        finally:
            if task is not None:
                self._tasks.discard(task)

    # --- events ------------------------------------------------------------------------------------
    async def _on_mention(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
        await self._tracked(self._on_event(event, body, context, mentioned=True))

    async def _on_message(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
        await self._tracked(self._on_event(event, body, context, mentioned=False))

    async def _on_event(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any],
                        mentioned: bool) -> None:
        try:
            await self._answer_event(event, body, context, mentioned)
        except Exception:
            log.exception("slack: failed to handle event %s", body.get("event_id"))

    async def _answer_event(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any],
                            mentioned: bool) -> None:
        bot_user = context.get("bot_user_id")
        user = event.get("user")
        if (not user or user == bot_user or event.get("bot_id") or event.get("hidden")
                or event.get("subtype") not in _USER_SUBTYPES):
            return
        channel = str(event.get("channel", ""))
        ts = str(event.get("ts", ""))
        thread_ts: str | None = event.get("thread_ts")
        text = str(event.get("text") or "")
        mentioned = mentioned or bool(bot_user and re.search(f"<@{re.escape(bot_user)}[|>]", text))
        if not channel or not ts or not self._allowed(channel):
            return
        direct = event.get("channel_type") == "im"
        # A mention inside a thread someone else started: adopted if Raven does not know it yet.
        inside = not direct and mentioned and thread_ts is not None and thread_ts != ts
        if direct:
            key = ThreadKey(PLATFORM, f"{channel}:{thread_ts or 'dm'}")
        elif mentioned:
            thread_ts = thread_ts or ts
            key = ThreadKey(PLATFORM, f"{channel}:{thread_ts}")
        elif thread_ts and await self._follows(ThreadKey(PLATFORM, f"{channel}:{thread_ts}")):
            key = ThreadKey(PLATFORM, f"{channel}:{thread_ts}")
        else:
            return
        # Known from this moment: a follow-up sent right after the mention arrives while the mention
        # is still being claimed, and must find its thread.
        self._opening[key] += 1
        try:
            if not await self._claim(body.get("event_id"), channel, ts):
                log.debug("slack: duplicate delivery of %s/%s ignored", channel, ts)
                return
            plain = from_slack(text, bot_user)
            addressed = mentioned or direct
            self._recent[(channel, user)] = (key, thread_ts)
            command = self.service.command(plain, addressed=addressed)
            if command is not None and command.name == "fork":  # the core cannot open a Slack thread
                await self._fork(key, channel, thread_ts, user)
                return
            history = None
            if inside and thread_ts is not None and not await self.service.knows_thread(key):
                history = self._history(channel, thread_ts, ts, bot_user)
            files = await self._attachments(event.get("files"))
            said = await self._event(key, user, plain, channel, message_id=ts, addressed=addressed, attachments=files)
            await self._reply(said, channel, thread_ts, history=history)
        finally:
            self._opening[key] -= 1
            if self._opening[key] <= 0:
                del self._opening[key]

    # --- what a message brings: a thread's earlier messages, files --------------------------------
    def _history(self, channel: str, thread_ts: str, before_ts: str,
                 bot_user: str | None) -> History:
        """The core calls this once, when it adopts the thread (see ``ChatService.reply``)."""
        return lambda: self._earlier(channel, thread_ts, before_ts, bot_user)

    async def _earlier(self, channel: str, thread_ts: str, before_ts: str,
                       bot_user: str | None) -> list[EarlierMessage]:
        """The thread's messages before ``before_ts`` (the mention), oldest first: its first message
        and the latest ``RAVEN_ADOPT_MAX_MESSAGES`` - 1 (what the core keeps), read with
        ``conversations.replies`` (only what the bot may read; at most ``ADOPT_MAX_PAGES`` pages)."""
        keep = self.service.settings.adopt_max_messages
        if keep <= 0:
            return []
        first: dict[str, Any] | None = None
        latest: deque[dict[str, Any]] = deque(maxlen=keep - 1)
        cursor: str | None = None
        for _ in range(ADOPT_MAX_PAGES):
            page = await self.client.conversations_replies(channel=channel, ts=thread_ts, limit=ADOPT_PAGE,
                                                           latest=before_ts, inclusive=False, cursor=cursor)
            for message in page.get("messages") or []:
                if float(message.get("ts") or 0) >= float(before_ts):
                    continue  # the mention itself, and anything after it
                if first is None:
                    first = message
                else:
                    latest.append(message)
            cursor = (page.get("response_metadata") or {}).get("next_cursor") or None
            if not page.get("has_more") or cursor is None:
                break
        chosen = ([first] if first is not None else []) + list(latest)
        earlier = await self._as_earlier(chosen, bot_user)
        log.info("slack: read %d earlier message(s) of %s:%s to adopt it", len(earlier), channel, thread_ts)
        return earlier

    def _own(self, message: Mapping[str, Any], bot_user: str | None) -> bool:
        return bool((bot_user and message.get("user") == bot_user)
                    or (self._bot_id and message.get("bot_id") == self._bot_id))

    async def _look_up_names(self, users: set[str]) -> None:
        """Wait (briefly) for the names of the people in an adopted thread: they are stored with it."""
        unknown = [user for user in users if user not in self._names][:50]
        if unknown:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(asyncio.shield(self._lookup(u)) for u in unknown)),
                                       NAME_LOOKUP_S)

    async def _attachments(self, files: Any) -> tuple[Attachment, ...]:
        """Slack's ``files`` of a message as the core's attachments: the bytes of the ones the core
        will read (``wanted``: a text-like name, within the size limit), the rest by name and size."""
        if not isinstance(files, list):
            return ()
        settings = self.service.settings
        found: list[Attachment] = []
        for index, file in enumerate(files):
            if not isinstance(file, dict) or file.get("mode") == "tombstone":
                continue  # deleted meanwhile
            name = str(file.get("name") or file.get("title") or "file")
            size = int(file.get("size") or 0)
            content = None
            if index < settings.attachment_max_files and wanted(name, size, settings.attachment_max_bytes):
                content = await self._download(file, settings.attachment_max_bytes)
            found.append(Attachment(name, max(size, len(content or b"")), content))
        return tuple(found)

    def _may_send_token(self, url: str) -> bool:
        """Only Slack's file host (or the host of ``SLACK_API_URL``: a proxy, the local stand-in)."""
        target = urlsplit(url)
        api = urlsplit(self.settings.api_url)
        if target.scheme == "https" and target.hostname == FILES_HOST:
            return True
        return (target.scheme, target.hostname, target.port) == (api.scheme, api.hostname, api.port)

    async def _download(self, file: Mapping[str, Any], max_bytes: int) -> bytes | None:
        """A file's bytes (at most ``max_bytes`` + 1: more means too big), or None if Slack would not
        give them (a missing ``files:read`` scope shows as Slack's sign-in page)."""
        url = str(file.get("url_private_download") or file.get("url_private") or "")
        if not url or not self._may_send_token(url):
            log.warning("slack: not fetching file %s from an unexpected address", file.get("id"))
            return None
        if self._files is None:
            self._files = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FILE_TIMEOUT_S))
        assert self.settings.bot_token is not None
        headers = {"Authorization": f"Bearer {self.settings.bot_token.get_secret_value()}"}
        try:
            async with self._files.get(url, headers=headers, allow_redirects=False) as response:
                html = response.content_type == "text/html" and not str(file.get("name", "")).endswith(".html")
                if response.status != 200 or html:
                    log.warning("slack: file %s answered %s%s", file.get("id"), response.status,
                                " (a sign-in page: is the files:read scope granted?)" if html else "")
                    return None
                content = b""
                async for chunk in response.content.iter_chunked(65536):
                    content += chunk
                    if len(content) > max_bytes:
                        break
                return content[:max_bytes + 1]
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("slack: could not fetch file %s (%s)", file.get("id"), type(exc).__name__)
            return None

    async def _follows(self, key: ThreadKey) -> bool:
        """A thread Raven talks in: answered before, or being opened by a mention right now."""
        return key in self._opening or await self.service.knows_thread(key)

    async def _claim(self, event_id: str | None, channel: str, ts: str) -> bool:
        """Claim an event when its processing starts: first on its id (Slack's retries), then on the
        message (one message delivered as ``app_mention`` and as ``message``)."""
        if event_id and not await self.service.claim_event(f"slack:event:{event_id}"):
            return False
        return await self.service.claim_event(f"slack:message:{channel}:{ts}")

    def _allowed(self, channel: str) -> bool:
        allowed = self.settings.allowed_channels
        return not allowed or channel in allowed

    async def _event(self, key: ThreadKey, user: str, text: str, channel: str, *, fallback: str | None = None,
                     **extra: Any) -> Event:
        """The core's event for ``user`` writing ``text`` in ``channel``: the room its limits count in
        (a direct message, ``D…``, has none, as on Discord), and whether an admin role exempts them."""
        admin = await self._is_admin(user)  # first: its lookup brings the name as well
        name = await self._user_name(user, fallback=fallback)
        room = None if channel.startswith("D") else channel
        return Event(key, user, name, text, channel=room, admin=admin, **extra)

    async def _is_admin(self, user: str) -> bool:
        """SLACK_ADMINS_EXEMPT: a workspace admin or owner (users.info) is exempt from the limits. The
        one lookup a message waits for, briefly, so that a limit does not refuse an admin; a lookup
        that fails counts as "not an admin" (the limits, if any, then apply)."""
        if not self.settings.admins_exempt or not self.service.limits_apply:
            return False  # nothing to be exempt from: no message waits for the lookup
        if user not in self._admins:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lookup(user)), ADMIN_LOOKUP_S)
        return self._admins.get(user, False)

    async def _user_name(self, user: str, fallback: str | None = None) -> str:
        """The user's display name (``users:read``) if known; otherwise the id (or ``fallback``) now,
        and the name is looked up in the background for next time. A lookup never holds a reply up
        (``users.info`` is rate-limited) and its failure never loses a message."""
        known = self._names.get(user)
        if known is not None:
            return known
        self._lookup(user)
        return fallback or user

    def _lookup(self, user: str) -> asyncio.Task[None]:
        """The user's users.info call: the one under way if there is one (two messages at once from
        someone new make one call, not two: the method is rate-limited), else a new one."""
        task = self._lookups.get(user)
        if task is None:
            task = self._lookups[user] = asyncio.create_task(self._look_up_name(user), name=f"slack users.info {user}")
            self._tasks.add(task)

            def finished(done: asyncio.Task[None]) -> None:
                self._tasks.discard(done)
                if self._lookups.get(user) is done:
                    del self._lookups[user]

            task.add_done_callback(finished)
        return task

    async def _look_up_name(self, user: str) -> None:
        try:
            found = (await self.client.users_info(user=user)).get("user") or {}
            profile = found.get("profile") or {}
            name = profile.get("display_name") or found.get("real_name") or found.get("name")
            if name:
                self._names[user] = str(name)
            if found.get("id"):
                self._admins[user] = bool(found.get("is_admin") or found.get("is_owner"))
        except Exception as exc:  # SlackApiError, a connection error …: the id stays the name
            log.debug("slack: users.info for %s failed (%s)", user, exc)

    # --- /advisor ----------------------------------------------------------------------------------
    def _persona_list(self) -> str:
        lines = ["Personas (use `/advisor <name> [question]`, or `@Raven advisor <name>` in a thread):"]
        for persona in self.service.personas():
            line = f"• `{persona.name}` — *{escape(persona.display_name)}*"
            if persona.description:
                line += f": {escape(persona.description)}"
            lines.append(line)
        return "\n".join(lines)

    def _advisor_answer(self, command: dict[str, Any]) -> str | None:
        """The ephemeral answer when ``/advisor`` does not start a conversation; None when it does."""
        if not self._allowed(str(command.get("channel_id", ""))):
            return "Raven is not enabled in this channel."
        name, _ = split_advisor(from_slack(str(command.get("text") or "")))
        if not name:
            return self._persona_list()
        try:
            self.service.persona(name)
        except PersonaError:
            return f"There is no persona `{escape(name[:40])}`.\n" + self._persona_list()
        return None

    async def _on_help(self, ack: Callable[..., Awaitable[Any]], command: dict[str, Any]) -> None:
        """``/help``: the commands, seen by the user only (answered in the ack, well within 3 s)."""
        if not self._allowed(str(command.get("channel_id", ""))):
            await ack(text="Raven is not enabled in this channel.", response_type="ephemeral")
            return
        await ack(text=to_mrkdwn(HELP_TEXT), response_type="ephemeral")

    async def _ack_advisor(self, ack: Callable[..., Awaitable[Any]], command: dict[str, Any]) -> None:
        answer = self._advisor_answer(command)
        if answer is None:
            await ack()
        else:
            await ack(text=answer, response_type="ephemeral")  # seen by the user only

    async def _run_advisor(self, command: dict[str, Any], respond: Callable[..., Awaitable[Any]]) -> None:
        await self._tracked(self._advisor(command, respond))

    async def _advisor(self, command: dict[str, Any], respond: Callable[..., Awaitable[Any]]) -> None:
        if self._advisor_answer(command) is not None:
            return  # already answered in the ack
        channel = str(command["channel_id"])
        user = str(command["user_id"])
        name, question = split_advisor(from_slack(str(command.get("text") or "")))
        try:
            trigger = command.get("trigger_id")
            if trigger and not await self.service.claim_event(f"slack:command:{trigger}"):
                return
            persona = self.service.persona(name)
            title = f"*{escape(persona.display_name)}*"
            root_text = (f"<@{user}> asked {title}: {escape(question)}" if question
                         else f"<@{user}> started a conversation with {title}. Reply in this thread.")
            try:
                root = await self.client.chat_postMessage(channel=channel, text=root_text,
                                                          unfurl_links=False, unfurl_media=False)
            except SlackApiError as exc:
                error = _api_error(exc)
                log.warning("slack: cannot start /advisor in %s (%s)", channel, error)
                hint = " Invite me with `/invite @Raven` and try again." if error == "not_in_channel" else ""
                await respond(text=f"I can't post in this conversation ({error}).{hint}",
                              response_type="ephemeral")
                return
            thread_ts = str(root["ts"])
            key = ThreadKey(PLATFORM, f"{channel}:{thread_ts}")
            text = f"/advisor {name} {question}".strip()
            said = await self._event(key, user, text, channel, fallback=command.get("user_name"))
            await self._reply(said, channel, thread_ts)
        except Exception:
            log.exception("slack: /advisor failed in %s", channel)

    # --- buttons (Block Kit actions) -----------------------------------------------------------------
    async def _ack_action(self, ack: Callable[..., Awaitable[Any]]) -> None:
        await ack()  # at once: Slack wants it within 3 s; the work runs after it (lazy listener)

    async def _run_action(self, body: dict[str, Any], respond: Callable[..., Awaitable[Any]]) -> None:
        await self._tracked(self._action(body, respond))

    async def _action(self, body: dict[str, Any], respond: Callable[..., Awaitable[Any]]) -> None:
        """A click on a reply's button (or on the ``/forget`` prompt's): the same core text as typed."""
        try:
            action = (body.get("actions") or [{}])[0]
            action_id = str(action.get("action_id") or "")
            value = str(action.get("value") or "")
            clicker = body.get("user") or {}
            user = str(clicker.get("id") or "")
            container = body.get("container") or {}
            channel = str((body.get("channel") or {}).get("id") or container.get("channel_id") or "")
            clicked = str(container.get("message_ts") or "")
            if not user or not channel:
                return
            if not self._allowed(channel):
                await respond(text="Raven is not enabled in this channel.", response_type="ephemeral",
                              replace_original=False)
                return
            named_channel, _, thread = value.partition(":")
            if named_channel != channel or not thread:  # a button names its own conversation's thread
                log.warning("slack: ignored a %s click naming another conversation", action_id)
                return
            trigger = body.get("trigger_id") or action.get("action_ts")
            if trigger and not await self.service.claim_event(f"slack:action:{trigger}"):
                return  # delivered twice
            key = ThreadKey(PLATFORM, value)
            thread_ts = None if thread == "dm" else thread
            self._recent[(channel, user)] = (key, thread_ts)
            if action_id == STOP:
                if not self.service.stop(key):
                    await self._notice(channel, thread_ts, user, NOTHING_WRITTEN)
                return
            # Only what this process posted: the log's newest message may be a command's (/help keeps
            # the buttons where they are), so after a restart a click acts on the thread's last reply.
            last = self._last_reply.get(key)
            if action_id != FORGET and last is not None and clicked and last[1].ts != clicked:
                await self._notice(channel, thread_ts, user, STALE_BUTTONS)
                return
            if action_id == FORGET and container.get("is_ephemeral"):
                await respond(delete_original=True)  # the private prompt has been answered
            text = {RETRY: "/retry", CONTINUE: "/continue", FORGET: f"/forget {FORGET_CONFIRMATION}"}[action_id]
            said = await self._event(key, user, text, channel, fallback=clicker.get("name"), addressed=True)
            await self._reply(said, channel, thread_ts)
        except Exception:
            log.exception("slack: a button click failed")

    # --- /retry, /continue, /stop, /fork, /forget ------------------------------------------------------
    async def _target(self, command: dict[str, Any]) -> tuple[ThreadKey, str | None] | str:
        """The thread a slash command acts on (the user's last one in that channel), or why none: as
        this process saw it (a ``/fork`` moves it to the fork), else the thread of the user's newest
        message there in the log (written before a restart, or to another process)."""
        channel, user = str(command.get("channel_id", "")), str(command.get("user_id", ""))
        if not self._allowed(channel):
            return "Raven is not enabled in this channel."
        found = self._recent.get((channel, user))
        if found is None and channel and user:
            key = await self.service.last_thread_of(PLATFORM, user, f"{channel}:")
            if key is not None:
                thread = key.thread_id.partition(":")[2]
                found = self._recent[(channel, user)] = (key, None if thread == "dm" else thread)
        if found is None:
            return NO_THREAD.format(command=command.get("command", "this command"))
        return found

    async def _label(self, key: ThreadKey) -> str:
        info = await self.service.thread(key)
        return f"your last Raven thread here (“{escape(info.title)}”)" if info and info.title else \
            "your last Raven thread here"

    async def _on_stop_command(self, ack: Callable[..., Awaitable[Any]], command: dict[str, Any]) -> None:
        """``/stop``: answered in the ack (stopping is immediate)."""
        target = await self._target(command)
        if isinstance(target, str):
            await ack(text=target, response_type="ephemeral")
            return
        stopped = self.service.stop(target[0])
        said = f"Stopped the reply in {await self._label(target[0])}." if stopped else NOTHING_WRITTEN
        await ack(text=said, response_type="ephemeral")

    async def _ack_thread_command(self, ack: Callable[..., Awaitable[Any]], command: dict[str, Any]) -> None:
        target = await self._target(command)
        if isinstance(target, str):
            await ack(text=target, response_type="ephemeral")
            return
        key = target[0]
        label = await self._label(key)
        name = str(command.get("command", ""))
        confirmed = from_slack(str(command.get("text") or "")).strip().lower() == FORGET_CONFIRMATION
        if name == "/forget" and not confirmed:
            question = f"{FORGET_ASK.split('. ')[0]}: {label}. Or send `/forget {FORGET_CONFIRMATION}`."
            await ack(text=question, blocks=forget_prompt(question, key.thread_id), response_type="ephemeral")
            return
        doing = {"/retry": "Writing a new last reply in", "/continue": "Continuing the last reply in",
                 "/fork": "Forking", "/forget": "Forgetting"}[name]
        await ack(text=f"{doing} {label}.", response_type="ephemeral")

    async def _run_thread_command(self, command: dict[str, Any]) -> None:
        await self._tracked(self._thread_command(command))

    async def _thread_command(self, command: dict[str, Any]) -> None:
        target = await self._target(command)
        name = str(command.get("command", ""))
        confirmed = from_slack(str(command.get("text") or "")).strip().lower() == FORGET_CONFIRMATION
        if isinstance(target, str) or (name == "/forget" and not confirmed):
            return  # answered in the ack
        key, thread_ts = target
        channel, user = str(command["channel_id"]), str(command["user_id"])
        try:
            trigger = command.get("trigger_id")
            if trigger and not await self.service.claim_event(f"slack:command:{trigger}"):
                return
            if name == "/fork":
                await self._fork(key, channel, thread_ts, user)
                return
            text = f"/forget {FORGET_CONFIRMATION}" if name == "/forget" else name
            said = await self._event(key, user, text, channel, fallback=command.get("user_name"), addressed=True)
            await self._reply(said, channel, thread_ts)
        except Exception:
            log.exception("slack: %s failed in %s", name, channel)

    # --- /summary: the channel's recent messages, for the user alone ------------------------------------
    async def _ack_summary(self, ack: Callable[..., Awaitable[Any]], command: dict[str, Any]) -> None:
        if not self._allowed(str(command.get("channel_id", ""))):
            await ack(text="Raven is not enabled in this channel.", response_type="ephemeral")
            return
        await ack(text="Summarizing this channel's recent messages…", response_type="ephemeral")

    async def _run_summary(self, command: dict[str, Any], respond: Callable[..., Awaitable[Any]],
                           context: dict[str, Any]) -> None:
        await self._tracked(self._summary(command, respond, context.get("bot_user_id")))

    async def _summary(self, command: dict[str, Any], respond: Callable[..., Awaitable[Any]],
                       bot_user: str | None) -> None:
        """``/summary``: the channel's recent messages (``conversations.history``, read for this and not
        kept), summarized from a fresh state; only the user sees it. In a thread, ``@Raven summary``
        summarizes the thread from its own state."""
        channel, user = str(command.get("channel_id", "")), str(command.get("user_id", ""))
        if not self._allowed(channel):
            return
        try:
            trigger = command.get("trigger_id")
            if trigger and not await self.service.claim_event(f"slack:command:{trigger}"):
                return
            asked = await self._event(ThreadKey(PLATFORM, f"{channel}:channel"), user, "/summary", channel,
                                      fallback=command.get("user_name"), private=True)  # ephemeral
            turn = self.service.reply(asked, history=lambda: self._channel_history(channel, bot_user))
            said = await turn.text()
            outcome = await turn.outcome()
            answered = isinstance(outcome, CutOff) or (bool(said) and not isinstance(outcome, NOTICES))
            text = said if answered else outcome.message
            await respond(text=to_mrkdwn(text), response_type="ephemeral", replace_original=True)
            if answered:
                await self.service.delivered(turn)
        except Exception:
            log.exception("slack: /summary failed in %s", channel)

    async def _channel_history(self, channel: str, bot_user: str | None) -> list[EarlierMessage]:
        """The channel's newest top-level messages, oldest first (``channels:history``)."""
        keep = self.service.settings.adopt_max_messages
        if keep <= 0:
            return []
        page = await self.client.conversations_history(channel=channel, limit=min(keep, ADOPT_PAGE))
        return await self._as_earlier(list(reversed(page.get("messages") or [])), bot_user)

    async def _as_earlier(self, messages: list[dict[str, Any]], bot_user: str | None) -> list[EarlierMessage]:
        """Slack messages (oldest first) as the core reads them: people's under their names (looked up
        first), Raven's own and other apps' marked as a bot's; shared files named."""
        readable = [m for m in messages if m.get("subtype") in _USER_SUBTYPES | {"bot_message"}]
        await self._look_up_names({str(m["user"]) for m in readable if m.get("user") and not self._own(m, bot_user)})
        earlier: list[EarlierMessage] = []
        for message in readable:
            text = from_slack(str(message.get("text") or ""), bot_user)
            names = [str(f.get("name") or "a file") for f in message.get("files") or []]
            if names:
                text = (text + "\n" if text else "") + f"[shared: {', '.join(names)}]"
            if not text.strip():
                continue
            if self._own(message, bot_user):
                earlier.append(EarlierMessage("Raven", text, from_bot=True))
            elif message.get("user") and not message.get("bot_id"):
                earlier.append(EarlierMessage(self._names.get(str(message["user"]), str(message["user"])), text))
            else:  # another app's message
                profile = message.get("bot_profile") or {}
                earlier.append(EarlierMessage(str(message.get("username") or profile.get("name") or "a bot"), text,
                                              from_bot=True))
        return earlier

    # --- /fork ----------------------------------------------------------------------------------------
    async def _fork(self, source: ThreadKey, channel: str, thread_ts: str | None, user: str) -> None:
        """A new top-level message whose thread starts where ``source`` is now (a copy of its log and
        state: ``service.fork``); each thread links to the other."""
        if not await self.service.knows_thread(source):
            await self._notice(channel, thread_ts, user, "There is nothing to fork in this thread yet.")
            return
        old_link = await self._permalink(channel, thread_ts)
        origin = f"<{old_link}|this thread>" if old_link else "a thread"
        try:
            root = await self.client.chat_postMessage(
                channel=channel, unfurl_links=False, unfurl_media=False,
                text=f"<@{user}> forked {origin}: this thread starts where that one was. Reply here to go on.")
        except SlackApiError as exc:
            log.warning("slack: cannot fork in %s (%s)", channel, _api_error(exc))
            await self._notice(channel, thread_ts, user, f"I can't post in this conversation ({_api_error(exc)}).")
            return
        new_ts = str(root["ts"])
        target = ThreadKey(PLATFORM, f"{channel}:{new_ts}")
        try:
            await self.service.fork(source, target)
        except RavenError as exc:
            log.error("slack: fork of %s failed (%s)", source, exc)
            await self.client.chat_update(channel=channel, ts=new_ts, text="(This fork failed.)")
            await self._notice(channel, thread_ts, user, "The fork failed; this thread is unchanged.")
            return
        self._recent[(channel, user)] = (target, new_ts)
        new_link = await self._permalink(channel, new_ts)
        where = f"<{new_link}|a new thread>" if new_link else "a new thread"
        await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, unfurl_links=False,
                                           unfurl_media=False,
                                           text=f"Forked into {where}, which goes on from here; this one is unchanged.")
        log.info("slack: forked %s into %s", source, target)

    async def _permalink(self, channel: str, ts: str | None) -> str | None:
        if ts is None:
            return None
        try:
            found = await self.client.chat_getPermalink(channel=channel, message_ts=ts)
            return str(found["permalink"])
        except (SlackApiError, KeyError) as exc:
            log.warning("slack: no permalink for %s/%s (%s)", channel, ts, exc)
            return None

    # --- replies -----------------------------------------------------------------------------------
    async def _reply(self, event: Event, channel: str, thread_ts: str | None,
                     history: History | None = None) -> None:
        """Stream the core's reply into the conversation, then show how the turn ended: a cut-off
        note closes the reply; a notice (busy, refused, failed) is shown to the user only. Errors are
        logged and, where the conversation can still be reached, the user sees a short notice."""
        started = self.clock()
        command = self.service.command(event.text, addressed=event.addressed)
        reply = _Reply(event.thread, _buttons_for(command),
                       retires=command is None or command.name not in _KEEPS_BUTTONS)
        turn = (self.service.reply(event, confirm=True) if history is None
                else self.service.reply(event, confirm=True, history=history))

        async def shown(position: int, posted: _Posted, _piece: str) -> None:
            for sub, message in enumerate(posted.messages):  # a piece Slack found too long is several
                await self.service.record_delivery(turn, position * SUB_MESSAGES + sub, message.ts, message.text)

        async def posting(position: int, piece: str) -> None:  # the first message of it, as it will be sent
            first = split_message(piece, self._max_chars)[0] if self._max_chars and len(piece) > self._max_chars \
                else piece
            await self.service.posting(turn, position * SUB_MESSAGES, first)

        renderer = _ReplyRenderer(
            post=lambda piece: self._post(channel, thread_ts, piece, reply),
            edit=self._update,
            limit=self.settings.max_message_chars,
            min_interval_s=self.settings.update_interval_s,
            transform=to_mrkdwn,
            shown=shown,
            posting=posting,
            reply=reply,
        )
        try:
            text, notice = await present(renderer, turn)
            await self._settle_buttons(reply, isinstance(await turn.outcome(), Answered | CutOff))
            await self.service.delivered(turn)
            if notice is not None:
                await self._notice(channel, thread_ts, event.user_id, notice)
            log.info("slack: answered %s in %.1fs (%d chars, %d messages)", event.thread,
                     self.clock() - started, len(text), len(renderer.messages))
        except SlackApiError as exc:
            error = _api_error(exc)  # an expected platform failure: its code says it all
            log.error("slack: %s failed (%s) while answering in %s; the message stays in the log",
                      _api_method(exc), error, event.thread)
            await self.service.undelivered(turn, f"slack {error}")
            if error not in _UNREACHABLE:
                await self._notice(channel, thread_ts, event.user_id, ERROR_NOTICE)
        except Exception:
            log.exception("slack: failed to answer in %s", event.thread)
            await self.service.undelivered(turn, "the adapter failed")
            await self._notice(channel, thread_ts, event.user_id, ERROR_NOTICE)
        except BaseException:  # cancelled: stopping
            await self.service.undelivered(turn, "stopped while delivering")
            raise

    async def _settle_buttons(self, reply: _Reply, answered: bool) -> None:
        """After the final text: the reply's last message alone shows its buttons (Retry and Continue
        for an answer), and it becomes the thread's last reply. Usually already so (the final edit
        sets them); a failure here is logged, the reply itself is delivered."""
        messages = reply.messages()
        if not messages:
            return
        channel = reply.pieces[0].channel
        want: Controls | None = reply.kind if answered or reply.kind == "forget" else None
        *older, last = messages
        try:
            for message in older:
                if message.controls is not None:
                    await self._edit(channel, message, message.text)
            if last.controls != want:
                await self._edit(channel, last, last.text, want, reply.key.thread_id)
        except SlackApiError as exc:
            log.warning("slack: could not set the buttons of a reply in %s (%s)", reply.key, _api_error(exc))
        if last.controls is not None:
            self._last_reply[reply.key] = (channel, last)
        elif reply.retires:  # the older reply's buttons are off, and this one has none
            self._last_reply[reply.key] = None

    async def _last_reply_of(self, key: ThreadKey) -> tuple[str, _Message] | None:
        """The thread's last reply message with its buttons: as this process left it, or, for a thread
        last answered before a restart, the newest message the log says was posted in it (taken to
        show buttons: taking them off a message that has none, a command's, changes nothing)."""
        if key in self._last_reply:
            return self._last_reply[key]
        delivery = await self.service.last_delivery(key)
        found = None
        if delivery is not None:
            channel = key.thread_id.partition(":")[0]
            found = channel, _Message(delivery.platform_message_id, delivery.shown, 0.0, controls="done")
        self._last_reply[key] = found
        return found

    async def _retire(self, key: ThreadKey) -> None:
        """Take the buttons off the thread's previous reply (a newer one is coming)."""
        last = await self._last_reply_of(key)
        self._last_reply.pop(key, None)
        if last is None:
            return
        channel, message = last
        try:
            await self._edit(channel, message, message.text)
        except SlackApiError as exc:
            log.warning("slack: could not take the buttons off an older reply in %s (%s)", key, _api_error(exc))

    async def _notice(self, channel: str, thread_ts: str | None, user: str, text: str) -> None:
        """A notice, never mistaken for an answer: a context block (small grey text) that only
        ``user`` sees; posted for everyone in the thread if Slack refuses the ephemeral message."""
        shown = f":warning: {escape(text)}"
        blocks = [{"type": "context", "elements": [{"type": "mrkdwn", "text": shown[:3000]}]}]
        try:
            await self.client.chat_postEphemeral(channel=channel, thread_ts=thread_ts, user=user,
                                                 text=shown, blocks=blocks)
            return
        except SlackApiError as exc:
            log.warning("slack: could not post an ephemeral notice in %s (%s)", channel, _api_error(exc))
        try:
            await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=shown, blocks=blocks)
        except SlackApiError as exc:
            log.warning("slack: could not post the notice in %s (%s)", channel, _api_error(exc))

    async def _post(self, channel: str, thread_ts: str | None, piece: str, reply: _Reply | None = None) -> _Posted:
        posted = _Posted(channel, thread_ts, [], reply)
        if reply is not None:
            if not reply.pieces and reply.retires:
                await self._retire(reply.key)
            reply.pieces.append(posted)
        await self._update(posted, piece)
        return posted

    async def _update(self, posted: _Posted, piece: str) -> None:
        """Show ``piece``: edit the handle's messages (each at most once per
        ``SLACK_UPDATE_INTERVAL_S``) and post new ones in the thread for what does not fit. The last
        message gets the reply's buttons of the moment (``_Reply.controls``)."""
        want = posted.reply.controls(posted, piece) if posted.reply is not None else None
        thread_id = posted.reply.key.thread_id if posted.reply is not None else ""
        while True:
            parts = [piece]
            if self._max_chars is not None and len(piece) > self._max_chars:
                parts = split_message(piece, self._max_chars)
            try:
                for index, part in enumerate(parts):
                    controls = want if index == len(parts) - 1 else None
                    if index < len(posted.messages):
                        await self._edit(posted.channel, posted.messages[index], part, controls, thread_id)
                    else:
                        response = await self.client.chat_postMessage(
                            channel=posted.channel, thread_ts=posted.thread_ts, text=part,
                            blocks=message_blocks(part, controls, thread_id),
                            unfurl_links=False, unfurl_media=False)
                        posted.messages.append(_Message(str(response["ts"]), part, self.clock(), controls))
                return
            except SlackApiError as exc:
                refused = max(len(part), 1)
                if _api_error(exc) != "msg_too_long" or refused <= _MIN_CHARS:
                    raise
                self._max_chars = max(_MIN_CHARS, refused * 3 // 4)
                log.warning("slack: a %d-character message was too long; now splitting at %d characters",
                            refused, self._max_chars)

    async def _edit(self, channel: str, message: _Message, text: str, controls: Controls | None = None,
                    thread_id: str = "") -> None:
        if text == message.text and controls == message.controls:
            return
        wait = message.last_write + self.settings.update_interval_s - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        await self.client.chat_update(channel=channel, ts=message.ts, text=text,
                                      blocks=message_blocks(text, controls, thread_id))
        message.text = text
        message.controls = controls
        message.last_write = self.clock()

    async def _on_bolt_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error("slack: bolt error for %s: %r", body.get("event_id") or body.get("command"), error)
