"""One retry policy for every platform call: a budget in time, not a count shared across kinds of error.

- 429: wait what ``Retry-After`` says (1 s when it says nothing);
- 500, 502, 503, 504 and broken connections: back off exponentially (0.5 s, 1 s, 2 s … up to 8 s, with
  jitter);
- anything else (403, 404, ``not_in_channel`` …): no retry, the caller decides;
- and never past the budget: a call that would still be waiting when its budget runs out fails now,
  so that the reply is marked undelivered and the user told, instead of hanging.

Slack's SDK takes it as its one retry handler (``SlackRetryHandler`` in ``adapters/slack_bot.py``);
Discord calls go through ``call_with_retries`` (discord.py already waits out the rate limits it may
wait out, and retries some 5xx itself; this covers what it gives up on).

Each attempt is told to ``call_observers`` (``PlatformCall``: metrics count calls and errors by code);
nothing here knows who listens.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class PlatformCall:
    """One attempt at a platform call: ``result`` is ``ok``, the HTTP status of an error (``429``),
    ``connection`` (a broken connection) or ``error`` (anything else)."""

    platform: str
    what: str
    result: str


CallObserver = Callable[[PlatformCall], None]
call_observers: list[CallObserver] = []
"""Told of every attempt ``call_with_retries`` makes (and whatever calls ``report_call``)."""


def report_call(platform: str, what: str, result: str) -> None:
    """Tell the observers of one attempt; an observer's failure never reaches the call."""
    call = PlatformCall(platform, what, result)
    for observe in list(call_observers):
        try:
            observe(call)
        except Exception:
            log.exception("platform call observer failed")


@dataclass(frozen=True)
class RetryPolicy:
    budget_s: float = 60.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int, elapsed_s: float, status: int | None, retry_after_s: float | None,
              connection_error: bool) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up."""
        if status == 429:
            wait = retry_after_s if retry_after_s is not None else 1.0
        elif connection_error or (status is not None and status in RETRIED_STATUSES):
            wait = min(self.max_backoff_s, self.first_backoff_s * 2**attempt) * random.uniform(0.8, 1.2)
        else:
            return None
        if elapsed_s + wait > self.budget_s:
            return None
        return wait


async def call_with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy,
                            classify: Callable[[BaseException], tuple[int | None, float | None, bool] | None],
                            what: str, clock: Callable[[], float] = time.monotonic, platform: str | None = None) -> T:
    """Run ``call`` under ``policy``. ``classify`` says of an error (status, Retry-After seconds,
    whether the connection broke), or None for an error that is not the platform's to retry.
    ``platform`` names it for the observers (default: ``what`` up to its colon, "discord: …")."""
    started = clock()
    attempt = 0
    name = platform or what.split(":", 1)[0].strip() or "unknown"
    while True:
        try:
            result = await call()
        except Exception as exc:
            kind = classify(exc)
            if kind is None:
                report_call(name, what, "error")
                raise
            status, retry_after, connection = kind
            report_call(name, what, str(status) if status is not None else "connection" if connection else "error")
            wait = policy.delay(attempt, clock() - started, status, retry_after, connection)
            if wait is None:
                raise
            log.info("%s failed (%s); retrying in %.1f s", what, status or type(exc).__name__, wait)
            await asyncio.sleep(wait)
            attempt += 1
        else:
            report_call(name, what, "ok")
            return result
