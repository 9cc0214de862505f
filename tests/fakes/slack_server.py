"""A local fake of Slack's Web API and Socket Mode websocket, for the real slack-bolt to talk to.

One aiohttp server on 127.0.0.1 serves:

- ``GET|POST /api/{method}``: the Web API methods the adapter uses (``auth.test``, ``chat.postMessage``,
  ``chat.update``, ``chat.postEphemeral``, ``chat.getPermalink``, ``conversations.replies``,
  ``users.info``, ``apps.connections.open``). Every call is recorded with its arguments and a
  ``time.monotonic()`` timestamp; messages (with their blocks) are kept so a test can read what a
  channel shows, and people's messages can be added (``say``) for ``conversations.replies`` to serve.
  ``fail(...)`` queues an error answer (``ratelimited`` with a 429 and ``Retry-After``,
  ``not_in_channel``, a 500 ...).
- ``GET /files/{name}``: files shared in Slack (``add_file``), served only with the bot token.
- ``GET /link``: the Socket Mode websocket. It sends ``hello``, then whatever envelopes the test sends
  with ``send_envelope``; the acks the app sends back are recorded.
- ``POST /response/{id}``: a slash command's ``response_url``; posts are recorded.

It also builds signed HTTP requests for bolt's HTTP mode (``signed_headers``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from slack_sdk.signature import SignatureVerifier

from tests.fakes import LocalServer


@dataclass
class ApiCall:
    method: str
    args: dict[str, Any]
    at: float
    token: str | None


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    thread_ts: str | None
    posted_at: float
    writes: list[float] = field(default_factory=list)  # post and every update, monotonic seconds
    blocks: list[dict[str, Any]] | None = None
    user: str | None = None  # a person's message (``say``); None: the bot's

    def buttons(self) -> list[str]:
        """The action ids of the buttons the message shows."""
        return [element["action_id"] for block in self.blocks or [] if block.get("type") == "actions"
                for element in block.get("elements", [])]

    def shown_text(self) -> str:
        """What the message shows: its section blocks' text, or its text without blocks."""
        if not self.blocks:
            return self.text
        return "".join(block["text"]["text"] for block in self.blocks if block.get("type") == "section")


@dataclass(frozen=True)
class Ephemeral:
    """A message only ``user`` sees (``chat.postEphemeral``)."""

    channel: str
    thread_ts: str | None
    user: str
    text: str
    blocks: Any


@dataclass
class _Failure:
    error: str
    status: int
    headers: dict[str, str]
    times: int


