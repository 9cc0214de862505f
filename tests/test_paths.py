"""Fast paths chosen per machine: the regret rule, the measured tune and its cache, and that every
kernel the tuner may pick gives the package's logits (the oracle) within the fp32 tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bot.inference.backend import clone_state
from bot.inference.package_backend import PackageBackend
from bot.inference.paths import TuneCache, candidates, least_regret
from bot.inference.rwkv7_batched import BatchedRWKV7Backend

FP32_TOL = 1e-4


def test_least_regret_is_never_far_from_the_best() -> None:
    # a: best alone, 3x worse batched; b: 1.2x worse alone, best batched; c: the slowest
    times = {"a": [1.0, 3.0], "b": [1.2, 1.0], "c": [2.0, 2.0]}
    assert least_regret(times) == "b"
    assert least_regret({"x": [1.0, 1.0], "y": [0.99, 1.0]}) == "x"  # within 5%: the preferred stays
    assert least_regret({"x": [2.0], "y": [1.0]}) == "y"


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
    assert first.paths.threads_source in ("measured at load", "the only core")
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
    monkeypatch.setattr(batched, "candidates", lambda device, dtype: [kernel])
    backend = BatchedRWKV7Backend(tiny_v7_path, max_slots=2, tune_cache=tmp_path / "t.json", always_tune=True)
    assert set(backend.paths.matmul.values()) == {kernel} and backend.head.kernel == kernel
    assert backend.paths.wkv_chunk == 16
    _check_against_package(backend, ref)
