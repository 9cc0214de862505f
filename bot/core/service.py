"""The chat service: the one entry point adapters use.

``reply(event)`` runs one *turn* in a task of its own and hands back a :class:`~bot.core.turn.Turn`:
clean the text, carry out a command, store the user's message (committed before anything is
generated), resume the thread's model state (``ThreadStates``: memory → store → rebuild from the log),
generate while streaming, then store the reply and the new state in one transaction. How the turn
ended is data (:mod:`bot.core.outcomes`); adapters render it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cachetools import LRUCache

from bot.core.attachments import render as render_attachments
from bot.core.commands import FORGET_CONFIRMATION, HELP_TEXT, Command, as_text, parse_command
from bot.core.limits import DAY, Limits, over_limit
from bot.core.outcomes import Answered, Busy, CommandDone, CutOff, Failed, Outcome, Refused
from bot.core.personas import NAME_PATTERN, Persona, PersonaLibrary, check_name
from bot.core.prompt import PromptFormat
from bot.core.states import Resumed, ThreadStates
from bot.core.text import clean_text, without_controls
from bot.core.thinking import ThinkingFilter, strip_thinking
from bot.core.turn import Turn, TurnInfo
from bot.errors import EngineBusy, InputError, PersonaError, RavenError
from bot.events import EarlierMessage, Event, ThreadKey
from bot.inference.engine import Completion, Engine, GenerateRequest, Generation
from bot.inference.sampling import SamplingParams
from bot.inference.tokenizer import Tokenizer
from bot.settings import CoreSettings
from bot.storage import (
    INTERRUPTED_NOTICE,
    Delivery,
    Exchange,
    Phase,
    Repair,
    StateDraft,
    Store,
    StoredMessage,
    ThreadInfo,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
History = Callable[[], Awaitable[Sequence[EarlierMessage]]]
"""Fetches a platform thread's earlier messages, oldest first (adopting a thread; see ``reply``)."""
HISTORY_TIMEOUT_S = 30.0
REDO_COMMANDS = ("retry", "continue")
"""Commands that write a new reply to the last question: their turn is recorded like an answer's."""
ASIDE_COMMANDS = ("summary", "gen", "instruct", "qa")
"""Commands whose reply stands aside: written from the thread's state or a fresh one, and never part of
the thread's context (the thread's state is not changed)."""
SUMMARY_REQUEST = ("Summarize our conversation so far in a few sentences: what was asked, what was answered, "
                   "and anything decided.")
UNLIMITED_COMMANDS = ("stop", "help", "personas", "forget", "reset", "fork")
"""Commands that write no reply: never held back by a rate limit."""
ONE_SHOT_PROMPTS = {"gen": "{}", "instruct": "Instruction: {}\n\nResponse:", "qa": "Question: {}\n\nAnswer:"}
"""ChatRWKV's one-shot formats, read from a fresh state."""
FORGET_ASK = ("This deletes this thread's log and saved state for good. "
              f"Send `/forget {FORGET_CONFIRMATION}` to do it.")
FORGET_DONE = "Forgotten: this thread's log and saved state are deleted."
TURN_HISTORY = 1024
"""Threads whose last turn's figures are kept (``last_turn``)."""

@dataclass(frozen=True)
class TurnReport:
    """A finished turn, for whoever watches (metrics): what platform, how it ended, what it cost."""

    platform: str
    outcome: str  # answered, cut_off, busy, refused, failed, command
    resumed_from: str | None  # memory, store, rebuild, new; None when nothing was generated
    seconds: float
    first_text_s: float | None  # time to the first text shown
    generated_tokens: int


TurnObserver = Callable[[TurnReport], None]

__all__ = [
    "INTERRUPTED_NOTICE", "ChatService", "Delivery", "Repair", "StoredMessage", "ThreadInfo", "Turn", "TurnInfo",
    "TurnObserver", "TurnReport",
]


