"""Blocking tensor work in a thread of its own that ends when the work is done.

Why not asyncio's executor (``asyncio.to_thread``) or the calling thread: with GNU OpenMP, every
thread that runs a parallel torch op keeps its own team of OpenMP worker threads for as long as it
lives, and once the process holds more such threads than CPUs, every team stops spinning between
parallel regions. Measured on 2 cores: one large op on the event loop's thread made the engine
worker's prefill 2.3× slower (66 tokens: 81 → 190 ms). The executor's threads live on, and so would
their teams; a thread that ends takes its team with it. So loading a model, or a benchmark's direct
measurements, run here; the engine's own worker is the one long-lived thread that runs the model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def settle(future: asyncio.Future[Any], value: object, error: BaseException | None) -> None:
    """Complete a future on its loop's thread, unless it was already (e.g. cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


async def in_fresh_thread(fn: Callable[[], T], *, name: str = "raven-load") -> T:
    """Run ``fn`` in a new (daemon) thread that ends afterwards; the event loop goes on meanwhile.
    Its error is raised here."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            value = fn()
        except BaseException as exc:  # re-raised in the awaiting task
            loop.call_soon_threadsafe(settle, result, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, value, None)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await result


def run_in_fresh_thread(fn: Callable[[], T], *, name: str = "raven-work", torch_threads: int | None = None) -> T:
    """Run ``fn`` under ``torch.no_grad`` in a new thread, wait for it to end, and return its value or
    raise its error. ``torch_threads``: the torch (OpenMP) thread count for that thread's work."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if torch_threads is not None:
                torch.set_num_threads(torch_threads)
            with torch.no_grad():
                box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    worker = threading.Thread(target=target, name=name)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
