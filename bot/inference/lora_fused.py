"""A bf16 layer's four low-rank chains (decay, in-context learning rate, value gate, output gate)
for a small decode step in one compiled call (``bot.inference.lora_kernels``) instead of eight
small matmuls and eight elementwise ops: 11.13 → 9.82 ms for a one-row bf16 step of the 0.1B shape
on the Zen 5 (AVX-512 + bf16; A/B in one process), 7.6% faster at two rows, 5.7% at three. The
backend measures it against PyTorch's ops at load and keeps whichever is faster
(``Paths.small_lora``). numba compiles it once in ~1.6 s and loads it from its cache afterwards.

Only for bf16 on the CPU: in fp32, MKL already runs those small products in 4-7 µs a call (the
kernel gained 6.8% at one row there, not worth a second path for fp32's 1e-4 oracle), and at four
rows or more the products are real work that oneDNN does better. It keeps its own copy of the LoRA
weights (plain (out, in) bf16, about 3% of the model), beside the tuned ones the batches use."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bot.inference.self_check import kernel_agrees
from bot.inference.wkv_fused import bf16_bits as _bits

log = logging.getLogger(__name__)
_kernel: dict[str, Any] = {}


def _chains() -> Any:
    if not _kernel:
        from bot.inference import lora_kernels

        _kernel["chains"] = lora_kernels.chains
    return _kernel["chains"]


@dataclass(frozen=True)
class LoraWeights:
    """One layer's LoRA factors as the kernel reads them: (out, in) bf16 bits, ``w0`` fp32."""

    w1: np.ndarray
    w2: np.ndarray
    a1: np.ndarray
    a2: np.ndarray
    v1: np.ndarray
    v2: np.ndarray
    g1: np.ndarray
    g2: np.ndarray
    w0: np.ndarray
    a0: np.ndarray
    v0: np.ndarray
    has_v: bool

    @classmethod
    def of(cls, factors: dict[str, torch.Tensor | None], w0: torch.Tensor, a0: torch.Tensor,
           v0: torch.Tensor | None) -> LoraWeights:
        """``factors``: w1 … g2 as the checkpoint stores them, (in, out); v1/v2/v0 None in layer 0."""
        empty = torch.zeros(1, 1, dtype=torch.bfloat16)

        def matrix(name: str) -> np.ndarray:
            t = factors[name]
            return _bits(t.to(torch.bfloat16).t().contiguous() if t is not None else empty)

        return cls(matrix("w1"), matrix("w2"), matrix("a1"), matrix("a2"), matrix("v1"), matrix("v2"),
                   matrix("g1"), matrix("g2"), w0.float().reshape(-1).contiguous().numpy(),
                   _bits(a0.to(torch.bfloat16).reshape(-1)),
                   _bits((v0 if v0 is not None else empty).to(torch.bfloat16).reshape(-1)), v0 is not None)


def chains(mixed: torch.Tensor, weights: LoraWeights
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """From the six token-shift mixes (6, R, C) bf16: ``log_w`` (R, C) fp32 and ``a``, the value
    gate (None in layer 0) and ``g``, (R, C) bf16: what ``_time_mix`` computes with its LoRA Linears."""
    _, R, C = mixed.shape
    log_w = torch.empty(R, C)
    a, v_gate, g = (torch.empty(R, C, dtype=torch.bfloat16) for _ in range(3))
    _chains()(_bits(mixed), weights.w1, weights.w2, weights.a1, weights.a2, weights.v1, weights.v2,
              weights.g1, weights.g2, weights.w0, weights.a0, weights.v0, weights.has_v,
              log_w.numpy(), _bits(a), _bits(v_gate), _bits(g))
    return log_w, a, v_gate if weights.has_v else None, g


def reference(mixed: torch.Tensor, factors: dict[str, torch.Tensor | None], w0: torch.Tensor,
              a0: torch.Tensor, v0: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The same in PyTorch's bf16 ops (``_time_mix``'s formulas): the self-check's and tests' oracle."""
    from bot.inference.rwkv7_batched import LOG_W_SCALE

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        t = factors[name]
        assert t is not None
        return F.linear(x, t.to(torch.bfloat16).t())

    _, xw, _, xv, xa, xg = mixed.unbind(0)
    log_w = LOG_W_SCALE * torch.sigmoid(w0.float() + lin(torch.tanh(lin(xw, "w1")), "w2").float())
    a = torch.sigmoid(a0.to(torch.bfloat16) + lin(lin(xa, "a1"), "a2"))
    v_gate = torch.sigmoid(v0.to(torch.bfloat16) + lin(lin(xv, "v1"), "v2")) if v0 is not None else None
    g = lin(torch.sigmoid(lin(xg, "g1")), "g2")
    return log_w, a, v_gate, g


Chains = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


def agrees(got: Chains, want: Chains) -> bool:
    """``log_w`` within 1e-5 relative, the bf16 outputs within one bf16 step of PyTorch's (the
    products' sums may be ordered differently)."""
    ok = bool(torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-7))
    for mine, theirs in zip(got[1:], want[1:], strict=True):
        if (mine is None) != (theirs is None):
            return False
        if mine is not None and theirs is not None:
            m, t = mine.float(), theirs.float()
            ok = ok and bool(((m - t).abs() <= t.abs() * 2.0 ** -7 + 1e-6).all())
    return ok


@cache
def lora_works() -> bool:
    """numba compiles the kernel and it computes what PyTorch's ops compute, with and without the
    value gate; anything else keeps PyTorch's path (``bot.inference.self_check``)."""
    return kernel_agrees(log, "fused LoRA kernel", _check)


def _check() -> bool:
    g = torch.Generator().manual_seed(0)
    C = 128

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.3).to(torch.bfloat16)

    factors: dict[str, torch.Tensor | None] = {
        "w1": rand(C, 16), "w2": rand(16, C), "a1": rand(C, 16), "a2": rand(16, C),
        "v1": rand(C, 8), "v2": rand(8, C), "g1": rand(C, 32), "g2": rand(32, C)}
    w0, a0, v0 = rand(C).float(), rand(C), rand(C)
    mixed = rand(6, 3, C)
    ok = agrees(chains(mixed, LoraWeights.of(factors, w0, a0, v0)), reference(mixed, factors, w0, a0, v0))
    first = {**factors, "v1": None, "v2": None}
    ok = ok and agrees(chains(mixed, LoraWeights.of(first, w0, a0, None)), reference(mixed, first, w0, a0, None))
    return ok