class ChatService:
    def __init__(self, settings: CoreSettings, store: Store, engine: Engine, tokenizer: Tokenizer,
                 personas: PersonaLibrary, model_fingerprint: str, family: str, instance_id: str = "") -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.tokenizer = tokenizer
        self.library = personas
        self.family = family
        self.states = ThreadStates(engine, store, model_fingerprint, settings.state_cache_mb * 1024 * 1024)
        # Persona files are read in a thread (refresh_personas: at start-up and once per turn), never
        # on the event loop; adapters' lookups (autocomplete, /advisor) read this snapshot.
        self._personas: dict[str, Persona | PersonaError] = {}
        self._locks: weakref.WeakValueDictionary[ThreadKey, asyncio.Lock] = weakref.WeakValueDictionary()
        self._turns: LRUCache[ThreadKey, TurnInfo] = LRUCache(maxsize=TURN_HISTORY)
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: Counter[ThreadKey] = Counter()  # threads with a turn started and not yet ended
        self._arrivals: dict[ThreadKey, asyncio.Future[None]] = {}  # each thread's last message to store
        self._closing = False  # shutting down: new messages are kept, not answered
        self._writing: dict[ThreadKey, Turn] = {}  # the turn generating in each thread, for followers
        self._generations: dict[ThreadKey, Generation] = {}  # what ``stop`` stops
        self.instance_id = instance_id  # owns the turns this process answers (see Store.recover)
        self.observers: list[TurnObserver] = []  # told of every finished turn (metrics)
        self.is_demo_model = False

    # --- queries adapters use --------------------------------------------------------------------

    def personas(self) -> list[Persona]:
        return [p for p in self._personas.values() if isinstance(p, Persona)]

    def persona(self, name: str) -> Persona:
        check_name(name)
        found = self._personas.get(name)
        if isinstance(found, Persona):
            return found
        if isinstance(found, PersonaError):
            raise PersonaError(str(found))
        available = ", ".join(p.name for p in self.personas())
        raise PersonaError(f"unknown persona {name!r}; available: {available}")

    def persona_list(self) -> str:
        lines = [f"- `{p.name}` — {p.display_name}" + (f": {p.description}" if p.description else "")
                 for p in self.personas()]
        return "Personas:\n" + "\n".join(lines)

    def command(self, text: str, *, addressed: bool = False) -> Command | None:
        """The command ``text`` holds, as the core will read it (adapters ask before routing)."""
        return parse_command(text, addressed=addressed, personas=self._personas)

    async def refresh_personas(self) -> None:
        """Pick up added, edited and removed persona files (changed files only are re-read)."""
        self._personas = await asyncio.to_thread(self.library.load_all)

    async def knows_thread(self, key: ThreadKey) -> bool:
        """A thread Raven talks in: one in the log, or one whose first turn has just started (its
        row is written a moment later; a follow-up sent right after the mention must not be missed)."""
        return key in self._active or await self.store.get_thread(key) is not None

    async def claim_event(self, event_key: str) -> bool:
        return await self.store.claim_event(event_key, self.settings.dedupe_ttl_s)

    async def thread_messages(self, key: ThreadKey) -> list[StoredMessage]:
        return await self.store.messages(key)

    async def thread(self, key: ThreadKey) -> ThreadInfo | None:
        return await self.store.get_thread(key)

    async def list_threads(self, platform: str, prefix: str = "") -> list[ThreadInfo]:
        return await self.store.list_threads(platform, prefix)

    def writing(self, key: ThreadKey) -> Turn | None:
        """The turn writing a reply in that thread right now, if any (``Turn.follow`` reads along)."""
        return self._writing.get(key)

    def last_turn(self, key: ThreadKey) -> TurnInfo | None:
        return self._turns.get(key)

    # --- what a thread's state makes cheap -----------------------------------------------------------

    def stop(self, key: ThreadKey) -> bool:
        """Stop the reply being written in the thread: what was written is kept as the reply (cut off,
        ``halted``), and the model still reads it, so the saved state matches what is kept. False
        when nothing is being written there."""
        generation = self._generations.get(key)
        if generation is None:
            return False
        generation.stop()
        return True

    async def rename_thread(self, key: ThreadKey, title: str) -> bool:
        """Give the thread a name (blank: back to its first message's first line)."""
        try:
            cleaned = clean_text(title[:400], 400).split("\n")[0].strip()[:80]
        except InputError:  # blank
            cleaned = ""
        return await self.store.rename_thread(key, cleaned or None)

    async def forget_thread(self, key: ThreadKey) -> bool:
        """Delete the thread's log and saved state; a reply being written there is stopped first."""
        self.stop(key)
        async with self._lock(key):
            return await self._forget(key)

    async def _forget(self, key: ThreadKey) -> bool:
        self.states.forget(key)
        self._turns.pop(key, None)
        return await self.store.delete_thread(key)

    async def fork(self, source: ThreadKey, target: ThreadKey, upto_reply_id: int | None = None) -> ThreadInfo:
        """A new thread that starts where ``source`` is now (or at one of its replies): its log is a
        copy of the source's context and its state a copy of the source's — one row, whatever the
        history — so it continues exactly as the source would. The source is unchanged."""
        async with self._lock(source):  # no turn of the source commits meanwhile
            info = await self.store.fork_thread(source, target, upto_reply_id)
            thread = await self.store.get_thread(source)
            cached = self.states.get(source)
            if thread is not None and cached is not None and cached.epoch == thread.epoch:
                last = await self.store.last_reply_id(source, thread.epoch)
                if cached.last_message_id == last and upto_reply_id in (None, last):
                    self.states.remember(target, cached.model, cached.fingerprint, 0,
                                         await self.store.last_reply_id(target, 0))
        return info

    async def shutdown(self, grace_s: float) -> None:
        """Stop taking new messages (each gets a "restarting" notice and stays in the log), let the
        turns in flight finish and be delivered for up to ``grace_s``, then cut off whatever is still
        being written (kept, with its state) and wait for those to be stored."""
        self._closing = True
        try:
            await asyncio.wait_for(self.drain(), grace_s)
            return
        except TimeoutError:
            log.warning("replies still being written after %g s: cutting them off", grace_s)
        self.engine.wrap_up()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), max(10.0, grace_s))

    async def drain(self) -> None:
        """Wait for turns still finishing in the background (a reply whose reader went away).
        ``asyncio.wait``, not ``gather``: a drain given up on (``shutdown``'s grace) must not cancel
        the turns it waited for, which are then cut off and stored instead."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    # --- a turn ------------------------------------------------------------------------------------

    def reply(self, event: Event, *, confirm: bool = False, history: History | None = None) -> Turn:
        """Start answering ``event``. The turn runs in its own task: if the reader goes away (a
        platform error, a closed page), the reply is still finished and stored.

        ``confirm``: the caller will report whether the reply reached its user (``delivered`` /
        ``undelivered``: a chat platform, where posting can fail after the reply is written). Until
        it does (or ``RAVEN_DELIVERY_TIMEOUT_S`` passes) the thread's next turn waits, so that it never
        builds on a reply nobody saw: an undelivered reply leaves the log's context, and the thread
        goes back to the state it had before that reply (kept for this; no rebuild).

        ``history``: Raven is being called into a platform thread it does not know yet. After the
        message is stored, the turn fetches the thread's earlier messages with it, stores them in the
        log under their authors (``adopted``) and reads them into the state before answering: once —
        the thread's state carries them from then on. A failed fetch is logged, and the message is
        answered without them."""
        turn = Turn(confirm=confirm)
        key = event.thread
        self._active[key] += 1
        # Arrival order, kept explicitly: each turn stores its message only after the previous one
        # of this thread has stored its own (whatever the store, however its writes are scheduled).
        previous = self._arrivals.get(key)
        stored = asyncio.get_running_loop().create_future()
        self._arrivals[key] = stored
        task = asyncio.create_task(self._run(event, turn, previous, stored, history), name=f"turn {key}")
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            if self._arrivals.get(key) is stored:
                del self._arrivals[key]
            self._active[key] -= 1
            if self._active[key] <= 0:
                del self._active[key]

        task.add_done_callback(done)
        return turn

    async def delivered(self, turn: Turn) -> None:
        """The adapter showed the whole reply on its platform: the turn is complete."""
        await self._delivery(turn, None)

    async def undelivered(self, turn: Turn, reason: str) -> None:
        """The platform would not take (all of) the reply, after its retries: the log says so, and the
        reply is taken out of the thread's context (see ``reply(confirm=True)``)."""
        await self._delivery(turn, reason)

    async def _delivery(self, turn: Turn, failure: str | None) -> None:
        if not isinstance(await turn.outcome(), Answered | CutOff):
            return  # nothing was answered: the turn already ended as it should
        if turn.confirm:
            turn.report_delivery(failure)  # the turn, still holding its thread, settles it
        elif turn.turn_id is not None:
            await self._end_turn(turn, "delivered" if failure is None else "delivery_failed", failure)

    async def record_delivery(self, turn: Turn, position: int, platform_message_id: str, shown: str) -> None:
        """What a platform message of the reply shows now (for repairs after a crash)."""
        if turn.turn_id is not None:
            await self.store.record_delivery(turn.turn_id, position, platform_message_id, shown)

    async def posting(self, turn: Turn, position: int, shown: str) -> None:
        """A platform message showing ``shown`` is about to be posted at ``position``: recorded first,
        with no id yet (``Delivery.confirmed`` False), so that a crash before ``record_delivery``
        still tells the repair to look for it."""
        await self.record_delivery(turn, position, "", shown)

    async def repairs(self, platform: str) -> list[Repair]:
        """Turns on ``platform`` whose messages may not match the log (see ``Store.repairs``)."""
        return await self.store.repairs(platform, self.settings.instance_lease_s)

    async def repaired(self, repair: Repair) -> None:
        await self.store.mark_repaired(repair.turn.id)

    async def last_thread_of(self, platform: str, user_id: str, under: str) -> ThreadKey | None:
        """The thread of the user's newest message on ``platform`` among the thread ids starting with
        ``under`` (e.g. one channel's): for a slash command, in a process that did not see it."""
        return await self.store.last_thread_of(f"{platform}:{user_id}", f"{platform}:{under}")

    async def last_delivery(self, key: ThreadKey) -> Delivery | None:
        """The thread's newest posted platform message (where its last reply's buttons are), for an
        adapter that did not post it: it was started since."""
        return await self.store.last_delivery(key)

    @property
    def limits_apply(self) -> bool:
        """Any RAVEN_RATE_* limit is set: only then is it worth an adapter's while to find out whether a
        sender is exempt (a Slack admin costs a users.info call the message waits for)."""
        s = self.settings
        return bool(s.rate_messages_per_minute or s.rate_tokens_per_day
                    or s.rate_channel_messages_per_minute or s.rate_channel_tokens_per_day)

    @property
    def repair_interval_s(self) -> float:
        """How often adapters look for repairs: a dead process's turns surface once its lease ends."""
        return self.settings.instance_lease_s / 3

    async def unanswered(self, event: Event, reason: str) -> None:
        """Keep a message that cannot be answered at all (e.g. the platform refused to open a thread
        for it), so that nothing a user wrote is lost; its turn ends failed with ``reason``."""
        try:
            text = clean_text(event.text, self.settings.max_message_chars)
        except InputError:
            return  # nothing to keep
        accepted = await self.store.accept(event.thread, self.settings.default_persona, text,
                                           author=event.user_name or event.user_id,
                                           platform_message_id=event.message_id, owner=self.instance_id)
        if accepted.turn_id is not None:
            await self.store.end_turn(accepted.turn_id, "failed", reason)

    def _lock(self, key: ThreadKey) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def _run(self, event: Event, turn: Turn, previous: asyncio.Future[None] | None,
                   stored: asyncio.Future[None], history: History | None) -> None:
        outcome: Outcome = Failed(partial=turn.shown)
        try:
            outcome = await self._turn(event, turn, previous, stored, history)
        except Exception:
            log.exception("turn failed in %s", event.thread)
            outcome = Failed(partial=turn.shown)
            await self._end_turn(turn, "failed", "error")  # never left pending (stuck until a restart)
        finally:
            if not stored.done():
                stored.set_result(None)
            turn.end(outcome)  # even when cancelled: no reader may wait for an outcome forever
        self._report(event, turn, outcome)

    def _report(self, event: Event, turn: Turn, outcome: Outcome) -> None:
        kinds = {Answered: "answered", CutOff: "cut_off", Busy: "busy", Refused: "refused", Failed: "failed",
                 CommandDone: "command"}
        info = turn.info
        report = TurnReport(
            platform=event.platform, outcome=kinds[type(outcome)],
            resumed_from=info.resumed_from if info is not None else None,
            seconds=time.monotonic() - turn.started_at,
            first_text_s=None if turn.first_shown_at is None else turn.first_shown_at - turn.started_at,
            generated_tokens=info.generated_tokens if info is not None else 0)
        for observe in self.observers:
            try:
                observe(report)
            except Exception:  # a watcher's bug must not break a turn
                log.exception("turn observer failed")

    async def _end_turn(self, turn: Turn, phase: Phase, reason: str | None) -> None:
        if turn.turn_id is None:
            return
        try:
            await self.store.end_turn(turn.turn_id, phase, reason)
        except Exception:  # the store itself may be what failed; recovery catches the turn later
            log.exception("could not record turn %s as %s", turn.turn_id, phase)

    async def _turn(self, event: Event, turn: Turn, previous: asyncio.Future[None] | None,
                    stored: asyncio.Future[None], history: History | None = None) -> Outcome:
        raw = event.text
        if event.addressed and not raw.strip() and not event.attachments:
            raw = "/help"  # a bare mention
        try:
            text = self._message_text(event, raw)
        except InputError as exc:
            return Refused("too_long" if exc.reason == "too_long" else "empty", str(exc))
        key = event.thread
        if self._closing:
            await self.unanswered(event, "restarting")
            return Busy(0, retry_after_s=30, restarting=True)
        # Stored the moment it is accepted, before waiting for the thread's lock (another turn may be
        # generating there): a crash meanwhile cannot lose it. Persona files are not re-read first (the
        # names that make "@Raven advisor <name>" a command are the last turn's snapshot).
        command = self.command(text, addressed=event.addressed)
        author = event.user_name or event.user_id
        user_ref = f"{event.platform}:{event.user_id}"
        if previous is not None:
            await asyncio.wait([previous])  # the message that arrived before this one is stored first
        channel_ref = f"{event.platform}:{event.channel}" if event.channel else None
        exempt = event.admin or user_ref in self.settings.admins or (
            command is not None and command.name in UNLIMITED_COMMANDS)
        limited = None if exempt else await self._limit(user_ref, channel_ref)
        # The log keeps a command in its slash form.
        accepted = await self.store.accept(
            key, self.settings.default_persona, as_text(command) if command is not None else text,
            author=author, platform_message_id=event.message_id, owner=self.instance_id,
            answer=command is None,
            writes_reply=command is not None and command.name in REDO_COMMANDS + ASIDE_COMMANDS,
            user_ref=user_ref, channel_ref=channel_ref, refused=limited is not None, repairable=not event.private)
        stored.set_result(None)
        if limited is not None:
            return limited
        turn.turn_id = accepted.turn_id
        message = accepted.message
        if command is not None and command.name == "stop":  # not after the reply it is to stop
            said = "Stopped." if self.stop(key) else "Nothing is being written here."
            turn.show(said)
            return CommandDone("stop", said)
        async with self._lock(key):  # a thread's turns run in the order their messages arrived
            await self.refresh_personas()  # local file checks in a thread: picks up an edited persona
            thread = await self.store.get_thread(key)  # as it is now: an earlier turn may have switched it
            assert thread is not None
            if command is not None and command.name in REDO_COMMANDS + ASIDE_COMMANDS:
                self._writing[key] = turn
                try:
                    if command.name in ASIDE_COMMANDS:
                        return await self._aside(command, thread, message, turn, history)
                    return await self._redo(command, thread, message, turn)
                finally:
                    if self._writing.get(key) is turn:
                        del self._writing[key]
            if command is not None:
                result = await self._command(command, thread, turn)
                if not isinstance(result, str):
                    return result
                # "/advisor <persona> <question>": the question is answered in the new epoch. It is
                # the sender's too (the tokens written for it count), so one such message counts
                # twice against a per-minute limit: the safe side.
                asked = await self.store.accept(key, self.settings.default_persona, result, author=author,
                                                platform_message_id=event.message_id, owner=self.instance_id,
                                                user_ref=user_ref, channel_ref=channel_ref,
                                                repairable=not event.private)
                turn.turn_id, message, thread = asked.turn_id, asked.message, asked.thread
            if history is not None:
                await self._adopt(thread, history)
            self._writing[key] = turn
            try:
                return await self._answer_and_confirm(thread, message, turn)
            finally:
                if self._writing.get(key) is turn:
                    del self._writing[key]

    async def _limit(self, user_ref: str, channel_ref: str | None) -> Refused | None:
        """The message is over a limit (RAVEN_RATE_*): the refusal that says until when. The sender's
        own limits come first, then the channel's (every member's messages there)."""
        s, now = self.settings, time.time()
        mine = Limits(s.rate_messages_per_minute, s.rate_tokens_per_day, "You have sent", "for you")
        if mine.active:
            refused = over_limit(await self.store.user_activity(user_ref, now - DAY), now, mine)
            if refused is not None:
                return refused
        room = Limits(s.rate_channel_messages_per_minute, s.rate_channel_tokens_per_day,
                      "This channel has had", "in this channel")
        if channel_ref is not None and room.active:
            return over_limit(await self.store.channel_activity(channel_ref, now - DAY), now, room)
        return None

    async def housekeeping(self) -> tuple[int, int]:
        """Retention (RAVEN_RETENTION_DAYS, RAVEN_STATE_IDLE_DAYS): delete threads idle that long, drop
        saved states unused that long (the log rebuilds them). Returns (threads, states) removed."""
        now = time.time()
        threads_before = now - self.settings.retention_days * DAY if self.settings.retention_days else None
        states_before = now - self.settings.state_idle_days * DAY if self.settings.state_idle_days else None
        if threads_before is None and states_before is None:
            return 0, 0
        threads, states = await self.store.prune(threads_before, states_before)
        if threads or states:
            self.states.clear()  # whatever it kept may be of a deleted thread, or a dropped state's
            log.info("retention: %d thread(s) deleted, %d saved state(s) dropped", threads, states)
        return threads, states

    def _message_text(self, event: Event, raw: str) -> str:
        """The message as the log keeps it: the typed text (within the limit), then its files."""
        typed = clean_text(raw, self.settings.max_message_chars) if raw.strip() or not event.attachments else ""
        files = render_attachments(event.attachments, self.settings.attachment_max_bytes,
                                   self.settings.attachment_max_files)
        text = "\n\n".join(part for part in (typed, files) if part)
        return text or clean_text(raw, self.settings.max_message_chars)  # nothing at all: "empty"

    async def _adopt(self, thread: ThreadInfo, history: History) -> None:
        """Read a platform thread's earlier messages into the log, once, before its first reply."""
        key = thread.key
        if not self.settings.adopt_max_messages or any(
                m.role != "user" or m.status == "adopted" for m in await self.store.messages(key)):
            return  # adoption is off, or this thread has been talked in (or adopted) already
        kept = await self._earlier(key, history)
        if kept:
            await self.store.adopt(key, kept)
            log.info("adopted %s: %d earlier message(s) read into the thread", key, len(kept))

    async def _earlier(self, key: ThreadKey, history: History) -> list[tuple[str, str]]:
        """A platform's earlier messages as ``(author, text)``, oldest first: the newest ones, at most
        RAVEN_ADOPT_MAX_MESSAGES and RAVEN_ADOPT_MAX_CHARS of them; [] when they cannot be read."""
        try:
            earlier = list(await asyncio.wait_for(history(), HISTORY_TIMEOUT_S))
        except Exception as exc:  # a platform error must not cost the user their answer
            log.warning("could not read the earlier messages of %s (%s); answering without them", key, exc)
            return []
        kept: list[tuple[str, str]] = []
        budget = self.settings.adopt_max_chars
        for message in reversed(earlier[-self.settings.adopt_max_messages:] if self.settings.adopt_max_messages
                                else []):
            try:
                text = clean_text(message.text, self.settings.max_message_chars)
            except InputError:
                continue
            if len(text) > budget:
                break
            budget -= len(text)
            kept.append((message.author or "someone", text))
        return kept[::-1]

    async def _redo(self, command: Command, thread: ThreadInfo, message: StoredMessage, turn: Turn) -> Outcome:
        """``/retry``: a new reply to the last question, sampled from the state before the last reply;
        ``/continue``: the last reply made longer, from the state right after its text. Either way the
        new reply takes the old one's place in the log (the old one is kept, ``replaced``)."""
        exchange = await self.store.last_exchange(thread.key, thread.epoch)
        if exchange is None:
            await self._end_turn(turn, "failed", "nothing to redo")
            return Refused("nothing_to_redo", f"There is no reply to {command.name} in this thread yet.")
        return await self._answer_and_confirm(thread, exchange.question, turn, redo=(command.name, exchange),
                                              seed_message=message)

    async def _aside(self, command: Command, thread: ThreadInfo, message: StoredMessage, turn: Turn,
                     history: History | None = None) -> Outcome:
        """``/summary``: the thread's state, asked for a summary, and that answer kept out of the thread
        (its state is not changed: the request is read into a copy). With ``history`` (a summary of a
        channel's recent messages, outside any thread): a fresh state reads them first — they are
        not kept, only the summary is. ``+gen``/``+i``/``+qa``: a fresh state reading the text in
        ChatRWKV's format. The reply is stored ``aside``."""
        key = thread.key
        persona = self._thread_persona(thread)
        fmt = PromptFormat(self.tokenizer, self.family, persona)
        if command.name != "summary" and not command.rest:
            await self._end_turn(turn, "failed", "empty")
            word = {"gen": "+gen", "instruct": "+i", "qa": "+qa"}[command.name]
            return Refused("empty", f"`{word}` needs something after it, e.g. `{word} what is an index?`")
        if turn.turn_id is not None:
            await self.store.begin_turn(turn.turn_id, thread.epoch)
        try:
            if command.name == "summary" and history is not None:
                earlier = await self._earlier(key, history)
                if not earlier:
                    await self._end_turn(turn, "failed", "nothing to summarize")
                    return Refused("nothing_to_summarize", "There are no recent messages here to summarize.")
                tokens = await self._off_loop(lambda: [t for author, text in earlier
                                                       for t in fmt.earlier_message_tokens(author, text)])
                start = await self.engine.prefill(await self.states.prefix(fmt), tokens)
                prompt_text, stops = None, fmt.stop_strings
            elif command.name == "summary":
                resumed = await self.states.resume(thread, fmt)
                if not resumed.last_id and resumed.source == "new":
                    await self._end_turn(turn, "failed", "nothing to summarize")
                    return Refused("nothing_to_summarize", "There is nothing in this thread to summarize yet.")
                start, prompt_text, stops = resumed.model, None, fmt.stop_strings
            else:
                start = await self.engine.call(self.engine.zero_state)
                prompt_text = ONE_SHOT_PROMPTS[command.name].format(command.rest)
                stops = [] if command.name == "gen" else [fmt.separator]
        except EngineBusy as exc:
            await self._end_turn(turn, "failed", "busy")
            return Busy(exc.ahead)
        prompt, separator = await self._off_loop(lambda: (
            fmt.user_turn_tokens(SUMMARY_REQUEST) if prompt_text is None else self.tokenizer.encode(prompt_text),
            fmt.separator_tokens()))
        position = (await self.store.position_in_thread(key, message.id) if self.settings.seed is not None else 0)
        sampling = self._sampling(persona)
        request = GenerateRequest(start=start, prompt_tokens=prompt, sampling=sampling, stop_strings=stops,
                                  seed=self._seed(key, position), separator_text=fmt.separator,
                                  separator_tokens=separator)
        completion = await self._stream(key, request, turn)
        if not isinstance(completion, Completion):
            return completion
        reply = await self.store.finish_turn(key, message.id, without_controls(completion.text).strip(), None,
                                             status="done",
                                             turn_id=turn.turn_id, finish=completion.finish_reason,
                                             reply_status="aside", generated=completion.generated_tokens)
        outcome = self._ending(completion, turn, reply.id, sampling)
        if turn.confirm:
            failure = await self._delivery_report(turn, outcome)
            await self._end_turn(turn, "delivered" if failure is None else "delivery_failed", failure)
        return outcome

    async def _delivery_report(self, turn: Turn, outcome: Outcome) -> str | None:
        """Hand the outcome to the adapter and wait (holding the thread) for whether it was shown."""
        turn.end(outcome)
        try:
            return await asyncio.wait_for(turn.delivery(), self.settings.delivery_timeout_s)
        except TimeoutError:
            log.warning("no delivery report within %g s; taken as delivered", self.settings.delivery_timeout_s)
            return None

    async def _answer_and_confirm(self, thread: ThreadInfo, message: StoredMessage, turn: Turn,
                                  redo: tuple[str, Exchange] | None = None,
                                  seed_message: StoredMessage | None = None) -> Outcome:
        outcome, before, fmt = await self._answer(thread, message, turn, redo, seed_message or message)
        if not turn.confirm or before is None or not isinstance(outcome, Answered | CutOff):
            return outcome
        failure = await self._delivery_report(turn, outcome)  # the adapter shows it, then reports
        if failure is None:
            await self._end_turn(turn, "delivered", None)
            return outcome
        log.warning("reply in %s was not delivered (%s): the thread goes back to before it", thread.key, failure)
        await self._end_turn(turn, "delivery_failed", failure)
        if redo is not None:  # the reply it replaced is out of the context too: so is its question
            await self.store.set_status(message.id, "failed")
        assert fmt is not None
        await self.states.roll_back(thread, fmt, before)
        return outcome

    async def _command(self, command: Command, thread: ThreadInfo, turn: Turn) -> Outcome | str:
        """Carry out a command: its outcome, or (``/advisor <persona> <question>``) the question
        still to answer in this turn."""
        key = thread.key
        if command.name == "help":
            turn.show(HELP_TEXT)
            return CommandDone("help", HELP_TEXT)
        if command.name == "personas":
            listing = self.persona_list()
            turn.show(listing)
            return CommandDone("personas", listing)
        if command.name == "reset":
            await self._restart(key, thread.persona)
            said = (f"Started over with {self._thread_persona(thread).display_name}. "
                    "(Earlier messages stay in the log.)\n")
            turn.show(said)
            return CommandDone("reset", said)
        if command.name == "forget":
            if command.argument != FORGET_CONFIRMATION:
                turn.show(FORGET_ASK)
                return CommandDone("forget", FORGET_ASK)
            await self._forget(key)  # this command's own message goes with the rest
            turn.show(FORGET_DONE)
            return CommandDone("forget", FORGET_DONE)
        if command.name == "fork":  # adapters that can open a thread handle /fork before it gets here
            said = "`/fork` is not available here yet."
            turn.show(said)
            return CommandDone("fork", said)
        # /advisor <persona> [question]
        if not command.argument:
            return Refused("no_persona", "Which persona? " + self.persona_list())
        try:
            chosen = self.persona(command.argument)
        except PersonaError as exc:
            reason = "unknown_persona" if NAME_PATTERN.fullmatch(command.argument) else "invalid_persona"
            return Refused(reason, f"{exc}\n\n{self.persona_list()}")  # type: ignore[arg-type]
        await self._restart(key, chosen.name)
        said = (f"Now talking with **{chosen.display_name}**"
                f"{' — ' + chosen.description if chosen.description else ''}\n\n")
        turn.show(said)
        if not command.rest:
            return CommandDone("advisor", said)
        return command.rest

    async def _restart(self, key: ThreadKey, persona: str) -> None:
        await self.store.restart_thread(key, persona)
        self.states.forget(key)

    def _sampling(self, persona: Persona) -> SamplingParams:
        """The settings' sampling parameters with the persona's overrides (checked by the same model)."""
        chosen = self.settings.sampling.model_copy(update=persona.sampling)
        return SamplingParams(
            temperature=chosen.temperature, top_p=chosen.top_p, top_k=chosen.top_k,
            presence_penalty=chosen.presence_penalty, frequency_penalty=chosen.frequency_penalty,
            penalty_decay=chosen.penalty_decay, max_tokens=chosen.max_reply_tokens,
        )

    def _seed(self, key: ThreadKey, position: int) -> int:
        """Fixed seed → reproducible replies: the same conversation gets the same replies whatever
        other threads do (``position`` counts this thread's messages); otherwise fresh randomness."""
        base = self.settings.seed
        material = f"{base}:{key}:{position}" if base is not None else f"{time.time_ns()}:{key}"
        return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "little") & (2**63 - 1)

    def _stored_reply(self, raw: str, fmt: PromptFormat) -> str:
        """The reply as the log keeps it, and so as the model re-reads it (think block dropped)."""
        return fmt.clean_reply(without_controls(raw if self.settings.show_thinking else strip_thinking(raw)))

    def _thread_persona(self, thread: ThreadInfo) -> Persona:
        try:
            return self.persona(thread.persona)
        except PersonaError:
            log.warning("thread %s had persona %r, which no longer exists", thread.key, thread.persona)
            return self.persona(self.settings.default_persona)

    @staticmethod
    async def _off_loop(work: Callable[[], T]) -> T:
        """Tokenizing is pure Python (the World tokenizer): a long message would stall the loop."""
        return await asyncio.to_thread(work)

    async def _answer(self, thread: ThreadInfo, user_message: StoredMessage, turn: Turn,
                      redo: tuple[str, Exchange] | None = None, seed_message: StoredMessage | None = None,
                      ) -> tuple[Outcome, Resumed | None, PromptFormat | None]:
        """Generate and commit the reply; also returns where the turn started (for a roll-back).

        ``redo``: ``("retry" | "continue", the last exchange)``: start from the state before that
        exchange's reply (``ThreadStates.resume_before``), and store the new reply in its place;
        ``continue`` first re-reads the old reply's own tokens, so the model carries on from its
        last word."""
        key = thread.key
        started = time.monotonic()
        persona = self._thread_persona(thread)
        fmt = PromptFormat(self.tokenizer, self.family, persona)
        if turn.turn_id is not None:
            await self.store.begin_turn(turn.turn_id, thread.epoch)
        try:  # a persona prompt or a rebuild is model work too, and waits in the same queue
            before = (await self.states.resume(thread, fmt) if redo is None
                      else await self.states.resume_before(thread, fmt, redo[1].reply))
        except EngineBusy as exc:
            await self._end_turn(turn, "failed", "busy")
            return Busy(exc.ahead), None, None
        start, resumed_from = before.model, before.source
        kept_text, kept_tokens = "", []
        if redo is not None and redo[0] == "continue":
            kept_text, kept_tokens = redo[1].reply.text, await self._off_loop(
                lambda: self._reply_without_separator(redo[1].reply, fmt))
        prompt, separator = await self._off_loop(
            lambda: (fmt.user_turn_tokens(user_message.text) + kept_tokens, fmt.separator_tokens()))
        seed_from = seed_message or user_message
        position = (await self.store.position_in_thread(key, seed_from.id)
                    if self.settings.seed is not None else 0)
        sampling = self._sampling(persona)
        request = GenerateRequest(
            start=start, prompt_tokens=prompt, sampling=sampling,
            stop_strings=fmt.stop_strings, seed=self._seed(key, position),
            separator_text=fmt.separator, separator_tokens=separator,
        )
        completion = await self._stream(key, request, turn)
        if not isinstance(completion, Completion):
            return completion, None, None
        reply = self._stored_reply(kept_text + completion.text, fmt)
        replaced = redo[1].reply.id if redo is not None else None
        reply_message = await self._commit(thread, fmt, user_message, completion, reply, turn.turn_id,
                                           before=before, replaces=replaced,
                                           tokens=kept_tokens + completion.segment_tokens,
                                           shown_from=len(kept_text) if kept_text else 0)
        info = TurnInfo(resumed_from, len(prompt), completion.generated_tokens, completion.finish_reason,
                        time.monotonic() - started)
        self._turns[key] = info
        turn.info = info
        return self._ending(completion, turn, reply_message.id, sampling), before, fmt

    async def _stream(self, key: ThreadKey, request: GenerateRequest, turn: Turn) -> Completion | Outcome:
        """Generate, showing the text as it comes (``stop`` can end it); the completion, or how the
        turn ended without one."""
        try:
            generation = self.engine.generate(request)
        except EngineBusy as exc:
            await self._end_turn(turn, "failed", "busy")
            return Busy(exc.ahead)
        self._generations[key] = generation
        try:
            visible = ThinkingFilter(show=self.settings.show_thinking)
            async for chunk in generation:
                turn.show(without_controls(visible.feed(chunk)))
            try:
                completion = await generation.result()
            except RavenError:
                log.exception("generation failed in %s", key)
                await self._end_turn(turn, "failed", "model")
                return Failed(partial=turn.shown)
        finally:
            if self._generations.get(key) is generation:
                del self._generations[key]
        if completion.final is None and not completion.text:
            if completion.finish_reason == "stopped":
                await self._end_turn(turn, "interrupted", "stopped before it started")
                return Busy(0, retry_after_s=30, restarting=True)
            if completion.finish_reason == "halted":  # stopped before its first word: nothing to keep
                await self._end_turn(turn, "failed", "halted")
                return CutOff("", 0, "halted", 0)
        return completion

    def _ending(self, completion: Completion, turn: Turn, reply_id: int, sampling: SamplingParams) -> Outcome:
        if completion.finish_reason == "timeout":
            return CutOff(turn.shown, reply_id, "timeout", self.settings.reply_timeout_s)
        if completion.finish_reason in ("stopped", "halted"):
            return CutOff(turn.shown, reply_id, completion.finish_reason, 0)  # type: ignore[arg-type]
        if completion.finish_reason == "length":
            return CutOff(turn.shown, reply_id, "length", sampling.max_tokens)
        return Answered(turn.shown, reply_id)

    def _reply_without_separator(self, reply: StoredMessage, fmt: PromptFormat) -> list[int]:
        """The tokens of a reply as the model read them, up to the turn separator (``/continue``)."""
        separator = fmt.separator_tokens()
        tokens = reply.tokens if (reply.tokens and reply.tokenizer == self.engine.tokenizer_name
                                  and self.engine.valid_tokens(reply.tokens)) else fmt.reply_tokens(reply.text)
        if separator and tokens[-len(separator):] == separator:
            return tokens[:-len(separator)]
        text = self.tokenizer.decode(tokens)
        return self.tokenizer.encode(text[:-len(fmt.separator)] if text.endswith(fmt.separator) else text)

    async def _commit(self, thread: ThreadInfo, fmt: PromptFormat, user_message: StoredMessage,
                      completion: Completion, reply: str, turn_id: int | None, before: Resumed,
                      replaces: int | None, tokens: list[int], shown_from: int = 0) -> StoredMessage:
        """The reply, the user's message marked answered and the new state: one transaction. The
        state the turn started from stays as the thread's prior state (for ``/retry``)."""
        key = thread.key
        final = completion.final
        fingerprint = self.states.fingerprint(fmt)
        stored = None
        if final is not None:
            blob = await self.states.encode(final)
            stored = StateDraft(fingerprint, thread.epoch, final.token_count, blob)
        reply_message = await self.store.finish_turn(
            key, user_message.id, reply, stored, tokens=tokens or None,
            tokenizer=self.tokenizer.name, turn_id=turn_id, finish=completion.finish_reason, replaces=replaces,
            generated=completion.generated_tokens, shown_from=shown_from)
        if final is not None:
            if replaces is None:
                self.states.remember_prior(key, before.model, fingerprint, thread.epoch, before.last_id)
            self.states.remember(key, final, fingerprint, thread.epoch, reply_message.id)
        else:
            self.states.forget(key)
        return reply_message
