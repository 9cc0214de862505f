"""The fused (numba) wkv kernels against PyTorch's formulations of the same recurrence: the decode
step, the closed-form prefill, over several sequences and heads, from a non-zero state, with the
strongest decay the model can express, and with bf16 inputs. The whole model on the fused path is
held to the ``rwkv`` package in ``tests/test_paths.py`` and ``tests/test_rwkv7_batched.py``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bot.inference.rwkv7_batched import LOG_W_SCALE, _wkv_seq, _wkv_step
from bot.inference.wkv_fused import (
    LayerConstants,
    time_mix_reference,
    wkv_layer,
    wkv_seq,
    wkv_step,
)

REL = 2e-5  # the fused sums run in another order (vectorised): last bits only

# Skipped only where numba is missing: a kernel that compiles but disagrees must fail here, with
# the numbers, not skip (the backend would quietly fall back to PyTorch's slower path).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")


def _inputs(B: int, T: int, H: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    N = 64
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    log_w = LOG_W_SCALE * torch.rand(B, T, H, N, generator=g)
    log_w[0, :, 0] = LOG_W_SCALE  # the strongest decay, on one head
    a = torch.rand(B, T, H, N, generator=g)
    return [r, log_w, k, v, kk, a]


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got - want).abs().max()) <= REL * float(want.abs().max())


@pytest.mark.parametrize(("B", "T", "H"), [(1, 1, 1), (2, 37, 3), (3, 70, 2)])
def test_fused_prefill_is_the_closed_form(B: int, T: int, H: int) -> None:
    ins = _inputs(B, T, H, seed=B * 100 + T)
    S0 = torch.randn(B * H, 64, 64, generator=torch.Generator().manual_seed(T)) * 0.1
    S_ref, S_fused = S0.clone(), S0.clone()
    want = _wkv_seq(S_ref, *ins, chunk=32)
    got = wkv_seq(S_fused, *ins)
    assert got.shape == want.shape == (B, T, H, 64) and got.dtype == torch.float32
    assert _close(got, want) and _close(S_fused, S_ref)
    assert not torch.equal(S_fused, S0)  # the state really was updated in place


def test_fused_steps_are_pytorchs_steps() -> None:
    B, T, H = 4, 20, 3
    ins = _inputs(B, T, H, seed=7)
    S0 = torch.randn(B * H, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    S_ref, S_fused = S0.clone(), S0.clone()
    for t in range(T):
        rows = [x[:, t].reshape(B * H, 64) for x in ins]
        want = _wkv_step(S_ref, *rows)
        got = wkv_step(S_fused, *rows)
        assert _close(got, want), f"token {t}"
    assert _close(S_fused, S_ref)


def test_bf16_inputs_are_read_as_fp32() -> None:
    ins = _inputs(2, 9, 2, seed=3)
    half = [x.bfloat16() for x in ins]
    S_ref, S_fused = torch.zeros(4, 64, 64), torch.zeros(4, 64, 64)
    want = _wkv_seq(S_ref, *(x.float() for x in half), chunk=16)
    got = wkv_seq(S_fused, *half)
    assert _close(got, want) and _close(S_fused, S_ref)


@pytest.mark.parametrize(("B", "T", "H", "dtype", "mixed"), [
    (1, 1, 2, torch.float32, False), (5, 1, 3, torch.float32, True), (2, 33, 2, torch.float32, True),
    (3, 1, 2, torch.bfloat16, True), (2, 9, 2, torch.bfloat16, False)])
def test_the_fused_layer_is_pytorchs_time_mix(B: int, T: int, H: int, dtype: torch.dtype, mixed: bool) -> None:
    """From the raw projections (kk, the in-context key and the value residual derived in the
    kernel) to the gated, normed output, against PyTorch's ops on the same fp32 inputs."""
    g_ = torch.Generator().manual_seed(B + 10 * T)
    r, log_w, k, v, _, a = (x.to(dtype) for x in _inputs(B, T, H, seed=5 * B + T))
    gate, v_first = (torch.randn(B, T, H, 64, generator=g_).to(dtype) for _ in range(2))
    v_gate = torch.rand(B, T, H, 64, generator=g_).to(dtype)
    C = H * 64
    k_k, k_a = 1 + 0.2 * torch.randn(C, generator=g_), torch.rand(C, generator=g_)
    r_k = torch.randn(H, 64, generator=g_)
    ln_w, ln_b = 1 + 0.3 * torch.randn(C, generator=g_), 0.3 * torch.randn(C, generator=g_)
    S0 = torch.randn(B * H, 64, 64, generator=g_) * 0.1
    S_ref, S_fused = S0.clone(), S0.clone()
    first, gated = (v_first, v_gate) if mixed else (None, None)
    got = wkv_layer(S_fused, r, log_w, k, v, a, gate, LayerConstants.of(k_k, k_a, r_k, ln_w, ln_b), first, gated)
    f32 = [x.float() if x is not None else None for x in (r, log_w, k, v, a, gate, first, gated)]
    want = time_mix_reference(S_ref, *f32[:6], k_k, k_a, r_k, ln_w, ln_b, f32[6], f32[7])  # type: ignore[arg-type]
    assert got.shape == want.shape == (B, T, H, 64) and got.dtype == dtype  # bf16 in, bf16 out
    # bf16: the fp32 result rounded once, to nearest: within half a bf16 step (at most 2^-8 of it)
    rounding = want.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else torch.zeros_like(want)
    assert bool(((got.float() - want).abs() <= rounding + 1e-4 * float(want.abs().max())).all())
    assert _close(S_fused, S_ref)
    if mixed:  # the residual is really applied: without it the answer differs
        S_plain = S0.clone()
        plain = time_mix_reference(S_plain, *f32[:6], k_k, k_a, r_k, ln_w, ln_b, None, None)  # type: ignore[arg-type]
        assert float((plain - want).abs().max()) > 0.1


