"""The numba kernel behind ``bot.inference.lora_fused`` (imported only when it is used): a bf16
layer's four low-rank (LoRA) chains for one to three rows in one call, where PyTorch makes eight
small matmul calls and eight elementwise ops. Each of those costs a fixed ~14-20 µs in bf16 on the
Zen 5 (oneDNN's call, whatever the weight's size), which was 17% of a one-row step; here a chain's
two products and its activation run in one pass over each weight.

Every intermediate is rounded to bf16 where PyTorch's bf16 ops round it (a matmul's output, an
activation's, a bf16 addition's), so ``a``, ``g`` and the value gate come out bit for bit as
PyTorch's, and the fp32 decay ``log_w`` within an ulp or so of its ``sigmoid``."""

import math
from typing import Any

import numpy as np
from numba import njit

from bot.inference.numba_bf16 import to_element, to_f32
from bot.inference.numba_setup import FASTMATH

LOG_W_SCALE = np.float32(-0.606531)  # rwkv7_batched.LOG_W_SCALE, the package's literal
__all__ = ["chains"]


@njit(nogil=True, fastmath=FASTMATH, inline="always")
def _dot(W: Any, row: int, x: Any) -> Any:
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += to_f32(W[row, i]) * to_f32(x[i])
    return acc


@njit(nogil=True, fastmath=FASTMATH, inline="always")
def _sigmoid(x: Any) -> Any:
    return np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-x)))


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def _down(W: Any, x: Any, like: Any, act: int) -> Any:
    """``W @ x`` rounded, then (act 1) tanh or (act 2) sigmoid rounded: a chain's first half."""
    h = np.empty(W.shape[0], x.dtype)
    for o in range(W.shape[0]):
        value = to_f32(to_element(_dot(W, o, x), like))
        if act == 1:
            value = np.float32(math.tanh(value))
        elif act == 2:
            value = _sigmoid(value)
        h[o] = to_element(value, like)
    return h


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def _gated(W: Any, h: Any, bias: Any, like: Any, out: Any) -> None:
    """``sigmoid(bias + W @ h)``, each step rounded as PyTorch's bf16 ops round it."""
    for c in range(W.shape[0]):
        s = to_f32(to_element(to_f32(bias[c]) + to_f32(to_element(_dot(W, c, h), like)), like))
        out[c] = to_element(_sigmoid(s), like)


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def chains(mixed: Any, w1: Any, w2: Any, a1: Any, a2: Any, v1: Any, v2: Any, g1: Any, g2: Any,
           w0: Any, a0: Any, v0: Any, has_v: bool, log_w: Any, a: Any, v_gate: Any, g: Any) -> None:
    """Per row r of ``mixed`` (6, R, C), the token-shift mixes r, w, k, v, a, g (bf16 bits):
    ``log_w[r] = LOG_W_SCALE·sigmoid(w0 + w2 tanh(w1 x_w))`` (fp32), ``a[r] = sigmoid(a0 + a2 a1
    x_a)``, ``v_gate[r] = sigmoid(v0 + v2 v1 x_v)`` (where ``has_v``: past layer 0) and ``g[r] =
    g2 sigmoid(g1 x_g)`` (bf16 bits). Weights (out, in), as bf16 bits; ``w0`` fp32."""
    like = mixed[0, 0, 0]
    for r in range(mixed.shape[1]):
        h = _down(w1, mixed[1, r], like, 1)
        for c in range(w2.shape[0]):
            log_w[r, c] = LOG_W_SCALE * _sigmoid(w0[c] + to_f32(to_element(_dot(w2, c, h), like)))
        _gated(a2, _down(a1, mixed[4, r], like, 0), a0, like, a[r])
        if has_v:
            _gated(v2, _down(v1, mixed[3, r], like, 0), v0, like, v_gate[r])
        h = _down(g1, mixed[5, r], like, 2)
        for c in range(g2.shape[0]):
            g[r, c] = to_element(_dot(g2, c, h), like)
