"""A fake of Discord's REST API and gateway on 127.0.0.1, enough for the unmodified discord.py client.

A test starts it, points discord.py at it (:meth:`FakeDiscord.install`), starts the bot, drives it with
gateway events (user messages, slash commands, autocomplete) and asserts on the REST calls the bot made
(:attr:`FakeDiscord.calls`) and on the messages as they now stand (:meth:`FakeDiscord.bot_messages`).

What it models, because the adapter depends on it:

- one guild with two text channels and a role; a DM channel; threads created from messages
  (the thread's id is the message's id, as on Discord) announced with ``THREAD_CREATE``;
- the bot's own messages come back over the gateway as ``MESSAGE_CREATE`` (a bot must ignore them);
- without the ``MESSAGE_CONTENT`` intent, guild messages that do not mention the bot arrive with empty
  content;
- interaction callbacks (``?with_response=1``), and follow-ups through ``webhooks/{app}/{token}``,
  the first of which after a deferred response fills the original "thinking" message;
- message components (buttons) kept on messages as sent and edited, and button presses
  (:meth:`FakeDiscord.press`) that carry the message as it now stands;
- a channel's message history (``GET /channels/{id}/messages``: newest first, ``before``/``after``/
  ``limit``), and attachments served from ``/attachments/…`` on the same server;
- injected failures (:meth:`FakeDiscord.fail_next`): 403, 404, 429, 5xx with Discord's error bodies.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from aiohttp import WSMsgType, web

from tests.fakes import LocalServer

JSON_TYPE = "application/json"
ALL_PERMISSIONS = str((1 << 53) - 1)
MESSAGE_CONTENT_INTENT = 1 << 15
CONTENT_LIMIT = 2000
T = TypeVar("T")
Payload = dict[str, Any]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _check_length(body: Payload) -> Payload | None:
    """Discord's answer to content over 2,000 characters (a 400 with code 50035)."""
    content = body.get("content") or ""
    if len(content) <= CONTENT_LIMIT:
        return None
    return {
        "message": "Invalid Form Body", "code": 50035,
        "errors": {"content": {"_errors": [{
            "code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length.",
        }]}},
    }


@dataclass(frozen=True)
class Call:
    """One REST request the bot made."""

    method: str
    path: str  # without the "/api/v10" prefix, e.g. "/channels/123/messages"
    query: dict[str, str]
    body: Any
    at: float  # time.monotonic() on arrival
    status: int


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    body: Payload
    headers: dict[str, str]
    remaining: int


@dataclass
class _Interaction:
    payload: Payload
    channel_id: str
    original_id: str | None = None
    original_pending: bool = False
    callbacks: list[Payload] = field(default_factory=list)