@pytest.mark.parametrize(("env", "layer"), [(None, "threadsafe"), ("omp", "omp"), ("TBB", "tbb"),
                                            ("safe", "safe"), ("default", "threadsafe"),
                                            ("workqueue", "threadsafe"), ("forksafe", "threadsafe")])
def test_an_operators_numba_threading_layer_is_kept_where_it_is_safe(
        env: str | None, layer: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from bot.inference import numba_setup

    if env is None:
        monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    else:
        monkeypatch.setenv("NUMBA_THREADING_LAYER", env)
    with caplog.at_level("WARNING", logger="bot.inference.numba_setup"):
        assert numba_setup.threading_layer() == layer
    warned = env in ("workqueue", "forksafe")
    assert ("not safe for the engine's threads" in caplog.text) == warned


def test_the_self_check_covers_the_fused_time_mix(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A kernel whose recurrence is right but whose time-mix is not (a miscompile on some CPU) must
    send the backend to PyTorch's path: the start-up check runs ``wkv_layer`` too."""
    from bot.inference import wkv_fused

    assert wkv_fused.fused_works.__wrapped__() is True
    real = wkv_fused.wkv_layer
    monkeypatch.setattr(wkv_fused, "wkv_layer", lambda *args, **kwargs: real(*args, **kwargs) * 1.01)
    with caplog.at_level("WARNING", logger="bot.inference.wkv_fused"):
        assert wkv_fused.fused_works.__wrapped__() is False
    assert "disagrees with PyTorch's ops" in caplog.text


@pytest.mark.parametrize(("B", "T", "mixed"), [(4, 1, True), (1, 40, False), (3, 7, True)])
def test_bf16_in_and_out_is_the_fp32_kernel_rounded_once(B: int, T: int, mixed: bool) -> None:
    """The kernel reads bf16 inputs as their bits and writes a bf16 output: the same numbers as
    converting the inputs to fp32 first and rounding the fp32 output to nearest (PyTorch's
    rounding), bit for bit, and the same state; a NaN stays a NaN."""
    H = 3
    g_ = torch.Generator().manual_seed(7 * B + T)
    r, log_w, k, v, _, a = (x.bfloat16() for x in _inputs(B, T, H, seed=B + 3 * T))
    gate, v_first = (torch.randn(B, T, H, 64, generator=g_).bfloat16() for _ in range(2))
    v_gate = torch.rand(B, T, H, 64, generator=g_).bfloat16()
    gate[0, -1, 0, 5] = float("nan")  # one output element becomes NaN, nothing else does
    C = H * 64
    layer = LayerConstants.of(1 + 0.2 * torch.randn(C, generator=g_), torch.rand(C, generator=g_),
                              torch.randn(H, 64, generator=g_), 1 + 0.3 * torch.randn(C, generator=g_),
                              0.3 * torch.randn(C, generator=g_))
    S0 = torch.randn(B * H, 64, 64, generator=g_) * 0.1
    S_bits, S_f32 = S0.clone(), S0.clone()
    first, gated = (v_first, v_gate) if mixed else (None, None)
    got = wkv_layer(S_bits, r, log_w, k, v, a, gate, layer, first, gated)
    f32 = [x.float() if x is not None else None for x in (r, k, v, a, gate, first, gated)]
    want = wkv_layer(S_f32, f32[0], log_w, f32[1], f32[2], f32[3], f32[4], layer, f32[5], f32[6])  # type: ignore[arg-type]
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    assert torch.equal(S_bits, S_f32)
    rounded = want.bfloat16()
    nan = torch.isnan(got)
    assert bool(nan[0, -1, 0, 5]) and int(nan.sum()) == 1 and torch.equal(nan, torch.isnan(rounded))
    # bit for bit elsewhere (a NaN's payload is the CPU's business: PyTorch's own differs by ISA)
    assert torch.equal(got.view(torch.int16)[~nan], rounded.view(torch.int16)[~nan])
