"""Slack adapter: slack-bolt (async) in Socket Mode or HTTP mode, translating Slack events into core
``Event``s and the core's streamed reply into ``chat.postMessage``/``chat.update`` calls.

What reaches the core:

- a mention in a channel (``app_mention``), answered in a thread on that message;
- any later message in a thread the bot has answered in (``service.knows_thread``), without a mention;
- direct messages (``channel_type == "im"``): top-level DMs are one conversation per DM, replies in a
  DM thread are that thread's conversation;
- ``/advisor <persona> [question]``: acknowledged at once, then a root message naming the persona is
  posted in the channel and the conversation continues in its thread.

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
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cachetools import TTLCache
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from adapters.retry import RetryPolicy
from adapters.settings import SlackSettings
from adapters.slack_mrkdwn import escape, from_slack, to_mrkdwn
from adapters.streaming import CONTINUED, MARK, StreamRenderer, final_pieces, present
from adapters.text_split import split_message
from bot.core.commands import HELP_TEXT
from bot.core.service import INTERRUPTED_NOTICE
from bot.errors import ConfigError, PersonaError
from bot.events import Event, ThreadKey

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
NAME_CACHE_SIZE = 4096  # display names kept (users.info is rate-limited; people rename themselves)
NAME_CACHE_TTL_S = 3600


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


@dataclass
class _Posted:
    """The stream renderer's handle for one piece of a reply: normally one Slack message; more when
    Slack refused the piece as too long (``msg_too_long``) and it continues in new messages."""

    channel: str
    thread_ts: str | None
    messages: list[_Message]


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
        log.info("slack: %s answered %s; retrying in %.1f s", request.url.rsplit("/", 1)[-1],
                 response.status_code if response is not None else type(error).__name__, wait)
        state.next_attempt_requested = True
        await asyncio.sleep(wait)
        state.increment_current_attempt()



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
        self.client = AsyncWebClient(
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
        self.app.error(self._on_bolt_error)
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._names: TTLCache[str, str] = TTLCache(maxsize=NAME_CACHE_SIZE, ttl=NAME_CACHE_TTL_S)
        self._looking_up: set[str] = set()
        self._opening: Counter[ThreadKey] = Counter()
        self._repairer: asyncio.Task[None] | None = None  # threads a mention is opening (see _answer_event)
        self._max_chars: int | None = None  # learned from msg_too_long: Slack's real limit is lower
        self._tasks: set[asyncio.Task[Any]] = set()

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
        self._repairer = asyncio.create_task(self._keep_repairing(), name="slack repairs")

    async def _keep_repairing(self) -> None:
        """Make the platform match the log after a crash: at start, then as dead processes' leases end."""
        while True:
            try:
                await self.repair()
            except Exception:
                log.exception("slack: repairs failed; trying again later")
            await asyncio.sleep(self.service.repair_interval_s)

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
        delivered = [d for d in repair.deliveries]
        if repair.reply is not None:
            pieces = final_pieces(repair.reply, self.settings.max_message_chars, to_mrkdwn)
            for index, piece in enumerate(pieces):
                if index < len(delivered):
                    if delivered[index].shown != piece:
                        await self.client.chat_update(channel=channel, ts=delivered[index].platform_message_id,
                                                      text=piece)
                else:
                    await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=piece,
                                                       unfurl_links=False, unfurl_media=False)
            for extra in delivered[len(pieces):]:
                await self.client.chat_update(channel=channel, ts=extra.platform_message_id, text=CONTINUED)
            log.info("slack: repaired turn %s in %s (the reply shown in full)", repair.turn.id, channel)
            return
        for delivery in delivered:  # what was shown stays, without the still-writing mark
            if delivery.shown.endswith(MARK):
                await self.client.chat_update(channel=channel, ts=delivery.platform_message_id,
                                              text=delivery.shown.removesuffix(MARK) or "…")
        shown = f":warning: {escape(INTERRUPTED_NOTICE)}"
        blocks = [{"type": "context", "elements": [{"type": "mrkdwn", "text": shown}]}]
        await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=shown, blocks=blocks)
        log.info("slack: told %s that turn %s was interrupted", channel, repair.turn.id)

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
            await self.client.auth_test()
        except SlackApiError as exc:
            error = _api_error(exc)
            if error in _BAD_TOKEN:
                raise ConfigError(f"SLACK_BOT_TOKEN was refused by Slack ({error})") from None
            log.warning("slack: auth.test failed (%s); starting anyway", error)

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
            name = await self._user_name(user)
            await self._reply(Event(key, user, name, plain, message_id=ts, addressed=mentioned or direct),
                              channel, thread_ts)
        finally:
            self._opening[key] -= 1
            if self._opening[key] <= 0:
                del self._opening[key]

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

    async def _user_name(self, user: str, fallback: str | None = None) -> str:
        """The user's display name (``users:read``) if known; otherwise the id (or ``fallback``) now,
        and the name is looked up in the background for next time. A lookup never holds a reply up
        (``users.info`` is rate-limited) and its failure never loses a message."""
        known = self._names.get(user)
        if known is not None:
            return known
        if user not in self._looking_up:
            self._looking_up.add(user)
            task = asyncio.create_task(self._look_up_name(user), name=f"slack users.info {user}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fallback or user

    async def _look_up_name(self, user: str) -> None:
        try:
            found = (await self.client.users_info(user=user)).get("user") or {}
            profile = found.get("profile") or {}
            name = profile.get("display_name") or found.get("real_name") or found.get("name")
            if name:
                self._names[user] = str(name)
        except Exception as exc:  # SlackApiError, a connection error …: the id stays the name
            log.debug("slack: users.info for %s failed (%s)", user, exc)
        finally:
            self._looking_up.discard(user)

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
            name_shown = await self._user_name(user, fallback=command.get("user_name"))
            text = f"/advisor {name} {question}".strip()
            await self._reply(Event(key, user, name_shown, text), channel, thread_ts)
        except Exception:
            log.exception("slack: /advisor failed in %s", channel)

    # --- replies -----------------------------------------------------------------------------------
    async def _reply(self, event: Event, channel: str, thread_ts: str | None) -> None:
        """Stream the core's reply into the conversation, then show how the turn ended: a cut-off
        note closes the reply; a notice (busy, refused, failed) is shown to the user only. Errors are
        logged and, where the conversation can still be reached, the user sees a short notice."""
        started = self.clock()
        turn = self.service.reply(event, confirm=True)

        async def shown(position: int, posted: _Posted, _piece: str) -> None:
            for sub, message in enumerate(posted.messages):  # a piece Slack found too long is several
                await self.service.record_delivery(turn, position * SUB_MESSAGES + sub, message.ts, message.text)

        renderer: StreamRenderer[_Posted] = StreamRenderer(
            post=lambda piece: self._post(channel, thread_ts, piece),
            edit=self._update,
            limit=self.settings.max_message_chars,
            min_interval_s=self.settings.update_interval_s,
            transform=to_mrkdwn,
            shown=shown,
        )
        try:
            text, notice = await present(renderer, turn)
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

    async def _post(self, channel: str, thread_ts: str | None, piece: str) -> _Posted:
        posted = _Posted(channel, thread_ts, [])
        await self._update(posted, piece)
        return posted

    async def _update(self, posted: _Posted, piece: str) -> None:
        """Show ``piece``: edit the handle's messages (each at most once per
        ``SLACK_UPDATE_INTERVAL_S``) and post new ones in the thread for what does not fit."""
        while True:
            parts = [piece]
            if self._max_chars is not None and len(piece) > self._max_chars:
                parts = split_message(piece, self._max_chars)
            try:
                for index, part in enumerate(parts):
                    if index < len(posted.messages):
                        await self._edit(posted.channel, posted.messages[index], part)
                    else:
                        response = await self.client.chat_postMessage(
                            channel=posted.channel, thread_ts=posted.thread_ts, text=part,
                            unfurl_links=False, unfurl_media=False)
                        posted.messages.append(_Message(str(response["ts"]), part, self.clock()))
                return
            except SlackApiError as exc:
                refused = max(len(part), 1)
                if _api_error(exc) != "msg_too_long" or refused <= _MIN_CHARS:
                    raise
                self._max_chars = max(_MIN_CHARS, refused * 3 // 4)
                log.warning("slack: a %d-character message was too long; now splitting at %d characters",
                            refused, self._max_chars)

    async def _edit(self, channel: str, message: _Message, text: str) -> None:
        if text == message.text:
            return
        wait = message.last_write + self.settings.update_interval_s - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        await self.client.chat_update(channel=channel, ts=message.ts, text=text)
        message.text = text
        message.last_write = self.clock()

    async def _on_bolt_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error("slack: bolt error for %s: %r", body.get("event_id") or body.get("command"), error)
