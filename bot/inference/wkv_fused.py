"""The wkv recurrence as one pass over each head's state, compiled by numba, for the CPU.

Why: in PyTorch ops the decode step reads and writes the whole state pool five times (a batched
matrix-vector product, a decay, a rank-2 update), and small batched products run far below the
memory bandwidth. At 64 threads of the 0.1B shape the pool is 12.6 MB a layer, and those passes took
1.6-2.2 ms a layer on the Zen 5 (AVX-512, and lowered to AVX2) against 0.47 ms for this kernel,
which reads each row of a head's state once and writes it once. Prefill walks the tokens one by one
with the head's 16 KB state held in the L1 cache: 0.8-1.3 ms for 256 tokens of one layer against
5.5-10 ms for the chunked closed form (``rwkv7_batched._wkv_seq``). The formulas are those of
``rwkv7_batched._wkv_step``; one kernel serves both (a step is a prefill of one token), and tests
hold it to the PyTorch formulations and the model to the ``rwkv`` package. The decay arrives as
``w = exp(log w)`` from PyTorch's vectorised ``exp`` (numba's is scalar: 20-30% of the kernel), and
for the model (``wkv_layer``) the kernel runs the time-mix from the raw projections to the output
projection's input: it derives ``kk``, the in-context key and the value residual, and each head's
output leaves it normed, with its bonus, gated (nineteen PyTorch ops a layer before and after it).
A bf16 model's layer is read and written in bf16 (the tensors' bits; the kernel computes in fp32),
so the seven inputs are not converted to fp32 before the call nor the output back after it: the
same numbers, bit for bit, and 1.7-1.9% off a bf16 decode step at 1-64 rows, 3.7% off a 16×16
prefill (A/B in one process, Zen 5).

Floating point: the dot products are summed in a vectorised order (``fastmath`` reassociation and
fused multiply-adds only; no assumption about NaN or infinity), so results differ from PyTorch's in
the last bits (≤ 2e-5 relative, measured), never in the recurrence. Threads: heads are spread over
numba's threading layer, ``omp`` or ``tbb`` (never ``workqueue``, which aborts the process when two
threads launch a kernel at once; an operator's safe ``NUMBA_THREADING_LAYER`` is kept, see
``numba_setup.threading_layer``), with as many threads as torch uses on the calling thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from bot.inference.self_check import kernel_agrees

log = logging.getLogger(__name__)

FUSED = "fused"
TORCH = "torch"
PARALLEL_MIN = 64
"""Heads × tokens below which a call runs on the calling thread alone (a 0.1B model's one-stream
step is 12): waking a second thread costs more than such a call's work, and on a host whose cores
are busy the woken thread may not be scheduled for a while (PyTorch runs its small ops inline too)."""
_kernels: dict[str, Any] = {}


def _compile() -> dict[str, Any]:
    """The kernel, compiled on first use: ~5 s once per machine and code version (Zen 5, measured
    with an empty cache); numba caches it on disk, so a restart takes ~1.4 s, mostly numba's import."""
    if not _kernels:
        from bot.inference import wkv_kernels

        _kernels.update(seq=wkv_kernels.seq, numba=wkv_kernels.numba)
    return _kernels


