"""The torch thread count re-checked while the bot runs, not only at load.

Why: the count is measured at load (``BatchedRWKV7Backend._tune_threads``), but the neighbours that
decide it come and go. On the 2-core Zen 4 (2026-12-06), loaded on a quiet host with two busy
processes started afterwards, a one-row fp32 decode step took 191 ms on two threads against 70 ms on
one (16 rows: 231 against 108; quiet, two threads win: 31 against 42): every op's OpenMP threads wait
for each other, and with the cores taken one of them is always waiting for a core.

So, for each kind of step (under ``SMALL_STEP_ROWS`` rows: one stream; the rest: a batch), every
``every_s`` seconds the next decode steps of that kind take turns between the current count and one
other, in pairs (current, other), (other, current), … so that a steady rise or fall of the load
favours neither. Each pair of steps of one row count gives a ratio (the other's time ÷ the
current's), and when the median of ``pairs`` ratios says the other is faster by more than
``margin``, it becomes the count: a burst of load on one step moves one ratio, not the median. The
cost is a few steps on the slower count per check: on the quiet Zen 4 (``python -m
bench.busy_host``), 55 ms per check in fp32 (0.37% of the 15 s between checks), 31 ms in bf16 (0.21%).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from bot.inference.paths import SMALL_STEP_ROWS

log = logging.getLogger(__name__)

EVERY_S = 15.0
"""Seconds between two checks of one kind of step (the first: this long after the load)."""
PAIRS = 4
"""Ratios per check: one from each two steps, eight steps in all."""
ORDER = (False, True, True, False)
"""Whether a check's steps run on the other count, in turn: pairs (current, other), (other, current)."""
MARGIN = 0.15
"""How much faster the other count must run to take over: more than a quiet host's spread between
neighbouring steps, far less than what a busy core costs (2-3×)."""
KINDS = ("one stream", "batch")
T = TypeVar("T")


def thread_options(cores: int) -> list[int]:
    """The counts worth trying on ``cores`` usable cores: all of them, half (from 4), and one."""
    return sorted({cores, *([cores // 2] if cores >= 4 else []), 1}, reverse=True)


def kind_of(rows: int) -> int:
    """0 for a step under ``SMALL_STEP_ROWS`` rows, else 1 (the indices of ``KINDS``)."""
    return 0 if rows < SMALL_STEP_ROWS else 1


@dataclass
class _Check:
    """One check in progress: the count being tried and what its steps so far measured."""

    other: int
    ratios: list[float] = field(default_factory=list)
    first: tuple[int, float] | None = None  # (rows, seconds) of a pair's first step
    steps: int = 0
    cost: float = 0.0  # the pairs' other-count seconds minus their current-count seconds


@dataclass(frozen=True)
class Change:
    """A count replaced, and what decided it (for the log, the metrics and the tests)."""

    kind: str
    before: int
    after: int
    ratio: float  # median of the other's step time ÷ the current's


class ThreadWatch:
    """Per kind of step: the count to run the next step on (``count``), and what each step took
    (``observe``). Runs on the engine's worker thread alone; ``clock`` is read once per step."""

    def __init__(self, options: Sequence[int], current: Sequence[int], *, every_s: float = EVERY_S,
                 pairs: int = PAIRS, margin: float = MARGIN, first_check_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``first_check_s``: seconds to the first check of each kind (default ``every_s``)."""
        if len(options) < 2:
            raise ValueError("a thread watch needs two or more counts to choose from")
        if any(c not in options for c in current) or len(current) != len(KINDS):
            raise ValueError(f"current counts {list(current)} must be among {list(options)}, one per kind")
        self.options = tuple(options)
        self.current = list(current)
        self.every_s = every_s
        self.pairs = pairs
        self.margin = margin
        self.clock = clock
        self.changes: list[Change] = []
        self.checks = 0
        #: per finished check, seconds its steps on the other count took beyond the current's (< 0: saved)
        self.check_costs: list[float] = []
        now = clock()
        first = now + (every_s if first_check_s is None else first_check_s)
        self._next_check = [first, first]
        self._checking: list[_Check | None] = [None, None]
        self._tried = [0, 0]  # which other count each kind tries next (they take turns)

    def count(self, rows: int) -> int:
        """The thread count for the next step of ``rows`` rows."""
        kind = kind_of(rows)
        check = self._checking[kind]
        if check is None:
            if self.clock() < self._next_check[kind]:
                return self.current[kind]
            check = self._checking[kind] = _Check(self._other(kind))
        return check.other if ORDER[check.steps % len(ORDER)] else self.current[kind]

    def observe(self, rows: int, count: int, seconds: float) -> Change | None:
        """What a step of ``rows`` rows took on ``count`` threads; the change it decided, if any."""
        kind = kind_of(rows)
        check = self._checking[kind]
        if check is None:
            return None
        on_other = ORDER[check.steps % len(ORDER)]
        if count != (check.other if on_other else self.current[kind]):
            return None  # not the step the check asked for (someone else set the count)
        check.steps += 1
        if check.steps % 2:
            check.first = (rows, seconds)
        else:
            first, check.first = check.first, None
            if first is not None and first[0] == rows and min(seconds, first[1]) > 0:
                other_s, current_s = (seconds, first[1]) if on_other else (first[1], seconds)
                check.ratios.append(other_s / current_s)
                check.cost += other_s - current_s
        if len(check.ratios) < self.pairs:
            if check.steps >= 4 * self.pairs:  # the step sizes kept changing: try again later
                self._finish(kind)
            return None
        ratio = statistics.median(check.ratios)
        self._finish(kind)
        self.check_costs.append(check.cost)
        if ratio >= 1 - self.margin:
            return None
        change = Change(KINDS[kind], self.current[kind], check.other, ratio)
        self.current[kind] = check.other
        self.changes.append(change)
        log.info("torch threads for %s steps: %d → %d (a step took %.2f× as long on %d as on %d: "
                 "other work on the cores)", change.kind, change.before, change.after, 1 / ratio,
                 change.before, change.after)
        return change

    def _other(self, kind: int) -> int:
        others = [n for n in self.options if n != self.current[kind]]
        self._tried[kind] = (self._tried[kind] + 1) % len(others)
        return others[self._tried[kind]]

    def _finish(self, kind: int) -> None:
        self._checking[kind] = None
        self._next_check[kind] = self.clock() + self.every_s
        self.checks += 1


def watched_step(watch: ThreadWatch, rows: int, step: Callable[[], T]) -> tuple[T, Change | None]:
    """Run a decode step of ``rows`` rows on the count the watch says and tell it the time taken:
    the step's result, and the change that decided, if any. The caller runs steps on this thread."""
    count = watch.count(rows)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    started = time.perf_counter()
    result = step()
    return result, watch.observe(rows, count, time.perf_counter() - started)


def follow_for_prefill(watch: ThreadWatch, tokens: int) -> None:
    """Set the count the watch keeps for a step of ``tokens`` rows, for a prefill of that many tokens
    (under ``SMALL_STEP_ROWS`` tokens: one stream's count); a count set elsewhere is left alone."""
    current = torch.get_num_threads()
    wanted = watch.current[kind_of(tokens)]
    if current != wanted and current in watch.options:
        torch.set_num_threads(wanted)
