"""``raven bench``: the batched RWKV-7 engine against the plain ``rwkv`` package, same weights, one run.

Every ratio's reference is measured in the same process and run, interleaved with our own
measurement (rounds alternate ours / package, and each figure is the median of its rounds), so
load from other processes hits both sides alike. Weights are random, in the real checkpoint format,
generated into a cache directory at the start: speed does not depend on what the weights say.

What is measured (JSON keys):

* ``single_stream_ratio``: one thread decoding, our tok/s ÷ the package's (``backend.decode`` loop).
* ``aggregate_ratio_<N>``: N threads generating at once through the engine (prompt, reply, and the
  close of the reply), total generated tok/s ÷ the package serving the same threads one after another
  through the same engine (its one-thread tok/s: serving N threads in turn takes N times as long).
* ``resume_ratio_8k``: time to the first streamed token on a thread with 8,000 tokens of history
  (loaded from its saved state) ÷ on a new thread. ``rebuild_8k_s`` is what re-reading would cost.
* ``ours_decode_step_tok_s_<N>``: the model alone, one decode step over N rows (no sampling, no
  scheduling): the ceiling the engine's figure approaches.
* ``engine_step_ratio_<N>``: ``ours_aggregate_tok_s_<N>`` ÷ ``ours_decode_step_tok_s_<N>``, what the
  engine delivers of its own decode step (both from this run, so a busy host moves it less than
  either figure). Where the rest goes, from the engine run itself: ``engine_decode_share_<N>`` (the
  wall time spent in the model's decode steps), ``engine_full_step_ms_<N>`` against
  ``direct_step_ms_<N>`` (one N-row step inside the engine and alone) and ``engine_streamed_rows_<N>``
  (rows of those steps that produced a streamed token rather than a reply's closing tokens).
* ``ttft_busy_ms``: time to the first streamed token of a 40-token message sent while 32 replies
  (``busy_streams``) are streaming: what a user waits for when the bot is busy (median of 5).
* ``prefill_ratio``: a 512-token message, our prefill tok/s ÷ the package's.
* ``max_loop_stall_ms``: the longest the asyncio event loop went without running a 5 ms ticker
  (``TICK_S``) while the engine generated, past the ticker's own sleep.
* ``max_logit_diff``: largest |ours − package| over the prefill and the decode steps compared.
* ``turn_overhead_ms_10`` / ``_2000`` and ``turn_overhead_ratio``: what a turn costs besides the model
  on a hot thread of 10 and of 2,000 messages, and their ratio (target ≤ 1.2: per-turn work does not
  grow with the thread; see ``bench/turn_overhead.py``).

The figures measured on the backend directly (single stream, prefill, decode steps) run on the
thread count chosen at load; the engine phases run as the bot does, with the thread watch
(``bot.inference.thread_watch``) re-checking that count every 15 s (on a quiet host ~0.2-0.4% of
the time; ``paths.timings.thread_changes`` lists any change it made). The package has no such watch:
on a host that gets busy mid-run, the engine ratios include what the watch recovers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.turn_overhead import LONG_MESSAGES, measure_turn_overhead
from bot.errors import ConfigError
from bot.inference.allocator import tune_allocator
from bot.inference.backend import Backend
from bot.inference.checkpoint import SizeName, make_checkpoint
from bot.inference.engine import Engine, GenerateRequest, ModelState
from bot.inference.package_backend import PackageBackend
from bot.inference.rwkv7_batched import BatchedRWKV7Backend
from bot.inference.sampling import SamplingParams
from bot.inference.threads import run_in_fresh_thread

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

HISTORY_TOKENS = 8000
MESSAGE_TOKENS = 512
PROMPT_TOKENS = 16
BUSY_PROBE_TOKENS = 40

# The targets for the 0.1B model on our 2-core CPU (shown beside the figures, not enforced).
TARGETS: dict[str, dict[str, float]] = {
    "fp32": {"single_stream_ratio": 1.1, "aggregate_ratio_16": 10, "aggregate_ratio_64": 15,
             "prefill_ratio": 2.0},
    "bf16": {"single_stream_ratio": 1.5, "aggregate_ratio_16": 10, "aggregate_ratio_64": 20,
             "prefill_ratio": 2.0},
}
FP32_LOGIT_TOL = 1e-4


class BenchTokenizer:
    """One token ↔ one printable character. The engine streams every token as it is sampled (a real
    vocabulary holds back partial UTF-8), so "time to first token" is exactly that."""

    name = "bench"

    def encode(self, text: str) -> list[int]:
        return [1 + (ord(ch) % 94) for ch in text]

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return bytes(33 + (t % 94) for t in tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("ascii")

    def unknown_ids(self, vocab_size: int) -> list[int]:
        return []


def bench_cache_dir() -> Path:
    """Where the checkpoints and the tuning cache live between runs."""
    return Path(os.environ.get("RAVEN_BENCH_CACHE", Path(tempfile.gettempdir()) / "raven-bench"))


def _threads_setting() -> int:
    """``RAVEN_TORCH_THREADS`` as the bot reads it (0 or unset: chosen for the machine)."""
    value = os.environ.get("RAVEN_TORCH_THREADS", "").strip()
    try:
        return max(0, int(value)) if value else 0
    except ValueError:
        raise ConfigError(f"RAVEN_TORCH_THREADS must be a whole number, not {value!r}") from None


def bench_checkpoint(size: SizeName) -> Path:
    """The random-weight checkpoint, made once per machine (a few seconds for 0.1B)."""
    path = bench_cache_dir() / f"rwkv7-{size}-seed0.pth"
    if not path.is_file():
        make_checkpoint(path, "v7", size, seed=0)
    return path


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1, 65536, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Comparison:
    """Runs the same tokens from the same state through both backends and tracks |ours − package|."""

    def __init__(self) -> None:
        self.max_diff = 0.0
        self.agree = 0
        self.total = 0

    def add(self, ours: torch.Tensor, ref: torch.Tensor) -> None:
        ours, ref = ours.float().reshape(-1, ours.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
        self.max_diff = max(self.max_diff, float((ours - ref).abs().max()))
        self.agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        self.total += ours.shape[0]


def _time_decode(backend: Backend, steps: int, first: int) -> float:
    """Seconds for ``steps`` single-row decode steps in slot 0 (the state is already loaded)."""
    token = first
    started = time.perf_counter()
    for _ in range(steps):
        token = int(backend.decode([token])[0].argmax())
    return time.perf_counter() - started


def _time_prefill(backend: Backend, tokens: list[int]) -> tuple[float, torch.Tensor]:
    backend.load_slot(0, backend.zero_state())
    started = time.perf_counter()
    logits = backend.prefill(0, tokens)
    return time.perf_counter() - started, logits


TICK_S = 0.005
"""The stall probe's sleep. Each wake-up of the loop's thread takes a core from one of the engine's
compute threads on a 2-core host, and a 1 ms probe cost the throughput it was running beside 3-6%
(2026-12-04, median of 5-6 rounds: bf16 64 threads 1,194 tok/s against 1,248 with no probe, fp32 16
threads 478 against 507, emulated AVX2 fp32 16 threads 346 against 356; 5 ms was in between). A
5 ms probe still sees every stall that matters against the 50 ms target."""


async def _ticker(stop: asyncio.Event, gaps: list[float]) -> None:
    """Sleeps ``TICK_S`` at a time; any extra delay is time the event loop could not run (blocked, or
    its thread not scheduled: on 2 cores it competes with the engine's two compute threads)."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(TICK_S)
        gaps.append(max(0.0, time.perf_counter() - started - TICK_S))


async def generate_reply(engine: Engine, start: ModelState, prompt: list[int], max_tokens: int, seed: int
                         ) -> tuple[float, float, int]:
    """One reply through the engine: (seconds to its first streamed token, seconds to the end, tokens)."""
    params = SamplingParams(max_tokens=max_tokens)  # the chat defaults
    request = GenerateRequest(start=start, prompt_tokens=prompt, sampling=params, stop_strings=(),
                              seed=seed)
    started = time.perf_counter()
    generation = engine.generate(request)
    first = -1.0
    async for _chunk in generation:
        if first < 0:
            first = time.perf_counter() - started
    completion = await generation.result()
    total = time.perf_counter() - started
    return (first if first >= 0 else total), total, completion.generated_tokens


class _TimedDecode:
    """The backend with its decode steps timed (seconds and rows each), for the engine's accounting."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.steps: list[tuple[int, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        started = time.perf_counter()
        logits = self.inner.decode(tokens)
        _sync(logits.device)
        self.steps.append((len(tokens), time.perf_counter() - started))
        return logits


@dataclass
class _EngineRun:
    wall: float
    tokens: int
    decode_s: float  # in the model's decode steps
    full_steps_s: list[float]  # each step over every thread's row
    rows: int  # rows of all decode steps (streamed tokens and closing tokens)


async def _engine_phase(backend: Backend, threads: int, max_tokens: int, seed: int, gaps: list[float],
                        torch_threads: int) -> _EngineRun:
    """``threads`` replies generated at once, with the engine's decode steps timed."""
    timed = _TimedDecode(backend)
    engine = Engine(timed, BenchTokenizer(), max_batch=threads, max_queue=threads + 8,  # type: ignore[arg-type]
                    torch_threads=torch_threads)
    stop = asyncio.Event()
    async with engine:
        ticker = asyncio.create_task(_ticker(stop, gaps))
        zero = engine.zero_state()
        started = time.perf_counter()
        results = await asyncio.gather(*(
            generate_reply(engine, zero, random_tokens(PROMPT_TOKENS, seed + i), max_tokens, seed + i)
            for i in range(threads)
        ))
        wall = time.perf_counter() - started
        stop.set()
        await ticker
    return _EngineRun(wall, sum(r[2] for r in results), sum(t for _, t in timed.steps),
                      [t for rows, t in timed.steps if rows == threads], sum(rows for rows, _ in timed.steps))


async def _busy_phase(backend: Backend, streams: int, probes: int, stream_tokens: int, gaps: list[float],
                      torch_threads: int) -> list[float]:
    """Seconds to the first token of a ``BUSY_PROBE_TOKENS`` message sent while ``streams`` replies
    are streaming, for ``probes`` such messages one after another."""
    engine = Engine(backend, BenchTokenizer(), max_batch=streams + 1, max_queue=streams + 8,
                    torch_threads=torch_threads)
    stop = asyncio.Event()
    firsts: list[float] = []
    async with engine:
        ticker = asyncio.create_task(_ticker(stop, gaps))
        zero = engine.zero_state()
        busy = [asyncio.create_task(generate_reply(engine, zero, random_tokens(PROMPT_TOKENS, 300 + i), stream_tokens,
                                              300 + i)) for i in range(streams)]
        for _ in range(10_000):  # until every reply is streaming
            if engine.stats.decoded_tokens >= streams * 4:
                break
            await asyncio.sleep(0.005)
        for p in range(probes):
            probe = random_tokens(BUSY_PROBE_TOKENS, 400 + p)
            firsts.append((await generate_reply(engine, zero, probe, 2, 400 + p))[0])
        await asyncio.gather(*busy)
        stop.set()
        await ticker
    return firsts


async def _resume_phase(backend: Backend, history: ModelState, rounds: int, gaps: list[float],
                        torch_threads: int) -> tuple[float, float]:
    """Median time to first token: (thread with ``history``, new thread), alternating."""
    engine = Engine(backend, BenchTokenizer(), max_batch=1, torch_threads=torch_threads)
    stop = asyncio.Event()
    with_history: list[float] = []
    fresh: list[float] = []
    async with engine:
        ticker = asyncio.create_task(_ticker(stop, gaps))
        zero = engine.zero_state()
        await generate_reply(engine, zero, random_tokens(PROMPT_TOKENS, 5), 2, 5)  # warm-up
        for r in range(rounds):
            message = random_tokens(PROMPT_TOKENS * 2, 1000 + r)
            with_history.append((await generate_reply(engine, history, message, 2, r))[0])
            fresh.append((await generate_reply(engine, zero, message, 2, r))[0])
        stop.set()
        await ticker
    return _median(with_history), _median(fresh)


def _accounting(n: int, runs: Sequence[_EngineRun], rate: float, step_rate: float) -> dict[str, float]:
    """Where the engine's time went at ``n`` threads, against the model's own ``n``-row step."""
    full = [t for run in runs for t in run.full_steps_s]
    return {
        f"engine_step_ratio_{n}": round(rate / step_rate, 3),
        f"engine_decode_share_{n}": round(sum(r.decode_s for r in runs) / sum(r.wall for r in runs), 3),
        f"engine_full_step_ms_{n}": round(_median(full) * 1000, 2) if full else 0.0,
        f"direct_step_ms_{n}": round(n / step_rate * 1000, 2),
        f"engine_streamed_rows_{n}": round(sum(r.tokens for r in runs) / max(1, sum(r.rows for r in runs)), 3),
    }


def _peak_memory(device: torch.device) -> dict[str, float | None]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss_kb / 1024, 1), "cuda_peak_mb": None if cuda_mb is None else round(cuda_mb, 1)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


