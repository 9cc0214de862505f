"""The fast paths for this machine and model: matmul kernel per weight shape, wkv kernel and chunk,
threads.

Two ways to choose, both logged and reported by ``raven bench``:

* **by capability** (no measurement; what a backend built without a tuning cache uses): oneDNN
  prepacked wherever it works (fp32 laid out for 64 rows, bf16 for 16), else ``F.linear``; on the
  CPU the fused wkv kernels (``bot.inference.wkv_fused``) where numba works, else PyTorch's with a
  chunk of 32; one torch thread per usable core (affinity and cgroup quota, not the host's count).
* **measured at load** (``raven run`` and the benchmark): each distinct weight shape is timed with
  every kernel that works here at 1, 16 and 64 rows, the weight read from memory as in a real step
  (copies cycled through, ``COLD_BYTES``), and the kernel with the smallest *regret*
  wins — the largest factor by which it is slower than the best kernel at any of those batch sizes,
  so the choice is never far from the best for one stream nor for a busy bot. The wkv kernels are
  timed the same way (fused, or PyTorch's at each chunk: a 256-token prefill and 16- and 64-row
  steps), and so is the thread count on a real decode step (1 vs all cores:
  on a machine whose cores are busy, one thread was 2.5× faster for a whole chat). Kernel and chunk
  choices are cached per machine, torch version and model shape (a JSON file), so a restart costs
  nothing; the thread count is measured at every load, because it depends on what else runs.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from bot.inference.linear import PLAIN, TRANSPOSED, Linear, mkldnn_works, onednn
from bot.inference.machine import Machine
from bot.inference.wkv_fused import FUSED, TORCH, fused_works

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_WKV_CHUNK = 32
WKV_CHUNKS = (16, 32, 64)
"""Closed-form wkv block lengths tried; 64 is the longest that keeps the decay ratios in fp32's range."""
PREPACK_BATCH = {torch.float32: 64, torch.bfloat16: 16}
"""The capability default's oneDNN layout: measured best for decode at B = 1..64 on the Zen 4 machine."""
TUNE_BATCHES = (1, 16, 64)
"""Rows per call the matmul kernels are timed at: one stream, a busy bot's batch, and a full one (at
(1, 16) alone, F.linear won the small weights by its one-row speed and then cost the 64-row decode
steps and the prefill ~17% of the engine's throughput: 235 against 282 tok/s at 64 threads, fp32)."""
TIE = 1.05
"""A candidate within 5% of the best counts as as good: the earlier (preferred) one is kept."""
COLD_BYTES = 128 << 20
"""Weights timed per kernel and shape, in copies cycled through (up to ``MAX_COPIES``): more than any
last-level cache we run on, so that each call reads its weight from memory, as it does in a real
step (which reads the whole model once). Timed warm, a weight that fits in the cache measures what
no decode step sees: on the AVX2 Zen 3, at 16 rows a 768×768 ``F.linear`` took 0.40 ms from the
cache (oneDNN 0.29) but 0.73 ms from memory (oneDNN 0.50), so the warm timing chose ``F.linear``
for that shape and cost every step ~4-10% (measured A/B in the same process)."""
MAX_COPIES = 64
SMALL_STEP_ROWS = 4
"""Decode steps under this many rows (and prefills under this many tokens) run on the thread count
measured best at one row, larger ones on the count measured best at 16 rows. The two can differ on a shared host: one
stream reads the weights (memory-bound, each matmul a short parallel region that waits for every
thread), a batch computes with them."""


