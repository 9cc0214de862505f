"""The numba kernel behind ``bot.inference.wkv_fused`` (imported only when it is used: numba takes a
second or so to import). Per head x of the batch (``prange``: spread over numba's threads), token
by token, each row i of the state ``S[x]`` (value dim i, key dim j) is read once for its two dot
products and written once with the decay and the rank-2 update; see ``rwkv7_batched._wkv_step`` for
the algebra. A decode step is the case T = 1. The decay comes in as ``w`` (the caller's vectorised
``exp``): numba's scalar ``exp`` per element cost 20-30% of the kernel (at 16 and 64 rows and for a
256-token prefill, measured on the Zen 5). With ``post``, each head's output leaves the kernel as the
model uses it next: group-normed (``ln_x``), plus the bonus ``(r·(k⊙r_k))·v``, times the gate ``g``
(eight PyTorch ops a layer otherwise, 0.3-2 ms a step at 1-64 rows). With ``pre``, ``k`` and ``v``
are the raw projections and the kernel derives ``kk``, the in-context key and the value residual
itself (eleven more ops a layer)."""

from typing import Any

import numba
import numpy as np
from numba import njit, prange

from bot.inference.numba_setup import FASTMATH

__all__ = ["numba", "seq"]


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True)
def seq(S: Any, r: Any, w_: Any, k: Any, v: Any, kk: Any, a: Any, y: Any, post: bool, g: Any, r_k: Any,
        ln_w: Any, ln_b: Any, eps: float, pre: bool, mix: bool, k_k: Any, k_a: Any, v_first: Any,
        v_gate: Any) -> None:
    B, T, H, N = r.shape
    for x in prange(B * H):
        b = x // H
        h = x % H
        kka = np.empty(N, np.float32)
        wr = np.empty(N, np.float32)
        out = np.empty(N, np.float32)
        keys = np.empty(N, np.float32)  # k as the recurrence uses it
        unit = np.empty(N, np.float32)  # kk
        vals = np.empty(N, np.float32)  # v as the recurrence uses it
        for t in range(T):
            if pre:
                # From the raw projections: kk = normalize(k⊙k_k), k ← k⊙(1 + (a-1)⊙k_a) and, past
                # layer 0, v ← v + (v_first - v)⊙gate (the gate's sigmoid comes in computed).
                norm = np.float32(0.0)
                for j in range(N):
                    c = h * N + j
                    kj = k[b, t, h, j]
                    unit[j] = kj * k_k[c]
                    norm += unit[j] * unit[j]
                    keys[j] = kj * (np.float32(1.0) + (a[b, t, h, j] - np.float32(1.0)) * k_a[c])
                    vj = v[b, t, h, j]
                    vals[j] = vj + (v_first[b, t, h, j] - vj) * v_gate[b, t, h, j] if mix else vj
                inv = np.float32(1.0) / max(np.sqrt(norm), np.float32(1e-12))
                for j in range(N):
                    unit[j] *= inv
            else:
                for j in range(N):
                    keys[j] = k[b, t, h, j]
                    unit[j] = kk[b, t, h, j]
                    vals[j] = v[b, t, h, j]
            k_r = np.float32(0.0)
            kka_r = np.float32(0.0)
            bonus = np.float32(0.0)
            w = w_[b, t, h]
            for j in range(N):
                kka[j] = unit[j] * a[b, t, h, j]
                wr[j] = w[j] * r[b, t, h, j]
                k_r += keys[j] * r[b, t, h, j]
                kka_r += kka[j] * r[b, t, h, j]
            if post:
                for j in range(N):
                    bonus += keys[j] * r[b, t, h, j] * r_k[h, j]
            mean = np.float32(0.0)
            for i in range(N):
                sa = np.float32(0.0)
                s_wr = np.float32(0.0)
                for j in range(N):
                    s = S[x, i, j]
                    sa -= s * unit[j]
                    s_wr += s * wr[j]
                vi = vals[i]
                for j in range(N):
                    S[x, i, j] = S[x, i, j] * w[j] + sa * kka[j] + vi * keys[j]
                out[i] = s_wr + sa * kka_r + vi * k_r
                mean += out[i]
            if not post:
                for i in range(N):
                    y[b, t, h, i] = out[i]
                continue
            # The head's group norm, the current token's own value ("bonus") and the output gate.
            mean /= N
            var = np.float32(0.0)
            for i in range(N):
                d = out[i] - mean
                var += d * d
            rstd = np.float32(1.0) / np.sqrt(var / N + np.float32(eps))
            for i in range(N):
                c = h * N + i
                normed = (out[i] - mean) * rstd * ln_w[c] + ln_b[c]
                y[b, t, h, i] = (normed + bonus * vals[i]) * g[b, t, h, i]
