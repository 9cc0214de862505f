"""The batched RWKV-7 backend against its oracle, the official ``rwkv`` package, on a tiny checkpoint.

Every comparison runs the same tokens from the same state through both and asserts on the numbers:
per-row decode logits, prefill logits and states, states handed between the two implementations,
the slot pool's bookkeeping, bf16 drift, and the loader's errors. On a machine with CUDA the oracle
tests also run ``cuda fp32`` against the package's ``cuda fp32``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bot.errors import ModelLoadError, NonFiniteLogitsError
from bot.inference.backend import State, clone_state
from bot.inference.checkpoint import make_checkpoint
from bot.inference.package_backend import PackageBackend
from bot.inference.rwkv7_batched import (
    LOG_W_SCALE,
    WKV_CHUNK,
    BatchedRWKV7Backend,
    _wkv_seq,
    _wkv_step,
)

FP32_TOL = 1e-4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def b7_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("b7") / "tiny-v7.pth", "v7", "tiny", seed=11)


@pytest.fixture(scope="module", params=DEVICES)
def pair(request: pytest.FixtureRequest, b7_ckpt: Path) -> tuple[BatchedRWKV7Backend, PackageBackend]:
    """Ours and the package's, fp32, on one device. TF32 off: the package turns it on at import,
    and fp32 should mean fp32 on both sides."""
    device = str(request.param)
    ref = PackageBackend(b7_ckpt, f"{device} fp32", max_slots=8)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return BatchedRWKV7Backend(b7_ckpt, device=device, dtype="fp32", max_slots=8), ref


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 65536, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _package_run(ref: PackageBackend, state: State, tokens: list[int]) -> tuple[torch.Tensor, State]:
    """The package's own forward from ``state`` (one call, as its per-token loop sees it)."""
    logits, new = ref.model.forward(list(tokens), ref._device_state(state))
    return logits.float().cpu(), clone_state(new)


