"""What a store hands back: plain frozen records, the same whatever database is behind them.

Nothing here knows about SQL. The reply token ids' byte format lives here too, because it is part of
what a store keeps, not of how one database keeps it: every store must write the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bot.events import ThreadKey

Role = Literal["user", "assistant", "notice"]
Status = Literal["pending", "answered", "interrupted", "failed", "done", "undelivered", "replaced", "adopted",
                 "aside", "refused"]
"""A message's status. Out of the context: ``undelivered`` (a reply its user never saw) and ``replaced``
(a reply ``/retry`` replaced, or ``/continue`` extended into a new one). ``adopted``: a message written
in a platform thread before Raven was called into it, read into the context as it stands. ``aside``: a
reply that is not part of the context (``/summary``, ``+gen``/``+i``/``+qa``). ``refused``: a message kept
but not answered (its sender was over a rate limit)."""


@dataclass(frozen=True)
class ThreadInfo:
    """A thread's header. ``title`` is the name it was given, else the first line of its first user
    message (any epoch), ≤ 80 chars. ``forked_from``: the thread it was forked from (``/fork``)."""

    key: ThreadKey
    persona: str
    epoch: int
    title: str
    created_at: float
    updated_at: float
    forked_from: ThreadKey | None = None


@dataclass(frozen=True)
class StoredMessage:
    """One entry of the log. ``id`` grows across all threads, so it orders messages but is no position."""

    id: int
    thread: ThreadKey
    epoch: int
    role: Role
    author: str
    text: str
    platform_message_id: str | None
    status: Status
    created_at: float
    tokens: list[int] | None = None
    tokenizer: str | None = None


INTERRUPTED_NOTICE = "Raven was restarted while answering this message; please send it again."
"""The notice a lost turn leaves in its thread's log (and that adapters post on the platform)."""

Phase = Literal["received", "generating", "generated", "delivered", "delivery_failed", "interrupted", "failed"]
IN_FLIGHT: tuple[Phase, ...] = ("received", "generating")
"""Phases of a turn that its owner is still working on; recovery ends them when the owner is gone."""


@dataclass(frozen=True)
class TurnRecord:
    """A user message being answered, and where that stands. ``owner`` is the instance working on
    it; ``reason`` says why a turn failed (``busy``, ``error`` …)."""

    id: int
    thread: ThreadKey
    message_id: int
    reply_id: int | None
    phase: Phase
    owner: str | None
    reason: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Delivery:
    """One platform message that carries (part of) a turn's reply, and what it shows now.
    ``platform_message_id`` is empty while the message is being posted: recorded just before the
    post, so that a crash between the post and its record leaves a trace (``confirmed`` False) that a
    repair resolves by looking for the bot's message showing exactly ``shown``."""

    turn_id: int
    position: int
    platform_message_id: str
    shown: str
    updated_at: float

    @property
    def confirmed(self) -> bool:
        return bool(self.platform_message_id)


@dataclass(frozen=True)
class Repair:
    """A turn whose process is gone before its platform messages caught up with the log: a reply
    stored but perhaps not shown in full (``reply`` set: what this turn's messages should show), or a
    turn lost mid-way (``reply`` None)."""

    turn: TurnRecord
    reply: str | None
    deliveries: list[Delivery]


@dataclass(frozen=True)
class Accepted:
    """What ``accept`` stored: the thread, the user's message and (for a message to answer) its turn."""

    thread: ThreadInfo
    message: StoredMessage
    turn_id: int | None


@dataclass(frozen=True)
class StateDraft:
    """A model state to save: what it was built from. Which message it follows is the store's to
    record (``finish_turn``: the reply it commits) or the caller's to say (``save_state``)."""

    fingerprint: str
    epoch: int
    token_count: int
    blob: bytes


@dataclass(frozen=True)
class Exchange:
    """The last question of a thread's epoch and the reply that answers it (what ``/retry`` and
    ``/continue`` work on)."""

    question: StoredMessage
    reply: StoredMessage


@dataclass(frozen=True)
class StoredState:
    """A saved model state: a cache of "the model after reading the epoch up to ``last_message_id``".

    ``checksum_ok`` is False when the blob read back is not the one written (a torn or damaged row)."""

    fingerprint: str
    epoch: int
    last_message_id: int
    token_count: int
    blob: bytes
    checksum_ok: bool


def checksum(blob: bytes) -> str:
    """What a state's blob is checked against when it is loaded."""
    return hashlib.sha256(blob).hexdigest()


TOKEN_FORMAT = np.dtype("<i4")
"""Reply token ids on disk: little-endian int32, the same bytes on every machine."""


def pack_tokens(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype=TOKEN_FORMAT).tobytes()


def unpack_tokens(blob: bytes | None) -> list[int] | None:
    """The stored ids; None when absent or malformed (a rebuild then re-reads the reply's text)."""
    if blob is None or len(blob) % TOKEN_FORMAT.itemsize:
        return None
    return [int(t) for t in np.frombuffer(bytes(blob), dtype=TOKEN_FORMAT)]