@dataclass
class _Direct:
    """The backends, and what was measured by calling them directly (no engine)."""

    ours: BatchedRWKV7Backend
    ref: PackageBackend
    compare: _Comparison
    ours_prefill: list[float]
    ref_prefill: list[float]
    ours_decode: list[float]
    ref_decode: list[float]
    step_rate: dict[str, float]
    history: ModelState
    rebuild_s: float


def _measure_directly(path: Path, ours: BatchedRWKV7Backend, ref_dtype: str, threads: tuple[int, ...],
                      rounds: int, decode_steps: int, say: Progress) -> _Direct:
    device, dtype = str(ours.device), ours.dtype
    dev = ours.device
    say(f"loading the package ({device} {ref_dtype})")
    ref = PackageBackend(path, f"{device} {ref_dtype}", max_slots=2)
    if dev.type == "cuda" and dtype == "fp32":  # the package turns TF32 on at import; fp32 means fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    compare = _Comparison()
    message = random_tokens(MESSAGE_TOKENS, 1)

    # Warm-up (the package JIT-compiles on first use; oneDNN builds its kernels), then prefill.
    for backend in (ours, ref):
        _time_prefill(backend, message[:64])
        _time_decode(backend, 2, 1)
    say("prefill of a 512-token message")
    ours_prefill, ref_prefill = [], []
    for _ in range(rounds):
        seconds, ours_logits = _time_prefill(ours, message)
        ours_prefill.append(seconds)
        seconds, ref_logits = _time_prefill(ref, message)
        ref_prefill.append(seconds)
        compare.add(ours_logits, ref_logits)

    say("single-stream decode")
    ours_decode, ref_decode = [], []
    for _ in range(rounds):
        ours.load_slot(0, ours.zero_state())
        ours_decode.append(_time_decode(ours, decode_steps, 7))
        ref.load_slot(0, ref.zero_state())
        ref_decode.append(_time_decode(ref, decode_steps, 7))
    # Logit agreement, token by token from the same state: the one after the message (from a zero
    # state the first tokens sit at fp32's noise floor, where the package itself is ~1.5e-4 away
    # from an fp64 evaluation), on the tokens the package picks.
    _, after_message = _time_prefill(ref, message)
    state = ref.read_slot(0)
    ours.load_slot(0, state)
    token = int(after_message.argmax())
    for _ in range(decode_steps):
        got, want = ours.decode([token]), ref.decode([token])
        compare.add(got, want)
        token = int(want[0].argmax())

    say("batched decode steps (the model alone, no engine)")
    step_rate: dict[str, float] = {}
    for n in threads:
        for slot in range(n):
            ours.load_slot(slot, state)
        batch = random_tokens(n, 3)
        ours.decode(batch)
        times = []
        for _ in range(max(2, rounds)):
            started = time.perf_counter()
            ours.decode(batch)
            _sync(dev)
            times.append(time.perf_counter() - started)
        step_rate[str(n)] = n / _median(times)

    say("rebuilding an 8,000-token history")
    started = time.perf_counter()
    ours.load_slot(0, ours.zero_state())
    logits = ours.prefill(0, random_tokens(HISTORY_TOKENS, 2))
    rebuild = time.perf_counter() - started
    history = ModelState(ours.read_slot(0), logits, HISTORY_TOKENS)
    return _Direct(ours, ref, compare, ours_prefill, ref_prefill, ours_decode, ref_decode, step_rate,
                   history, rebuild)


