"""The thread watch: the torch thread count re-checked while running (bot.inference.thread_watch).

Step times here are given, not measured: what is under test is the decision, on the clock the
watch is given. The backend running its steps on the watch's counts is in tests/test_paths.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bot.inference.thread_watch import EVERY_S, PAIRS, ThreadWatch, kind_of, thread_options


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(watch: ThreadWatch, clock: Clock, rows: int, steps: int, seconds: Callable[[int], float]) -> list[int]:
    """``steps`` decode steps of ``rows`` rows, each taking ``seconds(count)``; the counts they ran on."""
    used = []
    for _ in range(steps):
        count = watch.count(rows)
        took = seconds(count)
        clock.now += took
        watch.observe(rows, count, took)
        used.append(count)
    return used


def busy(count: int) -> float:
    """The Zen 4 with two busy neighbours: a one-row fp32 step 191 ms on two threads, 70 on one."""
    return 0.191 if count == 2 else 0.070


def quiet(count: int) -> float:
    """The same host quiet: 31 ms on two threads, 42 on one."""
    return 0.031 if count == 2 else 0.042


def test_the_counts_worth_trying() -> None:
    assert thread_options(1) == [1]
    assert thread_options(2) == [2, 1]
    assert thread_options(3) == [3, 1]
    assert thread_options(4) == [4, 2, 1]
    assert thread_options(16) == [16, 8, 1]
    assert [kind_of(n) for n in (1, 3, 4, 64)] == [0, 0, 1, 1]


def test_between_checks_every_step_runs_on_the_current_count() -> None:
    clock = Clock()
    watch = ThreadWatch([2, 1], (2, 2), every_s=10, clock=clock)
    assert run(watch, clock, 1, 50, busy) == [2] * 50  # 9.55 s: no check yet, however slow
    assert watch.checks == 0 and watch.current == [2, 2]
    clock.now = 10.0
    assert run(watch, clock, 1, 4, busy) == [2, 1, 1, 2]  # the check has begun: pairs in turn


def test_a_busy_host_moves_one_stream_to_one_thread_and_a_quiet_one_moves_it_back() -> None:
    clock = Clock()
    watch = ThreadWatch([2, 1], (2, 2), clock=clock)
    clock.now = EVERY_S
    used = run(watch, clock, 1, 2 * PAIRS, busy)
    assert used == [2, 1, 1, 2, 2, 1, 1, 2]  # four pairs, in turn which count goes first
    assert watch.current == [1, 2]  # the batch's count is its own
    (change,) = watch.changes
    assert (change.kind, change.before, change.after) == ("one stream", 2, 1)
    assert change.ratio == pytest.approx(0.070 / 0.191)
    assert watch.check_costs == [pytest.approx(PAIRS * (0.070 - 0.191))]  # the check saved time already
    assert run(watch, clock, 1, 20, busy) == [1] * 20  # until the next check, 15 s on

    clock.now += EVERY_S  # the neighbours have gone
    used = run(watch, clock, 1, 2 * PAIRS, quiet)
    assert used == [1, 2, 2, 1, 1, 2, 2, 1] and watch.current == [2, 2]
    assert [(c.before, c.after) for c in watch.changes] == [(2, 1), (1, 2)]
    assert watch.changes[1].ratio == pytest.approx(0.031 / 0.042)


def test_a_quiet_host_keeps_its_count_and_checks_again_later() -> None:
    clock = Clock()
    watch = ThreadWatch([2, 1], (2, 2), clock=clock)
    clock.now = EVERY_S
    assert run(watch, clock, 16, 2 * PAIRS, quiet) == [2, 1, 1, 2, 2, 1, 1, 2]
    assert watch.current == [2, 2] and not watch.changes and watch.checks == 1
    assert watch.check_costs == [pytest.approx(PAIRS * (0.042 - 0.031))]  # four steps 11 ms slower
    assert run(watch, clock, 16, 100, quiet) == [2] * 100  # 3.1 s: before the next check
    clock.now += EVERY_S
    assert run(watch, clock, 16, 2 * PAIRS, quiet)[:2] == [2, 1] and watch.checks == 2


def test_one_burst_of_load_does_not_decide() -> None:
    """A neighbour's burst makes one step on the current count 4× as long: that pair says "the
    other is 3× faster", the other three pairs that it is slower, and the median decides."""
    clock = Clock()
    watch = ThreadWatch([2, 1], (2, 2), clock=clock)
    clock.now = EVERY_S
    times = iter([0.124, 0.042, 0.042, 0.031, 0.031, 0.042, 0.042, 0.031])  # counts 2, 1, 1, 2, 2, 1, 1, 2
    run(watch, clock, 1, 2 * PAIRS, lambda count: next(times))
    assert watch.checks == 1 and not watch.changes and watch.current == [2, 2]


