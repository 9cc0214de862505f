"""The numba kernel behind ``bot.inference.nucleus`` (imported only when it is used): one row of
probabilities per ``prange`` iteration, from the whole vocabulary to the drawn token.

Per row: the maximum of each of ``chunk`` strided parts' columns (one pass), a histogram of those
maxima by their float32 bits (bits >> 20 are ordered like the values: 2,048 buckets, each ~9% wide),
and a threshold ``t`` at the bucket where at least ``want`` columns lie above it. Every probability
≥ ``t`` sits in a column whose maximum is ≥ ``t``, so gathering those columns' members ≥ ``t`` gives
*exactly* the set {p ≥ t}: the vocabulary's top list, ties included. Sorted, it decides the row when
the top-p sum is reached inside it (or top-k is); otherwise ``want`` grows fourfold and the scan goes
on down the histogram, to the whole row at worst.

Only the head of that list is sorted: a second, finer histogram of the gathered values (with their
sums) finds the bucket where the top-p sum is reached (or top-k is), and the values from one bucket
below it up form the sorted list's first entries, in the same order as a sort of them all. Where
rounding leaves the cut outside that head, everything gathered is sorted. A random-weight model's
~400-token nucleus at top-p 0.3 gathers ~1,000 values; sorting the ~450 of the head, as packed
integer keys rather than by ``argsort``, took 64 rows of that model's bf16 logits from 2.33 to 1.80
ms (Zen 5, AVX-512; numba's AVX2 code for a Zen 3 on the same host 2.43 to 1.75). A head
of thousands (a flat row, or top-p 1, where the whole vocabulary is kept and walked) is sorted by
radix instead, gathered again from the row in id order so that ties come out in the same order."""

from typing import Any

import numpy as np
from numba import njit, prange

from bot.inference import numba_setup

BUCKET_SHIFT = 20
"""float32 bits >> 20: the sign, the 8 exponent bits and 3 mantissa bits."""
BUCKETS = 1 << (32 - BUCKET_SHIFT - 1)
FINE_SHIFT = 15
"""float32 bits >> 15 for the head's histogram: 8 mantissa bits, buckets 0.4% wide."""
FINE_BUCKETS = 8192
"""At most this many fine buckets between the gathered values' extremes, else all are sorted."""
SORT_ALL_BELOW = 64
"""Gathered values below this count are sorted without looking for the head."""
SUM_MARGIN = 1.001
"""The head's histogram sums in another order than the sorted sum: aim a little past top-p."""
RADIX_MIN = 2048
"""Heads of at least this many values are sorted by radix: at 65,536 (top-p 1) a comparison sort of
int64 keys took ~4 ms a row, most of a one-row decode step."""
RADIX_BITS = 11
"""Three stable passes over 11-bit digits cover the 31 bits of a non-negative float32."""
UNRESOLVED = -1
__all__ = ["UNRESOLVED", "numba_setup", "rows"]


@njit(nogil=True, cache=True)
def _pick(vals: Any, top_p: Any, top_k: int, inv_t: Any, draw: float, complete: bool) -> tuple[int, int]:
    """(index into ``vals``, nucleus size), or (UNRESOLVED, 0) where the cut lies past ``vals``.
    ``vals``: the row's exact top list, sorted, descending. The package's rule: the cut is the first
    index where the running sum reaches ``top_p``; every token at least as probable stays (ties)."""
    n = vals.shape[0]
    total = 0.0  # float64 sums here and in PyTorch's path: in float32 the order of a long sum
    cut = n  # (sequential here, blocked in torch.cumsum) moved draws over 65,536 tokens by a token
    for i in range(n if top_p < 1 else 0):  # top-p 1 cuts nothing (not a tail that rounding reaches)
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
    running = np.empty(keep, np.float64)
    acc = 0.0
    for i in range(keep):
        acc += vals[i] / vals[0] if inv_t == 1 else (vals[i] / vals[0]) ** inv_t  # (x ** 1 is x)
        running[i] = acc
    target = draw * acc
    for i in range(keep):
        if running[i] > target:
            return i, keep
    return keep - 1, keep


@njit(nogil=True, cache=True)
def _sorted(vals: Any, ids: Any, n: int) -> tuple[Any, Any]:
    """``vals[:n]`` sorted descending (ties by ascending id) and their ids: one sort of int64 keys
    (the negated value bits, which order like the values for p >= 0, then the id)."""
    bits = vals[:n].view(np.int32)
    keys = np.empty(n, np.int64)
    for i in range(n):
        keys[i] = (np.int64(-bits[i]) << 32) + ids[i]
    keys.sort()
    top = np.empty(n, np.float32)
    top_bits = top.view(np.int32)
    top_ids = np.empty(n, np.int64)
    for i in range(n):
        top_bits[i] = np.int32(-(keys[i] >> 32))
        top_ids[i] = keys[i] & 0xFFFFFFFF
    return top, top_ids


