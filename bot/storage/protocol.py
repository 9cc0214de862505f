"""The Store contract: what the chat service and the adapters may rely on, whatever the database.

The message log is the source of truth: a saved state is only a cache of "the model after reading
this thread up to message N" and can always be rebuilt from the log. Each thread has an *epoch* that
a persona switch or ``/reset`` increments; the model's context is the current epoch's messages.

Every implementation must pass ``tests/store_contract.py``. Message ids grow with every insert across
all threads (so they order a thread's messages, and a later message always has a later epoch or the
same one); every method that returns a list returns it oldest first unless it says otherwise. Each
write is committed before the method returns, and methods may be awaited concurrently from many
coroutines of one event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, Self

from bot.events import ThreadKey
from bot.storage.records import (
    Accepted,
    Delivery,
    Exchange,
    Phase,
    Repair,
    Role,
    StateDraft,
    Status,
    StoredMessage,
    StoredState,
    ThreadInfo,
    TurnRecord,
)


class Store(Protocol):
    """A database of threads, their message log, their saved model states and claimed event keys."""

    async def __aenter__(self) -> Self:
        """``open()``, then the store itself."""
        ...

    async def __aexit__(self, *exc: object) -> None:
        """``close()``."""
        ...

    async def open(self) -> None:
        """Connect and bring the schema up to date; a database from a newer Raven is refused with a
        ``StoreError`` (a ``RavenError``) and nothing is left open or changed."""
        ...

    async def close(self) -> None:
        """Release the connection; closing a closed store does nothing."""
        ...

    # --- threads ---------------------------------------------------------------------------------------

    async def get_thread(self, key: ThreadKey) -> ThreadInfo | None:
        """The thread, or None when it was never created."""
        ...

    async def ensure_thread(self, key: ThreadKey, persona: str) -> ThreadInfo:
        """Create the thread at epoch 0 with ``persona`` unless it exists (then it is left as it is)."""
        ...

    async def restart_thread(self, key: ThreadKey, persona: str) -> ThreadInfo:
        """A new epoch with ``persona``, and the saved state dropped, in one transaction; the log is
        kept. The thread must exist."""
        ...

    async def rename_thread(self, key: ThreadKey, title: str | None) -> bool:
        """Name the thread (None: back to the first line of its first message); False when there is
        no such thread."""
        ...

    async def delete_thread(self, key: ThreadKey) -> bool:
        """Delete the thread with everything of it — log, saved states, turns, delivery records — in one
        transaction; False when there was no such thread."""
        ...

    async def fork_thread(self, source: ThreadKey, target: ThreadKey, upto_reply_id: int | None = None) -> ThreadInfo:
        """A new thread ``target`` (epoch 0, ``source``'s persona, ``forked_from`` set) whose log is a
        copy of ``source``'s context (its current epoch, as ``context`` reads it) up to and including
        the reply ``upto_reply_id`` (default: all of it), and whose saved state is ``source``'s
        when that state follows exactly that reply (else the fork has none, and is rebuilt from its
        log). One transaction. ``StoreError`` when ``source`` is unknown, ``target`` exists, or
        ``upto_reply_id`` is not a reply in that context."""
        ...

    async def list_threads(self, platform: str, prefix: str = "", limit: int = 100) -> list[ThreadInfo]:
        """The platform's threads whose id starts with ``prefix`` — compared exactly: case-sensitive,
        no wildcards — most recently updated first, at most ``limit``."""
        ...

    # --- the log ---------------------------------------------------------------------------------------

    async def add_message(
        self, key: ThreadKey, role: Role, text: str, *, author: str = "",
        platform_message_id: str | None = None, status: Status = "done",
    ) -> StoredMessage:
        """Append to the thread's current epoch, committed before this returns (a user's message is
        durable before it is answered), and touch the thread's ``updated_at``. The thread must exist."""
        ...

    async def adopt(self, key: ThreadKey, messages: Sequence[tuple[str, str]]) -> list[StoredMessage]:
        """Store ``(author, text)`` pairs — a platform thread's earlier messages, oldest first — as
        ``user`` messages with the status ``adopted`` (part of the context as they stand), in one
        transaction, in the thread's current epoch. The thread must exist."""
        ...

    async def get_message(self, message_id: int) -> StoredMessage | None:
        """The message, or None."""
        ...

    async def messages(self, key: ThreadKey, epoch: int | None = None) -> list[StoredMessage]:
        """The thread's whole log, or one epoch of it, oldest first."""
        ...

    async def position_in_thread(self, key: ThreadKey, message_id: int) -> int:
        """How many of the thread's messages have an id below ``message_id`` (0 for its first): a
        per-thread count, unlike the id, which depends on what every other thread wrote meanwhile.
        O(log n), not a count over the thread."""
        ...

    async def last_reply_id(self, key: ThreadKey, epoch: int, before_id: int | None = None) -> int:
        """The id of the newest ``assistant`` message with status ``done`` (not an undelivered one) of
        that thread and epoch (with id < ``before_id`` when given), or 0 when there is none: what a
        saved state must have read to be current. One indexed lookup, whatever the thread's length
        (it runs on every turn)."""
        ...

    async def context(self, key: ThreadKey, epoch: int, before_id: int | None = None) -> list[StoredMessage]:
        """What the model has read of that epoch, in the order it read it: each ``answered`` ``user``
        message just before its reply (messages are stored as they arrive, so two questions sent
        together both precede their answers in the log), then the reply. No notices, nothing pending,
        failed or interrupted. With ``before_id``, only what was read before the reply (or message)
        with that id. What a rebuild from the log reads; may cost O(thread)."""
        ...

    async def last_exchange(self, key: ThreadKey, epoch: int) -> Exchange | None:
        """The epoch's last question and the reply that answers it, as ``context`` orders them; None
        when the context does not end with a reply."""
        ...

    async def user_activity(self, user_ref: str, since: float) -> list[tuple[float, int]]:
        """The sender's messages since ``since`` (store clock), oldest first, not counting refused ones:
        ``(created_at, tokens generated for it)``. Rate limits are read off this, so they hold across
        restarts and processes."""
        ...

    async def last_thread_of(self, user_ref: str, prefix: str) -> ThreadKey | None:
        """The thread of the sender's newest message (``user_ref`` as ``accept`` stored it) among the
        threads whose key starts with ``prefix`` (literally: e.g. ``slack:C1:``, one Slack channel's):
        what a slash command acts on, for a process that did not see that message."""
        ...

    async def channel_activity(self, channel_ref: str, since: float) -> list[tuple[float, int]]:
        """``user_activity`` for every sender in one channel (``platform:channel id``, as ``accept``
        stored it): the per-channel limits."""
        ...

    async def prune(self, threads_idle_before: float | None, states_idle_before: float | None) -> tuple[int, int]:
        """Retention, in one transaction: delete every thread (with all of it) not updated since
        ``threads_idle_before`` — except one with a turn in flight — and drop saved states not
        written since ``states_idle_before`` (their threads rebuild from the log). None skips that
        part. Returns (threads deleted, states dropped)."""
        ...

    async def set_status(self, message_id: int, status: Status) -> None:
        """Change one message's status (nothing happens for an unknown id)."""
        ...

    # --- instances and turns ------------------------------------------------------------------------

    async def register_instance(self, instance_id: str, label: str = "") -> None:
        """A running Raven process announces itself; its heartbeat starts now."""
        ...

    async def heartbeat(self, instance_id: str) -> None:
        """Renew the instance's lease (its turns are not recovered while it beats)."""
        ...

    async def stop_instance(self, instance_id: str) -> None:
        """A clean stop: what the instance still owns is recoverable at once."""
        ...

    async def accept(
        self, key: ThreadKey, default_persona: str, text: str, *, author: str = "",
        platform_message_id: str | None = None, owner: str | None = None, answer: bool = True,
        writes_reply: bool = False, user_ref: str | None = None, channel_ref: str | None = None,
        refused: bool = False, repairable: bool = True,
    ) -> Accepted:
        """The moment a message is accepted, in one transaction: the thread (created with
        ``default_persona`` when new), the user's message (``pending`` when it is to be answered,
        ``done`` for a command) and, when ``answer`` (or ``writes_reply``: a command that writes a reply
        of its own — ``/retry``, ``/continue``, ``/summary``, ``+gen`` — without being context itself),
        its turn: ``received``, owned by ``owner``. ``user_ref`` (``platform:user id``) and
        ``channel_ref`` (``platform:channel id``) name the sender and the room for ``user_activity``
        and ``channel_activity``; ``refused``: kept, not to be answered (status ``refused``, no turn).
        ``repairable=False``: the turn never shows up in ``repairs`` (its reply is private to the sender)."""
        ...

    async def begin_turn(self, turn_id: int, epoch: int) -> None:
        """The turn's owner starts generating: phase ``generating``, and its message joins ``epoch``
        (the one it is answered in, should a reset have come between its arrival and its turn)."""
        ...

    async def end_turn(self, turn_id: int, phase: Phase, reason: str | None = None) -> None:
        """Move the turn to ``phase`` (``failed``, ``delivered`` …) with a ``reason`` (None keeps the one
        it has, e.g. a reply's ``length`` when it is delivered); ``failed`` and
        ``interrupted`` mark its still-pending message the same. ``delivery_failed`` takes the reply
        out of the thread's context (the reply ``undelivered``, the question ``failed``): a reply its
        user never saw is not what the next turn builds on; ``last_reply_id`` and ``context`` skip it."""
        ...

    async def get_turn(self, turn_id: int) -> TurnRecord | None:
        ...

    async def recover(self, lease_s: float) -> list[TurnRecord]:
        """After a crash, kill or restart: every turn still ``received`` or ``generating`` whose owner
        is gone — stopped, unknown, or without a heartbeat for ``lease_s`` — becomes ``interrupted``,
        its message too, and its thread gets a ``notice``, in one transaction. A live owner's turns are
        never touched. Returns the turns as they were, oldest first; a second call finds nothing."""
        ...

    # --- deliveries and repairs ------------------------------------------------------------------------

    async def record_delivery(self, turn_id: int, position: int, platform_message_id: str, shown: str) -> None:
        """The platform message at ``position`` (0, 1 … for a reply split over several) of the turn's
        reply is ``platform_message_id`` and now shows ``shown`` (replaces what was recorded)."""
        ...

    async def deliveries(self, turn_id: int) -> list[Delivery]:
        """The turn's platform messages, by position."""
        ...

    async def last_delivery(self, thread: ThreadKey) -> Delivery | None:
        """The last platform message (highest position) of the thread's newest turn that has a posted
        one (a delivery recorded before its post, with no id yet, does not count): where the thread's
        last reply shows its buttons, for a process that did not post it."""
        ...

    async def repairs(self, platform: str, lease_s: float, limit: int = 50) -> list[Repair]:
        """The turns of ``platform``'s threads whose platform messages may not match the log, oldest
        first: a reply ``generated`` whose owner is gone (stopped, unknown, or no heartbeat for
        ``lease_s``: it may have died before its last edit), and every ``interrupted`` turn whose user
        has not been told. Each with its reply's text (None for an interrupted turn) and deliveries."""
        ...

    async def mark_repaired(self, turn_id: int) -> None:
        """The platform now shows what the log says: a ``generated`` turn becomes ``delivered``, and
        the turn is not offered for repair again."""
        ...

    async def finish_turn(
        self, key: ThreadKey, user_message_id: int, reply: str, state: StateDraft | None,
        status: Status = "answered", tokens: list[int] | None = None, tokenizer: str | None = None,
        turn_id: int | None = None, finish: str | None = None, replaces: int | None = None,
        reply_status: Status = "done", generated: int = 0, shown_from: int = 0,
    ) -> StoredMessage:
        """Store the reply (author ``raven``, with the token ids the model read), set the user
        message's ``status``, move the turn (if given) to ``generated`` with this reply and how it
        ended (``finish``: ``stop``, or ``length`` / ``timeout`` / ``stopped`` for a reply cut off), and save
        ``state`` as following the reply: one transaction, so a crash or an error anywhere inside
        leaves either the whole turn or none of it.

        The state saved before becomes the *prior* state (``load_prior_state``): the model before this
        reply. With ``replaces`` (a reply id), the new reply takes that one's place: the old one becomes
        ``replaced`` (out of the context) and the prior state stays as it was — the replacement was
        written from it too. ``reply_status`` ``aside``: a reply outside the thread's context (a
        summary, a one-shot answer), stored with ``state`` None. ``generated``: the tokens the model
        wrote for it (what a daily token limit counts). ``shown_from``: the reply's first character this
        turn showed (``/continue`` shows only what it adds); ``repairs`` offer the reply from there."""
        ...

    # --- saved states ----------------------------------------------------------------------------------

    async def load_state(self, key: ThreadKey) -> StoredState | None:
        """The thread's saved state, its blob checked against the checksum written with it."""
        ...

    async def load_prior_state(self, key: ThreadKey) -> StoredState | None:
        """The state saved before the current one (see ``finish_turn``), checked like ``load_state``;
        what it follows is in its ``last_message_id``."""
        ...

    async def save_state(self, key: ThreadKey, state: StateDraft, last_message_id: int) -> None:
        """Replace the thread's saved state (one per thread): ``state`` is the model after the epoch up
        to ``last_message_id``; the store writes a checksum of its blob."""
        ...

    async def delete_state(self, key: ThreadKey) -> None:
        """Drop the thread's saved states (current and prior), if any."""
        ...

    # --- deduplication ---------------------------------------------------------------------------------

    async def claim_event(self, key: str, ttl_s: float) -> bool:
        """True when ``key`` was not claimed in the last ``ttl_s`` seconds of the store's clock (a claim
        at t blocks the key up to t + ttl_s inclusive; a refused claim does not extend that). Claims
        are committed, so they survive a restart; expired ones are swept here."""
        ...

    # --- export ----------------------------------------------------------------------------------------

    async def all_threads(self, after: ThreadKey | None = None, limit: int = 500) -> list[ThreadInfo]:
        """Every platform's threads in the order of their keys (``str(key)``, compared exactly), only
        those after ``after``, at most ``limit``: how an export pages through a whole database."""
        ...
