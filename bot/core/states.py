"""Where a thread's model state comes from: memory → the store → a rebuild from the log.

The log is the source of truth; a state is only "the model after reading this thread up to message N",
kept hot in memory (an LRU within ``RAVEN_STATE_CACHE_MB``, shared with the persona prefixes) and saved
in the store after every turn. A state is used only if it matches what it depends on: the model file,
the persona's text and the prompt format (the fingerprint), the thread's epoch and the id of the last
reply it has read. Anything else — a corrupt blob, another model, an edited persona — is rebuilt from
the log, and the user notices nothing but a slower reply.

When the state is hot, resuming a thread costs one indexed lookup, whatever the thread's length.

The state from *before* the last reply is kept too (in memory beside the current one, and in the
store's prior slot), so that ``/retry`` and ``/continue`` start where that reply started at the same
cost (``resume_before``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

from cachetools import LRUCache

from bot.core.prompt import FORMAT_VERSION, PromptFormat
from bot.errors import StateError
from bot.events import ThreadKey
from bot.inference.engine import Engine, ModelState
from bot.storage import StateDraft, Store, StoredMessage, ThreadInfo

log = logging.getLogger(__name__)
ResumedFrom = Literal["memory", "store", "rebuild", "new"]


@dataclass(frozen=True)
class CachedState:
    """A thread's state in memory, with what it was built from."""

    model: ModelState
    fingerprint: str
    epoch: int
    last_message_id: int


@dataclass(frozen=True)
class Resumed:
    """Where a turn starts: the model, where it came from, and the last reply it has read (0: none)."""

    model: ModelState
    source: ResumedFrom
    last_id: int


@dataclass(frozen=True)
class _Prefix:
    """The model after a persona's system prompt; every new thread of that persona starts here."""

    model: ModelState


_Entry = CachedState | _Prefix


def _size(entry: _Entry) -> int:
    return entry.model.nbytes()


class _Memory(LRUCache[Hashable, _Entry]):
    """An LRU by bytes that counts what it evicts."""

    evictions = 0

    def popitem(self) -> tuple[Hashable, _Entry]:
        item = super().popitem()
        self.evictions += 1
        return item


