"""What a turn costs besides the model, on a short thread and on a long one.

When a thread's state is hot, resuming it must not depend on how long the thread is: no loading of the
whole log, no unpacking of every reply. This measures the chat core's own work per turn — the store's
reads and writes, finding the state, tokenizing, encoding the new state, scheduling — as the turn's
wall time minus the time the engine's worker spent in model steps, through the real service, engine
and SQLite store, on the tiny random-weight model with one-token replies (so little else is in it).

The long thread's history is written straight through the store (a user message and a reply per
turn), then one real turn reads it into the state; after that, both threads are hot and their turns
are timed alternately (median of ``turns`` each).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bot.app.assembly import open_service
from bot.app.settings import load_settings
from bot.core.outcomes import Answered, CutOff
from bot.core.service import ChatService
from bot.events import Event, ThreadKey

SHORT_MESSAGES = 10
LONG_MESSAGES = 2000


async def _fill(service: ChatService, key: ThreadKey, messages: int) -> None:
    """``messages`` messages of history (half questions, half answers), written as turns are."""
    await service.store.ensure_thread(key, service.settings.default_persona)
    for turn in range(messages // 2):
        user = await service.store.add_message(key, "user", f"question {turn} about the schema",
                                               author="bench", status="pending")
        await service.store.finish_turn(key, user.id, f"answer {turn}: add an index", None)


async def _turn(service: ChatService, key: ThreadKey, text: str) -> tuple[float, float]:
    """(wall seconds, seconds in model steps) of one turn."""
    stats = service.engine.stats
    model_before = stats.step_seconds
    started = time.perf_counter()
    turn = service.reply(Event(key, "bench", "bench", text))
    await turn.text()
    outcome = await turn.outcome()
    wall = time.perf_counter() - started
    if not isinstance(outcome, Answered | CutOff):
        raise RuntimeError(f"a benchmark turn did not answer: {outcome}")
    return wall, stats.step_seconds - model_before


async def _measure(checkpoint: Path, data_dir: Path, short: int, long: int, turns: int) -> dict[str, Any]:
    settings = load_settings(env_file=None, model=checkpoint, data_dir=data_dir, seed=1,
                             max_reply_tokens=1, max_batch=4)
    async with open_service(settings) as service:
        keys = {short: ThreadKey("bench", "short"), long: ThreadKey("bench", "long")}
        for size, key in keys.items():
            await _fill(service, key, size - 2)
            await _turn(service, key, "warm up")  # reads the history into the state: hot from here on
        overhead: dict[int, list[float]] = {size: [] for size in keys}
        for index in range(turns):
            for size, key in keys.items():
                wall, model = await _turn(service, key, f"next question {index}")
                overhead[size].append(wall - model)
                if service.last_turn(key).resumed_from != "memory":  # type: ignore[union-attr]
                    raise RuntimeError("a benchmark turn did not resume from memory")
    short_ms = statistics.median(overhead[short]) * 1000
    long_ms = statistics.median(overhead[long]) * 1000
    return {
        f"turn_overhead_ms_{short}": round(short_ms, 2),
        f"turn_overhead_ms_{long}": round(long_ms, 2),
        "turn_overhead_ratio": round(long_ms / short_ms, 3),
        "turn_overhead_turns": turns,
    }


def measure_turn_overhead(checkpoint: Path, *, short: int = SHORT_MESSAGES, long: int = LONG_MESSAGES,
                          turns: int = 40) -> dict[str, Any]:
    """Median per-turn overhead (ms) on threads of ``short`` and ``long`` messages, and their ratio
    (the target: ≤ 1.2). Runs its own event loop; ``checkpoint`` is a small RWKV-7 file."""
    with tempfile.TemporaryDirectory(prefix="raven-bench-turns-") as tmp:
        return asyncio.run(_measure(checkpoint, Path(tmp), short, long, turns))
