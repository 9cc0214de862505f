"""The inference engine: one worker thread owns the model and serves many threads at once.

Scheduling, once per step of the worker:

1. **Admit** new replies whose prompts fit this step's prefill budget together: their prompts are
   read in one multi-row prefill per distinct length (longest first, at most ``MAX_ADMIT_ROUNDS``), and
   their first tokens are sampled at once. A new message in a busy bot streams after one step.
2. **Decode** one token for every row in the batch (one batched model call): a sampled token for a
   streaming reply, or the next *forced* token of a reply being closed (its last token and the turn
   separator, read one per step, nearly free in a batched step).
3. **Prefill** what is left of the budget (``prefill_chunk`` tokens a step) with other waiting work
   (long prompts, persona prompts, rebuilds from the log), so a long new prompt never stalls replies
   that are already streaming.

The backend keeps streaming generations in slots ``0 .. n-1`` (compacted when one finishes) and
prefills in one extra slot at the end of the pool. Nothing here blocks the event loop: results
reach asyncio through ``call_soon_threadsafe``, gathered in an outbox and handed over once per phase
of a step (one wake-up of the loop for a 64-row step, not 64).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch

from bot.errors import EngineBusy, RavenError
from bot.inference import state_codec
from bot.inference.backend import Backend, ModelState, State
from bot.inference.machine import usable_cores
from bot.inference.nucleus import nucleus_works
from bot.inference.sampling import END_OF_TEXT, RowSampler, SamplingParams, sample_rows
from bot.inference.threads import in_fresh_thread, settle
from bot.inference.tokenizer import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")
COALESCE_S = 0.002
MAX_ADMIT_ROUNDS = 4
"""Distinct prompt lengths admitted in one step: each is one more pass over the weights."""
FinishReason = Literal["stop", "length", "timeout", "stopped", "halted", "cancelled", "error"]
"""``stopped``: the engine is wrapping up (shutdown); ``halted``: this one reply was asked to stop."""


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    generated_tokens: int
    #: the model after reading the reply's segment; None for a cancelled reply
    final: ModelState | None
    #: the token ids of the reply's segment, as the model read them (kept in the log for rebuilds)
    segment_tokens: list[int]


@dataclass
class GenerateRequest:
    start: ModelState
    prompt_tokens: list[int]
    sampling: SamplingParams
    stop_strings: Sequence[str]
    seed: int
    #: the end of a turn: appended to a reply's segment unless its text already ends with it
    separator_text: str = "\n\n"
    separator_tokens: list[int] = field(default_factory=list)


class _Call:
    """A function to run in the worker thread between steps (tensor work off the event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
        self.loop = loop
        self.fn = fn
        self.result: asyncio.Future[object] = loop.create_future()

    def run(self) -> None:
        try:
            value = self.fn()
        except Exception as exc:
            self.loop.call_soon_threadsafe(settle, self.result, None, exc)
            return
        self.loop.call_soon_threadsafe(settle, self.result, value, None)


class _Outbox:
    """What the worker hands to event loops (text chunks, results), delivered in one
    ``call_soon_threadsafe`` per loop and batch instead of one per token: each call writes to the
    loop's wake-up pipe and each wake-up takes the GIL from the worker between its torch ops.
    Worker thread only; the order of everything posted is kept."""

    def __init__(self) -> None:
        self._items: list[tuple[asyncio.AbstractEventLoop, Callable[..., object], tuple[object, ...]]] = []

    def post(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
        self._items.append((loop, fn, args))

    def deliver(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., object], tuple[object, ...]]]] = {}
        for loop, fn, args in items:
            by_loop.setdefault(loop, []).append((fn, args))
        for loop, calls in by_loop.items():
            try:
                loop.call_soon_threadsafe(_run_calls, calls)
            except RuntimeError:  # the loop is closed: nobody is waiting for these any more
                log.debug("engine: %d result(s) for a closed event loop dropped", len(calls))


def _run_calls(calls: list[tuple[Callable[..., object], tuple[object, ...]]]) -> None:
    """On the event loop: one batch from the worker, in order; one failing call never stops the rest."""
    for fn, args in calls:
        try:
            fn(*args)
        except Exception:
            log.exception("engine: delivering a result failed")


