"""The fused (numba) wkv kernels against PyTorch's formulations of the same recurrence: the decode
step, the closed-form prefill, over several sequences and heads, from a non-zero state, with the
strongest decay the model can express, and with bf16 inputs. The whole model on the fused path is
held to the ``rwkv`` package in ``tests/test_paths.py`` and ``tests/test_rwkv7_batched.py``."""

from __future__ import annotations

import pytest
import torch

from bot.inference.rwkv7_batched import LOG_W_SCALE, _wkv_seq, _wkv_step
from bot.inference.wkv_fused import fused_works, wkv_seq, wkv_step

REL = 2e-5  # the fused sums run in another order (vectorised): last bits only

pytestmark = pytest.mark.skipif(not fused_works(), reason="numba cannot compile the kernels here")


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


def _post_torch(y: torch.Tensor, r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                r_k: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor) -> torch.Tensor:
    """What ``_time_mix``'s PyTorch path does after the recurrence, in fp32: ln_x, bonus, gate."""
    B, T, H, N = y.shape
    normed = torch.nn.functional.group_norm(y.reshape(B * T, H * N), H, ln_w, ln_b, eps=64e-5).view(B, T, H, N)
    bonus = (r * k * r_k).sum(-1, keepdim=True) * v
    return (normed + bonus) * g


@pytest.mark.parametrize(("B", "T", "H", "dtype"), [(1, 1, 2, torch.float32), (5, 1, 3, torch.float32),
                                                     (2, 33, 2, torch.float32), (3, 1, 2, torch.bfloat16)])
def test_the_kernels_post_is_pytorchs_group_norm_bonus_and_gate(B: int, T: int, H: int, dtype: torch.dtype) -> None:
    g_ = torch.Generator().manual_seed(B + 10 * T)
    ins = [x.to(dtype) for x in _inputs(B, T, H, seed=5 * B + T)]
    gate, r_k = torch.randn(B, T, H, 64, generator=g_).to(dtype), torch.randn(H, 64, generator=g_).to(dtype)
    ln_w, ln_b = 1 + 0.3 * torch.randn(H * 64, generator=g_), 0.3 * torch.randn(H * 64, generator=g_)
    S0 = torch.randn(B * H, 64, 64, generator=g_) * 0.1
    S_raw, S_post = S0.clone(), S0.clone()
    raw = wkv_seq(S_raw, *ins)
    got = wkv_seq(S_post, *ins, post=(gate, r_k, ln_w, ln_b))
    r, _, k, v, _, _ = (x.float() for x in ins)
    want = _post_torch(raw, r, k, v, gate.float(), r_k.float(), ln_w, ln_b)
    assert got.shape == want.shape == (B, T, H, 64) and got.dtype == torch.float32
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((got - raw).abs().max()) > 0.1  # it is not the raw output
    assert torch.equal(S_post, S_raw)  # the state's update does not depend on the post-processing


@pytest.mark.parametrize(("env", "layer"), [(None, "threadsafe"), ("omp", "omp"), ("TBB", "tbb"),
                                            ("safe", "safe"), ("default", "threadsafe"),
                                            ("workqueue", "threadsafe"), ("forksafe", "threadsafe")])
def test_an_operators_numba_threading_layer_is_kept_where_it_is_safe(
        env: str | None, layer: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from bot.inference import wkv_kernels

    if env is None:
        monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    else:
        monkeypatch.setenv("NUMBA_THREADING_LAYER", env)
    with caplog.at_level("WARNING", logger="bot.inference.wkv_kernels"):
        assert wkv_kernels._threading_layer() == layer
    warned = env in ("workqueue", "forksafe")
    assert ("not safe for the engine's threads" in caplog.text) == warned
