"""How a turn ended, as data.

The core decides what happened; each adapter decides how to show it. An answer is a message from
Raven; a notice (busy, refused, failed, cut off) is not an answer and is rendered as a notice: an HTTP
status on the web API, an ephemeral or visibly distinct message on Discord and Slack.

Every outcome carries the core's own wording (``message``) so that an adapter that has nothing better
(the terminal) can print it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CutOffReason = Literal["timeout", "length", "stopped", "halted"]
"""``stopped``: Raven is shutting down; ``halted``: the user stopped the reply (``/stop``)."""
RefusalReason = Literal["empty", "too_long", "unknown_persona", "invalid_persona", "no_persona", "nothing_to_redo",
                        "nothing_to_summarize", "rate_limited"]


@dataclass(frozen=True, slots=True)
class Answered:
    """The model answered. ``text`` is the reply as shown; ``reply_id`` its row in the log."""

    text: str
    reply_id: int

    @property
    def message(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class CutOff:
    """The model answered, but the reply was cut short; what was written is kept and shown."""

    text: str
    reply_id: int
    reason: CutOffReason
    limit: float  # seconds for a timeout, tokens for a length cut

    @property
    def message(self) -> str:
        if self.reason == "timeout":
            return f"reply cut off: it took longer than {self.limit:g} s"
        if self.reason == "stopped":
            return "reply cut off: Raven is restarting"
        if self.reason == "halted":
            return "reply stopped"
        return f"reply cut off at the {self.limit:g}-token limit"


@dataclass(frozen=True, slots=True)
class Busy:
    """The engine's queue was full. The user's message is in the log, marked failed."""

    ahead: int
    retry_after_s: int = 60
    restarting: bool = False  # not busy but stopping: the next Raven answers

    @property
    def message(self) -> str:
        if self.restarting:
            return "Raven is restarting; please send your message again in a moment."
        return (f"Raven is busy right now: {self.ahead} conversations are ahead of you. "
                "Please send your message again in a minute.")


@dataclass(frozen=True, slots=True)
class Refused:
    """The message could not be accepted (nothing about it was stored, or only a refused command)."""

    reason: RefusalReason
    message: str
    retry_after_s: int = 0  # rate_limited: when the user may write again


@dataclass(frozen=True, slots=True)
class Failed:
    """Answering failed (a model step, the store). ``partial`` is what had been streamed."""

    partial: str = ""
    message: str = "Sorry — something went wrong while answering. Your message is saved; please try again."


@dataclass(frozen=True, slots=True)
class CommandDone:
    """A command was carried out; ``text`` says what happened (shown as Raven's message)."""

    command: str
    text: str

    @property
    def message(self) -> str:
        return self.text


Outcome = Answered | CutOff | Busy | Refused | Failed | CommandDone
NOTICES = (CutOff, Busy, Refused, Failed)
"""Outcomes whose ``message`` is a notice to show apart from an answer."""