def signed_headers(secret: str, body: str, timestamp: int | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, str]:
    """Headers Slack sends with an HTTP-mode request, signed with ``secret``."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    headers: dict[str, str] = {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": str(SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)),
    }
    headers.update(extra or {})
    return headers


class FakeSlack(LocalServer):
    def __init__(self, *, bot_user_id: str = "UBOT", bot_id: str = "BBOT", team_id: str = "T1",
                 users: dict[str, str] | None = None, max_text_chars: int = 40_000,
                 outside_channels: set[str] | None = None) -> None:
        super().__init__()
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.team_id = team_id
        self.users = users or {}
        self.max_text_chars = max_text_chars  # longer texts get msg_too_long
        self.outside_channels = outside_channels or set()  # the bot is not a member: not_in_channel
        self.admins: set[str] = set()  # users.info says is_admin for these
        self.calls: list[ApiCall] = []
        self.messages: dict[tuple[str, str], Message] = {}
        self.ephemerals: list[Ephemeral] = []
        self._drops: dict[str, int] = {}
        self.responses: list[dict[str, Any]] = []  # posts to response_url
        self.acks: dict[str, tuple[float, dict[str, Any]]] = {}
        self.connections = 0
        self._failures: dict[str, list[_Failure]] = {}
        self._holds: dict[str, asyncio.Event] = {}
        self._ts = itertools.count(1)
        self._envelopes = itertools.count(1)
        self._changed = asyncio.Condition()
        self.bot_token = "xoxb-test"  # what ``/files`` accepts
        self.files: dict[str, bytes] = {}
        self.downloads: list[tuple[str, str | None]] = []  # (file name, Authorization header)

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/link", self._link)
        app.router.add_post("/response/{id}", self._response_url)
        app.router.add_get("/files/{name}", self._file)
        await self.serve(app)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self, name: str = "1") -> str:
        return f"http://127.0.0.1:{self.port}/response/{name}"

    # --- test controls -----------------------------------------------------------------------------
    def fail(self, method: str, error: str, *, status: int = 200, headers: dict[str, str] | None = None,
             times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with an error."""
        self._failures.setdefault(method, []).append(_Failure(error, status, headers or {}, times))

    def hold(self, method: str) -> asyncio.Event:
        """Keep every call of ``method`` waiting (recorded, unanswered) until the returned event is set."""
        gate = self._holds[method] = asyncio.Event()
        return gate

    def heal(self) -> None:
        """Forget every failure still queued: the Web API answers normally again."""
        self._failures.clear()
        self._drops.clear()

    def drop(self, method: str, times: int = 1) -> None:
        """Close the connection of the next ``times`` calls of ``method`` without answering."""
        self._drops[method] = self._drops.get(method, 0) + times

    def say(self, channel: str, ts: str, user: str, text: str, thread_ts: str | None = None,
            **extra: Any) -> dict[str, Any]:
        """A person's message in a channel (served by ``conversations.replies``); returns it as the
        event Slack would send."""
        now = time.monotonic()
        self.messages[(channel, ts)] = Message(channel, ts, text, thread_ts, now, [now], user=user)
        event = {"type": "message", "user": user, "text": text, "ts": ts, "channel": channel,
                 "channel_type": "channel", "event_ts": ts, **extra}
        if thread_ts:
            event["thread_ts"] = thread_ts
        return event

    def add_file(self, name: str, content: bytes, *, file_id: str | None = None,
                 mimetype: str = "text/plain", size: int | None = None) -> dict[str, Any]:
        """A file shared in Slack: the file object an event carries, its bytes served at its URL."""
        self.files[name] = content
        url = f"http://127.0.0.1:{self.port}/files/{name}"
        return {"id": file_id or f"F{len(self.files)}", "name": name, "title": name, "mimetype": mimetype,
                "filetype": name.rsplit(".", 1)[-1], "size": len(content) if size is None else size,
                "mode": "hosted", "url_private": url, "url_private_download": url}

    def calls_to(self, method: str) -> list[ApiCall]:
        return [call for call in self.calls if call.method == method]

    def thread(self, channel: str, thread_ts: str) -> list[Message]:
        """The bot's messages in one thread, oldest first."""
        return [m for m in self.messages.values()
                if m.channel == channel and m.thread_ts == thread_ts and m.user is None]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(until(), within)

    async def quiet(self, period: float = 0.5, within: float = 15.0) -> None:
        """Wait until no Web API call has arrived for ``period`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            last = self.calls[-1].at if self.calls else 0.0
            if time.monotonic() - last >= period:
                return
            await asyncio.sleep(period / 5)
        raise TimeoutError("the fake Slack never went quiet")

    # --- Socket Mode -------------------------------------------------------------------------------
    async def wait_connected(self, within: float = 10.0) -> None:
        await self.wait_for(lambda: bool(self._sockets), within)

    async def send_envelope(self, type_: str, payload: dict[str, Any], *, retry_attempt: int | None = None,
                            retry_reason: str | None = None, envelope_id: str | None = None) -> str:
        envelope_id = envelope_id or f"env-{next(self._envelopes)}"
        envelope: dict[str, Any] = {
            "envelope_id": envelope_id, "type": type_, "payload": payload,
            "accepts_response_payload": type_ != "events_api",
        }
        if type_ == "events_api":
            envelope["retry_attempt"] = 0 if retry_attempt is None else retry_attempt
            envelope["retry_reason"] = retry_reason or ""
        await self._sockets[-1].send_str(json.dumps(envelope))
        return envelope_id

    async def wait_ack(self, envelope_id: str, within: float = 5.0) -> tuple[float, dict[str, Any]]:
        await self.wait_for(lambda: envelope_id in self.acks, within)
        return self.acks[envelope_id]

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.connections += 1
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1,
                                      "debug_info": {"host": "fake"}, "connection_info": {"app_id": "A1"}}))
        self._sockets.append(ws)
        await self._notify()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if "envelope_id" in data:
                        self.acks[data["envelope_id"]] = (time.monotonic(), data.get("payload") or {})
                        await self._notify()
        finally:
            self._sockets.remove(ws)
        return ws

    # --- HTTP handlers -----------------------------------------------------------------------------
    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        auth = request.headers.get("Authorization")
        self.downloads.append((name, auth))
        await self._notify()
        if auth != f"Bearer {self.bot_token}":  # Slack shows its sign-in page to strangers
            return web.Response(text="<html>sign in</html>", content_type="text/html")
        if name not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[name], content_type="application/octet-stream")

    async def _response_url(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.responses.append(body)
        await self._notify()
        return web.Response(text="ok")

    @staticmethod
    async def _arguments(request: web.Request) -> dict[str, Any]:
        args: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                args.update(await request.json())
            else:
                args.update(dict(await request.post()))
        return args

    @staticmethod
    def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(text=json.dumps(body), status=status, headers=headers,
                            content_type="application/json")

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._arguments(request)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth else args.get("token")
        self.calls.append(ApiCall(method, args, time.monotonic(), token))
        if method in self._holds:
            await self._notify()
            await self._holds[method].wait()
        if self._drops.get(method, 0) > 0:  # the connection breaks: no HTTP answer at all
            self._drops[method] -= 1
            assert request.transport is not None
            request.transport.close()
            await self._notify()
            return web.Response(status=500)  # never reaches the client
        try:
            return self._answer(method, args)
        finally:
            await self._notify()

    def _take_failure(self, method: str) -> _Failure | None:
        queue = self._failures.get(method)
        if not queue:
            return None
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.pop(0)
        return failure

    def _new_ts(self) -> str:
        return f"1700000000.{next(self._ts):06d}"

    def _answer(self, method: str, args: dict[str, Any]) -> web.Response:
        failure = self._take_failure(method)
        if failure is not None:
            return self._json({"ok": False, "error": failure.error}, failure.status, failure.headers)
        now = time.monotonic()
        if method == "auth.test":
            return self._json({"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "raven",
                               "team_id": self.team_id, "user_id": self.bot_user_id, "bot_id": self.bot_id})
        if method == "apps.connections.open":
            return self._json({"ok": True, "url": f"ws://127.0.0.1:{self.port}/link"})
        if method == "users.info":
            user = str(args.get("user", ""))
            if user not in self.users:
                return self._json({"ok": False, "error": "user_not_found"})
            name = self.users[user]
            return self._json({"ok": True, "user": {"id": user, "name": name.lower(), "is_admin": user in self.admins,
                                                    "is_owner": False, "real_name": name,
                                                    "profile": {"display_name": name}}})
        channel = str(args.get("channel", ""))
        posting = method in ("chat.postMessage", "chat.update", "chat.postEphemeral")
        if posting and channel in self.outside_channels:
            return self._json({"ok": False, "error": "not_in_channel"})
        if posting and len(str(args.get("text", ""))) > self.max_text_chars:
            return self._json({"ok": False, "error": "msg_too_long"})
        if method == "conversations.replies":
            return self._replies(channel, args)
        if method == "conversations.history":
            return self._history(channel, args)
        if method == "chat.getPermalink":
            ts = str(args.get("message_ts", ""))  # (people's messages are known to the fake only if said)
            if not ts:
                return self._json({"ok": False, "error": "message_not_found"})
            return self._json({"ok": True, "channel": channel,
                               "permalink": f"https://fake.slack.com/archives/{channel}/p{ts.replace('.', '')}"})
        blocks = args.get("blocks")
        if isinstance(blocks, str):  # form-encoded calls carry blocks as JSON text
            blocks = json.loads(blocks)
        if method == "chat.postMessage":
            ts = self._new_ts()
            thread_ts = args.get("thread_ts") or None
            text = str(args.get("text", ""))
            self.messages[(channel, ts)] = Message(channel, ts, text, thread_ts, now, [now], blocks)
            return self._json({"ok": True, "channel": channel, "ts": ts,
                               "message": {"text": args.get("text"), "ts": ts, "thread_ts": thread_ts}})
        if method == "chat.update":
            message = self.messages.get((channel, str(args.get("ts"))))
            if message is None:
                return self._json({"ok": False, "error": "message_not_found"})
            text = str(args.get("text", ""))
            message.text = text
            if "blocks" in args:  # without the field Slack keeps the message's blocks
                message.blocks = blocks or None
            message.writes.append(now)
            return self._json({"ok": True, "channel": channel, "ts": message.ts, "text": text})
        if method == "chat.postEphemeral":
            if not args.get("user"):
                return self._json({"ok": False, "error": "user_not_in_channel"})
            self.ephemerals.append(Ephemeral(channel, args.get("thread_ts") or None, str(args["user"]),
                                             str(args.get("text", "")), blocks))
            return self._json({"ok": True, "message_ts": self._new_ts()})
        return self._json({"ok": False, "error": "unknown_method"}, 404)

    def _history(self, channel: str, args: dict[str, Any]) -> web.Response:
        """``conversations.history``: the channel's top-level messages, newest first, up to ``limit``."""
        if channel in self.outside_channels:
            return self._json({"ok": False, "error": "not_in_channel"})
        found = sorted((m for m in self.messages.values() if m.channel == channel and m.thread_ts is None),
                       key=lambda m: float(m.ts), reverse=True)[:int(args.get("limit") or 100)]
        shown = [{"type": "message", "ts": m.ts, "text": m.text,
                  **({"user": m.user} if m.user else {"user": self.bot_user_id, "bot_id": self.bot_id})}
                 for m in found]
        return self._json({"ok": True, "messages": shown, "has_more": False})

    def _replies(self, channel: str, args: dict[str, Any]) -> web.Response:
        """``conversations.replies``: the thread's root and replies, oldest first, paged by ``cursor``;
        ``latest`` (with ``inclusive``) bounds the newest."""
        if channel in self.outside_channels:
            return self._json({"ok": False, "error": "not_in_channel"})
        thread = str(args.get("ts", ""))
        found = sorted((m for m in self.messages.values()
                        if m.channel == channel and (m.ts == thread or m.thread_ts == thread)),
                       key=lambda m: float(m.ts))
        if not found:
            return self._json({"ok": False, "error": "thread_not_found"})
        latest = args.get("latest")
        if latest:
            inclusive = str(args.get("inclusive", "")).lower() in ("1", "true")
            found = [m for m in found if float(m.ts) < float(latest) or (inclusive and m.ts == latest)]
        start = int(args.get("cursor") or 0)
        limit = int(args.get("limit") or 1000)
        page = found[start:start + limit]
        more = start + limit < len(found)
        shown = []
        for m in page:
            item: dict[str, Any] = {"type": "message", "ts": m.ts, "text": m.text, "thread_ts": m.thread_ts or m.ts}
            item |= {"user": m.user} if m.user else {"user": self.bot_user_id, "bot_id": self.bot_id}
            shown.append(item)
        return self._json({"ok": True, "messages": shown, "has_more": more,
                           "response_metadata": {"next_cursor": str(start + limit) if more else ""}})
