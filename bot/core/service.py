"""The chat service: the one entry point adapters use.

For each message it runs one *turn*: clean the text, handle a command, store the message (committed
before anything is generated), find the thread's model state (memory → SQLite → rebuild from the log),
generate while streaming, then store the reply and the new state in one transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import torch

from bot.core.commands import HELP_TEXT, Command, parse_command
from bot.core.personas import Persona, PersonaLibrary, check_name
from bot.core.prompt import FORMAT_VERSION, PromptFormat
from bot.core.state_cache import CachedState, StateCache
from bot.core.thinking import ThinkingFilter, strip_thinking
from bot.errors import EngineBusy, InputError, PersonaError, RavenError, StateError
from bot.events import Event, ThreadKey
from bot.inference.engine import Completion, Engine, GenerateRequest, ModelState
from bot.inference.sampling import SamplingParams
from bot.inference.state_codec import decode_state, encode_state
from bot.settings import Settings
from bot.storage import Store, StoredMessage, StoredState, ThreadInfo

log = logging.getLogger(__name__)
ResumedFrom = Literal["memory", "store", "rebuild", "new"]

__all__ = ["ChatService", "StoredMessage", "ThreadInfo", "TurnInfo"]


@dataclass(frozen=True)
class TurnInfo:
    """What the last turn of a thread cost; tests and logs read it."""

    resumed_from: ResumedFrom
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    seconds: float


class ChatService:
    def __init__(self, settings: Settings, store: Store, engine: Engine, personas: PersonaLibrary,
                 model_fingerprint: str, family: str) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.library = personas
        # Persona files are read in a thread (refresh_personas: at start-up and once per turn), never
        # on the event loop; adapters' lookups (autocomplete, /advisor) read this snapshot.
        self._personas: dict[str, Persona | PersonaError] = {}
        self.family = family
        self.model_fingerprint = model_fingerprint
        self.states = StateCache(settings.state_cache_mb * 1024 * 1024)
        self._prefixes: dict[str, ModelState] = {}
        self._locks: weakref.WeakValueDictionary[ThreadKey, asyncio.Lock] = weakref.WeakValueDictionary()
        self._turns: dict[ThreadKey, TurnInfo] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._template: list[torch.Tensor] | None = None  # the model's state layout, made in the worker
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

    async def refresh_personas(self) -> None:
        """Pick up added, edited and removed persona files (changed files only are re-read)."""
        self._personas = await asyncio.to_thread(self.library.load_all)

    async def knows_thread(self, key: ThreadKey) -> bool:
        return await self.store.get_thread(key) is not None

    async def claim_event(self, event_key: str) -> bool:
        return await self.store.claim_event(event_key, self.settings.dedupe_ttl_s)

    async def thread_messages(self, key: ThreadKey) -> list[StoredMessage]:
        return await self.store.messages(key)

    async def thread(self, key: ThreadKey) -> ThreadInfo | None:
        return await self.store.get_thread(key)

    async def list_threads(self, platform: str, prefix: str = "") -> list[ThreadInfo]:
        return await self.store.list_threads(platform, prefix)

    def last_turn(self, key: ThreadKey) -> TurnInfo | None:
        return self._turns.get(key)

    async def drain(self) -> None:
        """Wait for turns still finishing in the background (a reply whose reader went away)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- a turn ------------------------------------------------------------------------------------

    async def reply(self, event: Event) -> AsyncIterator[str]:
        """The reply to ``event`` as text chunks. The turn runs in its own task: if the reader goes
        away (a platform error, a closed page), the reply is still finished and stored."""
        chunks: asyncio.Queue[str | None] = asyncio.Queue()
        task = asyncio.create_task(self._turn(event, chunks), name=f"turn {event.thread}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        while True:
            chunk = await chunks.get()
            if chunk is None:
                break
            yield chunk

    def _lock(self, key: ThreadKey) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def _turn(self, event: Event, out: asyncio.Queue[str | None]) -> None:
        try:
            await self._turn_inner(event, out)
        except Exception:
            log.exception("turn failed in %s", event.thread)
            out.put_nowait("Sorry — something went wrong while answering. Your message is saved; "
                           "please try again.")
        finally:
            out.put_nowait(None)

    async def _turn_inner(self, event: Event, out: asyncio.Queue[str | None]) -> None:
        from bot.core.text import clean_text

        try:
            text = clean_text(event.text, self.settings.max_message_chars)
        except InputError as exc:
            out.put_nowait(str(exc))
            return
        key = event.thread
        async with self._lock(key):  # taken before any await: a thread's messages keep their order
            await self.refresh_personas()
            thread = await self.store.get_thread(key)
            command = parse_command(text)
            if command is not None:
                question = await self._command(event, command, thread, text, out)
                if question is None:
                    return
                text = question
                thread = await self.store.get_thread(key)
            if thread is None:
                thread = await self.store.ensure_thread(key, self.settings.default_persona)
            user_message = await self.store.add_message(
                key, "user", text, author=event.user_name or event.user_id,
                platform_message_id=event.message_id, status="pending",
            )
            await self._answer(thread, user_message, out)

    async def _command(self, event: Event, command: Command, thread: ThreadInfo | None, text: str,
                       out: asyncio.Queue[str | None]) -> str | None:
        """Carry out a command; returns a question still to answer, or None."""
        key = event.thread
        if command.name == "help":
            out.put_nowait(HELP_TEXT)
            return None
        if command.name == "personas":
            out.put_nowait(self._persona_list())
            return None
        if command.name == "reset":
            persona = thread.persona if thread else self.settings.default_persona
            await self._restart(key, persona, text, event)
            out.put_nowait(f"Started over with {self.persona(persona).display_name}. "
                           "(Earlier messages stay in the log.)\n")
            return None
        # /advisor <persona> [question]
        if not command.argument:
            out.put_nowait("Which persona? " + self._persona_list())
            return None
        try:
            chosen = self.persona(command.argument)
        except PersonaError as exc:
            out.put_nowait(f"{exc}\n\n{self._persona_list()}")
            return None
        await self._restart(key, chosen.name, text, event)
        out.put_nowait(f"Now talking with **{chosen.display_name}**"
                       f"{' — ' + chosen.description if chosen.description else ''}\n\n")
        return command.rest or None

    async def _restart(self, key: ThreadKey, persona: str, command_text: str, event: Event) -> None:
        if await self.store.get_thread(key) is None:
            await self.store.ensure_thread(key, persona)
        await self.store.add_message(key, "user", command_text, author=event.user_name or event.user_id,
                                     platform_message_id=event.message_id, status="done")
        await self.store.restart_thread(key, persona)
        self.states.discard(key)

    def _persona_list(self) -> str:
        lines = [f"- `{p.name}` — {p.display_name}" + (f": {p.description}" if p.description else "")
                 for p in self.personas()]
        return "Personas:\n" + "\n".join(lines)

    def _sampling(self, persona: Persona) -> SamplingParams:
        s = self.settings
        values: dict[str, float | int] = {
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
            "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            "penalty_decay": s.penalty_decay, "max_tokens": s.max_reply_tokens,
        }
        for name, value in persona.sampling.items():
            values["max_tokens" if name == "max_reply_tokens" else name] = value
        return SamplingParams(**values)  # type: ignore[arg-type]

    def _seed(self, key: ThreadKey, position: int) -> int:
        """Fixed seed → reproducible replies: the same conversation gets the same replies whatever
        other threads do (``position`` counts this thread's messages); otherwise fresh randomness."""
        base = self.settings.seed
        material = f"{base}:{key}:{position}" if base is not None else f"{time.time_ns()}:{key}"
        return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "little") & (2**63 - 1)

    def _stored_reply(self, raw: str, fmt: PromptFormat) -> str:
        """The reply as the log keeps it, and so as the model re-reads it (think block dropped)."""
        return fmt.clean_reply(raw if self.settings.show_thinking else strip_thinking(raw))

    def _fingerprint(self, persona: Persona) -> str:
        return f"{self.model_fingerprint}:{persona.fingerprint}:{FORMAT_VERSION}"

    async def _answer(self, thread: ThreadInfo, user_message: StoredMessage,
                      out: asyncio.Queue[str | None]) -> None:
        key = thread.key
        started = time.monotonic()
        try:
            persona = self.persona(thread.persona)
        except PersonaError:
            log.warning("thread %s had persona %r, which no longer exists", key, thread.persona)
            persona = self.persona(self.settings.default_persona)
        fmt = PromptFormat(self.engine.tokenizer, self.family, persona)
        fingerprint = self._fingerprint(persona)
        start, resumed_from = await self._resume(thread, persona, fmt, fingerprint, user_message.id)
        prompt = fmt.user_turn_tokens(user_message.text)
        position = (await self.store.position_in_thread(key, user_message.id)
                    if self.settings.seed is not None else 0)
        request = GenerateRequest(
            start=start, prompt_tokens=prompt, sampling=self._sampling(persona),
            stop_strings=fmt.stop_strings, seed=self._seed(key, position),
            separator_text=fmt.separator, separator_tokens=fmt.separator_tokens(), label=str(key),
        )
        try:
            generation = self.engine.generate(request)
        except EngineBusy as exc:
            await self.store.set_status(user_message.id, "failed")
            out.put_nowait(f"Raven is busy right now: {exc.ahead} conversations are ahead of you. "
                           "Please send your message again in a minute.")
            return
        visible = ThinkingFilter(show=self.settings.show_thinking)
        async for chunk in generation:
            shown = visible.feed(chunk)
            if shown:
                out.put_nowait(shown)
        try:
            completion = await generation.result()
        except RavenError:
            await self.store.set_status(user_message.id, "failed")
            raise
        reply = self._stored_reply(completion.text, fmt)
        if completion.finish_reason == "timeout":
            out.put_nowait(f"\n\n_(reply cut off: it took longer than {self.settings.reply_timeout_s:g} s)_")
        elif not completion.text.strip() and completion.finish_reason != "timeout":
            out.put_nowait("_(no reply)_")
        await self._commit(thread, persona, user_message, completion, reply, fingerprint, fmt)
        self._turns[key] = TurnInfo(resumed_from, len(prompt), completion.generated_tokens,
                                    completion.finish_reason, time.monotonic() - started)

    async def _commit(self, thread: ThreadInfo, persona: Persona, user_message: StoredMessage,
                      completion: Completion, reply: str, fingerprint: str, fmt: PromptFormat) -> None:
        key = thread.key
        final = completion.final
        stored = None
        if final is not None:
            blob = await self.engine.call(lambda: encode_state(final))
            stored = StoredState(fingerprint, thread.epoch, 0, final.token_count, blob, True)
        reply_message = await self.store.finish_turn(
            key, user_message.id, reply, stored, tokens=completion.segment_tokens or None,
            tokenizer=self.engine.tokenizer.name)
        if final is not None:
            self.states.put(key, CachedState(final, fingerprint, thread.epoch, reply_message.id))
        else:
            self.states.discard(key)

    async def _resume(self, thread: ThreadInfo, persona: Persona, fmt: PromptFormat, fingerprint: str,
                      user_message_id: int) -> tuple[ModelState, ResumedFrom]:
        """The model state at the end of the thread's log, before ``user_message_id``."""
        key = thread.key
        context = [m for m in await self.store.messages(key, thread.epoch)
                   if m.id < user_message_id and (m.role == "assistant" or m.status == "answered")]
        last_id = max((m.id for m in context if m.role == "assistant"), default=0)
        if not context:
            return await self._persona_prefix(persona, fmt), "new"
        cached = self.states.get(key)
        if cached and (cached.fingerprint, cached.epoch, cached.last_message_id) == (
                fingerprint, thread.epoch, last_id):
            return cached.model, "memory"
        stored = await self.store.load_state(key)
        if stored is not None:
            try:
                if not stored.checksum_ok:
                    raise StateError("checksum mismatch")
                if (stored.fingerprint, stored.epoch, stored.last_message_id) != (
                        fingerprint, thread.epoch, last_id):
                    raise StateError("state is stale (model, persona or log changed)")
                model = await self._decode(stored.blob)
                self.states.put(key, CachedState(model, fingerprint, thread.epoch, last_id))
                return model, "store"
            except StateError as exc:
                log.warning("saved state of %s not used (%s); rebuilding from the log", key, exc)
        model = await self._rebuild(context, persona, fmt)
        if last_id:
            blob = await self.engine.call(lambda: encode_state(model))
            await self.store.save_state(key, StoredState(fingerprint, thread.epoch, last_id,
                                                         model.token_count, blob, True))
            self.states.put(key, CachedState(model, fingerprint, thread.epoch, last_id))
        return model, "rebuild"

    async def _decode(self, blob: bytes) -> ModelState:
        backend = self.engine.backend

        def decode() -> ModelState:
            if self._template is None:
                self._template = backend.zero_state()
            return decode_state(blob, self._template, backend.vocab_size)

        return await self.engine.call(decode)

    async def _rebuild(self, context: list[StoredMessage], persona: Persona, fmt: PromptFormat) -> ModelState:
        tokens: list[int] = []
        vocab = self.engine.backend.vocab_size
        for message in context:
            if message.role != "assistant":
                tokens += fmt.user_turn_tokens(message.text)
            elif (message.tokens and message.tokenizer == self.engine.tokenizer.name
                  and all(0 <= t < vocab for t in message.tokens)):  # ids from a damaged blob: use the text
                tokens += message.tokens  # exactly what the model read when it wrote the reply
            else:
                tokens += fmt.reply_tokens(message.text)
        prefix = await self._persona_prefix(persona, fmt)
        return await self.engine.prefill(prefix, tokens)

    async def _persona_prefix(self, persona: Persona, fmt: PromptFormat) -> ModelState:
        """The model after the persona's system prompt, computed once per prompt (keyed by tokens)."""
        tokens = fmt.system_tokens()
        cache_key = hashlib.sha256(repr(tokens).encode()).hexdigest()
        cached = self._prefixes.get(cache_key)
        if cached is None:
            cached = await self.engine.prefill(None, tokens)
            self._prefixes[cache_key] = cached
        return cached
