"""``python -m bench.busy_host``: replies on a host whose cores got busy after the model loaded, with
the thread watch (``bot.inference.thread_watch``) and without it, in the same run.

The backend is loaded on the quiet host, so it measures and keeps its best count there (all cores,
as a rule). Then one busy process per usable core starts (a Python loop: another service, a build),
and the same replies run through the real engine with the watch and with the count fixed at the
load's choice, in turns. ``--family v4`` does the same with an RWKV-4 checkpoint on the ``rwkv``
package's backend (from all cores; 4 replies at once for the batch). ``busy_ratio_1`` (one reply)
and ``busy_ratio_batch`` (16 at once) are tok/s with the watch ÷ without; ``quiet_ratio`` is the
same with no neighbours and a check due at the start (~1, inside the host's noise).

``check_cost_ms`` is what one check cost (its steps on the other count beyond the current's, median
of the checks; negative where the check already saved time), and ``check_cost_share`` that cost
spread over the 15 s between checks: on a quiet host, the share of a steady load the watch takes.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import torch
import typer

from bench.benchmark import BenchTokenizer, bench_cache_dir, bench_checkpoint, generate_reply, random_tokens
from bot.inference.allocator import tune_allocator
from bot.inference.checkpoint import SizeName, make_checkpoint
from bot.inference.engine import Engine
from bot.inference.machine import detect, usable_cores
from bot.inference.package_backend import PackageBackend
from bot.inference.rwkv7_batched import BatchedRWKV7Backend
from bot.inference.thread_watch import EVERY_S, ThreadWatch, thread_options

ONE_REPLY_TOKENS = 150
"""The issue's case: a 150-token chat took 71 s with the default count and 28 s on one thread."""
BATCH = 16
BATCH_TOKENS = 64
PACKAGE_BATCH = 4
"""The package's backend reads its rows one after another: 4 replies (a batch step, ≥ 4 rows)."""
PACKAGE_BATCH_TOKENS = 32


@contextmanager
def neighbours(count: int) -> Iterator[None]:
    """``count`` processes that keep a core busy each, for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them start spinning
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


WatchedBackend = BatchedRWKV7Backend | PackageBackend


async def _replies(backend: WatchedBackend, replies: int, tokens: int, threads: int) -> float:
    """``replies`` at once through the engine: generated tok/s."""
    engine = Engine(backend, BenchTokenizer(), max_batch=replies, max_queue=replies + 8,  # type: ignore[arg-type]
                    torch_threads=threads)
    async with engine:
        zero = engine.zero_state()
        started = time.perf_counter()
        results = await asyncio.gather(*(generate_reply(engine, zero, random_tokens(16, 7 + i), tokens, 7 + i)
                                         for i in range(replies)))
        return sum(r[2] for r in results) / (time.perf_counter() - started)


def _measure(backend: WatchedBackend, replies: int, tokens: int, rounds: int) -> dict[str, Any]:
    """The same replies with the watch (a check due at once, as on a host that got busy a while
    after the load) and without it (the load's count kept), in turns; medians of tok/s."""
    options = thread_options(usable_cores())
    if isinstance(backend, BatchedRWKV7Backend):
        load = (backend.paths.small_step_threads or backend.paths.threads, backend.paths.threads)
    else:
        load = (options[0], options[0])  # the package's backend starts from all cores
    rates: dict[str, list[float]] = {"watch": [], "fixed": []}
    changes: list[list[str]] = []
    costs: list[float] = []
    for _ in range(rounds):
        for mode in ("fixed", "watch"):
            if isinstance(backend, BatchedRWKV7Backend):
                backend.paths.small_step_threads, backend.paths.threads = load
            watch = ThreadWatch(options, load, first_check_s=0.0) if mode == "watch" else None
            backend.thread_watch = watch
            rates[mode].append(asyncio.run(_replies(backend, replies, tokens, load[1])))
            if watch is not None:
                changes.append([f"{c.kind}: {c.before} → {c.after}" for c in watch.changes])
                costs += watch.check_costs
    watch_rate, fixed_rate = (statistics.median(rates[m]) for m in ("watch", "fixed"))
    cost = statistics.median(costs) if costs else 0.0
    return {"ratio": round(watch_rate / fixed_rate, 3), "watch_tok_s": round(watch_rate, 1),
            "fixed_tok_s": round(fixed_rate, 1), "changes": changes, "check_cost_ms": round(cost * 1e3, 2),
            "check_cost_share": round(cost / EVERY_S, 5)}


def run(dtype: str, rounds: int, size: SizeName = "0.1b", family: str = "v7") -> dict[str, Any]:
    tune_allocator()
    torch.set_num_threads(1)  # this thread runs the event loop (see bot.inference.threads)
    torch.get_num_threads()
    machine = detect()
    if machine.cores < 2:
        raise SystemExit("bench.busy_host: one usable core, so there is no thread count to choose")
    backend: WatchedBackend
    if family == "v7":
        backend = BatchedRWKV7Backend(bench_checkpoint(size), dtype=dtype, max_slots=BATCH + 1,
                                      tune_cache=bench_cache_dir() / "tuning.json")
        loaded, batch_replies, batch_tokens = backend.paths.summary(), BATCH, BATCH_TOKENS
    else:  # one sequence at a time: a smaller batch keeps the run to minutes
        path = bench_cache_dir() / f"rwkv4-{size}-seed0.pth"
        if not path.is_file():
            make_checkpoint(path, "v4", size, seed=0)
        backend = PackageBackend(path, f"cpu {dtype}", max_slots=PACKAGE_BATCH + 1, watch_threads=True)
        loaded, batch_replies, batch_tokens = "the rwkv package, all cores", PACKAGE_BATCH, PACKAGE_BATCH_TOKENS
    result: dict[str, Any] = {"family": family, "size": size, "dtype": dtype, "cpu_kind": machine.kind,
                              "cores": machine.cores, "paths_at_load": loaded, "busy_processes": machine.cores,
                              "rounds": rounds, "batch_replies": batch_replies}
    quiet = _measure(backend, 1, ONE_REPLY_TOKENS, 3 * rounds)  # a small difference: more turns
    with neighbours(machine.cores):
        one = _measure(backend, 1, ONE_REPLY_TOKENS, rounds)
        batch = _measure(backend, batch_replies, batch_tokens, rounds)
    result |= {"quiet_ratio": quiet["ratio"], "busy_ratio_1": one["ratio"], "busy_ratio_batch": batch["ratio"],
               "quiet": quiet, "busy_1": one, "busy_batch": batch}
    return result


def main(dtype: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
         rounds: Annotated[int, typer.Option(help="Turns of each mode per case")] = 2,
         size: Annotated[str, typer.Option(help="0.1b, or tiny for a smoke run")] = "0.1b",
         family: Annotated[str, typer.Option(help="v7 (the batched backend) or v4 (the rwkv package)")] = "v7",
         ) -> None:
    """Replies on a host that got busy after the load, with the thread watch and without."""
    for name, value, allowed in (("size", size, ("0.1b", "tiny")), ("dtype", dtype, ("fp32", "bf16")),
                                 ("family", family, ("v7", "v4"))):
        if value not in allowed:
            raise typer.BadParameter(f"--{name} must be {' or '.join(allowed)}, not {value!r}")
    result = run(dtype, rounds, size, family)  # type: ignore[arg-type]
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    typer.run(main)
