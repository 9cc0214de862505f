"""The numba kernel behind ``bot.inference.wkv_fused`` (imported only when it is used: numba takes a
second or so to import). Per head x of the batch (``prange``: spread over numba's threads), token
by token, each row i of the state ``S[x]`` (value dim i, key dim j) is read once for its two dot
products and written once with the decay and the rank-2 update; see ``rwkv7_batched._wkv_step`` for
the algebra. A decode step is the case T = 1. Prefill (T > 1) takes the rows four at a time: the
state is in the L1 cache after the first token, the kernel is bound by its dot products' latency,
and four rows' eight sums in one pass ran 12 layers of a 16-row × 16-token prefill in 10.2-10.7 ms
against 12.9-14.3, and 256 tokens of one row in 7.3-9.3 against 11.1-12.7 (Zen 5, and with numba
generating AVX2 code for a Zen 3, the same), where a whole prefill spends a quarter of its time in
this kernel in bf16. The decay comes in as ``w`` (the caller's vectorised
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

from bot.inference.numba_bf16 import to_element, to_f32
from bot.inference.numba_setup import FASTMATH

__all__ = ["numba", "seq"]


@njit(parallel=True, fastmath=FASTMATH, nogil=True, cache=True)
def seq(S: Any, r: Any, w_: Any, k: Any, v: Any, kk: Any, a: Any, y: Any, post: bool, g: Any, r_k: Any,
        ln_w: Any, ln_b: Any, eps: float, pre: bool, mix: bool, k_k: Any, k_a: Any, v_first: Any,
        v_gate: Any) -> None:
    B, T, H, N = r.shape
    # A decode step (T = 1) reads each head's state from memory once and is bound by that: there
    # the one-row loop is faster (64 rows of the 0.1B shape: 5.4 against 6.8-7.0 ms a step, Zen 5).
    blocked = T > 1 and N % 4 == 0
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
                    kj = to_f32(k[b, t, h, j])
                    unit[j] = kj * k_k[c]
                    norm += unit[j] * unit[j]
                    keys[j] = kj * (np.float32(1.0) + (to_f32(a[b, t, h, j]) - np.float32(1.0)) * k_a[c])
                    vj = to_f32(v[b, t, h, j])
                    vals[j] = vj + (to_f32(v_first[b, t, h, j]) - vj) * to_f32(v_gate[b, t, h, j]) if mix else vj
                inv = np.float32(1.0) / max(np.sqrt(norm), np.float32(1e-12))
                for j in range(N):
                    unit[j] *= inv
            else:
                for j in range(N):
                    keys[j] = to_f32(k[b, t, h, j])
                    unit[j] = to_f32(kk[b, t, h, j])
                    vals[j] = to_f32(v[b, t, h, j])
            k_r = np.float32(0.0)
            kka_r = np.float32(0.0)
            bonus = np.float32(0.0)
            w = w_[b, t, h]
            for j in range(N):
                kka[j] = unit[j] * to_f32(a[b, t, h, j])
                wr[j] = w[j] * to_f32(r[b, t, h, j])
                k_r += keys[j] * to_f32(r[b, t, h, j])
                kka_r += kka[j] * to_f32(r[b, t, h, j])
            if post:
                for j in range(N):
                    bonus += keys[j] * to_f32(r[b, t, h, j]) * r_k[h, j]
            mean = np.float32(0.0)
            if blocked:
                # Four rows at a time: eight independent sums per pass over the keys instead of
                # two, so the adds overlap instead of waiting on each other (a head's state is in
                # the L1 cache here, and the sums' latency is what bounds the step).
                for i0 in range(0, N, 4):
                    sa0 = np.float32(0.0)
                    sa1 = np.float32(0.0)
                    sa2 = np.float32(0.0)
                    sa3 = np.float32(0.0)
                    sw0 = np.float32(0.0)
                    sw1 = np.float32(0.0)
                    sw2 = np.float32(0.0)
                    sw3 = np.float32(0.0)
                    for j in range(N):
                        u = unit[j]
                        c = wr[j]
                        e0 = S[x, i0, j]
                        e1 = S[x, i0 + 1, j]
                        e2 = S[x, i0 + 2, j]
                        e3 = S[x, i0 + 3, j]
                        sa0 -= e0 * u
                        sa1 -= e1 * u
                        sa2 -= e2 * u
                        sa3 -= e3 * u
                        sw0 += e0 * c
                        sw1 += e1 * c
                        sw2 += e2 * c
                        sw3 += e3 * c
                    v0, v1, v2, v3 = vals[i0], vals[i0 + 1], vals[i0 + 2], vals[i0 + 3]
                    for j in range(N):
                        wj = w[j]
                        aj = kka[j]
                        kj = keys[j]
                        S[x, i0, j] = S[x, i0, j] * wj + sa0 * aj + v0 * kj
                        S[x, i0 + 1, j] = S[x, i0 + 1, j] * wj + sa1 * aj + v1 * kj
                        S[x, i0 + 2, j] = S[x, i0 + 2, j] * wj + sa2 * aj + v2 * kj
                        S[x, i0 + 3, j] = S[x, i0 + 3, j] * wj + sa3 * aj + v3 * kj
                    out[i0] = sw0 + sa0 * kka_r + v0 * k_r
                    out[i0 + 1] = sw1 + sa1 * kka_r + v1 * k_r
                    out[i0 + 2] = sw2 + sa2 * kka_r + v2 * k_r
                    out[i0 + 3] = sw3 + sa3 * kka_r + v3 * k_r
                    mean += out[i0] + out[i0 + 1] + out[i0 + 2] + out[i0 + 3]
            else:
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
                    y[b, t, h, i] = to_element(out[i], y[0, 0, 0, 0])
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
                y[b, t, h, i] = to_element((normed + bonus * vals[i]) * to_f32(g[b, t, h, i]), y[0, 0, 0, 0])