@njit(nogil=True, cache=True)
def _radix_sorted(p: Any, threshold: Any, count: int) -> tuple[Any, Any]:
    """The row's ``count`` values >= ``threshold``, sorted descending, ties by ascending id: the
    order ``_sorted`` gives. Gathered in id order, then stable passes over the digits of the
    inverted bits (ascending there is descending here)."""
    keys = np.empty(count, np.uint32)
    ids = np.empty(count, np.int64)
    bits = p.view(np.uint32)
    n = 0
    for i in range(p.shape[0]):
        if p[i] >= threshold and n < count:
            keys[n] = np.uint32(0x7FFFFFFF) - bits[i]
            ids[n] = i
            n += 1
    spare_keys = np.empty(n, np.uint32)
    spare_ids = np.empty(n, np.int64)
    mask = (1 << RADIX_BITS) - 1
    for shift in range(0, 31, RADIX_BITS):
        starts = np.zeros(mask + 2, np.int64)
        for j in range(n):
            starts[((keys[j] >> shift) & mask) + 1] += 1
        for d in range(mask + 1):
            starts[d + 1] += starts[d]
        for j in range(n):
            d = (keys[j] >> shift) & mask
            spare_keys[starts[d]] = keys[j]
            spare_ids[starts[d]] = ids[j]
            starts[d] += 1
        keys, spare_keys = spare_keys, keys
        ids, spare_ids = spare_ids, ids
    top = np.empty(n, np.float32)
    top_bits = top.view(np.uint32)
    for j in range(n):
        top_bits[j] = np.uint32(0x7FFFFFFF) - keys[j]
    return top, ids


@njit(nogil=True, cache=True)
def _sorted_top(p: Any, vals: Any, ids: Any, n: int, threshold: Any) -> tuple[Any, Any]:
    """``vals[:n]`` (the row's values >= ``threshold``) sorted: by radix when they are many."""
    if n >= RADIX_MIN:
        return _radix_sorted(p, threshold, n)
    return _sorted(vals, ids, n)


@njit(nogil=True, cache=True)
def _head(vals: Any, ids: Any, n: int, top_p: Any, top_k: int) -> tuple[int, Any, bool]:
    """Move to the front of ``vals[:n]`` (and ``ids``) every value from one fine bucket below where
    the running sum from the top reaches ``top_p`` (or the count ``top_k``); returns how many, the
    lowest value kept, and whether all of them clearly fall short of the cut (nothing to sort yet).
    ``n`` where the values are few or spread too widely to bucket."""
    if n < SORT_ALL_BELOW:
        return n, np.float32(0.0), False
    bits = vals[:n].view(np.int32)
    hi = 0
    lo = np.int32(0x7FFFFFFF)
    for i in range(n):
        hi = max(hi, bits[i] >> FINE_SHIFT)
        lo = min(lo, bits[i] >> FINE_SHIFT)
    if hi - lo >= FINE_BUCKETS:
        return n, np.float32(0.0), False
    sums = np.zeros(hi - lo + 1, np.float64)
    counts = np.zeros(hi - lo + 1, np.int64)
    for i in range(n):
        b = (bits[i] >> FINE_SHIFT) - lo
        sums[b] += vals[i]
        counts[b] += 1
    total = 0.0
    seen = 0
    floor = -1
    for b in range(hi - lo, -1, -1):
        total += sums[b]
        seen += counts[b]
        if total >= top_p * SUM_MARGIN or 0 < top_k <= seen:
            floor = b - 1
            break
    if floor <= 0:
        return n, np.float32(0.0), floor < 0 and total * SUM_MARGIN < top_p
    limit = (floor + lo) << FINE_SHIFT
    kept = 0
    for i in range(n):
        if bits[i] >= limit:
            vals[kept], vals[i] = vals[i], vals[kept]
            ids[kept], ids[i] = ids[i], ids[kept]
            kept += 1
    return kept, np.array([limit], np.int32).view(np.float32)[0], False


@njit(nogil=True, cache=True)
def _row(p: Any, top_p: Any, top_k: int, inv_t: Any, draw: float, want: int, chunk: int) -> tuple[int, int]:
    V = p.shape[0]
    parts = (V + chunk - 1) // chunk
    if top_p >= 1 and top_k <= 0:
        want = parts  # every token is kept: gather them all at once
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
        head, lowest, short = _head(vals, ids, n, top_p, top_k)  # moves the head's values to the front
        if short and not complete:  # the cut lies further down: widen without sorting
            want *= 4
            continue
        if head < n:
            top, top_ids = _sorted_top(p, vals, ids, head, lowest)
            index, keep = _pick(top, top_p, top_k, inv_t, draw, False)
            if index != UNRESOLVED:
                return top_ids[index], keep
        top, top_ids = _sorted_top(p, vals, ids, n, t)  # (or rounding put the cut past the head)
        index, keep = _pick(top, top_p, top_k, inv_t, draw, complete)
        if index != UNRESOLVED:
            return top_ids[index], keep
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
