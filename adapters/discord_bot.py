"""Discord adapter (discord.py 2.x): translates Discord messages and slash commands into core
:class:`~bot.events.Event` objects and streams the core's reply back as Discord messages.

- A mention in a channel opens a public thread on that message; the thread is the conversation
  (``ThreadKey("discord", <thread id>)``) and later messages there need no mention.
- A mention in any other thread joins it; from then on that thread is followed too.
- Direct messages are one conversation per DM channel (``DISCORD_ANSWER_DMS``).
- ``/advisor``, ``/reset``, ``/retry``, ``/continue``, ``/stop``, ``/fork``, ``/forget``, ``/personas`` and
  ``/help``; the same words after a mention reach the core as text addressed to it, and the core's one
  command mapper decides (``@Raven reset`` is a command, "@Raven reset the counter please" a message).
  ``/fork`` is carried out here (it opens a Discord thread), the rest by the core.
- Buttons on the newest reply (:mod:`adapters.discord_controls`): Stop while it is written, then Retry
  and Continue; Forget on the ``/forget`` question.
- Called into a thread it does not know, Raven hands the core that thread's earlier messages (adopting
  it); text files attached to a message are fetched when the core will read them.
- Notices (busy, refused, failed, a Discord error) are embeds, ephemeral for slash commands.

No prompt, persona or history logic lives here: the core decides what to say, this module only
decides where to say it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import aiohttp
import discord
import yarl
from discord import app_commands

from adapters.discord_controls import Action, ControlButton, controls
from adapters.repairs import confirm_posts, has_unconfirmed, keep_repairing
from adapters.retry import RetryPolicy, call_with_retries
from adapters.settings import DiscordSettings
from adapters.streaming import CONTINUED, MARK, StreamRenderer, final_pieces, present
from bot.core.attachments import wanted
from bot.core.commands import HELP_TEXT
from bot.core.outcomes import Answered, Busy, CommandDone, CutOff, Failed, Outcome, Refused
from bot.core.service import FORGET_ASK, INTERRUPTED_NOTICE, ChatService, History, Repair
from bot.errors import ConfigError, PersonaError
from bot.events import Attachment, EarlierMessage, Event, ThreadKey

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000  # characters of content per Discord message
THREAD_NAME_LIMIT = 100
TYPING_REPEAT_S = 8.0  # a typing indicator lasts about 10 s
ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
NO_MENTIONS = discord.AllowedMentions.none()
EMBED_LIMIT = 4096  # characters of an embed's description
NOTICE_COLOUR = discord.Colour.orange()
ATTACHMENT_TIMEOUT_S = 30.0
POST_SEARCH_LIMIT = 50  # newest messages a repair reads to find a post whose id a crash kept from the log
FORK_SUFFIX = " (fork)"

Post = Callable[[str, discord.ui.View | None], Awaitable[Any]]
Notify = Callable[[str], Awaitable[None]]
Say = Callable[[str, bool], Awaitable[None]]  # (text, as a notice?)


def thread_name(text: str, fallback: str = "Raven") -> str:
    """A thread title from the first words of a message, at most 100 characters."""
    name = " ".join(text.split()) or fallback
    if len(name) > THREAD_NAME_LIMIT:
        name = name[: THREAD_NAME_LIMIT - 1].rstrip() + "…"
    return name


def fork_name(name: str) -> str:
    """The name of a thread forked from one called ``name``: the same, marked as a fork."""
    base = " ".join(name.split()) or "Raven"
    room = THREAD_NAME_LIMIT - len(FORK_SUFFIX)
    if len(base) > room:
        base = base[: room - 1].rstrip() + "…"
    return base + FORK_SUFFIX


def notice_for(exc: discord.HTTPException) -> str:
    """A short line telling the user what went wrong on Discord's side."""
    if isinstance(exc, discord.Forbidden):
        return ("I'm missing a Discord permission here (I need Send Messages, Send Messages in "
                "Threads, Create Public Threads and Read Message History).")
    if isinstance(exc, discord.NotFound):
        return "The message I was writing to was deleted, so I stopped."
    if exc.status == 429:
        return "Discord is rate-limiting me right now; please try again in a minute."
    if exc.status >= 500:
        return "Discord had a server error while I was answering; please try again."
    return f"Discord rejected my reply (HTTP {exc.status}); please try again."


def notice_embed(text: str) -> discord.Embed:
    """A notice (busy, refused, failed, a Discord error) is an embed with a coloured bar, so it never
    looks like one of Raven's answers."""
    return discord.Embed(description=f"⚠️ {text}"[:EMBED_LIMIT], colour=NOTICE_COLOUR)


def _retryable(exc: BaseException) -> tuple[int | None, float | None, bool] | None:
    """What adapters/retry.py needs to know of a failed Discord call (None: not to be retried)."""
    if isinstance(exc, discord.RateLimited):  # discord.py would not wait this one out itself
        return 429, exc.retry_after, False
    if isinstance(exc, discord.HTTPException):
        if exc.status == 429:
            header = exc.response.headers.get("Retry-After") if exc.response is not None else None
            try:
                return 429, float(header) if header else None, False
            except ValueError:
                return 429, None, False
        return (exc.status, None, False) if exc.status >= 500 else None
    if isinstance(exc, aiohttp.ClientError | OSError | asyncio.TimeoutError):
        return None, None, True
    return None


def _describe(exc: discord.HTTPException) -> str:
    return f"HTTP {exc.status} code {exc.code}: {exc.text[:200]}"


