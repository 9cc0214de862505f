"""The rate limits (RAVEN_RATE_*) as arithmetic on the log's activity rows: no counters of their own,
so a limit holds across restarts and across processes sharing one database."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from bot.core.outcomes import Refused

MINUTE, DAY = 60.0, 86_400.0
Activity = Sequence[tuple[float, int]]  # (created_at, tokens generated for it), oldest first


@dataclass(frozen=True, slots=True)
class Limits:
    """Whose messages are counted, and how many of them (0: no limit)."""

    messages_per_minute: int
    tokens_per_day: int
    sent: str  # "You have sent" / "This channel has had"
    written_for: str  # "for you" / "in this channel"

    @property
    def active(self) -> bool:
        return bool(self.messages_per_minute or self.tokens_per_day)


def over_limit(activity: Activity, now: float, limits: Limits) -> Refused | None:
    """The refusal, saying when the limit resets, if one more message would be over ``limits``."""
    per_minute, per_day = limits.messages_per_minute, limits.tokens_per_day
    recent = [at for at, _ in activity if at > now - MINUTE]
    if per_minute and len(recent) >= per_minute:
        wait = max(1, math.ceil(recent[-per_minute] + MINUTE - now))
        return Refused("rate_limited", f"{limits.sent} {len(recent)} messages in the last minute (the limit is "
                                       f"{per_minute}). Please wait {wait} s before the next one.", wait)
    used = sum(tokens for _, tokens in activity)
    if per_day and used >= per_day:
        left, free_at = used, now
        for at, tokens in activity:  # oldest first: when enough of them have left the 24 hours
            left -= tokens
            free_at = at + DAY
            if left < per_day:
                break
        wait = max(1, math.ceil(free_at - now))
        when = datetime.fromtimestamp(free_at, UTC).strftime("%H:%M UTC")
        return Refused("rate_limited", f"Raven has written {used:,} tokens {limits.written_for} in the last 24 "
                                       f"hours (the limit is {per_day:,}). You can ask again from {when} "
                                       f"(in about {math.ceil(wait / 60)} min).", wait)
    return None
