"""The batched RWKV-7 backend on CUDA against the ``rwkv`` package on CUDA, in fp16 and bf16.

Skipped without a CUDA device (our CPU machines); ``bench/gpu_check.sh`` runs it where one is lent.
Each of B = 1, 8, 64 threads starts from its own history (the package's prefill of a different
length), then all decode together; every row is compared with the package decoding that thread
alone, in the same dtype. Half precision cannot match to 1e-4: the bounds are relative to the
logits' scale, with argmax agreement as the second check (fp32 on CUDA is covered by the CPU+CUDA
parametrisation of ``tests/test_rwkv7_batched.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.inference.backend import State
from bot.inference.checkpoint import make_checkpoint
from bot.inference.package_backend import PackageBackend
from bot.inference.rwkv7_batched import BatchedRWKV7Backend
from bot.inference.sampling import RowSampler, SamplingParams, sample_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (max |Δ| as a share of the largest |logit|, argmax agreement): fp16 keeps 10 mantissa bits, bf16 7
BOUNDS = {"fp16": (0.02, 0.9), "bf16": (0.1, 0.75)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("cuda") / "tiny-v7.pth", "v7", "tiny", seed=21)


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def pair(request: pytest.FixtureRequest, ckpt: Path) -> tuple[BatchedRWKV7Backend, PackageBackend, str]:
    dtype = str(request.param)
    ref = PackageBackend(ckpt, f"cuda {dtype}", max_slots=65)
    return BatchedRWKV7Backend(ckpt, device="cuda", dtype=dtype, max_slots=65), ref, dtype


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_batched_decode_matches_the_package_on_cuda(pair: tuple[BatchedRWKV7Backend, PackageBackend, str],
                                                     batch: int) -> None:
    ours, ref, dtype = pair
    share, floor = BOUNDS[dtype]
    for row in range(batch):
        ref.load_slot(row, ref.zero_state())
        ref.prefill(row, _tokens(1 + 3 * (row % 11), seed=row))
        ours.load_slot(row, ref.read_slot(row))
    worst = scale = 0.0
    agree = total = 0
    for step in range(3):
        tokens = _tokens(batch, seed=100 + step)
        got = ours.decode(tokens)
        assert got.device.type == "cuda" and got.shape == (batch, ours.vocab_size)
        want = ref.decode(tokens)
        assert torch.isfinite(got).all()
        worst = max(worst, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += batch
    print(f"cuda {dtype} B={batch}: max |Δ| {worst:.4f} (logits up to {scale:.2f}), argmax {agree}/{total}")
    assert worst <= share * scale
    assert agree / total >= floor


def test_prefill_matches_the_package_on_cuda(pair: tuple[BatchedRWKV7Backend, PackageBackend, str]) -> None:
    ours, ref, dtype = pair
    share, _ = BOUNDS[dtype]
    tokens = _tokens(300, seed=5)  # past a prefill chunk (256) and several wkv chunks
    ours.load_slot(0, ours.zero_state())
    ref.load_slot(0, ref.zero_state())
    got, want = ours.prefill(0, tokens), ref.prefill(0, tokens)
    assert float((got - want).abs().max()) <= share * float(want.abs().max())
    mine: State = ours.read_slot(0)
    theirs: State = ref.read_slot(0)
    wkv_scale = max(float(t.float().abs().max()) for t in theirs[1::3])
    assert max(float((a.float() - b.float()).abs().max()) for a, b in zip(mine[1::3], theirs[1::3], strict=True)) \
        <= share * wkv_scale


def test_sampling_runs_on_the_gpu(pair: tuple[BatchedRWKV7Backend, PackageBackend, str]) -> None:
    ours, _, _ = pair
    for row in range(64):
        ours.load_slot(row, ours.zero_state())
    logits = ours.decode(_tokens(64, seed=9))
    samplers = [RowSampler(SamplingParams(), seed=i) for i in range(64)]
    for s in samplers:
        s.record(17, "x")
    picks = sample_rows(logits, samplers)
    assert len(picks) == 64 and all(0 <= t < ours.vocab_size for t in picks)


def test_cuda_graph_replays_match_the_eager_step(ckpt: Path) -> None:
    """Each batch size runs eagerly, is captured on its second step and replayed after: every step's
    logits and the states they leave match a backend that never captures, also after a state is
    loaded into a slot between replays (the graph reads the live pool)."""
    graphed = BatchedRWKV7Backend(ckpt, device="cuda", dtype="fp16", max_slots=9)
    eager = BatchedRWKV7Backend(ckpt, device="cuda", dtype="fp16", max_slots=9, cuda_graphs=False)
    assert graphed.graphs is not None and eager.graphs is None
    for slot in range(8):
        eager.load_slot(slot, eager.zero_state())
        eager.prefill(slot, _tokens(2 + 5 * slot, seed=slot))
        graphed.load_slot(slot, eager.read_slot(slot))

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return float((a.float() - b.float()).abs().max()) <= 1e-3 * max(1.0, float(b.float().abs().max()))

    for step in range(4):
        for batch in (8, 3):
            tokens = _tokens(batch, seed=300 + 10 * step + batch)
            assert same(graphed.decode(tokens), eager.decode(tokens)), (step, batch)
    assert graphed.graphs.captured == [3, 8] and graphed.graphs.disabled is None
    graphed.load_slot(1, eager.read_slot(7))
    eager.load_slot(1, eager.read_slot(7))
    tokens = _tokens(3, seed=999)
    assert same(graphed.decode(tokens), eager.decode(tokens))
    for slot in range(8):
        assert all(same(a, b) for a, b in zip(graphed.read_slot(slot), eager.read_slot(slot), strict=True))