class _RavenClient(discord.Client):
    """A plain discord.py client whose hooks call back into the adapter."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter

    async def setup_hook(self) -> None:
        self.add_dynamic_items(ControlButton)  # buttons posted before a restart keep working
        await self.adapter.sync_commands()

    async def on_control(self, interaction: discord.Interaction, action: Action, thread_id: int) -> None:
        await self.adapter.on_control(interaction, action, thread_id)

    async def on_ready(self) -> None:
        log.info("discord: connected as %s (%s) to %d guild(s)", self.user,
                 self.user.id if self.user else "?", len(self.guilds))
        self.adapter.start_repairs()

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)


class DiscordAdapter:
    """Runs a discord.py client that answers mentions, threads, DMs and slash commands."""

    def __init__(self, service: ChatService, settings: DiscordSettings, *, guild_ready_timeout: float = 2.0) -> None:
        self.service = service
        self.settings = settings
        self.command_guilds = _snowflakes(settings.variable("command_guilds"), settings.command_guilds)
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = True  # privileged: needed to read thread messages without a mention
        self.client = _RavenClient(
            self, intents=intents, allowed_mentions=NO_MENTIONS, guild_ready_timeout=guild_ready_timeout
        )
        self.tree = app_commands.CommandTree(self.client)
        self._repairer: asyncio.Task[None] | None = None
        # The messages carrying buttons, per thread: only the newest reply keeps them ([]: it has none).
        # A thread not in here (answered before a restart) is looked up in the log's deliveries.
        self._controls: dict[ThreadKey, list[Any]] = {}
        self._add_commands()

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Log in, connect and answer until cancelled."""
        token = self.settings.token
        if token is None:
            raise ConfigError("DISCORD_TOKEN is not set")
        # discord.py keeps both addresses on its classes: one Discord adapter per process sets them
        if self.settings.api_url:
            discord.http.Route.BASE = self.settings.api_url.rstrip("/")
        if self.settings.gateway_url:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.settings.gateway_url)
        try:
            await self.client.start(token.get_secret_value())
        except discord.LoginFailure:
            raise ConfigError("DISCORD_TOKEN was rejected by Discord; copy a fresh one from the "
                              "Developer Portal (Bot → Reset Token)") from None
        except discord.PrivilegedIntentsRequired:
            raise ConfigError("Discord refused the Message Content intent; turn it on in the Developer "
                              "Portal (Bot → Privileged Gateway Intents → Message Content Intent)") from None
        finally:
            if self._repairer is not None:
                self._repairer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._repairer
            if not self.client.is_closed():
                await self.client.close()

    async def sync_commands(self) -> None:
        """Register the slash commands: per guild when configured (instant), otherwise globally
        (Discord may take up to an hour to show global changes)."""
        try:
            if self.command_guilds:
                for guild_id in self.command_guilds:
                    guild = discord.Object(id=guild_id)
                    self.tree.copy_global_to(guild=guild)
                    synced = await self.tree.sync(guild=guild)
                    log.info("discord: synced %d command(s) to guild %s", len(synced), guild_id)
            else:
                synced = await self.tree.sync()
                log.info("discord: synced %d global command(s)", len(synced))
        except discord.HTTPException as exc:  # e.g. invited without the applications.commands scope
            log.error("discord: could not sync slash commands (%s); text commands still work",
                      _describe(exc))

    # --- repairs after a crash ------------------------------------------------------------------------

    def start_repairs(self) -> None:
        if self._repairer is None or self._repairer.done():
            self._repairer = asyncio.create_task(
                keep_repairing(PLATFORM, self.repair, self.service.repair_interval_s), name="discord repairs")

    async def repair(self) -> int:
        """Finish what a process that died left on Discord: a reply stored in full but shown with the
        still-writing mark is edited to the full reply (the rest posted); a turn lost mid-way gets its
        mark removed and a notice in its thread. Returns how many turns were repaired."""
        done = 0
        for repair in await self.service.repairs(PLATFORM):
            channel = await self._fetch_channel(int(repair.turn.thread.thread_id))
            try:
                if channel is not None:
                    await self._repair_turn(channel, repair)
            except discord.HTTPException as exc:
                if exc.status == 429 or exc.status >= 500:
                    log.warning("discord: repair of turn %s put off (%s)", repair.turn.id, _describe(exc))
                    continue  # the next round tries again
                log.warning("discord: turn %s cannot be repaired (%s)", repair.turn.id, _describe(exc))
            await self.service.repaired(repair)
            done += 1
        return done

    async def _repair_turn(self, channel: Any, repair: Repair) -> None:
        delivered = list(repair.deliveries)
        if has_unconfirmed(delivered):  # a post whose id a crash kept from the log: find it by its text
            me = self.client.user
            own = [(str(m.id), m.content) async for m in channel.history(limit=POST_SEARCH_LIMIT)
                   if me is not None and m.author.id == me.id]
            delivered = confirm_posts(delivered, own)
        if repair.reply is not None:
            pieces = final_pieces(repair.reply, MESSAGE_LIMIT)
            for index, piece in enumerate(pieces):
                if index < len(delivered):
                    if delivered[index].shown != piece:
                        await channel.get_partial_message(int(delivered[index].platform_message_id)).edit(
                            content=piece, allowed_mentions=NO_MENTIONS)
                else:
                    await channel.send(piece, allowed_mentions=NO_MENTIONS)
            for extra in delivered[len(pieces):]:
                await channel.get_partial_message(int(extra.platform_message_id)).edit(content=CONTINUED)
            log.info("discord: repaired turn %s in %s (the reply shown in full)", repair.turn.id, channel.id)
            return
        for delivery in delivered:  # what was shown stays, without the still-writing mark
            if delivery.shown.endswith(MARK):
                await channel.get_partial_message(int(delivery.platform_message_id)).edit(
                    content=delivery.shown.removesuffix(MARK) or "…", allowed_mentions=NO_MENTIONS)
        await channel.send(embed=notice_embed(INTERRUPTED_NOTICE), allowed_mentions=NO_MENTIONS)
        log.info("discord: told %s that turn %s was interrupted", channel.id, repair.turn.id)

    # --- access control -------------------------------------------------------------------------

    def allowed(self, guild: discord.Guild | None, channel: Any, member: Any) -> bool:
        """Inside the allow-lists (each one empty = everything)? A thread counts as its parent
        channel, and a channel's category counts as well."""
        s = self.settings
        if guild is None:
            return s.answer_dms
        if s.allowed_guilds and str(guild.id) not in s.allowed_guilds:
            return False
        if s.allowed_channels:
            ids = {getattr(channel, "id", None), getattr(channel, "parent_id", None),
                   getattr(channel, "category_id", None)}
            if not {str(i) for i in ids if i is not None} & set(s.allowed_channels):
                return False
        if s.allowed_roles:
            roles = {str(role.id) for role in getattr(member, "roles", [])}
            if not roles & set(s.allowed_roles):
                return False
        return True

    # --- messages -------------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        try:
            await self._on_message(message)
        except Exception:  # the bot keeps running; a message meant for it gets a notice below
            log.exception("discord: failed to handle message %s", message.id)

    async def _on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if me is None or message.author.bot or message.webhook_id is not None:
            return  # never answer bots (ourselves included)
        if message.type not in ANSWERED_TYPES:
            return  # system messages: thread created, pins, joins
        channel: Any = message.channel
        if isinstance(channel, discord.PartialMessageable) and message.guild is not None:
            channel = await self._fetch_channel(channel.id)  # a thread we were never told about
            if channel is None:
                return
        if not self.allowed(message.guild, channel, message.author):
            return
        mentioned = self._mentions_me(message)
        text = self._clean_text(message)
        addressed = mentioned or message.guild is None  # a DM is written to the bot

        if message.guild is None:
            if await self._claim(message):
                await self._answer_message(message, channel, ThreadKey(PLATFORM, str(channel.id)), text, addressed)
        elif isinstance(channel, discord.Thread):
            key = ThreadKey(PLATFORM, str(channel.id))
            known = await self.service.knows_thread(key)
            if not (mentioned or known) or not await self._claim(message):
                return
            history = None
            if not known:
                await self._join(channel)
                history = self._history(channel, before=message)
            await self._answer_message(message, channel, key, text, addressed, history)
        elif mentioned and await self._claim(message):
            if not isinstance(channel, discord.TextChannel):
                # e.g. a voice channel's chat: no threads there, so the channel is the conversation
                await self._answer_message(message, channel, ThreadKey(PLATFORM, str(channel.id)), text, addressed)
                return
            thread = await self._open_thread(message, channel, text)
            if thread is not None:
                await self._answer_message(message, thread, ThreadKey(PLATFORM, str(thread.id)), text, addressed)

    async def _claim(self, message: discord.Message) -> bool:
        """False when this message was already handled (a gateway resume can deliver it twice)."""
        return await self.service.claim_event(f"discord:message:{message.id}")

    def _mentions_me(self, message: discord.Message) -> bool:
        me = self.client.user
        assert me is not None
        if any(user.id == me.id for user in message.mentions):
            return True
        return any(self._is_my_role(role) for role in message.role_mentions)

    def _is_my_role(self, role: discord.Role) -> bool:
        tags = role.tags
        return tags is not None and self.client.user is not None and tags.bot_id == self.client.user.id

    def _clean_text(self, message: discord.Message) -> str:
        """The message without the bot's mention; other mentions become readable ``@names``."""
        me = self.client.user
        assert me is not None
        text = re.sub(rf"<@!?{me.id}>", " ", message.content)
        for role in message.role_mentions:
            if self._is_my_role(role):
                text = text.replace(f"<@&{role.id}>", " ")
        for user in message.mentions:
            name = f"@{user.display_name}"
            text = text.replace(f"<@{user.id}>", name).replace(f"<@!{user.id}>", name)
        return text.strip()

    async def _fetch_channel(self, channel_id: int) -> Any:
        try:
            return await self.client.fetch_channel(channel_id)
        except discord.HTTPException as exc:
            log.warning("discord: cannot look up channel %s (%s)", channel_id, _describe(exc))
            return None

    async def _join(self, thread: discord.Thread) -> None:
        try:
            await thread.join()
        except discord.HTTPException as exc:  # answering may still work; log and go on
            log.warning("discord: could not join thread %s (%s)", thread.id, _describe(exc))

    async def _open_thread(self, message: discord.Message, channel: discord.TextChannel,
                           text: str) -> discord.Thread | None:
        try:
            return await message.create_thread(
                name=thread_name(text or " ".join(a.filename for a in message.attachments)))
        except discord.HTTPException as exc:
            log.warning("discord: could not open a thread in channel %s (%s)", channel.id, _describe(exc))
            # Kept in the log under the thread it would have opened (a thread on a message has its id).
            await self.service.unanswered(
                Event(ThreadKey(PLATFORM, str(message.id)), str(message.author.id), message.author.display_name,
                      text, message_id=str(message.id), addressed=True),
                f"discord could not open a thread (HTTP {exc.status})")
            reason = notice_for(exc)
            await self._try_send(channel, "I couldn't open a thread here. " + reason)
            return None

    async def _answer_message(self, message: discord.Message, channel: Any, key: ThreadKey,
                              text: str, addressed: bool, history: History | None = None) -> None:
        command = self.service.command(text, addressed=addressed)
        if command is not None and command.name == "fork":  # opening a thread is Discord's part
            await self._fork(channel, key, message.author, self._say_in(channel))
            return
        event = self._event_of(key, message.author, text, channel, message_id=str(message.id), addressed=addressed,
                               attachments=await self._attachments(message))
        try:
            await self._stream(event, self._sender(channel), channel,
                               notify=lambda text: self._try_send(channel, text), controls=True, history=history)
        except Exception:
            log.exception("discord: failed to answer message %s in %s", message.id, key)
            await self._try_send(channel, "Sorry, something went wrong on my side.")

    def _sender(self, channel: Any) -> Post:
        async def post(content: str, view: discord.ui.View | None) -> discord.Message:
            if view is None:
                return await channel.send(content, allowed_mentions=NO_MENTIONS)
            return await channel.send(content, view=view, allowed_mentions=NO_MENTIONS)
        return post

    def _say_in(self, channel: Any) -> Say:
        async def say(text: str, notice: bool) -> None:
            if notice:
                await self._try_send(channel, text)
            else:
                await channel.send(text, allowed_mentions=NO_MENTIONS)
        return say

    async def _attachments(self, message: discord.Message) -> tuple[Attachment, ...]:
        """The message's files; the bytes only of those the core will read (the rest get its note)."""
        settings = self.service.settings
        found: list[Attachment] = []
        for index, attached in enumerate(message.attachments):
            content = None
            if index < settings.attachment_max_files and wanted(attached.filename, attached.size,
                                                                  settings.attachment_max_bytes):
                try:
                    content = await asyncio.wait_for(attached.read(), ATTACHMENT_TIMEOUT_S)
                except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("discord: could not fetch attachment %s of message %s (%s)",
                                attached.id, message.id, type(exc).__name__)
            found.append(Attachment(attached.filename, attached.size, content))
        return tuple(found)

    def _history(self, channel: discord.Thread | discord.TextChannel, *,
                 before: discord.Message | None) -> History:
        """Reads the thread's messages before ``before`` for the core to adopt: the newest
        ``RAVEN_ADOPT_MAX_MESSAGES`` (newest first from Discord, so a long thread gives its latest
        discussion, not its opening), handed over oldest first. System messages are left out."""
        async def read() -> list[EarlierMessage]:
            limit = self.service.settings.adopt_max_messages
            if limit <= 0:
                return []
            earlier: list[EarlierMessage] = []
            async for past in channel.history(limit=limit, before=before):
                if past.type not in ANSWERED_TYPES:
                    continue
                names = ", ".join(a.filename for a in past.attachments)
                text = "\n".join(part for part in (past.clean_content, f"(attached: {names})" if names else "")
                                  if part)
                if text.strip():
                    earlier.append(EarlierMessage(past.author.display_name, text, from_bot=past.author.bot))
            return earlier[::-1]
        return read

    # --- streaming ------------------------------------------------------------------------------

    async def _stream(self, event: Event, post: Post, channel: Any, *, notify: Notify,
                      controls: bool = False, history: History | None = None) -> Outcome | None:
        """Render the core's reply with ``post`` (and message edits), with a typing indicator until
        the first piece is posted; then the outcome: a cut-off note closes the reply, a notice (busy,
        refused, failed) goes out through ``notify``. Discord errors are logged and, where possible,
        shown. With ``controls`` (messages Raven can edit later) the reply gets its buttons: Stop
        while it is written, then Retry and Continue; the thread's older reply loses its own.
        Returns how the turn ended (None when Discord failed us)."""
        typing = None
        if channel is not None and await self._typing(channel):
            typing = asyncio.create_task(self._keep_typing(channel))

        policy = RetryPolicy(budget_s=self.settings.retry_budget_s)
        key = event.thread
        stop_on: list[Any] = []  # this reply's messages that show Stop
        turn = self.service.reply(event, confirm=True, history=history)

        def stoppable() -> bool:
            return controls and self.service.writing(key) is turn

        async def post_piece(content: str) -> Any:
            if typing is not None:
                typing.cancel()
            view = None
            if controls:
                if not renderer.messages:
                    await self._clear_controls(key)  # only the newest reply has buttons
                if stoppable():
                    view = self._view(key, "stop")
            handle = await call_with_retries(lambda: post(content, view), policy, _retryable,
                                             "discord: posting a reply")
            if view is not None:
                stop_on.append(handle)
            return handle

        async def edit(handle: Any, content: str) -> None:
            add_stop = (not stop_on and bool(renderer.messages) and handle is renderer.messages[-1]
                        and stoppable())
            extra: dict[str, Any] = {"view": self._view(key, "stop")} if add_stop else {}
            await call_with_retries(lambda: handle.edit(content=content, allowed_mentions=NO_MENTIONS, **extra),
                                    policy, _retryable, "discord: editing a reply")
            if add_stop:
                stop_on.append(handle)

        async def shown(position: int, handle: Any, piece: str) -> None:
            await self.service.record_delivery(turn, position, str(handle.id), piece)

        async def posting(position: int, piece: str) -> None:
            await self.service.posting(turn, position, piece)

        renderer: StreamRenderer[Any] = StreamRenderer(
            post=post_piece, edit=edit, limit=MESSAGE_LIMIT,
            min_interval_s=self.settings.edit_interval_s, shown=shown, posting=posting,
        )
        try:
            _, notice = await present(renderer, turn)
            outcome = await turn.outcome()
            if controls:  # before the delivery report: the thread's next turn waits for it
                await self._settle_controls(key, renderer.messages, stop_on, outcome)
            await self.service.delivered(turn)
            if notice is not None:
                if typing is not None:
                    typing.cancel()
                await notify(notice)
            return outcome
        except discord.HTTPException as exc:
            log.warning("discord: reply in %s failed (%s)", event.thread, _describe(exc))
            await self.service.undelivered(turn, f"discord HTTP {exc.status}")
            # after a 403 in this channel another send there is just one more invalid request
            if not isinstance(exc, discord.Forbidden) or channel is None:
                await notify(notice_for(exc))
            return None
        except BaseException:
            await self.service.undelivered(turn, "the adapter failed")
            raise
        finally:
            if typing is not None:
                typing.cancel()

    @staticmethod
    def _view(key: ThreadKey, *actions: Action) -> discord.ui.View:
        return controls(int(key.thread_id), *actions)

    async def _settle_controls(self, key: ThreadKey, messages: list[Any], stop_on: list[Any],
                               outcome: Outcome) -> None:
        """The finished reply's buttons: Retry and Continue on its last message (Forget on the
        ``/forget`` question), none elsewhere. A failed edit only costs the buttons."""
        last = messages[-1] if messages else None
        final = None
        if isinstance(outcome, Answered | CutOff):
            final = self._view(key, "retry", "continue")
        elif isinstance(outcome, CommandDone) and outcome.command == "forget" and outcome.text == FORGET_ASK:
            final = self._view(key, "forget")
        try:
            for handle in stop_on:
                if handle is not last or final is None:
                    await handle.edit(view=None)
            self._controls[key] = []
            if last is not None and final is not None:
                await last.edit(view=final)
                self._controls[key] = [last]
        except discord.HTTPException as exc:
            log.info("discord: could not update the buttons in %s (%s)", key, _describe(exc))

    async def _clear_controls(self, key: ThreadKey) -> None:
        """Take the buttons off the thread's older reply."""
        handles = self._controls.pop(key, None)
        if handles is None:  # answered before a restart: its newest posted message, as the log has it
            delivery = await self.service.last_delivery(key)  # (taking none off a message changes nothing)
            handles = [] if delivery is None else [
                self.client.get_partial_messageable(int(key.thread_id)).get_partial_message(
                    int(delivery.platform_message_id))]
        for handle in handles:
            try:
                await handle.edit(view=None)
            except discord.HTTPException as exc:
                log.info("discord: could not remove old buttons in %s (%s)", key, _describe(exc))

    async def _typing(self, channel: Any) -> bool:
        try:
            await channel.typing()
            return True
        except discord.HTTPException as exc:
            log.info("discord: no typing indicator in %s (%s)", getattr(channel, "id", "?"), _describe(exc))
            return False

    async def _keep_typing(self, channel: Any) -> None:
        """Renew the indicator until the first piece of the reply is posted."""
        while True:
            await asyncio.sleep(TYPING_REPEAT_S)
            if not await self._typing(channel):
                return

    async def _try_send(self, channel: Any, text: str) -> None:
        """Post a notice in ``channel`` (an embed: never mistaken for an answer); errors are logged."""
        try:
            await call_with_retries(lambda: channel.send(embed=notice_embed(text), allowed_mentions=NO_MENTIONS),
                                    RetryPolicy(budget_s=self.settings.retry_budget_s), _retryable,
                                    "discord: posting a notice")
        except discord.HTTPException as exc:
            log.warning("discord: could not post a notice in %s (%s)", getattr(channel, "id", "?"),
                        _describe(exc))

    # --- slash commands ---------------------------------------------------------------------------

    def _add_commands(self) -> None:
        adapter = self

        @app_commands.command(name="advisor", description="Talk to a persona: a new thread here, "
                                                          "or switch this thread's persona")
        @app_commands.describe(persona="Who answers", question="Your first question (optional)")
        async def advisor(interaction: discord.Interaction, persona: str,
                          question: str | None = None) -> None:
            await adapter.on_advisor(interaction, persona, question or "")

        @advisor.autocomplete("persona")
        async def persona_choices(interaction: discord.Interaction,
                                  current: str) -> list[app_commands.Choice[str]]:
            return adapter.persona_choices(interaction, current)

        @app_commands.command(name="reset", description="Start this thread over (its log is kept)")
        async def reset(interaction: discord.Interaction) -> None:
            await adapter.on_reset(interaction)

        @app_commands.command(name="personas", description="List the personas")
        async def personas(interaction: discord.Interaction) -> None:
            await adapter.on_personas(interaction)

        @app_commands.command(name="help", description="What Raven can do, and its commands")
        async def help_(interaction: discord.Interaction) -> None:
            await adapter.on_help(interaction)

        @app_commands.command(name="retry", description="A new reply to your last message, in place of the last reply")
        async def retry(interaction: discord.Interaction) -> None:
            await adapter.on_redo(interaction, "retry")

        @app_commands.command(name="continue", description="Make the last reply longer")
        async def continue_(interaction: discord.Interaction) -> None:
            await adapter.on_redo(interaction, "continue")

        @app_commands.command(name="stop", description="Stop the reply being written (what was written is kept)")
        async def stop(interaction: discord.Interaction) -> None:
            await adapter.on_stop(interaction)

        @app_commands.command(name="fork", description="A new thread that starts where this one is now")
        async def fork(interaction: discord.Interaction) -> None:
            await adapter.on_fork(interaction)

        @app_commands.command(name="summary", description="A summary of this thread, or of this channel's "
                                                          "recent messages (only you see it)")
        async def summary(interaction: discord.Interaction) -> None:
            await adapter.on_summary(interaction)

        @app_commands.command(name="forget", description="Delete this thread's log and saved state")
        @app_commands.describe(confirm="Delete at once, without asking")
        async def forget(interaction: discord.Interaction, confirm: bool = False) -> None:
            await adapter.on_forget(interaction, confirm)

        commands: list[app_commands.Command[Any, ..., None]] = [
            advisor, reset, retry, continue_, stop, fork, summary, forget, personas, help_]
        for command in commands:
            self.tree.add_command(command)

    def persona_choices(self, interaction: discord.Interaction,
                        current: str) -> list[app_commands.Choice[str]]:
        if not self.allowed(interaction.guild, interaction.channel, interaction.user):
            return []
        needle = current.strip().lower()
        choices = [
            app_commands.Choice(name=f"{p.display_name} ({p.name})"[:100], value=p.name)
            for p in self.service.personas()
            if needle in p.name.lower() or needle in p.display_name.lower()
        ]
        return choices[:25]  # Discord's maximum

    async def _defer(self, interaction: discord.Interaction, *, ephemeral: bool) -> bool:
        """Acknowledge within Discord's 3 s; the answer follows as follow-up messages."""
        try:
            await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        except discord.NotFound:  # 10062: the 3 s had passed (or the interaction is unknown)
            log.warning("discord: interaction %s expired before it was acknowledged", interaction.id)
            return False
        except discord.InteractionResponded:
            pass
        except discord.HTTPException as exc:
            if exc.code != 40060:  # 40060: already acknowledged; follow-ups still work
                raise
        return True

    def _conversation(self, interaction: discord.Interaction) -> ThreadKey | None:
        """The thread (or DM) an interaction was used in, or None in a plain channel."""
        channel = interaction.channel
        if isinstance(channel, discord.Thread | discord.DMChannel):
            return ThreadKey(PLATFORM, str(channel.id))
        return None

    async def _interaction_guard(self, interaction: discord.Interaction, *, ephemeral: bool) -> bool:
        """Defer, or answer "not here" outside the allow-lists; True when the command may go on."""
        if not self.allowed(interaction.guild, interaction.channel, interaction.user):
            if await self._defer(interaction, ephemeral=True):
                await self._followup(interaction, "Raven isn't enabled here.", ephemeral=True, notice=True)
            return False
        return await self._defer(interaction, ephemeral=ephemeral)

    async def on_advisor(self, interaction: discord.Interaction, persona_name: str, question: str) -> None:
        try:
            if not await self._interaction_guard(interaction, ephemeral=False):
                return
            text = f"/advisor {persona_name.strip()} {question.strip()}".strip()
            key = self._conversation(interaction)
            if key is not None:
                if isinstance(interaction.channel, discord.Thread) and not await self.service.knows_thread(key):
                    await self._join(interaction.channel)
                await self._answer_interaction(interaction, key, text)
                return
            try:
                persona = self.service.persona(persona_name.strip().lower())
            except PersonaError as exc:
                await self._followup(interaction, f"{exc}. Try `/personas`.", notice=True)
                return
            await self._advisor_thread(interaction, persona.display_name, question.strip(), text)
        except Exception:
            log.exception("discord: /advisor failed")
            await self._followup(interaction, "Sorry, something went wrong on my side.", notice=True)

    async def _advisor_thread(self, interaction: discord.Interaction, display_name: str, question: str,
                              text: str) -> None:
        """``/advisor`` in a channel: announce, open a thread on the announcement, answer there."""
        channel = interaction.channel
        if not isinstance(channel, discord.TextChannel):
            await self._followup(interaction, "Use `/advisor` in a text channel, a thread or a DM.", notice=True)
            return
        user = interaction.user
        announce = (f"{user.mention} asked **{display_name}**: {question}" if question
                    else f"{user.mention} started a thread with **{display_name}**.")[:MESSAGE_LIMIT]
        try:
            starter = await interaction.followup.send(announce, wait=True, allowed_mentions=NO_MENTIONS)
            thread = await channel.create_thread(name=thread_name(question, display_name), message=starter)
        except discord.HTTPException as exc:
            log.warning("discord: /advisor could not open a thread in %s (%s)", channel.id, _describe(exc))
            await self._followup(interaction, "I couldn't open a thread here. " + notice_for(exc), notice=True)
            return
        event = self._event_of(ThreadKey(PLATFORM, str(thread.id)), user, text, thread)
        await self._stream(event, self._sender(thread), thread, notify=lambda notice: self._try_send(thread, notice),
                           controls=True)

    async def on_reset(self, interaction: discord.Interaction) -> None:
        try:
            key = self._conversation(interaction)
            if not await self._interaction_guard(interaction, ephemeral=key is None):
                return
            if key is None:
                await self._followup(interaction, "Use `/reset` inside a thread I'm answering in "
                                     "(or `/advisor` to start one).", ephemeral=True, notice=True)
                return
            await self._answer_interaction(interaction, key, "/reset")
        except Exception:
            log.exception("discord: /reset failed")
            await self._followup(interaction, "Sorry, something went wrong on my side.", notice=True)

    async def on_personas(self, interaction: discord.Interaction) -> None:
        try:
            if not await self._interaction_guard(interaction, ephemeral=True):
                return
            lines = [f"- `{p.name}` — **{p.display_name}**" + (f": {p.description}" if p.description else "")
                     for p in self.service.personas()]
            text = "Personas (start one with `/advisor`):\n" + "\n".join(lines)
            await self._followup(interaction, text[:MESSAGE_LIMIT], ephemeral=True)
        except Exception:
            log.exception("discord: /personas failed")
            await self._followup(interaction, "Sorry, something went wrong on my side.", ephemeral=True,
                                 notice=True)

    async def on_help(self, interaction: discord.Interaction) -> None:
        try:
            if not await self._interaction_guard(interaction, ephemeral=True):
                return
            await self._followup(interaction, HELP_TEXT[:MESSAGE_LIMIT], ephemeral=True)
        except Exception:
            log.exception("discord: /help failed")
            await self._followup(interaction, "Sorry, something went wrong on my side.", ephemeral=True,
                                 notice=True)

    async def _in_known_thread(self, interaction: discord.Interaction, name: str) -> ThreadKey | None:
        """Defer privately; the conversation the command was used in, or None (with a hint) when it
        is not one Raven talks in."""
        if not await self._interaction_guard(interaction, ephemeral=True):
            return None
        key = self._conversation(interaction)
        if key is None or not await self.service.knows_thread(key):
            await self._followup(interaction, f"Use `/{name}` inside a thread I'm answering in.",
                                 ephemeral=True, notice=True)
            return None
        return key

    async def on_redo(self, interaction: discord.Interaction, command: Literal["retry", "continue"]) -> None:
        """``/retry`` and ``/continue``: the new reply goes into the thread like any reply (with its
        buttons); the command's own answer is private."""
        try:
            key = await self._in_known_thread(interaction, command)
            if key is None:
                return
            channel = interaction.channel
            outcome = await self._stream(self._event(interaction, key, f"/{command}"), self._sender(channel),
                                         channel, notify=self._notifier(interaction), controls=True)
            if isinstance(outcome, Answered | CutOff):
                done = "A new reply is below." if command == "retry" else "The reply goes on below."
                await self._followup(interaction, done, ephemeral=True)
        except Exception:
            log.exception("discord: /%s failed", command)
            await self._followup(interaction, "Sorry, something went wrong on my side.", ephemeral=True,
                                 notice=True)

    async def on_summary(self, interaction: discord.Interaction) -> None:
        """``/summary``, answered privately: in a thread Raven talks in, of that thread (from its state;
        the thread is unchanged); elsewhere in a channel, of the channel's recent messages Raven may
        read (``RAVEN_ADOPT_MAX_MESSAGES`` of them, read for this and not kept)."""
        try:
            if not await self._interaction_guard(interaction, ephemeral=True):
                return
            channel = interaction.channel
            key = self._conversation(interaction)
            history = None
            if key is None or not await self.service.knows_thread(key):
                if not isinstance(channel, discord.TextChannel | discord.Thread):
                    await self._followup(interaction, "Use `/summary` in a channel or a thread.", ephemeral=True,
                                         notice=True)
                    return
                key, history = ThreadKey(PLATFORM, str(channel.id)), self._history(channel, before=None)
            asked = self._event_of(key, interaction.user, "/summary", channel, private=True)  # ephemeral
            turn = self.service.reply(asked, history=history)
            said = await turn.text()
            outcome = await turn.outcome()
            if isinstance(outcome, Busy | Refused | Failed) or not said:
                await self._followup(interaction, outcome.message, ephemeral=True, notice=True)
            else:
                await self._followup(interaction, said[:MESSAGE_LIMIT], ephemeral=True)
                await self.service.delivered(turn)
        except Exception:
            log.exception("discord: /summary failed")
            await self._followup(interaction, "Sorry, something went wrong on my side.", ephemeral=True,
                                 notice=True)

    async def on_stop(self, interaction: discord.Interaction) -> None:
        try:
            key = await self._in_known_thread(interaction, "stop")
            if key is not None:
                said = await self._core_says(interaction, key, "/stop")
                await self._followup(interaction, said, ephemeral=True)
        except Exception:
            log.exception("discord: /stop failed")
            await self._followup(interaction, "Sorry, something went wrong on my side.", ephemeral=True,
                                 notice=True)

    async def on_forget(self, interaction: discord.Interaction, confirm: bool) -> None:
        """``/forget`` asks (privately, with a button that confirms); ``/forget confirm:True`` deletes."""
        try:
            key = await self._in_known_thread(interaction, "forget")
            if key is None:
                return
            said = await self._core_says(interaction, key, "/forget confirm" if confirm else "/forget")
            if said == FORGET_ASK:
                await interaction.followup.send(said, ephemeral=True, view=self._view(key, "forget"),
                                                allowed_mentions=NO_MENTIONS)
                return
            await self._clear_controls(key)
            await self._followup(interaction, said, ephemeral=True)
        except Exception:
            log.exception("discord: /forget failed")
            await self._followup(interaction, "Sorry, something went wrong on my side.", ephemeral=True,
                                 notice=True)

    async def on_fork(self, interaction: discord.Interaction) -> None:
        try:
            if not await self._interaction_guard(interaction, ephemeral=False):
                return
            key = self._conversation(interaction)

            async def say(text: str, notice: bool) -> None:
                await self._followup(interaction, text, notice=notice)

            if key is None:
                await say("Use `/fork` inside a thread I'm answering in.", True)
                return
            await self._fork(interaction.channel, key, interaction.user, say)
        except Exception:
            log.exception("discord: /fork failed")
            await self._followup(interaction, "Sorry, something went wrong on my side.", notice=True)

    async def _fork(self, channel: Any, key: ThreadKey, user: discord.abc.User, say: Say) -> None:
        """Open a thread next to this one (in the same channel, named after it), make it a copy of
        this conversation (``service.fork``: its state copied, whatever the history), and link the
        two threads to each other."""
        if not isinstance(channel, discord.Thread):
            await say("`/fork` works inside a server thread (Discord has no threads in DMs).", True)
            return
        if not await self.service.knows_thread(key):
            await say("There is nothing to fork in this thread yet.", True)
            return
        parent = channel.parent
        if parent is None and channel.parent_id is not None:
            parent = await self._fetch_channel(channel.parent_id)
        if not isinstance(parent, discord.TextChannel):
            await say("I can only fork threads of a text channel.", True)
            return
        try:
            new = await parent.create_thread(name=fork_name(channel.name), type=discord.ChannelType.public_thread)
        except discord.HTTPException as exc:
            log.warning("discord: /fork could not open a thread in %s (%s)", parent.id, _describe(exc))
            await say("I couldn't open a thread for the fork. " + notice_for(exc), True)
            return
        try:
            await self.service.fork(key, ThreadKey(PLATFORM, str(new.id)))
        except Exception:
            log.exception("discord: forking %s into %s failed", key, new.id)
            await self._try_send(new, "I couldn't copy the conversation into this thread.")
            await say("Sorry, the fork failed on my side.", True)
            return
        with contextlib.suppress(discord.HTTPException):
            await new.add_user(user)  # it shows up in their thread list
        try:
            await new.send(f"Forked from {channel.mention} by {user.mention}: this thread goes on from "
                           "where that one was, and that one is unchanged.", allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as exc:
            log.warning("discord: could not post in the fork %s (%s)", new.id, _describe(exc))
        await say(f"Forked into {new.mention}.", False)
        log.info("discord: forked %s into %s", key, new.id)

    # --- buttons ------------------------------------------------------------------------------------

    def _may_control(self, interaction: discord.Interaction) -> bool:
        """Who may press a reply's buttons: someone inside the allow-lists who may write in the
        thread (as they could type the command)."""
        channel = interaction.channel
        if not self.allowed(interaction.guild, channel, interaction.user):
            return False
        if interaction.guild is None:
            return True  # a DM: only its own user sees the buttons
        permissions = interaction.permissions
        if isinstance(channel, discord.Thread):
            return permissions.send_messages_in_threads
        return permissions.send_messages

    async def on_control(self, interaction: discord.Interaction, action: Action, thread_id: int) -> None:
        """A button was pressed: acknowledged at once (Discord allows 3 s), then carried out."""
        try:
            channel = interaction.channel
            if channel is None or channel.id != thread_id or not self._may_control(interaction):
                await interaction.response.send_message(
                    embed=notice_embed("Only people taking part in this conversation can use its buttons."),
                    ephemeral=True)
                return
            await interaction.response.defer()
            key = ThreadKey(PLATFORM, str(thread_id))
            if action == "stop":
                if not self.service.stop(key):
                    await self._followup(interaction, "Nothing is being written here.", ephemeral=True,
                                         notice=True)
                return
            if action == "forget":
                said = await self._core_says(interaction, key, "/forget confirm")
                await self._clear_controls(key)
                await interaction.edit_original_response(content=said, view=None)
                return
            await self._stream(self._event(interaction, key, f"/{action}"), self._sender(channel), channel,
                               notify=self._notifier(interaction), controls=True)
        except discord.InteractionResponded:
            pass
        except Exception:
            log.exception("discord: the %s button failed in %s", action, thread_id)
            await self._followup(interaction, "Sorry, something went wrong on my side.", ephemeral=True,
                                 notice=True)

    def _event(self, interaction: discord.Interaction, key: ThreadKey, text: str) -> Event:
        return self._event_of(key, interaction.user, text, interaction.channel)

    def _event_of(self, key: ThreadKey, user: Any, text: str, channel: Any, **extra: Any) -> Event:
        """The core's event for ``user`` writing ``text`` in ``channel``: the room its limits count in
        (a thread counts as its parent channel; a DM has none), and whether an admin role exempts them."""
        room = None
        if getattr(channel, "guild", None) is not None:
            room = str(getattr(channel, "parent_id", None) or channel.id)
        admin_roles = set(self.settings.admin_roles)
        admin = bool(admin_roles) and bool({str(role.id) for role in getattr(user, "roles", [])} & admin_roles)
        return Event(thread=key, user_id=str(user.id), user_name=user.display_name, text=text,
                     channel=room, admin=admin, **extra)

    def _notifier(self, interaction: discord.Interaction) -> Notify:
        async def notify(notice: str) -> None:  # seen by the user only
            await self._followup(interaction, notice, ephemeral=True, notice=True)
        return notify

    async def _core_says(self, interaction: discord.Interaction, key: ThreadKey, text: str) -> str:
        """What the core answers to a command that writes no reply (``/stop``, ``/forget``)."""
        turn = self.service.reply(self._event(interaction, key, text))
        shown = await turn.text()
        return shown or (await turn.outcome()).message

    async def _answer_interaction(self, interaction: discord.Interaction, key: ThreadKey, text: str) -> None:
        """Stream the core's answer as follow-ups of the interaction (a thread or DM)."""
        event = self._event(interaction, key, text)

        async def post(content: str, view: discord.ui.View | None) -> discord.WebhookMessage:
            # follow-ups can be edited for 15 minutes only: no buttons on them
            return await interaction.followup.send(content, wait=True, allowed_mentions=NO_MENTIONS)

        async def notify(notice: str) -> None:  # seen by the user only, where Discord allows it
            await self._followup(interaction, notice, ephemeral=True, notice=True)

        await self._stream(event, post, None, notify=notify)

    async def _followup(self, interaction: discord.Interaction, text: str, *,
                        ephemeral: bool = False, notice: bool = False) -> None:
        """A follow-up message; a ``notice`` goes out as an embed, never looking like an answer."""
        try:
            if notice:
                await interaction.followup.send(embed=notice_embed(text), ephemeral=ephemeral,
                                                allowed_mentions=NO_MENTIONS)
            else:
                await interaction.followup.send(text, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as exc:
            log.warning("discord: follow-up failed (%s)", _describe(exc))


def _snowflakes(variable: str, values: list[str]) -> list[int]:
    try:
        return [int(value) for value in values]
    except ValueError:
        raise ConfigError(f"{variable}: expected comma-separated Discord IDs, got {values!r}") from None