def run_benchmark(size: str = "0.1b", dtype: str = "fp32", device: str = "cpu",
                  threads: Sequence[int] = (16, 64), quick: bool = False,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Measure ours against the package; returns the JSON-able result (see the module docstring).

    ``quick`` shortens every phase to a smoke run (seconds on the tiny model); its figures are noisy.
    The calling thread runs the event loop and is set to one torch thread while this runs (see
    ``bot.inference.threads``); the model work runs with the torch thread count it had on entry.
    """
    _check_options(size, dtype, device)
    tuned = tune_allocator()  # as the bot does at start; the package's figures run under it too
    before = torch.get_num_threads()  # also pins this thread's count (see bot.inference.threads)
    torch.set_num_threads(1)
    torch_threads = _threads_setting()
    try:
        say = progress or (lambda message: log.info("bench: %s", message))
        result = _run(size, dtype, device, tuple(int(n) for n in threads), quick, torch_threads, say)
        result["malloc_tuned"] = tuned
        say("turn overhead, short vs long thread (tiny model)")
        result.update(measure_turn_overhead(bench_checkpoint("tiny"), long=200 if quick else LONG_MESSAGES,
                                            turns=6 if quick else 40))
        return result
    finally:
        torch.set_num_threads(before)


def _check_options(size: str, dtype: str, device: str) -> None:
    """Refuse what cannot run before minutes of work, with a message that says why."""
    if size not in ("tiny", "0.1b"):
        raise ConfigError(f"size must be tiny or 0.1b, not {size!r}")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"dtype must be fp32, bf16 or fp16, not {dtype!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be cpu, cuda or cuda:N, not {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available to torch {torch.__version__}")


def _run(size: str, dtype: str, device: str, threads: tuple[int, ...], quick: bool, torch_threads: int,
         say: Progress) -> dict[str, Any]:
    began = time.perf_counter()
    rounds = 1 if quick else 3
    decode_steps = 8 if quick else 32
    gen_tokens = 8 if quick else 64
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    say(f"checkpoint ({size})")
    path = bench_checkpoint(size)  # type: ignore[arg-type]
    say(f"loading the batched backend ({device} {dtype}) and choosing its paths")
    ours = BatchedRWKV7Backend(path, device=device, dtype=dtype, max_slots=max(threads) + 1,
                               tune_cache=bench_cache_dir() / "tuning.json", always_tune=True,
                               torch_threads=torch_threads)
    # As the bot: RAVEN_TORCH_THREADS if set, else what the backend chose for this machine.
    torch_threads = torch_threads or ours.paths.threads
    ref_dtype, notes = dtype, []
    if dev.type == "cpu" and dtype == "bf16" and not ours.machine.native_bf16:
        ref_dtype = "fp32"
        notes.append(f"bf16 is emulated on this CPU ({ours.machine.kind}): the package reference runs in "
                     "cpu fp32, the faster choice here (its emulated bf16 took ~20 min on an AVX2 Zen 3); "
                     "ratios are ours in bf16 against the package in fp32.")
    for note in notes:
        say(note)
    # In a thread that ends, with the chosen torch threads: the event loop's thread stays at 1.
    # The model's own speed, on the count chosen at load: the thread watch's checks (a few steps on
    # the other count) would land in some rounds and not others. The engine phases run with it.
    watch, ours.thread_watch = ours.thread_watch, None
    try:
        direct = run_in_fresh_thread(
            lambda: _measure_directly(path, ours, ref_dtype, threads, rounds, decode_steps, say),
            name="raven-bench", torch_threads=torch_threads)
    finally:
        ours.thread_watch = watch
    ref = direct.ref

    stall: list[float] = []
    say("time to first token, with and without history")
    ttft_history, ttft_fresh = asyncio.run(
        _resume_phase(ours, direct.history, 2 if quick else 5, stall, torch_threads))
    say("the package serving one thread through the engine")
    ref_stall: list[float] = []  # the package's own loop behaviour, reported apart
    ref_engine = [asyncio.run(_engine_phase(ref, 1, gen_tokens, 50 + r, ref_stall, torch_threads))
                  for r in range(rounds)]
    ref_engine_rate = _median([run.tokens / run.wall for run in ref_engine])
    aggregate: dict[str, float] = {}
    accounting: dict[str, Any] = {}
    for n in threads:
        say(f"{n} threads generating at once")
        runs = [asyncio.run(_engine_phase(ours, n, gen_tokens, 100 + 1000 * r, stall, torch_threads))
                for r in range(1 if quick else 2)]
        aggregate[str(n)] = _median([run.tokens / run.wall for run in runs])
        accounting |= _accounting(n, runs, aggregate[str(n)], direct.step_rate[str(n)])

    say("time to first token beside busy replies")
    busy_streams = min(32, max(threads))
    busy_ttft = asyncio.run(_busy_phase(ours, busy_streams, 2 if quick else 5, 24 if quick else 96, stall,
                                        torch_threads))

    ours_single = decode_steps / _median(direct.ours_decode)
    ref_single = decode_steps / _median(direct.ref_decode)
    ours_prefill_rate = MESSAGE_TOKENS / _median(direct.ours_prefill)
    ref_prefill_rate = MESSAGE_TOKENS / _median(direct.ref_prefill)
    compare = direct.compare
    result: dict[str, Any] = {
        "single_stream_ratio": round(ours_single / ref_single, 3),
        **{f"aggregate_ratio_{n}": round(rate / ref_engine_rate, 2) for n, rate in aggregate.items()},
        "resume_ratio_8k": round(ttft_history / ttft_fresh, 3),
        "prefill_ratio": round(ours_prefill_rate / ref_prefill_rate, 3),
        "max_loop_stall_ms": round(max(stall, default=0.0) * 1000, 2),
        "p99_loop_stall_ms": round(sorted(stall)[int(0.99 * (len(stall) - 1))] * 1000 if stall else 0.0, 2),
        "package_max_loop_stall_ms": round(max(ref_stall, default=0.0) * 1000, 2),
        "max_logit_diff": float(f"{compare.max_diff:.3g}"),
        "argmax_agreement": round(compare.agree / max(1, compare.total), 3),
        "ours_single_tok_s": round(ours_single, 1),
        "package_single_tok_s": round(ref_single, 1),
        **{f"ours_aggregate_tok_s_{n}": round(rate, 1) for n, rate in aggregate.items()},
        **{f"ours_decode_step_tok_s_{n}": round(rate, 1) for n, rate in direct.step_rate.items()},
        **accounting,
        "package_engine_tok_s": round(ref_engine_rate, 1),
        "ours_prefill_tok_s": round(ours_prefill_rate, 1),
        "package_prefill_tok_s": round(ref_prefill_rate, 1),
        "ttft_history_ms": round(ttft_history * 1000, 1),
        "ttft_fresh_ms": round(ttft_fresh * 1000, 1),
        "ttft_busy_ms": round(_median(busy_ttft) * 1000, 1),
        "busy_streams": busy_streams,
        "rebuild_8k_s": round(direct.rebuild_s, 2),
        "size": size, "dtype": dtype, "device": device, "device_name": _device_name(dev),
        "reference_dtype": ref_dtype, "notes": notes,
        "machine": ours.machine.as_dict(), "cpu_kind": ours.machine.kind, "paths": ours.paths.as_dict(),
        "paths_summary": ours.paths.summary(),
        "cuda_graphs": ours.graphs.summary() if ours.graphs is not None else None,
        "threads": list(threads), "torch_threads": torch_threads,
        "torch_version": torch.__version__, "quick": quick,
        "generated_tokens_per_thread": gen_tokens, "rounds": rounds,
        **_peak_memory(dev),
    }
    result["elapsed_s"] = round(time.perf_counter() - began, 1)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result as a fixed-width table, with the issue's targets where they apply."""
    # bf16's targets hold where bf16 is native (then the package reference is bf16 too)
    targets = TARGETS.get(str(result.get("dtype")), {}) if result.get("size") == "0.1b" \
        and result.get("device") == "cpu" and result.get("reference_dtype", result.get("dtype")) \
        == result.get("dtype") else {}

    def mark(key: str, value: float) -> str:
        if key in targets:
            return f">= {targets[key]:g}  " + ("ok" if value >= targets[key] else "MISSED")
        if key == "max_logit_diff" and result.get("dtype") == "fp32":
            return f"<= {FP32_LOGIT_TOL:g}  " + ("ok" if value <= FP32_LOGIT_TOL else "MISSED")
        return ""

    rows: list[tuple[str, str, str, str, str]] = [("figure", "ours", "package", "ratio", "target")]
    rows.append(("single-stream decode tok/s", f"{result['ours_single_tok_s']:.1f}",
                 f"{result['package_single_tok_s']:.1f}", f"{result['single_stream_ratio']:.2f}x",
                 mark("single_stream_ratio", result["single_stream_ratio"])))
    for n in result["threads"]:
        key = f"aggregate_ratio_{n}"
        rows.append((f"{n} threads at once, total tok/s", f"{result[f'ours_aggregate_tok_s_{n}']:.1f}",
                     f"{result['package_engine_tok_s']:.1f}", f"{result[key]:.1f}x", mark(key, result[key])))
        rows.append((f"  model alone, {n} rows per step", f"{result[f'ours_decode_step_tok_s_{n}']:.1f}",
                     f"{result['package_single_tok_s']:.1f}",
                     f"{result[f'ours_decode_step_tok_s_{n}'] / result['package_single_tok_s']:.1f}x",
                     f"engine gets {result[f'engine_step_ratio_{n}']:.0%} of it; step "
                     f"{result[f'engine_full_step_ms_{n}']:.0f} ms in it, {result[f'direct_step_ms_{n}']:.0f} alone"))
    rows.append(("prefill 512 tokens, tok/s", f"{result['ours_prefill_tok_s']:.0f}",
                 f"{result['package_prefill_tok_s']:.0f}", f"{result['prefill_ratio']:.2f}x",
                 mark("prefill_ratio", result["prefill_ratio"])))
    rows.append(("first token: 8k history / new (ms)", f"{result['ttft_history_ms']:.0f}",
                 f"{result['ttft_fresh_ms']:.0f}", f"{result['resume_ratio_8k']:.2f}x",
                 f"rebuild would take {result['rebuild_8k_s']:.1f} s"))
    rows.append((f"first token beside {result['busy_streams']} replies (ms)", f"{result['ttft_busy_ms']:.0f}",
                 "", "", f"a {BUSY_PROBE_TOKENS}-token message"))
    long = max(int(k.rsplit("_", 1)[1]) for k in result if k.startswith("turn_overhead_ms_"))
    rows.append((f"turn overhead, thread of {long} / 10 msgs (ms)", f"{result[f'turn_overhead_ms_{long}']:.1f}",
                 f"{result['turn_overhead_ms_10']:.1f}", f"{result['turn_overhead_ratio']:.2f}x",
                 "<= 1.2  " + ("ok" if result["turn_overhead_ratio"] <= 1.2 else "MISSED")))
    rows.append(("max |logit ours - package|", f"{result['max_logit_diff']:.3g}", "", "",
                 mark("max_logit_diff", result["max_logit_diff"])))
    rows.append(("argmax agreement", f"{result['argmax_agreement']:.1%}", "", "", ""))
    rows.append(("event-loop stall, max ms", f"{result['max_loop_stall_ms']:.1f}",
                 f"{result['package_max_loop_stall_ms']:.1f}", "", f"p99 {result['p99_loop_stall_ms']:.1f} ms"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) if i < 4 else cell
                       for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    memory = f"peak RSS {result['peak_rss_mb']:.0f} MB"
    if result.get("cuda_peak_mb") is not None:
        memory += f", CUDA peak {result['cuda_peak_mb']:.0f} MB"
    lines.append("")
    lines.append(f"RWKV-7 {result['size']} (random weights), {result['dtype']} on {result['device']} "
                 f"({result['device_name']}), torch {result['torch_version']} with "
                 f"{result['torch_threads']} threads; {memory}; {result['elapsed_s']:.0f} s"
                 + (" [quick: figures are noisy]" if result.get("quick") else ""))
    machine = result.get("machine") or {}
    if machine:
        lines.append(f"CPU: {machine['cpu_model']}, {machine['kind']}, torch capability "
                     f"{machine['capability']}, native bf16 {'yes' if machine['native_bf16'] else 'no'}, "
                     f"{machine['cores']} usable cores of {machine['logical_cpus']}")
    if result.get("paths_summary"):
        lines.append(f"paths: {result['paths_summary']}")
    if result.get("reference_dtype", result["dtype"]) != result["dtype"]:
        lines.append(f"package reference: {result['device']} {result['reference_dtype']}")
    lines.extend(f"NOTE: {note}" for note in result.get("notes", []))
    return "\n".join(lines)