class FakeDiscord(LocalServer):
    """Discord's REST API under ``/api/v10`` and its gateway under ``/gw``."""

    def __init__(self) -> None:
        super().__init__()
        self._ids = itertools.count(1_300_000_000_000_000_000)
        self.calls: list[Call] = []
        self.messages: dict[str, Payload] = {}  # every message, by id, as it now stands
        self.channels: dict[str, Payload] = {}
        self.intents: int | None = None
        self._failures: list[_Failure] = []
        self._seq = 0
        self._interactions: dict[str, _Interaction] = {}
        self.files: dict[str, bytes] = {}  # attachment path → bytes
        self.downloads: list[str] = []  # attachment paths fetched, in order
        self.thread_members: dict[str, list[str]] = {}
        self._identified = asyncio.Event()

        self.application_id = self.new_id()
        self.bot_user = self.make_user("raven", bot=True, user_id=self.application_id)
        self.alice = self.make_user("alice")
        self.bob = self.make_user("bob")
        self.other_bot = self.make_user("otherbot", bot=True)
        self.guild_id = self.new_id()
        self.member_role_id = self.new_id()
        self.guest_role_id = self.new_id()
        self.general_id = self._add_text_channel("general")
        self.other_id = self._add_text_channel("random")
        self.dm_channel_id = self.new_id()
        self.channels[self.dm_channel_id] = {
            "id": self.dm_channel_id, "type": 1, "recipients": [self.alice], "last_message_id": None,
        }
        self.extra_threads: list[Payload] = []  # threads present in GUILD_CREATE
        self.message_content_enabled = True  # the privileged intent's switch in the Developer Portal

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gw", self._gateway)
        app.router.add_get("/gw/", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        app.router.add_get("/attachments/{tail:.*}", self._attachment)
        await self.serve(app)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gw"

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point discord.py's REST routes (webhooks and interactions included) and gateway here."""
        import discord
        import yarl

        monkeypatch.setattr(discord.http.Route, "BASE", self.api_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(self.gateway_url))

    # ------------------------------------------------------------------ model objects
    def new_id(self) -> str:
        return str(next(self._ids))

    def make_user(self, name: str, *, bot: bool = False, user_id: str | None = None) -> Payload:
        return {
            "id": user_id or self.new_id(), "username": name, "global_name": None, "discriminator": "0",
            "avatar": None, "bot": bot, "public_flags": 0,
        }

    def _member(self, user: Payload, roles: list[str] | None = None) -> Payload:
        return {
            "roles": roles if roles is not None else [self.member_role_id], "nick": None,
            "joined_at": _now_iso(), "deaf": False, "mute": False, "flags": 0, "pending": False,
        }

    def _add_text_channel(self, name: str) -> str:
        channel_id = self.new_id()
        self.channels[channel_id] = {
            "id": channel_id, "type": 0, "guild_id": self.guild_id, "name": name, "position": 0,
            "permission_overwrites": [], "parent_id": None, "nsfw": False, "topic": None,
            "last_message_id": None, "rate_limit_per_user": 0,
        }
        return channel_id

    def _thread_payload(self, thread_id: str, parent_id: str, name: str, owner_id: str) -> Payload:
        return {
            "id": thread_id, "type": 11, "guild_id": self.guild_id, "parent_id": parent_id,
            "owner_id": owner_id, "name": name, "message_count": 0, "member_count": 1,
            "rate_limit_per_user": 0, "last_message_id": None, "flags": 0,
            "thread_metadata": {
                "archived": False, "auto_archive_duration": 1440, "archive_timestamp": _now_iso(),
                "locked": False, "create_timestamp": _now_iso(),
            },
        }

    def add_user_thread(self, parent_id: str, name: str = "people talking") -> str:
        """A thread someone else opened, known to the bot from GUILD_CREATE (call before connecting)."""
        thread_id = self.new_id()
        thread = self._thread_payload(thread_id, parent_id, name, self.alice["id"])
        self.channels[thread_id] = thread
        self.extra_threads.append(thread)
        return thread_id

    def _guild_payload(self) -> Payload:
        everyone = {
            "id": self.guild_id, "name": "@everyone", "permissions": ALL_PERMISSIONS, "position": 0,
            "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0,
        }
        roles = [everyone] + [
            {**everyone, "id": role_id, "name": name, "position": 1}
            for role_id, name in ((self.member_role_id, "members"), (self.guest_role_id, "guests"))
        ]
        bot_member = {**self._member(self.bot_user, []), "user": self.bot_user}
        text_channels = [c for c in self.channels.values() if c["type"] == 0]
        return {
            "id": self.guild_id, "name": "Test guild", "icon": None, "owner_id": self.alice["id"],
            "roles": roles, "channels": text_channels, "threads": self.extra_threads,
            "members": [bot_member], "member_count": 3, "features": [], "emojis": [], "stickers": [],
            "unavailable": False, "large": False, "presences": [], "voice_states": [],
            "preferred_locale": "en-US", "joined_at": _now_iso(),
        }

    def _message_payload(
        self, channel_id: str, author: Payload, content: str, *, roles: list[str] | None = None,
        mentions: list[Payload] | None = None, message_id: str | None = None,
        attachments: list[Payload] | None = None,
    ) -> Payload:
        channel = self.channels[channel_id]
        payload: Payload = {
            "id": message_id or self.new_id(), "channel_id": channel_id, "author": author,
            "content": content, "timestamp": _now_iso(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": mentions or [], "mention_roles": [],
            "attachments": attachments or [], "embeds": [], "pinned": False, "type": 0, "flags": 0,
            "components": [],
        }
        if "guild_id" in channel:
            payload["guild_id"] = self.guild_id
            payload["member"] = self._member(author, roles)
        return payload

    # ------------------------------------------------------------------ driving the bot
    @property
    def mention(self) -> str:
        return f"<@{self.bot_user['id']}>"

    async def wait_identified(self, within: float = 10.0) -> None:
        await asyncio.wait_for(self._identified.wait(), within)

    async def dispatch(self, event: str, data: Payload) -> None:
        if not self._sockets:
            raise RuntimeError("no gateway connection")
        self._seq += 1
        frame = json.dumps({"op": 0, "t": event, "s": self._seq, "d": data})
        for ws in list(self._sockets):
            await ws.send_str(frame)

    async def user_message(
        self, channel_id: str, content: str, *, author: Payload | None = None,
        roles: list[str] | None = None, mention_bot: bool = False,
        files: dict[str, bytes] | None = None, sizes: dict[str, int] | None = None,
    ) -> Payload:
        """A user (alice unless ``author``) posts ``content``, after a mention with ``mention_bot``,
        with ``files`` attached (name → bytes; ``sizes`` may state another size, as a lying client)."""
        author = author or self.alice
        mentions = [self.bot_user] if mention_bot else []
        text = f"{self.mention} {content}" if mention_bot else content
        attachments = [self._attachment_payload(name, data, (sizes or {}).get(name))
                       for name, data in (files or {}).items()]
        payload = self._message_payload(channel_id, author, text, roles=roles, mentions=mentions,
                                        attachments=attachments)
        self.messages[payload["id"]] = payload
        sent = dict(payload)
        no_content = self.intents is not None and not self.intents & MESSAGE_CONTENT_INTENT
        if no_content and "guild_id" in payload and not mention_bot:
            sent["content"] = ""  # what Discord does without the privileged intent
        await self.dispatch("MESSAGE_CREATE", sent)
        return payload

    def _attachment_payload(self, name: str, data: bytes, size: int | None) -> Payload:
        attachment_id = self.new_id()
        path = f"{attachment_id}/{name}"
        self.files[path] = data
        url = f"http://127.0.0.1:{self.port}/attachments/{path}"
        return {"id": attachment_id, "filename": name, "size": len(data) if size is None else size,
                "url": url, "proxy_url": url, "content_type": "application/octet-stream"}

    async def _attachment(self, request: web.Request) -> web.Response:
        path = request.match_info["tail"]
        self.downloads.append(path)
        if path not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[path], content_type="application/octet-stream")

    async def press(self, message: Payload, custom_id: str, *, user: Payload | None = None,
                    roles: list[str] | None = None) -> Payload:
        """A user presses the button ``custom_id`` on ``message`` (INTERACTION_CREATE type 3); the
        interaction carries the message as it now stands, as Discord's does."""
        payload = self._interaction_payload(3, "", [], message["channel_id"], user or self.alice, roles)
        payload["data"] = {"custom_id": custom_id, "component_type": 2}
        payload["message"] = dict(self.messages[message["id"]])
        record = _Interaction(payload, payload["channel_id"], original_id=message["id"])
        self._interactions[payload["token"]] = record
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    @staticmethod
    def buttons(message: Payload) -> list[str]:
        """The custom ids of the buttons a message shows now."""
        return [c["custom_id"] for row in message.get("components") or [] for c in row.get("components", [])
                if c.get("type") == 2]

    def _interaction_payload(
        self, itype: int, name: str, options: list[Payload], channel_id: str, user: Payload,
        roles: list[str] | None,
    ) -> Payload:
        interaction_id = self.new_id()
        channel = self.channels[channel_id]
        payload: Payload = {
            "id": interaction_id, "application_id": self.application_id, "type": itype,
            "token": f"token-{interaction_id}", "version": 1,
            "data": {"id": self.new_id(), "name": name, "type": 1, "options": options},
            "channel_id": channel_id, "channel": channel, "app_permissions": ALL_PERMISSIONS,
            "locale": "en-US", "attachment_size_limit": 8 * 1024 * 1024, "entitlements": [],
            "authorizing_integration_owners": {},
        }
        if "guild_id" in channel:
            payload["guild_id"] = self.guild_id
            payload["guild_locale"] = "en-US"
            payload["member"] = {**self._member(user, roles), "user": user, "permissions": ALL_PERMISSIONS}
            payload["context"] = 0
        else:
            payload["user"] = user
            payload["context"] = 1
        return payload

    async def slash_command(
        self, name: str, options: dict[str, str | bool] | None = None, *, channel_id: str | None = None,
        user: Payload | None = None, roles: list[str] | None = None,
    ) -> Payload:
        """A user invokes ``/name`` (INTERACTION_CREATE type 2); returns the interaction payload.
        Options are strings (type 3) or booleans (type 5)."""
        opts = [{"name": k, "type": 5 if isinstance(v, bool) else 3, "value": v} for k, v in (options or {}).items()]
        payload = self._interaction_payload(
            2, name, opts, channel_id or self.general_id, user or self.alice, roles
        )
        self._interactions[payload["token"]] = _Interaction(payload, payload["channel_id"])
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def autocomplete(
        self, name: str, focused: str, typed: str, others: dict[str, str] | None = None,
        *, channel_id: str | None = None,
    ) -> Payload:
        """A user types ``typed`` into option ``focused`` of ``/name`` (INTERACTION_CREATE type 4)."""
        opts: list[Payload] = [{"name": k, "type": 3, "value": v} for k, v in (others or {}).items()]
        opts.append({"name": focused, "type": 3, "value": typed, "focused": True})
        payload = self._interaction_payload(4, name, opts, channel_id or self.general_id, self.alice, None)
        self._interactions[payload["token"]] = _Interaction(payload, payload["channel_id"])
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    def fail_next(
        self, method: str, path_pattern: str, status: int, *, code: int = 0, message: str = "",
        times: int = 1, retry_after: float = 0.05, via: bool = True,
    ) -> None:
        """The next ``times`` requests matching ``method`` and the regex ``path_pattern`` fail."""
        body: Payload = {"message": message or f"fake {status}", "code": code}
        headers: dict[str, str] = {}
        if status == 429:
            body.update(retry_after=retry_after, **{"global": False})
            headers["Retry-After"] = str(retry_after)
            if via:  # discord.py treats a 429 without Via as a Cloudflare ban and gives up at once
                headers["Via"] = "1.1 google"
        self._failures.append(_Failure(method, re.compile(path_pattern), status, body, headers, times))

    # ------------------------------------------------------------------ assertions
    def calls_to(self, method: str, path_pattern: str) -> list[Call]:
        pattern = re.compile(path_pattern)
        return [c for c in self.calls if c.method == method and pattern.fullmatch(c.path)]

    async def wait_for(self, probe: Callable[[], T | None], within: float = 15.0) -> T:
        """Poll ``probe`` until it returns something truthy."""
        deadline = time.monotonic() + within
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within}s waiting for {probe}")
            await asyncio.sleep(0.01)

    async def wait_calls(
        self, method: str, path_pattern: str, count: int = 1, within: float = 15.0
    ) -> list[Call]:
        return await self.wait_for(
            lambda: (found if len(found := self.calls_to(method, path_pattern)) >= count else None), within
        )

    def bot_messages(self, channel_id: str) -> list[Payload]:
        """The bot's messages in a channel, as they now stand, oldest first."""
        return [
            m for m in self.messages.values()
            if m["channel_id"] == channel_id and m["author"]["id"] == self.bot_user["id"]
        ]

    @staticmethod
    def shown(message: Payload) -> str:
        """What a message shows: its content, then its embeds' descriptions (notices are embeds)."""
        return "\n".join([message["content"], *(e.get("description") or "" for e in message.get("embeds", []))]).strip()

    def threads_created(self) -> list[Payload]:
        return [c for c in self.channels.values() if c["type"] == 11 and c["owner_id"] == self.bot_user["id"]]

    def edit_times(self, message_id: str) -> list[float]:
        """Arrival times of every successful edit of one message's text (channel or webhook route;
        edits of its buttons alone are not counted)."""
        return [
            c.at for c in self.calls
            if c.method == "PATCH" and c.status < 300 and c.path.endswith(f"/messages/{message_id}")
            and "content" in (c.body or {})
        ]

    # ------------------------------------------------------------------ gateway
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                if frame["op"] == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif frame["op"] == 2:
                    self.intents = int(frame["d"]["intents"])
                    if self.intents & MESSAGE_CONTENT_INTENT and not self.message_content_enabled:
                        await ws.close(code=4014, message=b"Disallowed intent(s).")
                        break
                    self._sockets.append(ws)
                    await self.dispatch("READY", {
                        "v": 10, "user": self.bot_user, "session_id": "fake-session",
                        "resume_gateway_url": self.gateway_url, "private_channels": [],
                        "guilds": [{"id": self.guild_id, "unavailable": True}],
                        "application": {"id": self.application_id, "flags": 0},
                    })
                    await self.dispatch("GUILD_CREATE", self._guild_payload())
                    self._identified.set()
                elif frame["op"] == 6:
                    self._sockets.append(ws)
                    await self.dispatch("RESUMED", {})
        finally:
            if ws in self._sockets:
                self._sockets.remove(ws)
        return ws

    # ------------------------------------------------------------------ REST
    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            if request.content_type == JSON_TYPE and raw:
                body = json.loads(raw)
            else:
                body = raw.decode(errors="replace")
        payload: Payload | list[Any] | None
        status, payload, headers = self._injected_failure(request.method, path)
        if status == 0:
            status, payload = await self._route(request.method, path, body, dict(request.query))
        self.calls.append(Call(request.method, path, dict(request.query), body, time.monotonic(), status))
        if payload is None:
            return web.Response(status=status, headers=headers)
        return web.Response(
            status=status, body=json.dumps(payload).encode(), headers={"Content-Type": JSON_TYPE, **headers}
        )

    def _injected_failure(self, method: str, path: str) -> tuple[int, Payload | None, dict[str, str]]:
        for failure in self._failures:
            if failure.method == method and failure.pattern.fullmatch(path) and failure.remaining > 0:
                failure.remaining -= 1
                return failure.status, failure.body, failure.headers
        return 0, None, {}

    async def _route(self, method: str, path: str, body: Any,
                     query: dict[str, str]) -> tuple[int, Payload | list[Any] | None]:
        app = self.application_id
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("GET", r"/users/@me", lambda: (200, self.bot_user)),
            ("GET", r"/oauth2/applications/@me", self._application_info),
            ("PUT", rf"/applications/{app}/commands", lambda: (200, self._synced(body))),
            ("PUT", rf"/applications/{app}/guilds/(\d+)/commands", lambda _g: (200, self._synced(body))),
            ("GET", r"/channels/(\d+)", self._get_channel),
            ("POST", r"/channels/(\d+)/typing", lambda _c: (204, None)),
            ("POST", r"/channels/(\d+)/messages", lambda c: self._create_message(c, body)),
            ("GET", r"/channels/(\d+)/messages", lambda c: self._history(c, query)),
            ("PATCH", r"/channels/(\d+)/messages/(\d+)", lambda _c, m: self._edit_message(m, body)),
            ("POST", r"/channels/(\d+)/messages/(\d+)/threads", lambda c, m: self._thread(c, body, m)),
            ("POST", r"/channels/(\d+)/threads", lambda c: self._thread(c, body, None)),
            ("PUT", r"/channels/(\d+)/thread-members/@me", lambda _c: (204, None)),
            ("PUT", r"/channels/(\d+)/thread-members/(\d+)",
             lambda c, u: (204, self.thread_members.setdefault(c, []).append(u))),
            ("POST", r"/interactions/(\d+)/([^/]+)/callback", lambda _i, t: self._callback(t, body)),
            ("POST", rf"/webhooks/{app}/([^/]+)", lambda t: self._followup(t, body)),
            ("PATCH", rf"/webhooks/{app}/([^/]+)/messages/([^/]+)", lambda t, m: self._edit_hook(t, m, body)),
            ("GET", rf"/webhooks/{app}/([^/]+)/messages/@original", self._get_original),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                result: tuple[int, Payload | list[Any] | None] = handler(*match.groups())
                if asyncio.iscoroutine(result):
                    result = await result
                return result
        return 404, {"message": "404: Not Found", "code": 0}

    def _application_info(self) -> tuple[int, Payload]:
        return 200, {
            "id": self.application_id, "name": "Raven", "icon": None, "description": "",
            "rpc_origins": [], "bot_public": True, "bot_require_code_grant": False,
            "owner": self.alice, "summary": "", "verify_key": "0" * 64, "team": None, "flags": 0,
            "interactions_endpoint_url": None,
        }

    def _synced(self, commands: list[Payload]) -> list[Payload]:
        return [
            {**c, "id": self.new_id(), "application_id": self.application_id, "version": "1",
             "default_member_permissions": None, "dm_permission": True, "nsfw": False}
            for c in commands
        ]

    def _get_channel(self, channel_id: str) -> tuple[int, Payload]:
        if channel_id not in self.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        return 200, self.channels[channel_id]

    async def _create_message(self, channel_id: str, body: Payload) -> tuple[int, Payload]:
        if channel_id not in self.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        if too_long := _check_length(body):
            return 400, too_long
        payload = self._message_payload(channel_id, self.bot_user, body.get("content") or "")
        payload["embeds"] = list(body.get("embeds") or [])
        payload["components"] = list(body.get("components") or [])
        self.messages[payload["id"]] = payload
        await self.dispatch("MESSAGE_CREATE", payload)  # Discord echoes the bot's own messages
        return 200, payload

    def _history(self, channel_id: str, query: dict[str, str]) -> tuple[int, Payload | list[Any]]:
        """Discord's channel history: at most ``limit`` (≤ 100) messages, newest first; ``before`` the
        newest below an id, ``after`` the oldest above one."""
        if channel_id not in self.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        limit = min(int(query.get("limit", 50)), 100)
        found = sorted((m for m in self.messages.values() if m["channel_id"] == channel_id), key=lambda m: int(m["id"]))
        if "before" in query:
            found = [m for m in found if int(m["id"]) < int(query["before"])][-limit:]
        elif "after" in query:
            found = [m for m in found if int(m["id"]) > int(query["after"])][:limit]
        else:
            found = found[-limit:]
        return 200, found[::-1]

    def _edit_message(self, message_id: str, body: Payload) -> tuple[int, Payload]:
        message = self.messages.get(message_id)
        if message is None:
            return 404, {"message": "Unknown Message", "code": 10008}
        if too_long := _check_length(body):
            return 400, too_long
        if "content" in body:
            message["content"] = body["content"]
        if "embeds" in body:
            message["embeds"] = list(body["embeds"] or [])
        if "components" in body:
            message["components"] = list(body["components"] or [])
        message["edited_timestamp"] = _now_iso()
        return 200, message

    async def _thread(self, channel_id: str, body: Payload, message_id: str | None) -> tuple[int, Payload]:
        if channel_id not in self.channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        thread_id = message_id or self.new_id()
        thread = self._thread_payload(thread_id, channel_id, body["name"], self.bot_user["id"])
        self.channels[thread_id] = thread
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return 201, thread

    def _callback(self, token: str, body: Payload) -> tuple[int, Payload]:
        record = self._interactions.get(token)
        if record is None:
            return 404, {"message": "Unknown interaction", "code": 10062}
        if record.callbacks:
            return 400, {"message": "Interaction has already been acknowledged.", "code": 40060}
        record.callbacks.append(body)
        kind = body["type"]
        data = body.get("data") or {}
        response: Payload = {
            "interaction": {
                "id": record.payload["id"], "type": record.payload["type"],
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool((data.get("flags") or 0) & 64),
            },
            "resource": {"type": kind},
        }
        if kind == 7 and record.original_id is not None:  # a button's message, updated
            self._edit_message(record.original_id, data)
            response["resource"]["message"] = self.messages[record.original_id]
        if kind in (4, 5):
            message = self._message_payload(
                record.channel_id, self.bot_user, data.get("content") or "", message_id=None
            )
            message["flags"] = data.get("flags") or 0
            self.messages[message["id"]] = message
            record.original_id = message["id"]
            record.original_pending = kind == 5
            response["interaction"]["response_message_id"] = message["id"]
            if kind == 4:
                response["resource"]["message"] = message
        return 200, response

    def interaction_callbacks(self, interaction: Payload) -> list[Payload]:
        """The callbacks (defer, autocomplete result, ...) the bot posted for an interaction."""
        return list(self._interactions[interaction["token"]].callbacks)

    def original_response(self, interaction: Payload) -> Payload | None:
        """The interaction's original response message (the "thinking" one after a defer)."""
        original_id = self._interactions[interaction["token"]].original_id
        return self.messages[original_id] if original_id is not None else None

    def _followup(self, token: str, body: Payload) -> tuple[int, Payload]:
        record = self._interactions.get(token)
        if record is None or not record.callbacks:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        if too_long := _check_length(body):
            return 400, too_long
        if record.original_pending and record.original_id is not None:
            record.original_pending = False  # the first follow-up after a defer fills the "thinking" message
            message = self.messages[record.original_id]
            message["content"] = body.get("content") or ""
            message["embeds"] = list(body.get("embeds") or [])
            message["components"] = list(body.get("components") or [])
            message["flags"] = body.get("flags") or message["flags"]
            return 200, message
        message = self._message_payload(record.channel_id, self.bot_user, body.get("content") or "")
        message["embeds"] = list(body.get("embeds") or [])
        message["components"] = list(body.get("components") or [])
        message["flags"] = body.get("flags") or 0
        self.messages[message["id"]] = message
        return 200, message

    def _edit_hook(self, token: str, message_id: str, body: Payload) -> tuple[int, Payload]:
        record = self._interactions.get(token)
        if record is None:
            return 404, {"message": "Unknown Webhook", "code": 10015}
        if message_id == "@original":
            if record.original_id is None:
                return 404, {"message": "Unknown Message", "code": 10008}
            message_id = record.original_id
            record.original_pending = False
        return self._edit_message(message_id, body)

    def _get_original(self, token: str) -> tuple[int, Payload]:
        record = self._interactions.get(token)
        if record is None or record.original_id is None:
            return 404, {"message": "Unknown Message", "code": 10008}
        return 200, self.messages[record.original_id]