def _max_state_diff(a: State, b: State) -> float:
    assert len(a) == len(b)
    return max(float((x.float().cpu() - y.float().cpu()).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_decode_rows_match_package(pair: tuple[BatchedRWKV7Backend, PackageBackend], batch: int) -> None:
    """Threads at different positions (histories of different lengths) decode together; each row
    equals the package running that thread alone."""
    ours, ref = pair
    states: list[State] = []
    for row in range(batch):
        _, state = _package_run(ref, ref.zero_state(), _tokens(1 + 5 * row, seed=row))
        states.append(state)
        ours.load_slot(row, state)
    worst = 0.0
    for step in range(3):
        tokens = _tokens(batch, seed=100 + step)
        got = ours.decode(tokens)
        assert got.shape == (batch, ours.vocab_size) and got.dtype == torch.float32
        assert got.device == ours.device  # logits stay where the model runs (sampling runs there)
        for row in range(batch):
            want, states[row] = _package_run(ref, states[row], [tokens[row]])
            worst = max(worst, float((got[row] - want).abs().max()))
    assert worst <= FP32_TOL, f"decode differs from the package by {worst:.2e}"
    for row in range(batch):  # the states left behind match too
        assert _max_state_diff(ours.read_slot(row), states[row]) <= FP32_TOL


@pytest.mark.parametrize("length", [1, 7, WKV_CHUNK + 5, 300])
def test_prefill_matches_package(pair: tuple[BatchedRWKV7Backend, PackageBackend], length: int) -> None:
    """From a non-zero state, across wkv-chunk and prefill-chunk boundaries (300 > 256)."""
    ours, ref = pair
    _, start = _package_run(ref, ref.zero_state(), _tokens(9, seed=1))
    tokens = _tokens(length, seed=length)
    ours.load_slot(5, start)
    got = ours.prefill(5, tokens)
    want, want_state = _package_run(ref, start, tokens)
    assert got.shape == (ours.vocab_size,) and got.device.type == "cpu"
    diff = float((got - want).abs().max())
    assert diff <= FP32_TOL, f"prefill of {length} tokens differs by {diff:.2e}"
    assert _max_state_diff(ours.read_slot(5), want_state) <= FP32_TOL


def test_state_hands_over_between_implementations(pair: tuple[BatchedRWKV7Backend, PackageBackend]) -> None:
    """ours → package → ours continues exactly like the package alone: the layouts are the same."""
    ours, ref = pair
    first, second, third = _tokens(20, seed=2), _tokens(6, seed=3), [17, 4242, 99]
    ours.load_slot(0, ours.zero_state())
    ours.prefill(0, first)
    mid = ours.read_slot(0)
    _, after_package = _package_run(ref, mid, second)
    ours.load_slot(0, after_package)
    got = [ours.decode([t])[0] for t in third]

    _, alone = _package_run(ref, ref.zero_state(), first + second)
    for t, row in zip(third, got, strict=True):
        want, alone = _package_run(ref, alone, [t])
        assert float((row - want).abs().max()) <= FP32_TOL


def test_slots_round_trip_and_move(pair: tuple[BatchedRWKV7Backend, PackageBackend]) -> None:
    ours, _ = pair
    ours.load_slot(2, ours.zero_state())
    ours.prefill(2, _tokens(12, seed=4))
    saved = ours.read_slot(2)
    assert [t.shape for t in saved[:3]] == [(128,), (2, 64, 64), (128,)]
    assert saved[1].dtype == torch.float32 and saved[0].dtype == torch.float32
    assert all(t.device.type == "cpu" for t in saved)
    ours.load_slot(6, saved)
    assert _max_state_diff(ours.read_slot(6), saved) == 0.0
    saved[1].add_(1.0)  # read_slot returned a copy, not a view into the pool
    assert _max_state_diff(ours.read_slot(6), ours.read_slot(2)) == 0.0

    untouched = ours.read_slot(7)
    ours.move_slot(2, 0)
    assert _max_state_diff(ours.read_slot(0), ours.read_slot(2)) == 0.0
    a = ours.decode([5])[0]  # decoding slot 0 moves it on, and leaves slots ≥ B alone
    assert _max_state_diff(ours.read_slot(7), untouched) == 0.0
    ours.load_slot(1, ours.read_slot(6))
    ours.move_slot(1, 0)
    b = ours.decode([5])[0]
    assert float((a - b).abs().max()) == 0.0
    with pytest.raises(IndexError):
        ours.read_slot(8)


@pytest.mark.parametrize(("length", "chunk"), [(2 * WKV_CHUNK + 5, WKV_CHUNK), (40, 64), (7, 16)])
def test_wkv_closed_form_equals_steps(length: int, chunk: int) -> None:
    """Prefill's chunked closed form is the same recurrence as decode's per-token step, including a
    padded last chunk and the strongest decay the model can express."""
    gen = torch.Generator().manual_seed(length)
    X, N = 3, 64

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    r, k, v = rnd(X, length, N), rnd(X, length, N), rnd(X, length, N)
    kk = torch.nn.functional.normalize(rnd(X, length, N), dim=-1)
    a = torch.rand(X, length, N, generator=gen)
    log_w = LOG_W_SCALE * torch.rand(X, length, N, generator=gen)
    log_w[0] = LOG_W_SCALE
    S0 = rnd(X, N, N) * 0.1
    S_step, S_seq = S0.clone(), S0.clone()
    ys = torch.stack([_wkv_step(S_step, r[:, t], log_w[:, t], k[:, t], v[:, t], kk[:, t], a[:, t])
                      for t in range(length)], 1)
    def token_major(t: torch.Tensor) -> torch.Tensor:  # (X, T, N) as one sequence of X heads
        return t.transpose(0, 1).unsqueeze(0)

    y_seq = _wkv_seq(S_seq, token_major(r), token_major(log_w), token_major(k), token_major(v),
                     token_major(kk), token_major(a), chunk=chunk)[0].transpose(0, 1)
    assert y_seq.shape == ys.shape
    assert float((ys - y_seq).abs().max()) <= 1e-5 * float(ys.abs().max())
    assert float((S_step - S_seq).abs().max()) <= 1e-5 * float(S_step.abs().max())


def test_bf16_drift_is_bounded(b7_ckpt: Path, pair: tuple[BatchedRWKV7Backend, PackageBackend]) -> None:
    """bf16 weights (fp32 state) against the fp32 package: report the drift and bound it.

    bf16 keeps 8 bits of mantissa, so logits move by ~0.1 and near-ties flip; the argmax still agrees
    on most positions. The floors are loose on purpose: they catch a broken bf16 path, not noise.
    """
    ours16 = BatchedRWKV7Backend(b7_ckpt, device="cpu", dtype="bf16", max_slots=2)
    _, ref = pair
    if ref.device.type != "cpu":
        pytest.skip("measured once, on CPU")
    tokens = _tokens(48, seed=9)
    ours16.load_slot(0, ours16.zero_state())
    state = ref.zero_state()
    agree, worst, scale = 0, 0.0, 0.0
    for t in tokens:
        got = ours16.decode([t])[0]
        want, state = _package_run(ref, state, [t])
        agree += int(got.argmax() == want.argmax())
        worst = max(worst, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    rate = agree / len(tokens)
    print(f"bf16 vs fp32 package: argmax agreement {rate:.0%}, max |Δlogit| {worst:.3f} (logits up to {scale:.1f})")
    assert math.isfinite(worst)
    assert rate >= 0.75
    assert worst <= 0.1 * scale


def test_plain_linear_path_matches(b7_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                   pair: tuple[BatchedRWKV7Backend, PackageBackend]) -> None:
    """The ``F.linear`` path (what CUDA and fp16 use) gives the same numbers as oneDNN's."""
    import bot.inference.paths as module

    _, ref = pair
    if ref.device.type != "cpu":
        pytest.skip("the CPU's second kernel path")
    monkeypatch.setattr(module, "mkldnn_works", lambda device, dtype: False)
    plain = BatchedRWKV7Backend(b7_ckpt, device="cpu", dtype="fp32", max_slots=2)
    assert set(plain.paths.matmul.values()) == {"plain"} and not plain.head.use_mkldnn
    tokens = _tokens(40, seed=12)
    plain.load_slot(1, plain.zero_state())
    want, _ = _package_run(ref, ref.zero_state(), tokens)
    assert float((plain.prefill(1, tokens) - want).abs().max()) <= FP32_TOL


def test_fp16_overflow_raises_instead_of_garbage(b7_ckpt: Path) -> None:
    ours = BatchedRWKV7Backend(b7_ckpt, device="cpu", dtype="fp16", max_slots=2)
    ours.load_slot(0, ours.zero_state())
    assert torch.isfinite(ours.decode([3])).all()
    ours.head.weight.mul_(1e4)  # push the logits past fp16's 65504
    with pytest.raises(NonFiniteLogitsError, match="fp16"):
        ours.decode([3])


def test_missing_key_names_file_and_key(tmp_path: Path, b7_ckpt: Path) -> None:
    sd = torch.load(b7_ckpt, map_location="cpu", weights_only=True)
    del sd["blocks.1.att.k_a"]
    bad = tmp_path / "missing.pth"
    torch.save(sd, bad)
    with pytest.raises(ModelLoadError, match=r"missing\.pth.*blocks\.1\.att\.k_a") as info:
        BatchedRWKV7Backend(bad)
    assert "(1, 1, 128)" in str(info.value)


def test_wrong_shape_names_expected_shape(tmp_path: Path, b7_ckpt: Path) -> None:
    sd = torch.load(b7_ckpt, map_location="cpu", weights_only=True)
    sd["blocks.2.ffn.key.weight"] = sd["blocks.2.ffn.key.weight"][:100]
    bad = tmp_path / "shape.pth"
    torch.save(sd, bad)
    with pytest.raises(ModelLoadError, match=r"shape\.pth.*blocks\.2\.ffn\.key\.weight.*\(100, 128\).*\(512, 128\)"):
        BatchedRWKV7Backend(bad)


def test_rejects_other_families_and_bad_options(tmp_path: Path, b7_ckpt: Path) -> None:
    v4 = make_checkpoint(tmp_path / "v4.pth", "v4", "tiny")
    with pytest.raises(ModelLoadError, match="RWKV-4"):
        BatchedRWKV7Backend(v4)
    with pytest.raises(ModelLoadError, match="dtype"):
        BatchedRWKV7Backend(b7_ckpt, dtype="int8")
    with pytest.raises(ModelLoadError, match="does not exist"):
        BatchedRWKV7Backend(tmp_path / "nope.pth")


@pytest.mark.parametrize(("rows", "length"), [(2, WKV_CHUNK + 1), (3, 55), (4, 2 * WKV_CHUNK + 3)])
def test_multi_row_prefill_past_a_chunk_boundary_matches_package(
        pair: tuple[BatchedRWKV7Backend, PackageBackend], rows: int, length: int) -> None:
    """Several prompts read together, of a length that leaves the last wkv chunk padded (it failed
    with a strided view once: four 55-token messages arriving in one step)."""
    ours, ref = pair
    prompts = [_tokens(length, seed=500 + row) for row in range(rows)]
    for row in range(rows):
        ours.load_slot(row, ref.zero_state())
    got = ours.prefill_rows(0, prompts)
    assert got.shape == (rows, ours.vocab_size)
    for row, prompt in enumerate(prompts):
        want, state = _package_run(ref, ref.zero_state(), prompt)
        assert float((got[row] - want).abs().max()) <= FP32_TOL
        assert _max_state_diff(ours.read_slot(row), state) <= FP32_TOL


def test_cuda_graphs_are_for_cuda_only(b7_ckpt: Path) -> None:
    """On the CPU every decode step runs eagerly (graphs are a CUDA launch-overhead fix); the CUDA
    replays are checked against the eager step in ``tests/test_cuda_oracle.py``."""
    backend = BatchedRWKV7Backend(b7_ckpt, max_slots=2, cuda_graphs=True)
    assert backend.graphs is None


def test_a_graph_that_cannot_be_captured_leaves_the_eager_step(caplog: pytest.LogCaptureFixture) -> None:
    """The fallback, run where capturing must fail (no CUDA here; on a GPU an op that cannot be
    captured fails the same way): the first call of a batch size is the eager warm-up, the second
    tries to capture, fails, warns once and turns graphs off; every later call runs eagerly without
    trying again."""
    from bot.inference.cuda_graphs import StepGraphs

    steps: list[int] = []

    def step(ids: torch.Tensor) -> torch.Tensor:
        steps.append(int(ids.shape[0]))
        return ids.float()

    graphs = StepGraphs(step, torch.device("cpu"))
    ids = torch.tensor([3, 4])
    with caplog.at_level("WARNING", logger="bot.inference.cuda_graphs"):
        assert graphs.run(ids) is None and graphs.disabled is None  # the warm-up: eager
        assert graphs.run(ids) is None and graphs.disabled is not None  # the capture failed
        assert graphs.run(ids) is None and graphs.run(torch.tensor([1])) is None
    assert graphs.captured == [] and graphs.summary().startswith("CUDA graphs off (")
    assert caplog.text.count("CUDA graph capture failed at batch size 2") == 1
    assert steps == []  # StepGraphs itself ran no step: the eager calls are the backend's own