def _arrays(tensors: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """fp32, C-contiguous numpy views (one compiled specialisation; bf16 inputs are converted)."""
    return [t.float().contiguous().numpy() for t in tensors]


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor as a C-contiguous uint16 numpy view of its bits, which the numba kernels read
    as bf16 (``numba_bf16.to_f32``): no conversion pass, no fp32 copy (no copy at all where it is
    contiguous already)."""
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _bf16_bits(tensors: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [bf16_bits(t) for t in tensors]


def _threads(numba: Any, head_tokens: int) -> None:
    """As many threads as torch runs with here, or one for a small call (see ``PARALLEL_MIN``)."""
    wanted = torch.get_num_threads() if head_tokens >= PARALLEL_MIN else 1
    numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))


GROUP_NORM_EPS = 64e-5  # the model's ln_x eps (the package's literal)
_EMPTY4_BITS = np.empty((1, 1, 1, 1), np.uint16)  # for layer 0's missing residual, in bf16
_EMPTY4, _EMPTY2, _EMPTY1 = (np.empty((1,) * n, np.float32) for n in (4, 2, 1))  # typed stand-ins:
# every call passes arrays of the same ranks, so numba compiles (and caches) one kernel


@dataclass(frozen=True)
class LayerConstants:
    """One layer's per-channel weights the fused time-mix reads, fp32 and contiguous (made once)."""

    k_k: np.ndarray  # (C,)
    k_a: np.ndarray  # (C,)
    r_k: np.ndarray  # (H, N)
    ln_w: np.ndarray  # (C,) ln_x
    ln_b: np.ndarray  # (C,)

    @classmethod
    def of(cls, k_k: torch.Tensor, k_a: torch.Tensor, r_k: torch.Tensor, ln_w: torch.Tensor,
           ln_b: torch.Tensor) -> LayerConstants:
        k_k_, k_a_, r_k_, w_, b_ = _arrays((k_k, k_a, r_k, ln_w, ln_b))
        return cls(k_k_, k_a_, r_k_, w_, b_)


def wkv_step(S: torch.Tensor, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kk: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``rwkv7_batched._wkv_step`` in one pass: S (B·H, N, N) fp32 contiguous, updated in place;
    inputs (B·H, N); returns y (B·H, N) fp32. One token of B·H sequences of one head each."""
    X, N = r.shape

    def one(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, 1, X, N)

    return wkv_seq(S, one(r), one(log_w), one(k), one(v), one(kk), one(a)).view(X, N)


def wkv_seq(S: torch.Tensor, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kk: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``rwkv7_batched._wkv_seq`` token by token: inputs (B, T, H, N), S (B·H, N, N) updated in
    place; returns y (B, T, H, N) fp32."""
    r_, w_, k_, v_, kk_, a_ = _arrays((r, log_w.float().exp(), k, v, kk, a))
    return _launch(S, r.shape, (r_, w_, k_, v_, kk_, a_), post=None, pre=None)


def wkv_layer(S: torch.Tensor, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              a: torch.Tensor, g: torch.Tensor, layer: LayerConstants, v_first: torch.Tensor | None = None,
              v_gate: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's whole time-mix between its projections and its output projection, ``_time_mix``'s
    PyTorch path in one pass: from the raw key and value (B, T, H, N) (and past layer 0 the first
    layer's values with the residual's gate, its sigmoid applied), the recurrence on S (updated in
    place), then per head ``(group_norm(y) + (r·(k⊙r_k))·v) ⊙ g``; returns (B, T, H, N), bf16 where
    the inputs are all bf16 (read and written as such by the kernel, which computes in fp32: the
    same numbers as converting them first and rounding the fp32 output, without those eight
    passes), else fp32."""
    w_ = log_w.float().exp().contiguous().numpy()
    ins = (r, k, v, a, g) + ((v_first, v_gate) if v_first is not None and v_gate is not None else ())
    bits = all(t.dtype == torch.bfloat16 for t in ins)
    arrays: list[np.ndarray] = _bf16_bits(ins) if bits else _arrays(ins)
    empty, out_dtype = (_EMPTY4_BITS, torch.bfloat16) if bits else (_EMPTY4, torch.float32)
    r_, k_, v_, a_, g_ = arrays[:5]
    mix = len(arrays) == 7
    first, gate = (arrays[5], arrays[6]) if mix else (empty, empty)
    return _launch(S, r.shape, (r_, w_, k_, v_, _EMPTY4, a_), post=(g_, layer), pre=(mix, first, gate),
                   out_dtype=out_dtype)


def _launch(S: torch.Tensor, shape: torch.Size, ins: tuple[np.ndarray, ...],
            post: tuple[np.ndarray, LayerConstants] | None,
            pre: tuple[bool, np.ndarray, np.ndarray] | None, out_dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
    kernels = _compile()
    _threads(kernels["numba"], shape[0] * shape[1] * shape[2])
    y = torch.empty(shape, dtype=out_dtype)
    y_ = bf16_bits(y) if out_dtype == torch.bfloat16 else y.numpy()
    if post is not None:
        g, layer = post
        post_args: tuple[object, ...] = (True, g, layer.r_k, layer.ln_w, layer.ln_b)
    else:
        post_args = (False, _EMPTY4, _EMPTY2, _EMPTY1, _EMPTY1)
    if pre is not None:
        assert post is not None
        mix, first, gate = pre
        pre_args: tuple[object, ...] = (True, mix, post[1].k_k, post[1].k_a, first, gate)
    else:
        pre_args = (False, False, _EMPTY1, _EMPTY1, _EMPTY4, _EMPTY4)
    kernels["seq"](S.numpy(), *ins, y_, *post_args, GROUP_NORM_EPS, *pre_args)
    return y


def time_mix_reference(S: torch.Tensor, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, k_k: torch.Tensor, k_a: torch.Tensor,
                       r_k: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
                       v_first: torch.Tensor | None = None, v_gate: torch.Tensor | None = None) -> torch.Tensor:
    """What ``wkv_layer`` computes, in PyTorch ops (fp32; inputs (B, T, H, N), S updated in place,
    one token at a time with ``rwkv7_batched._wkv_step``): the self-check's and the tests' reference."""
    from bot.inference.rwkv7_batched import _wkv_step

    B, T, H, N = r.shape
    kk = torch.nn.functional.normalize(k * k_k.view(H, N), dim=-1, p=2.0)
    k = k * (1 + (a - 1) * k_a.view(H, N))
    if v_first is not None and v_gate is not None:
        v = v + (v_first - v) * v_gate
    y = torch.stack([_wkv_step(S, *(t[:, s].reshape(B * H, N) for t in (r, log_w, k, v, kk, a))).view(B, H, N)
                     for s in range(T)], dim=1)
    normed = torch.nn.functional.group_norm(y.reshape(B * T, H * N), H, ln_w, ln_b,
                                            eps=GROUP_NORM_EPS).view(B, T, H, N)
    return (normed + (r * k * r_k).sum(-1, keepdim=True) * v) * g


@cache
def fused_works() -> bool:
    """numba is importable, compiles the kernel, and what the model runs here agrees with PyTorch's:
    the recurrence (prefill and step) and the whole fused time-mix (``wkv_layer``), past layer 0's
    residual included, on fp32 and on bf16 inputs. A broken or missing install falls back to the
    PyTorch path with one log line, never an error."""
    return kernel_agrees(log, "fused wkv kernel", _fused_works_check)


def _fused_works_check() -> bool:
    from bot.inference.rwkv7_batched import _wkv_step  # the reference formulation

    g = torch.Generator().manual_seed(0)
    X, N, T = 3, 64, 5
    ins = [torch.randn(1, T, X, N, generator=g) for _ in range(3)]
    kk = torch.nn.functional.normalize(torch.randn(1, T, X, N, generator=g), dim=-1)
    log_w = -0.6 * torch.rand(1, T, X, N, generator=g)
    a = torch.rand(1, T, X, N, generator=g)
    r, k, v = ins
    S0 = torch.randn(X, N, N, generator=g) * 0.1
    ref_S, seq_S, step_S, layer_S, layer_ref_S = (S0.clone() for _ in range(5))
    want = torch.stack([_wkv_step(ref_S, *(t[0, s] for t in (r, log_w, k, v, kk, a))) for s in range(T)])
    got_seq = wkv_seq(seq_S, r, log_w, k, v, kk, a)[0]
    got_step = torch.stack([wkv_step(step_S, *(t[0, s] for t in (r, log_w, k, v, kk, a))) for s in range(T)])

    def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
        return float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())

    gate, first, v_gate = (torch.randn(1, T, X, N, generator=g) for _ in range(3))
    k_k, k_a = 1 + 0.2 * torch.randn(X * N, generator=g), torch.rand(X * N, generator=g)
    r_k, ln_w, ln_b = (torch.randn(X, N, generator=g), 1 + 0.2 * torch.randn(X * N, generator=g),
                       0.2 * torch.randn(X * N, generator=g))
    v_gate = torch.sigmoid(v_gate)
    got_layer = wkv_layer(layer_S, r, log_w, k, v, a, gate, LayerConstants.of(k_k, k_a, r_k, ln_w, ln_b),
                          first, v_gate)
    want_layer = time_mix_reference(layer_ref_S, r, log_w, k, v, a, gate, k_k, k_a, r_k, ln_w, ln_b,
                                    first, v_gate)
    # A bf16 model's layer: the inputs read as bf16 bits, the output rounded to bf16.
    hr, hk, hv, ha, hg, hf, hgate = (t.bfloat16() for t in (r, k, v, a, gate, first, v_gate))
    bits_S, bits_ref_S = S0.clone(), S0.clone()
    got_bits = wkv_layer(bits_S, hr, log_w, hk, hv, ha, hg, LayerConstants.of(k_k, k_a, r_k, ln_w, ln_b),
                         hf, hgate).float()
    want_bits = time_mix_reference(bits_ref_S, hr.float(), log_w, hk.float(), hv.float(), ha.float(),
                                   hg.float(), k_k, k_a, r_k, ln_w, ln_b, hf.float(), hgate.float())
    bits_ok = bool(((got_bits - want_bits).abs() <= want_bits.abs() * 2.0 ** -8
                    + 1e-4 * float(want_bits.abs().max())).all())
    ok = close(got_seq, want) and close(got_step, want) and close(got_layer, want_layer) and bits_ok
    ok = ok and close(seq_S, ref_S) and close(step_S, ref_S) and close(layer_S, layer_ref_S)
    ok = ok and close(bits_S, bits_ref_S)
    return ok
