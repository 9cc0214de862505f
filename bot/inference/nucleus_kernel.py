"""The numba kernel behind ``bot.inference.nucleus`` (imported only when it is used): one row of
probabilities per ``prange`` iteration, from the whole vocabulary to the drawn token.

Per row: the maximum of each of ``chunk`` strided parts' columns (one pass), a histogram of those
maxima by their float32 bits (bits >> 20 are ordered like the values: 2,048 buckets, each ~9% wide),
and a threshold ``t`` at the bucket where at least ``want`` columns lie above it. Every probability
≥ ``t`` sits in a column whose maximum is ≥ ``t``, so gathering those columns' members ≥ ``t`` gives
*exactly* the set {p ≥ t}: the vocabulary's top list, ties included. Sorted, it decides the row when
the top-p sum is reached inside it (or top-k is); otherwise ``want`` grows fourfold and the scan goes
on down the histogram, to the whole row at worst."""

from typing import Any

import numpy as np
from numba import njit, prange

from bot.inference import numba_setup

BUCKET_SHIFT = 20
"""float32 bits >> 20: the sign, the 8 exponent bits and 3 mantissa bits."""
BUCKETS = 1 << (32 - BUCKET_SHIFT - 1)
UNRESOLVED = -1
__all__ = ["UNRESOLVED", "numba_setup", "rows"]


@njit(nogil=True, cache=True)
def _pick(vals: Any, top_p: Any, top_k: int, inv_t: Any, draw: float, complete: bool) -> tuple[int, int]:
    """(index into ``vals``, nucleus size), or (UNRESOLVED, 0) where the cut lies past ``vals``.
    ``vals``: the row's exact top list, sorted, descending. The package's rule: the cut is the first
    index where the running sum reaches ``top_p``; every token at least as probable stays (ties)."""
    n = vals.shape[0]
    total = np.float32(0.0)
    cut = n
    for i in range(n):
        total += vals[i]
        if total >= top_p:
            cut = i
            break
    if cut < n:
        keep = cut + 1
        while keep < n and vals[keep] >= vals[cut]:
            keep += 1
        if 0 < top_k < keep:
            keep = top_k
    elif 0 < top_k <= n:
        keep = top_k  # the nucleus reaches past top_k: exactly top_k stay
    elif complete:
        keep = n  # rounding kept the sum below top_p: everything stays
    else:
        return UNRESOLVED, 0
    # Weights relative to the top probability, so a low temperature cannot underflow all of them.
    running = np.empty(keep, np.float32)
    acc = np.float32(0.0)
    for i in range(keep):
        acc += (vals[i] / vals[0]) ** inv_t
        running[i] = acc
    target = np.float32(draw) * acc
    for i in range(keep):
        if running[i] > target:
            return i, keep
    return keep - 1, keep


@njit(nogil=True, cache=True)
def _row(p: Any, top_p: Any, top_k: int, inv_t: Any, draw: float, want: int, chunk: int) -> tuple[int, int]:
    V = p.shape[0]
    parts = (V + chunk - 1) // chunk
    column_max = np.zeros(parts, np.float32)
    for m in range(chunk):
        base = m * parts
        for j in range(min(parts, V - base)):
            column_max[j] = max(column_max[j], p[base + j])
    counts = np.zeros(BUCKETS, np.int64)
    bits = column_max.view(np.int32)
    for j in range(parts):
        counts[max(0, bits[j] >> BUCKET_SHIFT)] += 1
    bucket = BUCKETS
    seen = 0
    while True:
        while bucket > 0 and seen < want:
            bucket -= 1
            seen += counts[bucket]
        complete = bucket == 0
        t = np.array([bucket << BUCKET_SHIFT], np.int32).view(np.float32)[0]  # the bucket's lower bound
        vals = np.empty(min(V, seen * chunk), np.float32)
        ids = np.empty(vals.shape[0], np.int64)
        n = 0
        for j in range(parts):
            if column_max[j] >= t:
                for m in range(chunk):
                    i = m * parts + j
                    if i < V and p[i] >= t and n < vals.shape[0]:
                        vals[n] = p[i]
                        ids[n] = i
                        n += 1
        if n == 0:
            return UNRESOLVED, 0  # nothing is a probability (NaN everywhere): the caller decides
        order = np.argsort(-vals[:n])
        index, keep = _pick(vals[:n][order], top_p, top_k, inv_t, draw, complete)
        if index != UNRESOLVED:
            return ids[order[index]], keep
        if complete:
            return UNRESOLVED, 0
        want *= 4


@njit(parallel=True, nogil=True, cache=True)
def rows(probs: Any, top_p: Any, top_k: Any, inv_t: Any, draws: Any, want: Any, chunk: int,
         tokens: Any, sizes: Any) -> None:
    """Per row b: ``tokens[b]`` drawn with ``draws[b]`` and ``sizes[b]`` the nucleus it came from
    (UNRESOLVED and 0 where the row holds no probability at all)."""
    for b in prange(probs.shape[0]):
        tokens[b], sizes[b] = _row(probs[b], top_p[b], top_k[b], inv_t[b], draws[b], want[b], chunk)
