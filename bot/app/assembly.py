"""Assembly: settings → store, tokenizer, model backend, engine → the chat service.

Explicit lifecycle: nothing happens at import; ``open_service`` opens everything and closes it in
reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bot.core.personas import PersonaLibrary
from bot.core.service import ChatService
from bot.errors import ModelLoadError
from bot.inference.allocator import tune_allocator
from bot.inference.backend import Backend
from bot.inference.checkpoint import describe, make_checkpoint
from bot.inference.engine import Engine
from bot.inference.state_file import StateLayout
from bot.inference.threads import in_fresh_thread
from bot.inference.tokenizer import load_tokenizer
from bot.settings import CoreSettings
from bot.storage import SQLiteStore, Store

log = logging.getLogger(__name__)
DEMO_MODEL_NAME = "demo-rwkv7-tiny.pth"


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    is_demo: bool

HOUSEKEEPING_INTERVAL_S = 3600.0
"""How often retention runs (it also runs at start-up)."""

def choose_model(settings: CoreSettings) -> ModelChoice:
    """The configured checkpoint, or the random-weight demo model (made on first use)."""
    if settings.model is not None:
        return ModelChoice(settings.model, False)
    demo = settings.data_dir / DEMO_MODEL_NAME
    if not demo.is_file():
        log.info("no RAVEN_MODEL configured: writing the demo model to %s", demo)
        make_checkpoint(demo, "v7", "tiny", seed=0)
    return ModelChoice(demo, True)


def model_fingerprint(path: Path) -> str:
    """Identifies the weights without reading a multi-GB file: size plus its first and last MiB."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def load_backend(settings: CoreSettings, path: Path) -> Backend:
    family, _, _, _ = describe(path)
    slots = settings.max_batch + 1
    use_batched = family == "v7" and settings.backend in ("auto", "batched")
    if settings.backend == "batched" and family != "v7":
        raise ModelLoadError(f"RAVEN_BACKEND=batched serves RWKV-7 only; {path} is RWKV-{family[1:]}")
    if use_batched:
        from bot.inference.rwkv7_batched import BatchedRWKV7Backend

        device, _, dtype = settings.strategy.strip().partition(" ")
        return BatchedRWKV7Backend(path, device=device, dtype=dtype.strip() or "fp32", max_slots=slots,
                                   tune_cache=settings.data_dir / "tuning.json", torch_threads=settings.torch_threads,
                                   cuda_graphs=settings.cuda_graphs)
    from bot.inference.package_backend import PackageBackend

    return PackageBackend(path, settings.strategy, max_slots=slots, watch_threads=settings.torch_threads == 0)


@contextlib.asynccontextmanager
async def open_service(settings: CoreSettings) -> AsyncIterator[ChatService]:

    tune_allocator()  # before the model's first allocation (see bot/inference/allocator.py)
    choice = await in_fresh_thread(lambda: choose_model(settings))  # may write the demo model
    personas = PersonaLibrary(settings.personas_dir)
    await asyncio.to_thread(personas.get, settings.default_persona)  # fail at start-up, not on the first message
    tokenizer = await asyncio.to_thread(load_tokenizer, settings.tokenizer)
    backend = await in_fresh_thread(lambda: load_backend(settings, choice.path))
    # a persona's state file must fit this model, else that persona is reported broken
    personas.state_layout = await in_fresh_thread(lambda: StateLayout.of_backend(backend))
    fingerprint = await asyncio.to_thread(model_fingerprint, choice.path)
    engine = Engine(
        backend, tokenizer, max_batch=settings.max_batch, prefill_chunk=settings.prefill_chunk,
        max_queue=settings.max_queue, reply_timeout_s=settings.reply_timeout_s,
        torch_threads=settings.torch_threads,
    )
    async with SQLiteStore(settings.database_path) as store, engine:
        instance_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        await store.register_instance(instance_id, label=f"raven pid {os.getpid()}")
        await recover(store, settings.instance_lease_s)
        service = ChatService(settings, store, engine, tokenizer, personas, fingerprint, backend.family,
                              instance_id=instance_id)
        await service.refresh_personas()
        service.is_demo_model = choice.is_demo
        lease = asyncio.create_task(keep_lease(store, instance_id, settings.instance_lease_s), name="raven-lease")
        tidy = asyncio.create_task(keep_tidy(service), name="raven-retention")
        # Everything loaded so far lives as long as the process: keep the collector from walking it
        # again (full collections over it paused the event loop for ~100 ms).
        gc.freeze()
        try:
            yield service
        finally:
            await service.drain()
            for task in (lease, tidy):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await store.stop_instance(instance_id)


async def keep_tidy(service: ChatService, interval_s: float = HOUSEKEEPING_INTERVAL_S) -> None:
    """Retention (``ChatService.housekeeping``): at start-up, then every hour."""
    while True:
        try:
            await service.housekeeping()
        except Exception:  # a busy database: next time
            log.exception("retention failed; trying again in %g s", interval_s)
        await asyncio.sleep(interval_s)


async def recover(store: Store, lease_s: float) -> None:
    """Turns whose process is gone (killed, crashed, or stopped mid-turn) are marked interrupted,
    with a notice in their thread; a live process's turns are left alone."""
    interrupted = await store.recover(lease_s)
    if interrupted:
        log.warning("%d message(s) were interrupted when their process stopped; their threads say so",
                    len(interrupted))


async def keep_lease(store: Store, instance_id: str, lease_s: float) -> None:
    """Renew this process's lease a few times per lease, and recover the turns of processes whose
    lease has run out meanwhile (one killed a moment before this one started is caught here)."""
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            await store.heartbeat(instance_id)
            await recover(store, lease_s)
        except Exception:  # a busy or failing database: try again at the next beat
            log.exception("could not renew the lease of %s", instance_id)