class _Job:
    """Work in the worker's queues. Fields below the line are touched only by the worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop, start: ModelState, tokens: list[int],
                 deadline: float, request: GenerateRequest | None, outbox: _Outbox) -> None:
        self.loop = loop
        self.outbox = outbox
        self.start = start
        self.tokens = tokens
        self.deadline = deadline
        self.request = request
        self.chunks: asyncio.Queue[str | None] = asyncio.Queue()
        self.result: asyncio.Future[object] = loop.create_future()
        self.cancelled = False
        self.halted = False  # asked to stop (Generation.stop): closed like a timeout, as ``halted``
        # ---
        self.position = 0
        self.loaded = False
        self.sampler: RowSampler | None = None
        self.token_count = 0
        self.pending_token = 0
        self.generated: list[int] = []
        self.fed: list[int] = []  # tokens of the reply the model has read
        self.closing = False
        self.forced: deque[int] = deque()
        self.segment: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.emitted = 0
        self.text = ""
        self.finish: FinishReason | None = None

    def emit(self, chunk: str | None) -> None:
        self.outbox.post(self.loop, self.chunks.put_nowait, chunk)

    def resolve(self, value: object) -> None:
        error = value if isinstance(value, BaseException) else None
        self.outbox.post(self.loop, settle, self.result, None if error else value, error)


class Generation:
    """A reply being generated: iterate for text chunks, then ``await result()``."""

    def __init__(self, engine: Engine, job: _Job) -> None:
        self._engine = engine
        self._job = job

    def __aiter__(self) -> AsyncIterator[str]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[str]:
        while True:
            chunk = await self._job.chunks.get()
            if chunk is None:
                return
            yield chunk

    async def result(self) -> Completion:
        value = await self._job.result
        assert isinstance(value, Completion)
        return value

    def cancel(self) -> None:
        self._job.cancelled = True
        self._engine._wake()

    def stop(self) -> None:
        """End the reply at the next step and keep what was written: the model still reads the
        reply's segment, so the saved state matches the kept text (finish reason ``halted``)."""
        self._job.halted = True
        self._job.deadline = float("-inf")
        self._engine._wake()


@dataclass
class EngineStats:
    decode_steps: int = 0
    decoded_tokens: int = 0
    prefilled_tokens: int = 0
    max_batch_seen: int = 0
    busy_rejections: int = 0
    step_seconds: float = 0.0
    prefill_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))


def _chosen_threads(backend: Backend) -> int:
    """The thread count the backend measured or chose at load, else one per usable core."""
    paths = getattr(backend, "paths", None)
    threads = getattr(paths, "threads", 0)
    return int(threads) if threads else usable_cores()


