"""Fast paths chosen per machine: the regret rule, the measured tune and its cache, and that every
kernel the tuner may pick gives the package's logits (the oracle) within the fp32 tolerance."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from bot.app.assembly import load_backend
from bot.inference.backend import clone_state
from bot.inference.linear import mkldnn_works
from bot.inference.machine import usable_cores
from bot.inference.package_backend import PackageBackend
from bot.inference.paths import (
    MAX_COPIES,
    TuneCache,
    _time_cold,
    candidates,
    cold_copies,
    least_regret,
    tune_matmul,
    wkv_candidates,
)
from bot.inference.rwkv7_batched import BatchedRWKV7Backend
from bot.inference.threads import run_in_fresh_thread
from bot.inference.wkv_fused import FUSED, TORCH, fused_works
from tests.conftest import SettingsFactory

FP32_TOL = 1e-4


def test_least_regret_is_never_far_from_the_best() -> None:
    # a: best alone, 3x worse batched; b: 1.2x worse alone, best batched; c: the slowest
    times = {"a": [1.0, 3.0], "b": [1.2, 1.0], "c": [2.0, 2.0]}
    assert least_regret(times) == "b"
    assert least_regret({"x": [1.0, 1.0], "y": [0.99, 1.0]}) == "x"  # within 5%: the preferred stays
    assert least_regret({"x": [2.0], "y": [1.0]}) == "y"


def test_kernels_are_timed_with_their_weight_out_of_the_cache() -> None:
    # enough copies to pass the cold budget, at least one, at most MAX_COPIES
    assert cold_copies(torch.zeros(768, 768), cold_bytes=128 << 20) == 57  # 2.25 MiB each
    assert cold_copies(torch.zeros(65536, 768), cold_bytes=128 << 20) == 1  # 192 MiB: one is cold
    assert cold_copies(torch.zeros(64, 64), cold_bytes=128 << 20) == MAX_COPIES
    assert cold_copies(torch.zeros(1536, 768, dtype=torch.bfloat16), cold_bytes=128 << 20) == 57  # by bytes

    calls: list[tuple[str, int, int]] = []

    class Recording:
        def __init__(self, kernel: str, n: int) -> None:
            self.kernel, self.n = kernel, n

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            calls.append((self.kernel, self.n, x.shape[0]))
            return x

    kernels = {k: [Recording(k, n) for n in range(3)] for k in ("a", "b")}
    times = _time_cold(kernels, [torch.zeros(1), torch.zeros(4)], rounds=2)
    assert set(times) == {"a", "b"} and all(len(t) == 2 for t in times.values())
    # warmed on the newest copy, then interleaved: every kernel at every row count in each round,
    # each call on the copy used longest ago
    assert calls[:4] == [("a", 2, 1), ("a", 2, 4), ("b", 2, 1), ("b", 2, 4)]
    assert calls[4:] == [("a", 0, 1), ("a", 1, 4), ("b", 0, 1), ("b", 1, 4),
                         ("a", 2, 1), ("a", 0, 4), ("b", 2, 1), ("b", 0, 4)]
    timed = calls[4:]
    for kernel in ("a", "b"):  # no copy of a kernel timed twice in a row (the second call would be warm)
        used = [n for k, n, _ in timed if k == kernel]
        assert all(x != y for x, y in itertools.pairwise(used))

    weights = {"48x32": torch.randn(48, 32)}
    chosen, report = tune_matmul(weights, ["plain", "onednn:16"] if mkldnn_works(torch.device("cpu"), torch.float32)
                                 else ["plain", "plain"], batches=(1, 4), cold_bytes=1 << 16)
    assert chosen["48x32"] in report["48x32"] and all(len(t) == 2 for t in report["48x32"].values())


@pytest.fixture(scope="module")
def ref(tiny_v7_path: Path) -> PackageBackend:
    return PackageBackend(tiny_v7_path, "cpu fp32", max_slots=2)


def _check_against_package(ours: BatchedRWKV7Backend, ref: PackageBackend) -> None:
    tokens = torch.randint(0, 65536, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    ours.load_slot(0, ours.zero_state())
    ref.load_slot(0, ref.zero_state())
    assert float((ours.prefill(0, tokens) - ref.prefill(0, tokens)).abs().max()) <= FP32_TOL
    state = ref.read_slot(0)
    for slot in range(2):
        ours.load_slot(slot, clone_state(state))
    got = ours.decode([5, 5])
    want = ref.decode([5])[0]
    assert float((got - want).abs().max()) <= FP32_TOL


def test_measured_paths_are_cached_and_match_the_package(tiny_v7_path: Path, ref: PackageBackend,
                                                         tmp_path: Path) -> None:
    cache = tmp_path / "tuning.json"
    first = BatchedRWKV7Backend(tiny_v7_path, max_slots=4, tune_cache=cache, always_tune=True)
    assert first.paths.source == "measured" and first.paths.tune_seconds > 0
    assert first.paths.threads in {1, first.machine.cores, first.machine.cores // 2}
    assert first.paths.threads_source in ("measured at load, re-checked every 15 s", "the only core")
    assert (first.thread_watch is not None) == (first.machine.cores > 1)
    assert set(first.paths.matmul.values()) <= set(candidates(first.device, first.torch_dtype))
    assert "768x768" not in first.paths.matmul and "65536x128" in first.paths.matmul  # the tiny shapes
    stored = json.loads(cache.read_text())
    assert len(stored) == 1
    (key, entry), = stored.items()
    assert first.machine.cpu_model in key and "cpu float32" in key and entry["matmul"] == first.paths.matmul
    _check_against_package(first, ref)

    second = BatchedRWKV7Backend(tiny_v7_path, max_slots=4, tune_cache=cache, always_tune=True)
    assert second.paths.source == "cached" and second.paths.matmul == first.paths.matmul
    assert second.paths.wkv_chunk == first.paths.wkv_chunk
    assert "chosen by cached" in second.paths.summary()


def test_kernels_are_timed_on_the_threads_the_steps_will_use(tiny_v7_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "tuning.json"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's thread at one, as the benchmark's event loop is
    try:
        chosen = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=cache, always_tune=True)
        pinned = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=cache, always_tune=True,
                                     torch_threads=1)
    finally:
        torch.set_num_threads(before)
    cores = chosen.machine.cores
    keys = list(json.loads(cache.read_text()))
    assert any(f"| {cores} threads |" in key for key in keys)  # not the caller's one
    assert any("| 1 threads |" in key for key in keys) and len(keys) == (2 if cores > 1 else 1)
    assert pinned.paths.threads == 1 and pinned.paths.threads_source == "RAVEN_TORCH_THREADS"


def test_thread_counts_take_turns_so_a_burst_of_load_cannot_pick_the_slower(tiny_v7_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import bot.inference.paths as paths_module

    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=16)
    cores = backend.machine.cores
    if cores < 2:
        pytest.skip("one usable core: there is no thread count to choose")
    order: list[int] = []
    now = [0.0]  # the measurement's clock, moved by the steps below: the host's load cannot move it

    def decode(tokens: list[int]) -> torch.Tensor:
        """A step that takes 4 ms on all cores and 8 ms on one, with a burst of load from elsewhere
        (+30 ms) on the first two rounds after the warm-up (calls 4..11 with two options)."""
        threads = torch.get_num_threads()
        order.append(threads)
        now[0] += (0.008 if threads == 1 else 0.004) + (0.03 if 4 <= len(order) - 1 < 12 else 0.0)
        return torch.zeros(len(tokens), backend.vocab_size)

    monkeypatch.setattr(backend, "decode", decode)
    monkeypatch.setattr(paths_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    backend._tune_threads()
    assert backend.paths.threads == cores and backend.paths.threads_source == "measured at load"
    assert backend.paths.small_step_threads == cores  # one stream too
    options = [cores] + ([cores // 2] if cores >= 4 else []) + [1]
    per_round = [n for n in options for _ in range(2)]  # each count at one row and at 16
    assert order == per_round * (1 + 5)  # the warm-up, then the rounds, the counts in turn
    timed = backend.paths.timings["threads_ms"]
    assert timed == {str(n): [8.0, 8.0] if n == 1 else [4.0, 4.0] for n in options}  # medians: the burst left out


def test_one_stream_and_a_batch_each_get_the_thread_count_measured_best_for_them(
        tiny_v7_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared host where one thread reads a one-row step faster (the weights from memory, no
    second thread to wait for) and all cores compute a 16-row step faster: each size gets its own
    count, and the steps and prefill then run on it."""
    import types

    import bot.inference.paths as paths_module

    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=16)
    cores = backend.machine.cores
    if cores < 2:
        pytest.skip("one usable core: there is no thread count to choose")
    now = [0.0]
    real_decode = backend.decode

    def decode(tokens: list[int]) -> torch.Tensor:
        one = torch.get_num_threads() == 1
        now[0] += (0.003 if one else 0.005) if len(tokens) == 1 else (0.008 if one else 0.004)
        return torch.zeros(len(tokens), backend.vocab_size)

    monkeypatch.setattr(backend, "decode", decode)
    monkeypatch.setattr(paths_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    backend._tune_threads()
    monkeypatch.setattr(backend, "decode", real_decode)
    assert backend.paths.small_step_threads == 1 and backend.paths.threads == cores
    assert f"{cores} torch threads, 1 for steps under 4 rows (measured at load)" in backend.paths.summary()
    assert [backend.paths.threads_for(n) for n in (1, 3, 4, 16)] == [1, 1, cores, cores]

    seen: list[tuple[int, int]] = []
    forward = backend._forward

    def counted(tokens: torch.Tensor, slots: slice) -> torch.Tensor:
        seen.append((tokens.numel(), torch.get_num_threads()))
        return forward(tokens, slots)

    monkeypatch.setattr(backend, "_forward", counted)

    def serve() -> None:  # as the engine's worker does: its own thread, at the batch count
        backend.decode([1])
        backend.decode([1] * 8)
        backend.prefill(0, [1, 2, 3, 4, 5])
        backend.decode([2])
        torch.set_num_threads(cores + 1)  # a count someone else chose: left alone
        backend.decode([1] * 8)

    run_in_fresh_thread(serve, name="serve", torch_threads=cores)
    assert seen == [(1, 1), (8, cores), (5, cores), (1, 1), (8, cores + 1)]


def test_steps_follow_the_thread_watch_when_the_cores_get_busy(tiny_v7_path: Path, ref: PackageBackend,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded on all cores; then the host gets busy, so that (on the clock below) a step takes 6 ms
    on all cores and 2 ms on one. The next check moves one stream to one thread, the batch's count
    stays until its own check, prefills follow the new count, and the logits stay the package's."""
    import types

    import bot.inference.thread_watch as thread_watch
    from bot.inference.thread_watch import EVERY_S, PAIRS, ThreadWatch, thread_options

    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=4, tune_cache=tmp_path / "t.json", always_tune=True)
    cores = backend.machine.cores
    if cores < 2:
        pytest.skip("one usable core: there is no thread count to choose")
    assert backend.thread_watch is not None and "re-checked every 15 s" in backend.paths.summary()
    now = [0.0]
    backend.paths.threads = backend.paths.small_step_threads = cores  # as a quiet load chooses
    backend.thread_watch = ThreadWatch(thread_options(cores), (cores, cores), clock=lambda: now[0])
    seen: list[tuple[int, int]] = []
    forward = backend._forward

    def busy(tokens: torch.Tensor, slots: slice) -> torch.Tensor:
        seen.append((tokens.numel(), torch.get_num_threads()))
        now[0] += 0.002 if torch.get_num_threads() == 1 else 0.006
        return forward(tokens, slots)

    monkeypatch.setattr(backend, "_forward", busy)
    monkeypatch.setattr(thread_watch, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    tokens = torch.randint(0, 65536, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    ours: list[torch.Tensor] = []

    def serve() -> None:  # as the engine's worker: its own thread, on the count chosen at load
        backend.load_slot(0, backend.zero_state())
        ours.append(backend.prefill(0, tokens[:20]))
        for token in tokens[20:22]:
            ours.append(backend.decode([token]))  # before the check: all cores
        now[0] += EVERY_S
        for token in tokens[22:22 + 2 * PAIRS]:
            ours.append(backend.decode([token]))  # the check: the counts in turn
        for token in tokens[30:33]:
            ours.append(backend.decode([token]))  # one thread from here
        ours.append(backend.prefill(0, tokens[33:35]))  # a 2-token prefill: the one-stream count
        ours.append(backend.prefill(0, tokens[35:40]))  # 5 tokens: the batch's count

    run_in_fresh_thread(serve, name="serve", torch_threads=cores)
    other = thread_options(cores)[-1]
    assert other == 1
    assert [n for _, n in seen] == ([cores] * 3 + [cores, 1, 1, cores] * 2 + [1, 1, 1] + [1, cores])
    assert backend.paths.small_step_threads == 1 and backend.paths.threads == cores
    assert backend.paths.threads_source == "changed while running, re-checked every 15 s"
    assert backend.paths.timings["thread_changes"] == [
        {"steps": "one stream", "from": cores, "to": 1, "ratio": pytest.approx(1 / 3, abs=1e-3)}]
    assert "1 for steps under 4 rows (changed while running" in backend.paths.summary()

    ref.load_slot(0, ref.zero_state())
    want = [ref.prefill(0, tokens[:20])] + [ref.decode([t])[0] for t in tokens[20:33]]
    want += [ref.prefill(0, tokens[33:35]), ref.prefill(0, tokens[35:40])]
    got = [ours[0]] + [t[0] for t in ours[1:-2]] + ours[-2:]
    assert len(got) == len(want) == 16
    assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) <= FP32_TOL


def test_the_package_backend_follows_its_thread_watch_too(tiny_v4_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """RWKV-4/5/6 run through the package: with ``watch_threads`` (the bot's default) a busy host
    moves its steps to one thread in the same way; the logits are the plain package's."""
    import types

    import bot.inference.thread_watch as thread_watch
    from bot.inference.thread_watch import EVERY_S, PAIRS, ThreadWatch

    plain = PackageBackend(tiny_v4_path, "cpu fp32", max_slots=2)
    watched = PackageBackend(tiny_v4_path, "cpu fp32", max_slots=2, watch_threads=True)
    assert plain.thread_watch is None
    cores = usable_cores()
    if cores < 2:
        assert watched.thread_watch is None
        pytest.skip("one usable core: there is no thread count to choose")
    assert watched.thread_watch is not None and watched.thread_watch.current == [cores, cores]
    now = [0.0]
    watched.thread_watch = ThreadWatch(watched.thread_watch.options, (cores, cores), clock=lambda: now[0])
    seen: list[int] = []
    decode = watched._decode

    def busy(tokens: Sequence[int]) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        now[0] += 0.002 if torch.get_num_threads() == 1 else 0.006
        return decode(tokens)

    monkeypatch.setattr(watched, "_decode", busy)
    monkeypatch.setattr(thread_watch, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    tokens = torch.randint(0, 50277, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    got: list[torch.Tensor] = []
    prefill_counts: list[int] = []

    def serve() -> None:
        watched.load_slot(0, watched.zero_state())
        got.append(watched.prefill(0, tokens[:8]))
        now[0] += EVERY_S
        for token in tokens[8:8 + 2 * PAIRS + 2]:
            got.append(watched.decode([token])[0])
        got.append(watched.prefill(0, tokens[18:20]))  # two tokens: one stream's count
        prefill_counts.append(torch.get_num_threads())

    run_in_fresh_thread(serve, name="serve", torch_threads=cores)
    assert seen == [cores, 1, 1, cores] * 2 + [1, 1] and prefill_counts == [1]
    assert [(c.kind, c.before, c.after) for c in watched.thread_watch.changes] == [("one stream", cores, 1)]
    plain.load_slot(0, plain.zero_state())
    want = [plain.prefill(0, tokens[:8])] + [plain.decode([t])[0] for t in tokens[8:18]]
    want.append(plain.prefill(0, tokens[18:20]))
    assert max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True)) <= FP32_TOL


@pytest.mark.parametrize("threads", [0, 1])
def test_the_bot_watches_the_package_backends_threads_unless_they_are_set(
        settings_factory: SettingsFactory, tiny_v4_path: Path, threads: int) -> None:
    settings = settings_factory(model=tiny_v4_path, torch_threads=threads)
    backend = load_backend(settings, tiny_v4_path)
    assert isinstance(backend, PackageBackend)
    assert (backend.thread_watch is not None) == (threads == 0 and usable_cores() > 1)


def test_raven_torch_threads_reaches_the_backend(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(torch_threads=1)
    assert settings.model is not None and settings.torch_threads == 1
    backend = load_backend(settings, settings.model)
    assert isinstance(backend, BatchedRWKV7Backend)
    assert backend.paths.threads == 1 and backend.paths.threads_source == "RAVEN_TORCH_THREADS"
    assert backend.thread_watch is None  # the operator's count is kept, whatever the neighbours do


def test_a_damaged_cache_is_measured_again(tiny_v7_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "tuning.json"
    cache.write_text("{not json")
    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=cache, always_tune=True)
    assert backend.paths.source == "measured"
    assert TuneCache(cache).get(next(iter(json.loads(cache.read_text())))) is not None


@pytest.mark.parametrize("cache", [False, True])
def test_without_a_cache_or_for_a_toy_model_paths_follow_capability(tiny_v7_path: Path, tmp_path: Path,
                                                                     cache: bool) -> None:
    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=tmp_path / "t.json" if cache else None)
    assert backend.paths.source == "capability" and backend.paths.threads == backend.machine.cores
    assert set(backend.paths.matmul.values()) == {candidates(backend.device, backend.torch_dtype)[0]}
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("kernel", candidates(torch.device("cpu"), torch.float32))
def test_every_kernel_the_tuner_may_pick_matches_the_package(kernel: str, tiny_v7_path: Path, ref: PackageBackend,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.inference.rwkv7_batched as batched

    monkeypatch.setattr(batched, "WKV_CHUNKS", (16,))
    monkeypatch.setattr(batched, "wkv_candidates", lambda device: [TORCH])
    monkeypatch.setattr(batched, "candidates", lambda device, dtype: [kernel])
    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=tmp_path / "t.json", always_tune=True)
    assert set(backend.paths.matmul.values()) == {kernel} and backend.head.kernel == kernel
    assert backend.paths.wkv == TORCH and backend.paths.wkv_chunk == 16
    assert "wkv torch, chunk 16" in backend.paths.summary()
    _check_against_package(backend, ref)


@pytest.mark.parametrize("wkv", wkv_candidates(torch.device("cpu")))
def test_every_wkv_kernel_the_tuner_may_pick_matches_the_package(
        wkv: str, tiny_v7_path: Path, ref: PackageBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.inference.rwkv7_batched as batched

    monkeypatch.setattr(batched, "wkv_candidates", lambda device: [wkv])
    cache = tmp_path / "t.json"
    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=cache, always_tune=True)
    assert backend.paths.wkv == wkv and f"wkv {wkv}" in backend.paths.summary()
    timed = backend.paths.timings["wkv_ms"]  # a 256-token prefill, 16- and 64-row steps per candidate
    assert all(len(t) == 3 and min(t) > 0 for t in timed.values())
    assert (FUSED in timed) == (wkv == FUSED) and {"16", "32", "64"} <= set(timed)
    assert next(iter(json.loads(cache.read_text()).values()))["wkv"] == wkv
    _check_against_package(backend, ref)


def test_the_fused_wkv_kernels_are_the_default_where_numba_works(tiny_v7_path: Path) -> None:
    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=2)
    assert fused_works()  # numba is a dependency: on our machines the fused path must be there
    assert backend.paths.source == "capability" and backend.paths.wkv == FUSED
    assert wkv_candidates(torch.device("meta")) == [TORCH]  # not on a device it cannot run on


def test_a_cached_choice_from_before_the_fused_kernels_is_measured_again(tiny_v7_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "t.json"
    first = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=cache, always_tune=True)
    stored = json.loads(cache.read_text())
    (key, entry), = stored.items()
    del entry["wkv"]  # an entry as older versions wrote it
    cache.write_text(json.dumps(stored))
    assert TuneCache(cache).get(key) is None
    again = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=cache, always_tune=True)
    assert again.paths.source == "measured" and first.paths.source == "measured"
    assert json.loads(cache.read_text())[key]["wkv"] in (FUSED, TORCH)