def test_a_margin_of_noise_is_not_a_reason_to_change() -> None:
    clock = Clock()
    watch = ThreadWatch([2, 1], (2, 2), clock=clock)
    clock.now = EVERY_S
    run(watch, clock, 1, 2 * PAIRS, lambda count: 0.030 if count == 1 else 0.033)  # the other 9% faster
    assert not watch.changes


def test_steps_whose_size_keeps_changing_give_up_the_check() -> None:
    clock = Clock()
    watch = ThreadWatch([2, 1], (2, 2), clock=clock)
    clock.now = EVERY_S
    for step in range(4 * PAIRS):
        rows = 1 + step % 3  # all one-stream steps, never two of one size in a row
        count = watch.count(rows)
        watch.observe(rows, count, busy(count))
    assert watch.checks == 1 and not watch.changes
    assert watch.count(1) == 2 and watch.count(1) == 2  # no check now: the next is 15 s on


def test_each_kind_of_step_is_checked_on_its_own() -> None:
    """One stream and a batch interleaved: one thread wins the one-row steps, two the 16-row ones."""
    clock = Clock()
    watch = ThreadWatch([2, 1], (2, 2), clock=clock)
    clock.now = EVERY_S
    for _ in range(2 * PAIRS):
        for rows, seconds in ((1, busy), (16, quiet)):
            count = watch.count(rows)
            watch.observe(rows, count, seconds(count))
    assert watch.current == [1, 2] and [c.kind for c in watch.changes] == ["one stream"]
    assert watch.checks == 2


def test_with_four_cores_each_other_count_takes_its_turn() -> None:
    clock = Clock()
    watch = ThreadWatch([4, 2, 1], (4, 4), clock=clock)
    tried = []
    for _ in range(3):
        clock.now += EVERY_S
        used = run(watch, clock, 16, 2 * PAIRS, lambda count: 0.010 / count)  # all four cores win
        assert used.count(4) == PAIRS and len(set(used)) == 2
        tried.append(next(n for n in used if n != 4))
    assert sorted(tried[:2]) == [1, 2] and tried[2] == tried[0]
    assert not watch.changes and watch.current == [4, 4]


def test_a_step_on_a_count_set_elsewhere_is_not_counted() -> None:
    clock = Clock()
    watch = ThreadWatch([2, 1], (2, 2), clock=clock)
    clock.now = EVERY_S
    assert watch.count(1) == 2
    for _ in range(10):
        assert watch.observe(1, 3, 0.001) is None  # someone else's three threads
    assert not watch.changes and watch.count(1) == 2  # the check still waits for its first step


def test_the_watch_needs_counts_to_choose_from() -> None:
    with pytest.raises(ValueError, match="two or more"):
        ThreadWatch([1], (1, 1))
    with pytest.raises(ValueError, match="must be among"):
        ThreadWatch([2, 1], (3, 2))
    with pytest.raises(ValueError, match="one per kind"):
        ThreadWatch([2, 1], (2,))
