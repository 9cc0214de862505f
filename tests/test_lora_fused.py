"""The fused LoRA chains (bot.inference.lora_fused) against PyTorch's bf16 ops, and the backend
using them only where they belong: bf16 on the CPU, decode steps under ``SMALL_STEP_ROWS`` rows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.inference import lora_fused
from bot.inference import rwkv7_batched as batched
from bot.inference.checkpoint import make_checkpoint
from bot.inference.paths import SMALL_STEP_ROWS, least_regret
from bot.inference.rwkv7_batched import BatchedRWKV7Backend


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("lora") / "tiny-v7.pth", "v7", "tiny", seed=5)


def _factors(C: int, seed: int) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.2).to(torch.bfloat16)

    dims = {"w": 64, "a": 64, "v": 32, "g": 128}
    factors: dict[str, torch.Tensor | None] = {}
    for name, d in dims.items():
        factors[name + "1"], factors[name + "2"] = rand(C, d), rand(d, C)
    return factors, rand(C).float(), rand(C), rand(C)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("first_layer", [False, True])
def test_the_kernel_computes_what_pytorchs_bf16_ops_compute(rows: int, first_layer: bool) -> None:
    """The 0.1B shape (C = 768, ranks 64/64/32/128): the bf16 outputs are PyTorch's bit for bit
    (each intermediate rounded where PyTorch rounds it), the fp32 decay within an ulp or so."""
    factors, w0, a0, v0 = _factors(768, seed=rows)
    if first_layer:
        factors["v1"] = factors["v2"] = None
    mixed = (torch.randn(6, rows, 768, generator=torch.Generator().manual_seed(9))).to(torch.bfloat16)
    got = lora_fused.chains(mixed, lora_fused.LoraWeights.of(factors, w0, a0, None if first_layer else v0))
    want = lora_fused.reference(mixed, factors, w0, a0, None if first_layer else v0)
    assert lora_fused.agrees(got, want)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    for mine, theirs in ((got[1], want[1]), (got[3], want[3])) + (() if first_layer else ((got[2], want[2]),)):
        assert mine is not None and theirs is not None
        assert float((mine.float() != theirs.float()).float().mean()) <= 0.001  # (sums in another order)
    assert (got[2] is None) == first_layer


def test_a_small_bf16_step_uses_the_kernel_and_keeps_the_model_s_numbers(ckpt: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 1-3 rows with the kernel against the same steps through PyTorch's ops (same weights,
    same states): the same argmax and logits within bf16's rounding; a 4-row step does not use it."""
    ours = BatchedRWKV7Backend(ckpt, device="cpu", dtype="bf16", max_slots=8)
    assert ours.paths.small_lora and ours._lora is not None  # a tiny model: by capability
    assert "LoRA chains fused for steps under 4 rows" in ours.paths.summary()
    calls: list[int] = []

    def counted(*args: Any) -> Any:
        calls.append(1)
        return lora_fused.chains(*args)

    monkeypatch.setattr(batched, "lora_chains", counted)
    tokens = torch.randint(0, 65536, (SMALL_STEP_ROWS, 6), generator=torch.Generator().manual_seed(2)).tolist()
    for rows in range(1, SMALL_STEP_ROWS + 1):
        logits = {}
        for fused in (True, False):
            ours.paths.small_lora = fused
            for slot in range(rows):
                ours.load_slot(slot, ours.zero_state())
            calls.clear()
            for step in range(6):
                logits[fused] = ours.decode([tokens[r][step] for r in range(rows)])
            assert bool(calls) == (fused and rows < SMALL_STEP_ROWS)
        if rows < SMALL_STEP_ROWS:
            assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))
            assert float((logits[True] - logits[False]).abs().max()) <= 0.05 * float(logits[False].abs().max())
        else:
            assert torch.equal(logits[True], logits[False])


def test_measured_paths_keep_the_kernel_only_where_a_one_row_step_is_faster_with_it(
        ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With paths measured, the load times real one-row steps both ways (rounds in turn): the choice
    follows those timings, the states it used are cleared, and a kernel made slow (20 ms a layer
    here) is dropped with its weights."""
    ours = BatchedRWKV7Backend(ckpt, device="cpu", dtype="bf16", max_slots=4, tune_cache=tmp_path / "t.json",
                               always_tune=True)
    times = ours.paths.timings["small_lora_ms"]
    assert set(times) == {"False", "True"} and all(t > 0 for t in times.values())
    assert ours.paths.small_lora == (least_regret({k: [v] for k, v in times.items()}) == "True")
    assert (ours._lora is not None) == ours.paths.small_lora
    assert not any(bool(t.any()) for t in (ours.att_x, ours.wkv, ours.ffn_x))

    def slow(*args: Any) -> Any:
        time.sleep(0.02)
        return lora_fused.chains(*args)

    monkeypatch.setattr(batched, "lora_chains", slow)
    slowed = BatchedRWKV7Backend(ckpt, device="cpu", dtype="bf16", max_slots=4, tune_cache=tmp_path / "t.json",
                                 always_tune=True)
    assert not slowed.paths.small_lora and slowed._lora is None
    assert slowed.paths.timings["small_lora_ms"]["True"] > slowed.paths.timings["small_lora_ms"]["False"]
    assert "LoRA" not in slowed.paths.summary()


def test_fp32_and_a_disagreeing_kernel_keep_pytorchs_ops(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    fp32 = BatchedRWKV7Backend(ckpt, device="cpu", dtype="fp32", max_slots=2)
    assert fp32._lora is None and not fp32.paths.small_lora and "LoRA" not in fp32.paths.summary()

    def wrong(*args: object) -> None:
        return None  # leaves the outputs as torch.empty left them

    lora_fused.lora_works.cache_clear()
    monkeypatch.setitem(lora_fused._kernel, "chains", wrong)
    try:
        with caplog.at_level("WARNING", logger="bot.inference.lora_fused"):
            assert lora_fused.lora_works() is False
        assert "disagrees" in caplog.text
        bf16 = BatchedRWKV7Backend(ckpt, device="cpu", dtype="bf16", max_slots=2)
        assert bf16._lora is None and not bf16.paths.small_lora
    finally:
        lora_fused.lora_works.cache_clear()