class Engine:
    def __init__(
        self, backend: Backend, tokenizer: Tokenizer, *, max_batch: int = 32, prefill_chunk: int = 256,
        max_queue: int = 64, reply_timeout_s: float = 180.0, torch_threads: int = 0,
    ) -> None:
        if backend.max_slots < max_batch + 1:
            raise ValueError(f"backend has {backend.max_slots} slots; the engine needs max_batch + 1")
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.reply_timeout_s = reply_timeout_s
        #: 0: what the backend chose for this machine (bot.inference.paths), else one per usable core
        self.torch_threads = torch_threads or _chosen_threads(backend)
        log.info("engine: %d torch thread(s) (%s)", self.torch_threads,
                 "RAVEN_TORCH_THREADS" if torch_threads else "chosen for this machine")
        self.stats = EngineStats()
        self._prefill_slot = max_batch
        self._cond = threading.Condition()
        self._incoming: deque[_Job] = deque()
        self._calls: deque[_Call] = deque()
        self._waiting: deque[_Job] = deque()
        self._decoding: list[_Job] = []
        self._prefilling: _Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._wrapping_up = False
        self._never = torch.tensor(tokenizer.unknown_ids(backend.vocab_size), dtype=torch.long)
        self._outbox = _Outbox()
        self._template: State | None = None  # the model's state layout, for decode_state (worker only)

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        if self.backend.device.type == "cpu":
            # numba holds the GIL while it compiles or loads the sampling kernel (0.8-5 s): done
            # here, before the caller starts serving, the event loop has nothing to answer yet. In a
            # thread that ends: the check's parallel launch gives its thread an OpenMP team, which an
            # executor thread would keep (see bot.inference.threads).
            await in_fresh_thread(nucleus_works, name="raven-sampling-check")
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="raven-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the asyncio side -----------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Work waiting its turn: replies not yet streaming and prefill jobs not yet started."""
        return len(self._incoming) + len(self._waiting)

    @property
    def rows(self) -> int:
        """Replies in the batch now (streaming or closing): what one decode step carries."""
        return len(self._decoding)

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name, stored beside reply token ids (ids are only replayed under it)."""
        return self.tokenizer.name

    def valid_tokens(self, tokens: Sequence[int]) -> bool:
        """Whether every id is one of the model's tokens (stored ids may come from a damaged row)."""
        vocab = self.backend.vocab_size
        return all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens)

    def zero_state(self) -> ModelState:
        """A fresh state. Tensor work: call it in the worker (``call``) or outside a running engine."""
        vocab = self.backend.vocab_size
        return ModelState(self.backend.zero_state(), torch.zeros(vocab), 0)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the worker thread, between steps. Tensor work belongs there rather than on the
        event loop: it must not block the loop, and with GNU OpenMP every thread that runs a parallel
        torch op keeps its own team of spinning threads, which slows the model's own steps."""
        if self._failure is not None:
            raise RavenError(f"the engine stopped after an error: {self._failure}")
        job = _Call(asyncio.get_running_loop(), fn)
        with self._cond:
            self._calls.append(job)
            self._cond.notify_all()
        return await job.result  # type: ignore[return-value]

    async def encode_state(self, state: ModelState) -> bytes:
        """``state`` as bytes for the store (serialised in the worker thread)."""
        return await self.call(lambda: state_codec.encode_state(state))

    async def decode_state(self, blob: bytes) -> ModelState:
        """A stored blob back into a state, checked against this model's state layout and vocabulary;
        raises :class:`~bot.errors.StateError` if it is corrupt or another model's."""

        def decode() -> ModelState:
            if self._template is None:
                self._template = self.backend.zero_state()
            return state_codec.decode_state(blob, self._template, self.backend.vocab_size)

        return await self.call(decode)

    async def prefill(self, start: ModelState | None, tokens: list[int]) -> ModelState:
        """The model after reading ``tokens`` from ``start`` (None: a fresh state); for persona
        prompts and rebuilds. Raises :class:`EngineBusy` when the queue is full."""
        if tokens:
            self._check_room()  # before the worker call: refuse at once
        if start is None:
            start = await self.call(self.zero_state)
        if not tokens:
            return start
        job = self._submit(start, tokens, None)
        value = await job.result
        assert isinstance(value, ModelState)
        return value

    def wrap_up(self) -> None:
        """Shutting down: every reply still being written or waiting ends at the next step, closed as
        a timeout would close it (its state saved), with the reason ``stopped``."""
        with self._cond:
            self._wrapping_up = True
            for job in [*self._incoming, *self._waiting, *self._decoding]:
                if job.request is not None:  # replies; persona prompts and rebuilds finish as they are
                    job.deadline = float("-inf")
            self._cond.notify_all()

    def generate(self, request: GenerateRequest) -> Generation:
        """Start a reply; raises :class:`EngineBusy` when the queue is full."""
        if not request.prompt_tokens:
            raise ValueError("a generation needs prompt tokens")
        if not request.separator_tokens:
            request.separator_tokens = self.tokenizer.encode(request.separator_text)
        job = self._submit(request.start, list(request.prompt_tokens), request)
        return Generation(self, job)

    def _check_room(self) -> None:
        """Raise :class:`EngineBusy` (saying how many are ahead) when ``max_queue`` jobs are waiting."""
        if self.queued >= self.max_queue:
            self.stats.busy_rejections += 1
            raise EngineBusy(self.queued + len(self._decoding))

    def _submit(self, start: ModelState, tokens: list[int], request: GenerateRequest | None) -> _Job:
        if self._failure is not None:
            raise RavenError(f"the engine stopped after an error: {self._failure}")
        self._check_room()
        deadline = time.monotonic() + self.reply_timeout_s if request is not None else float("inf")
        job = _Job(asyncio.get_running_loop(), start, tokens, deadline, request, self._outbox)
        with self._cond:
            self._incoming.append(job)
            self._cond.notify_all()
        return job

    # --- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        try:
            if self.backend.device.type == "cpu":
                nucleus_works()  # (done already when entered with ``async with``) not in the first reply
            with torch.no_grad():  # grad mode is per thread: set it in the worker itself
                while True:
                    with self._cond:
                        idle = False
                        while not (self._stopping or self._incoming or self._waiting
                                   or self._decoding or self._prefilling or self._calls):
                            idle = True
                            self._cond.wait()
                        if self._stopping:
                            break
                    if idle and self._incoming:
                        # Messages often arrive together (a burst on a channel): wait a moment so
                        # they start in one batched step rather than one prefill call each.
                        time.sleep(COALESCE_S)
                    with self._cond:
                        self._waiting.extend(self._incoming)
                        self._incoming.clear()
                        calls = list(self._calls)
                        self._calls.clear()
                    for call in calls:
                        call.run()
                    started = time.perf_counter()
                    try:
                        self._step()
                    except Exception as exc:  # fail the work in flight, keep serving the rest
                        log.exception("engine step failed")
                        self._fail_in_flight(exc)
                    self._outbox.deliver()
                    self.stats.step_seconds += time.perf_counter() - started
        except BaseException as exc:  # never leave callers waiting forever
            log.exception("engine worker failed")
            self._failure = exc
        self._abort_all(self._failure or RavenError("the engine was stopped"))

    def _fail_in_flight(self, error: Exception) -> None:
        """A model step failed: end the work it touched; queued work goes on."""
        self._fail_jobs([], RavenError(f"the model failed: {error}"))

    def _abort_all(self, error: BaseException) -> None:
        stopped = RavenError(f"the engine stopped: {error}")
        with self._cond:
            for call in self._calls:
                call.loop.call_soon_threadsafe(settle, call.result, None, stopped)
            self._calls.clear()
            queued = [*self._incoming, *self._waiting]
            self._incoming.clear()
            self._waiting.clear()
        self._fail_jobs(queued, stopped)

    def _fail_jobs(self, queued: list[_Job], error: RavenError) -> None:
        """End ``queued`` and everything in flight (the batch, the prefill) with ``error``."""
        jobs = [*queued, *self._decoding]
        self._decoding.clear()
        if self._prefilling is not None:
            jobs.append(self._prefilling)
            self._prefilling = None
        for job in jobs:
            job.emit(None)
            job.resolve(error)
        self._outbox.deliver()

    def _step(self) -> None:
        admitted = self._admit()
        self._outbox.deliver()  # new replies' first tokens go out before the decode step runs
        self._decode_step()
        self._outbox.deliver()
        self._prefill_step(self.prefill_chunk - admitted)

    def _decode_step(self) -> None:
        now = time.monotonic()
        for job in list(self._decoding):
            if job.closing:
                continue
            if job.cancelled:
                self._drop(job)
            elif now > job.deadline:
                self._close(job, self._cut_reason(job))
        if not self._decoding:
            return
        batch = list(self._decoding)
        logits = self.backend.decode([job.pending_token for job in batch])
        self.stats.decode_steps += 1
        self.stats.decoded_tokens += len(batch)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
        sampling: list[tuple[_Job, int]] = []
        for row, job in enumerate(batch):
            job.fed.append(job.pending_token)
            if not job.closing:
                sampling.append((job, row))
            elif job.forced:
                job.pending_token = job.forced.popleft()
            else:  # the reply segment is read in full: this is the state to save
                self._complete(job, logits[row])
        if sampling:
            rows = logits if len(sampling) == len(batch) else logits[[row for _, row in sampling]]
            tokens = sample_rows(rows, [job.sampler for job, _ in sampling])  # type: ignore[misc]
            for (job, _), token in zip(sampling, tokens, strict=True):
                self._accept(job, token)

    def _cut_reason(self, job: _Job) -> FinishReason:
        """Why a reply past its deadline ends: asked to stop, shutting down, or out of time."""
        return "halted" if job.halted else "stopped" if self._wrapping_up else "timeout"

    def _next_prefill(self) -> _Job | None:
        with self._cond:
            while self._waiting:
                job = self._waiting[0]
                if job.cancelled or time.monotonic() > job.deadline:
                    self._waiting.popleft()
                    self._end_unstarted(job, "cancelled" if job.cancelled else self._cut_reason(job))
                    continue
                if job.request is not None and len(self._decoding) >= self.max_batch:
                    return None  # no room to stream another reply yet
                if job.request is not None and self._admissible():
                    return None  # the next step admits it (see _admit)
                return self._waiting.popleft()
        return None

    def _prefill_step(self, budget: int) -> None:
        while budget > 0:
            job = self._prefilling or self._next_prefill()
            if job is None:
                return
            self._prefilling = job
            slot = self._prefill_slot
            if not job.loaded:
                self.backend.load_slot(slot, job.start.state)
                job.loaded = True
            take = job.tokens[job.position:job.position + budget]
            logits = self.backend.prefill(slot, take)
            self.stats.prefilled_tokens += len(take)
            self.stats.prefill_sizes.append(len(take))
            job.position += len(take)
            budget -= len(take)
            if job.position < len(job.tokens):
                return
            self._prefilling = None
            count = job.start.token_count + len(job.tokens)
            if job.request is None:
                job.resolve(ModelState(self.backend.read_slot(slot), logits.clone(), count))
            else:
                self._start_reply(job)
                self.backend.move_slot(self._prefill_slot, len(self._decoding))
                self._decoding.append(job)
                job.token_count = count
                self._accept(job, sample_rows(logits.clone().unsqueeze(0), [job.sampler])[0])  # type: ignore[list-item]
            self._outbox.deliver()  # before the rest of the budget is read

    def _start_reply(self, job: _Job) -> None:
        request = job.request
        assert request is not None
        job.sampler = RowSampler(request.sampling, request.seed, never=self._never)

    def _admissible(self) -> list[_Job]:
        """The waiting replies ``_admit`` starts now: from the head of the queue, in order, while
        there is room in the batch and their prompts fit this step's prefill budget together (with
        at most ``MAX_ADMIT_ROUNDS`` distinct lengths). A longer prompt is left to ``_prefill_step``,
        which reads it over several steps. The caller holds the lock; ``_next_prefill`` asks the same
        question, so the two never disagree."""
        room = self.max_batch - len(self._decoding)
        now = time.monotonic()
        taken: list[_Job] = []
        total = 0
        lengths: set[int] = set()
        for job in self._waiting:
            size = len(job.tokens)
            if (len(taken) >= room or job.request is None or job.cancelled or now > job.deadline
                    or total + size > self.prefill_chunk or len(lengths | {size}) > MAX_ADMIT_ROUNDS):
                break  # the prefill path deals with the rest, in order
            taken.append(job)
            total += size
            lengths.add(size)
        return taken

    def _admit(self) -> int:
        """Start new replies: read their prompts straight into batch slots, several rows per pass over
        the weights, and sample their first tokens together, all in this step. Reading a prompt as one
        forced token per step instead would cost a new user one step per prompt token (measured: a
        40-token message waited 1.5 s for its first token beside 32 streaming replies, 0.1 s this way).
        Returns the prompt tokens read (they count against this step's prefill budget)."""
        with self._cond:
            if self._prefilling is not None:
                return 0
            taken = self._admissible()
            for _ in taken:
                self._waiting.popleft()
        if not taken:
            return 0
        # Longest first: after each round, the rows still reading are the first slots of the group.
        taken.sort(key=lambda job: len(job.tokens), reverse=True)
        first = len(self._decoding)
        for offset, job in enumerate(taken):
            self._start_reply(job)
            self.backend.load_slot(first + offset, job.start.state)
            self._decoding.append(job)
            job.token_count = job.start.token_count + len(job.tokens)
        last: list[torch.Tensor] = []  # each prompt's final logits, gathered as the rounds finish them
        read = 0
        while read < len(taken[0].tokens):
            rows = [job for job in taken if len(job.tokens) > read]
            size = len(rows[-1].tokens) - read
            logits = self.backend.prefill_rows(first, [job.tokens[read:read + size] for job in rows])
            self.stats.prefilled_tokens += size * len(rows)
            self.stats.prefill_sizes.append(size * len(rows))
            read += size
            last[:0] = [logits[i] for i, job in enumerate(rows) if len(job.tokens) == read]
        tokens = sample_rows(torch.stack(last), [job.sampler for job in taken])  # type: ignore[misc]
        for job, token in zip(taken, tokens, strict=True):
            self._accept(job, token)
        return sum(len(job.tokens) for job in taken)

    def _accept(self, job: _Job, token: int) -> None:
        """Take a sampled token: stream its text, or close the reply on a stop condition."""
        request = job.request
        assert request is not None and job.sampler is not None
        if token == END_OF_TEXT:
            self._close(job, "stop")
            return
        piece = self.tokenizer.decode_bytes([token])
        job.generated.append(token)
        job.pending_token = token
        # A token can end inside a multi-byte character: the incremental decoder holds it back.
        before = len(job.text)
        text = job.text + job.decoder.decode(piece)
        job.text = text
        job.sampler.record(token, piece.decode("utf-8", errors="ignore"))
        if END_OF_TEXT in job.sampler.banned and text[before:].strip():
            # end-of-text is allowed once the reply has content (the text before was all blank)
            job.sampler.banned.discard(END_OF_TEXT)
        for stop in request.stop_strings:
            # The text before this token held no stop string (the reply would have ended): look
            # only where one could end in the new piece, not through the whole reply every token.
            cut = text.find(stop, max(0, before - len(stop) + 1)) if stop else 0
            if cut >= 0:
                job.text = text[:cut]
                self._flush(job, len(job.text))
                self._close(job, "stop")
                return
        # Hold back a tail that could be the start of a stop string.
        safe = len(text)
        for stop in request.stop_strings:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    safe = min(safe, len(text) - size)
                    break
        self._flush(job, safe)
        if len(job.generated) >= request.sampling.max_tokens:
            self._close(job, "length")

    def _flush(self, job: _Job, upto: int) -> None:
        if upto > job.emitted:
            job.emit(job.text[job.emitted:upto])
            job.emitted = upto

    def _close(self, job: _Job, reason: FinishReason) -> None:
        """End the reply's text, then let the model finish reading its segment in the next steps.

        The segment the model reads for a reply is every token it generated (the last one not yet
        fed) followed by the turn separator unless the text already ends with it. Those few tokens
        are *forced* through the ordinary batched decode step, so closing a reply costs no extra
        model call; the log keeps the segment's token ids, so a rebuild reads exactly the same."""
        request = job.request
        assert request is not None
        if reason != "stop":
            self._flush(job, len(job.text))
        job.finish = reason
        job.closing = True
        job.emit(None)
        segment = list(job.generated)
        full_text = self.tokenizer.decode_bytes(segment).decode("utf-8", errors="replace")
        if not full_text.endswith(request.separator_text):
            segment += request.separator_tokens
        job.segment = segment
        job.forced = deque(segment[len(job.fed):])
        if job.forced:
            job.pending_token = job.forced.popleft()
        else:  # nothing left to read (cannot happen with a non-empty separator)
            self._complete(job, None)

    def _complete(self, job: _Job, logits: torch.Tensor | None) -> None:
        """The reply's segment has been read: save the state and free the slot."""
        index = self._decoding.index(job)
        saved = logits.to("cpu", torch.float32, copy=True) if logits is not None else None  # one row
        final = ModelState(self.backend.read_slot(index),
                           saved if saved is not None else torch.zeros(self.backend.vocab_size),
                           job.token_count + len(job.segment))
        self._remove(index)
        job.resolve(Completion(job.text, job.finish or "stop", len(job.generated), final, list(job.segment)))

    def _drop(self, job: _Job) -> None:
        """A cancelled reply: free its slot; no state is saved."""
        self._remove(self._decoding.index(job))
        job.finish = "cancelled"
        job.emit(None)
        job.resolve(Completion(job.text, "cancelled", len(job.generated), None, []))

    def _remove(self, index: int) -> None:
        last = len(self._decoding) - 1
        if index != last:  # keep the streaming slots compacted
            self.backend.move_slot(last, index)
            self._decoding[index] = self._decoding[last]
        self._decoding.pop()

    def _end_unstarted(self, job: _Job, reason: FinishReason) -> None:
        job.finish = reason
        job.emit(None)
        job.resolve(Completion("", reason, 0, None, []))