class ThreadStates:
    """Owns every model state the chat core uses: thread states and persona prefixes, in one byte
    budget, and the way back to the log when memory and the store have nothing usable."""

    def __init__(self, engine: Engine, store: Store, model_fingerprint: str, budget_bytes: int) -> None:
        self.engine = engine
        self.store = store
        self.model_fingerprint = model_fingerprint
        self._memory = _Memory(maxsize=max(budget_bytes, 1), getsizeof=_size)
        self._budget = budget_bytes

    # --- memory ------------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return int(self._memory.currsize)

    @property
    def evictions(self) -> int:
        return self._memory.evictions

    def __contains__(self, key: ThreadKey) -> bool:
        return key in self._memory

    def get(self, key: ThreadKey) -> CachedState | None:
        entry = self._memory.get(key)  # a hit makes it the most recently used
        return entry if isinstance(entry, CachedState) else None

    def _keep(self, key: Hashable, entry: _Entry) -> None:
        self._memory.pop(key, None)
        if _size(entry) <= self._budget:  # one state larger than the whole budget is not kept
            self._memory[key] = entry

    def forget(self, key: ThreadKey) -> None:
        self._memory.pop(key, None)
        self._memory.pop(("prior", key), None)

    def clear(self) -> None:
        """Drop every thread's state kept in memory (persona prefixes stay)."""
        for key in [k for k, entry in self._memory.items() if isinstance(entry, CachedState)]:
            self._memory.pop(key, None)

    def _prior(self, key: ThreadKey) -> CachedState | None:
        entry = self._memory.get(("prior", key))
        return entry if isinstance(entry, CachedState) else None

    # --- what a state depends on ---------------------------------------------------------------------

    def fingerprint(self, fmt: PromptFormat) -> str:
        return f"{self.model_fingerprint}:{fmt.persona.fingerprint}:{FORMAT_VERSION}"

    # --- resuming ------------------------------------------------------------------------------------

    async def resume(self, thread: ThreadInfo, fmt: PromptFormat) -> Resumed:
        """The model after every turn of the thread's current epoch answered so far (the caller holds
        the thread's lock, so no other turn of it is under way)."""
        key = thread.key
        last_id = await self.store.last_reply_id(key, thread.epoch)
        if not last_id:
            return await self._opening(thread, fmt, None)
        fingerprint = self.fingerprint(fmt)
        wanted = (fingerprint, thread.epoch, last_id)
        cached = self.get(key)
        if cached is not None and (cached.fingerprint, cached.epoch, cached.last_message_id) == wanted:
            return Resumed(cached.model, "memory", last_id)
        stored = await self.store.load_state(key)
        if stored is not None:
            try:
                if not stored.checksum_ok:
                    raise StateError("checksum mismatch")
                if (stored.fingerprint, stored.epoch, stored.last_message_id) != wanted:
                    raise StateError("state is stale (model, persona or log changed)")
                model = await self.engine.decode_state(stored.blob)
                self.remember(key, model, fingerprint, thread.epoch, last_id)
                return Resumed(model, "store", last_id)
            except StateError as exc:
                log.warning("saved state of %s not used (%s); rebuilding from the log", key, exc)
        model = await self.rebuild(thread, fmt)
        blob = await self.engine.encode_state(model)
        await self.store.save_state(key, StateDraft(fingerprint, thread.epoch, model.token_count, blob), last_id)
        self.remember(key, model, fingerprint, thread.epoch, last_id)
        return Resumed(model, "rebuild", last_id)

    async def resume_before(self, thread: ThreadInfo, fmt: PromptFormat, reply: StoredMessage) -> Resumed:
        """The model as it was when ``reply`` (the epoch's last reply) began: after every reply before
        it. Found as cheaply as ``resume``: the prior state in memory or the store (saved when that
        reply was committed), else the current one (after a roll-back), else a rebuild of the log up
        to the reply before it."""
        key = thread.key
        last_id = await self.store.last_reply_id(key, thread.epoch, before_id=reply.id)
        if not last_id:
            return await self._opening(thread, fmt, reply.id)
        fingerprint = self.fingerprint(fmt)
        wanted = (fingerprint, thread.epoch, last_id)
        for cached in (self._prior(key), self.get(key)):
            if cached is not None and (cached.fingerprint, cached.epoch, cached.last_message_id) == wanted:
                return Resumed(cached.model, "memory", last_id)
        for stored in (await self.store.load_prior_state(key), await self.store.load_state(key)):
            if stored is None or not stored.checksum_ok:
                continue
            if (stored.fingerprint, stored.epoch, stored.last_message_id) == wanted:
                try:
                    model = await self.engine.decode_state(stored.blob)
                except StateError as exc:
                    log.warning("saved state of %s not used (%s)", key, exc)
                    continue
                self.remember_prior(key, model, fingerprint, thread.epoch, last_id)
                return Resumed(model, "store", last_id)
        context = await self.store.context(key, thread.epoch, before_id=last_id + 1)
        tokens = await asyncio.to_thread(self._context_tokens, context, fmt)
        model = await self.engine.prefill(await self.prefix(fmt), tokens)
        self.remember_prior(key, model, fingerprint, thread.epoch, last_id)
        return Resumed(model, "rebuild", last_id)

    async def _opening(self, thread: ThreadInfo, fmt: PromptFormat, before_id: int | None) -> Resumed:
        """Where an epoch's first reply starts: the persona's prompt, then the thread's earlier messages
        if Raven adopted it (read once: the first reply's state carries them from then on)."""
        context = await self.store.context(thread.key, thread.epoch, before_id)
        adopted = [m for m in context if m.status == "adopted"]
        if not adopted:
            return Resumed(await self.prefix(fmt), "new", 0)
        tokens = await asyncio.to_thread(self._context_tokens, adopted, fmt)
        return Resumed(await self.engine.prefill(await self.prefix(fmt), tokens), "rebuild", 0)

    async def roll_back(self, thread: ThreadInfo, fmt: PromptFormat, before: Resumed) -> None:
        """Make the state from before a reply the thread's state again (the reply never reached its
        user, so the next turn must not build on it): cheap, because the turn kept that state."""
        key = thread.key
        if not before.last_id:  # it was the thread's first reply: the next turn starts from the prompt
            self.forget(key)
            await self.store.delete_state(key)
            return
        fingerprint = self.fingerprint(fmt)
        self.remember(key, before.model, fingerprint, thread.epoch, before.last_id)
        blob = await self.engine.encode_state(before.model)
        await self.store.save_state(key, StateDraft(fingerprint, thread.epoch, before.model.token_count, blob),
                                    before.last_id)

    def remember(self, key: ThreadKey, model: ModelState, fingerprint: str, epoch: int, last_id: int) -> None:
        self._keep(key, CachedState(model, fingerprint, epoch, last_id))

    def remember_prior(self, key: ThreadKey, model: ModelState, fingerprint: str, epoch: int, last_id: int) -> None:
        """The state before the thread's last reply (``resume_before`` looks here first)."""
        self._keep(("prior", key), CachedState(model, fingerprint, epoch, last_id))

    async def rebuild(self, thread: ThreadInfo, fmt: PromptFormat) -> ModelState:
        """Re-read the epoch's log: each user turn as the prompt format writes it, each reply as the
        token ids the model generated (re-tokenized from its text only when those are unusable)."""
        context = await self.store.context(thread.key, thread.epoch)
        tokens = await asyncio.to_thread(self._context_tokens, context, fmt)
        return await self.engine.prefill(await self.prefix(fmt), tokens)

    def _context_tokens(self, context: list[StoredMessage], fmt: PromptFormat) -> list[int]:
        tokens: list[int] = []
        for message in context:
            if message.status == "adopted":
                tokens += fmt.earlier_message_tokens(message.author, message.text)
            elif message.role != "assistant":
                tokens += fmt.user_turn_tokens(message.text)
            elif (message.tokens and message.tokenizer == self.engine.tokenizer_name
                  and self.engine.valid_tokens(message.tokens)):  # ids from a damaged blob: use the text
                tokens += message.tokens  # exactly what the model read when it wrote the reply
            else:
                tokens += fmt.reply_tokens(message.text)
        return tokens

    async def prefix(self, fmt: PromptFormat) -> ModelState:
        """The model after the persona's system prompt, read once per prompt (keyed by its token ids
        and the persona's state file) and kept in the same memory budget as the threads' states. A
        state-tuned persona reads its prompt (if any) on top of its state file's state."""
        persona = fmt.persona
        tokens = await asyncio.to_thread(fmt.system_tokens) if persona.prompt else []
        state_digest = persona.state.digest if persona.state is not None else ""
        key = ("prefix", hashlib.sha256(repr(tokens).encode()).hexdigest(), state_digest)
        entry = self._memory.get(key)
        if isinstance(entry, _Prefix):
            return entry.model
        model = await self.engine.prefill(await self._initial_state(fmt), tokens)
        self._keep(key, _Prefix(model))
        return model

    async def _initial_state(self, fmt: PromptFormat) -> ModelState | None:
        """The persona's state file as a model state (checked against the loaded model; a mismatch is
        a :class:`~bot.errors.PersonaError` naming the file), or None: a fresh state."""
        from bot.inference.state_file import initial_model_state

        state = fmt.persona.state
        if state is None:
            return None
        backend = self.engine.backend
        return await self.engine.call(lambda: initial_model_state(state, backend))

    async def encode(self, model: ModelState) -> bytes:
        return await self.engine.encode_state(model)