@dataclass
class Paths:
    """What the backend runs with. ``matmul`` maps a weight shape ``"OUTxIN"`` to its kernel."""

    matmul: dict[str, str]
    wkv_chunk: int  # the closed form's block length, where ``wkv`` is "torch"
    threads: int  # decode steps and prefills of ``SMALL_STEP_ROWS`` rows (tokens) or more
    source: str  # "capability", "measured" or "cached" (kernels and chunk); threads say their own
    wkv: str = TORCH  # "fused" (bot.inference.wkv_fused) or "torch" (PyTorch ops)
    threads_source: str = "cores"
    small_step_threads: int = 0  # smaller steps and prefills; 0: ``threads``
    small_lora: bool = False  # bf16 steps under SMALL_STEP_ROWS rows: LoRA chains in one kernel
    tune_seconds: float = 0.0
    timings: dict[str, Any] = field(default_factory=dict)

    def kernel(self, shape: Sequence[int]) -> str:
        return self.matmul.get(shape_key(shape), PLAIN)

    def threads_for(self, rows: int) -> int:
        """The torch thread count for a decode step of ``rows`` rows."""
        return self.small_step_threads if rows < SMALL_STEP_ROWS and self.small_step_threads else self.threads

    def summary(self) -> str:
        """One line for the log and the benchmark's printout."""
        counts: dict[str, int] = {}
        for kernel in self.matmul.values():
            counts[kernel] = counts.get(kernel, 0) + 1
        kernels = ", ".join(f"{k} for {n} shape{'s' if n > 1 else ''}" for k, n in sorted(counts.items()))
        wkv = "wkv fused" if self.wkv == FUSED else f"wkv torch, chunk {self.wkv_chunk}"
        small = self.small_step_threads
        split = (f", {small} for steps under {SMALL_STEP_ROWS} rows" if small and small != self.threads else "")
        lora = f"; LoRA chains fused for steps under {SMALL_STEP_ROWS} rows" if self.small_lora else ""
        return (f"matmul {kernels or 'plain'}; {wkv}{lora}; {self.threads} torch "
                f"thread{'s' if self.threads > 1 else ''}{split} ({self.threads_source}); chosen by {self.source}"
                + (f" in {self.tune_seconds:.1f} s" if self.source == "measured" else ""))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def shape_key(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def candidates(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The kernels that work here, the capability default first. ``transposed`` (the ``rwkv``
    package's layout) is last: it never wins a tie, but where the reference's own BLAS call is the
    fastest for a shape, the tuner finds it."""
    if not mkldnn_works(device, dtype):
        return [PLAIN, TRANSPOSED]
    hint = PREPACK_BATCH.get(dtype, 16)
    # onednn:1, the layout for one row: on the AVX2 Zen 3 the 768×65536 head at one row took 11-12 ms
    # in it against 14-17 in the 64-row layout, and as long at 16 and 64 rows (within the host's noise)
    return [onednn(hint), onednn(16 if hint == 64 else 64), onednn(1), PLAIN, TRANSPOSED]


def wkv_candidates(device: torch.device) -> list[str]:
    """The wkv kernels that work here, the capability default first."""
    return ([FUSED] if device.type == "cpu" and fused_works() else []) + [TORCH]


def by_capability(shapes: Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype,
                  cores: int) -> Paths:
    best = candidates(device, dtype)[0]
    return Paths({shape_key(s): best for s in shapes}, DEFAULT_WKV_CHUNK, cores, "capability",
                 wkv=wkv_candidates(device)[0])


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 2,
                   sync: Callable[[], None] = lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return float(statistics.median(times))


def in_turns(options: Sequence[T], use: Callable[[T], None], steps: Sequence[Callable[[], object]],
             rounds: int) -> dict[T, list[float]]:
    """Each option's median seconds per step: ``use(option)``, then every step timed once, option
    after option, round after round (one warm-up round first, not counted). Taking turns, a burst of
    load from elsewhere falls on all the options alike; measured one after the other, a noisy
    neighbour once made one thread count "win" on a host where the other ran a step 1.4× faster."""
    samples: dict[T, list[list[float]]] = {option: [[] for _ in steps] for option in options}
    for round_ in range(rounds + 1):
        for option in options:
            use(option)
            for i, step in enumerate(steps):
                started = time.perf_counter()
                step()
                if round_:
                    samples[option][i].append(time.perf_counter() - started)
    return {option: [statistics.median(ts) for ts in per_step] for option, per_step in samples.items()}


def least_regret(times: Mapping[str, Sequence[float]]) -> str:
    """The candidate whose worst ratio to the best time, over the measured cases, is smallest;
    ``times`` lists each candidate's time per case, in preference order (ties keep the earlier)."""
    names = list(times)
    cases = len(times[names[0]])
    best = [min(times[n][i] for n in names) for i in range(cases)]
    regret = {n: max(times[n][i] / max(best[i], 1e-12) for i in range(cases)) for n in names}
    lowest = min(regret.values())
    return next(n for n in names if regret[n] <= lowest * TIE)


def cold_copies(weight: torch.Tensor, cold_bytes: int = COLD_BYTES) -> int:
    """How many copies of ``weight`` to cycle through so that each call finds it out of the cache."""
    size = weight.numel() * weight.element_size()
    return max(1, min(MAX_COPIES, -(-cold_bytes // max(size, 1))))


def _time_cold(kernels: Mapping[str, Sequence[Linear]], inputs: Sequence[torch.Tensor],
               rounds: int = 5) -> dict[str, list[float]]:
    """Median seconds of one call per kernel and input. The calls are interleaved (every kernel at
    every row count, round after round), so that a burst of load from elsewhere (on a shared host the
    same kernel varied 2× within a minute) falls on all candidates alike, not on one. Each call runs
    on the copy used longest ago (copies are made in order, so the first ones have left the cache
    by the time the last is made)."""
    for linears in kernels.values():  # warm-up: oneDNN builds its primitive on the first call
        for x in inputs:
            linears[-1](x)
    samples: dict[str, list[list[float]]] = {k: [[] for _ in inputs] for k in kernels}
    turns = dict.fromkeys(kernels, 0)  # per kernel: its copies in turn, none twice in a row
    for _ in range(rounds):
        for name, linears in kernels.items():
            for i, x in enumerate(inputs):
                linear = linears[turns[name] % len(linears)]
                turns[name] += 1
                started = time.perf_counter()
                linear(x)
                samples[name][i].append(time.perf_counter() - started)
    return {k: [float(statistics.median(t)) for t in per_input] for k, per_input in samples.items()}


def tune_matmul(weights: Mapping[str, torch.Tensor], kernels: Sequence[str],
                batches: Sequence[int] = TUNE_BATCHES,
                cold_bytes: int = COLD_BYTES) -> tuple[dict[str, str], dict[str, Any]]:
    """Per shape (one real weight each), the kernel of least regret over ``batches``, each timed
    with the weight read from memory (see ``COLD_BYTES``). Memory at load, for one shape at a time:
    every candidate's copies at once (interleaving needs them all), about ``COLD_BYTES`` per kernel,
    or one reordered weight per oneDNN kernel where the weight alone is larger (the 0.1B head: three
    of 192 MiB); freed before the weights are loaded."""
    chosen: dict[str, str] = {}
    report: dict[str, Any] = {}
    for key, weight in weights.items():
        if len(kernels) == 1:
            chosen[key] = kernels[0]
            continue
        copies = [weight] + [weight.clone() for _ in range(cold_copies(weight, cold_bytes) - 1)]
        built = {kernel: [Linear(w, kernel) for w in copies] for kernel in dict.fromkeys(kernels)}
        del copies
        inputs = [torch.randn(rows, weight.shape[1]).to(weight.dtype) * 0.1 for rows in batches]
        times = _time_cold(built, inputs)
        del built
        chosen[key] = least_regret(times)
        report[key] = {k: [round(t * 1e3, 3) for t in v] for k, v in times.items()}
    return chosen, report


class TuneCache:
    """Kernel and chunk choices per machine, torch version, device, dtype and model shape, in one
    JSON file (written atomically; a damaged file is ignored and rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @staticmethod
    def key(machine: Machine, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
            threads: int, kernels: Sequence[str], wkv: Sequence[str] = (TORCH,)) -> str:
        """``threads``: the torch threads the kernels were timed on (a one-thread choice is not reused
        on two); ``kernels`` and ``wkv``: the candidates (a choice among fewer is measured again)."""
        n_layer, n_embd, vocab = shape
        rows = ",".join(str(b) for b in TUNE_BATCHES)  # a choice made over other batch sizes is not reused
        return (f"{machine.cpu_model} | {machine.kind} | {machine.cores} cores | torch {torch.__version__} | "
                f"{device.type} {str(dtype).removeprefix('torch.')} | {n_layer}x{n_embd}x{vocab} | rows {rows}"
                f" | weights from memory | {threads} threads | {','.join(kernels)} | wkv {','.join(wkv)}")

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._read().get(key)
        ok = (isinstance(entry, dict) and isinstance(entry.get("matmul"), dict)
              and entry.get("wkv_chunk") in WKV_CHUNKS and entry.get("wkv") in (FUSED, TORCH))
        return entry if ok else None

    def put(self, key: str, matmul: dict[str, str], wkv_chunk: int, wkv: str = TORCH) -> None:
        data = self._read()
        data[key] = {"matmul": matmul, "wkv_chunk": wkv_chunk, "wkv": wkv,
                     "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as exc:  # a read-only data dir: tune again next time, but serve now
            log.warning("could not write the tuning cache %s: %s", self.path, exc)
