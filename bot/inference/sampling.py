"""Token sampling for a batch of rows, each with its own parameters and random generator.

Semantics follow the ``rwkv`` package's pipeline (``PIPELINE.sample_logits``): presence/frequency
penalties on tokens already generated (decaying each step), then on the softmax the top-p cut (every
token at least as probable as the one where the sorted cumulative sum reaches ``top_p``, ties
included; ``top_p`` 1 keeps every token, where the package's float32 sum may stop short of 1 or
cut a tail by rounding), top-k, and temperature; then one draw, walking the kept tokens from the
most probable (equal probabilities in ascending id order, on every path), its sums in float64.

Why it is more than a softmax and a sort: at 64 rows of a 65,536-token vocabulary a full sort costs
~140 ms and even ``topk(512)`` ~8 ms on our 2-core CPU, as much as a sixth of a decode step. So the
cut is found among a few candidates per row, all rows at once:

1. the vocabulary is split into ``CHUNK`` strided parts; the ``k`` columns with the largest maximum
   over the parts are kept (``k × CHUNK`` probabilities), and their ``k`` largest are sorted (the
   column maxima themselves are narrowed the same way, level by level, see ``_candidates``);
2. every probability *above* the smallest kept column maximum (``th``) is guaranteed to be among
   them, so the sorted candidates are exact down to ``th``. A row whose cut lies there is done;
3. a row whose cut lies further (a flat distribution) goes to a wider search, then to a full sort.

``k`` starts at twice the largest cut seen in the previous step (a real model's nucleus is often a
few tokens), so a peaked batch pays for 64 candidates, a flat one for 512. The draw itself uses one
number from the row's own ``random.Random``, so a reply is the same alone or batched.

On the CPU the search and the draw run instead in one compiled pass per row
(``bot.inference.nucleus``, same rules and same numbers: 1.8 ms at 64 rows against 7-8 ms here on
the Zen 5). What follows is the path for a CUDA device, and for a CPU where numba does not work.

Everything runs on the device the logits are on (a CUDA decode step's logits stay on the GPU): only
B-sized results (the chosen ids, which rows were resolved) come back to the CPU, never a row of the
vocabulary (64 × 65,536 fp32 is 16 MB a step).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from bot.inference.nucleus import draw_rows, nucleus_works

END_OF_TEXT = 0
CHUNK = 8
"""Strided parts of the vocabulary for the candidate search (measured best of 4, 8, 16 at 64 rows)."""
MIN_CANDIDATES = 64
CANDIDATES = 512
"""Candidates per row at most in the first search; a random-weight model's top-p 0.3 nucleus is ~480."""
WIDE_CANDIDATES = 4096
"""The second search, for the rare row whose cut lies beyond ``CANDIDATES``; after it, a full sort."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.3
    top_k: int = 0
    presence_penalty: float = 0.5
    frequency_penalty: float = 0.5
    penalty_decay: float = 0.996
    max_tokens: int = 400


class RowSampler:
    """One generation's sampling state: its parameters, penalty counts and random generator.

    Penalty counts decay every step; rather than multiply every count each time, a count is stored
    scaled by ``decay ** -step`` when it is added, and the scale is applied once per sampling call.
    """

    def __init__(self, params: SamplingParams, seed: int, never: torch.Tensor | None = None) -> None:
        self.params = params
        #: ids never to sample (the tokenizer cannot decode them); shared, read-only
        self.never = never
        self.banned: set[int] = {END_OF_TEXT}
        self.rng = random.Random(seed)
        #: the nucleus size of the last draw (None before the first), to size the next search
        self.last_nucleus: int | None = None
        self._steps = 0  # tokens recorded since the scale was last reset
        self._slot: dict[int, int] = {}
        self._ids = np.zeros(16, dtype=np.int64)
        self._scaled = np.zeros(16, dtype=np.float64)

    def record(self, token: int, text: str) -> None:
        """Count a generated token. Like the package: spaces and digits add no weight (numbers and
        layout stay free) but are still "present"."""
        decay = self.params.penalty_decay
        if decay <= 0:  # nothing carries over from earlier steps
            self._scaled[:len(self._slot)] = 0.0
        else:
            self._steps += 1
            if decay ** -self._steps > 1e100:  # re-base before float64 overflows
                self._scaled[:len(self._slot)] *= decay ** (self._steps - 1)
                self._steps = 1
        weight = 0.0 if text and text in " \t0123456789" else 1.0
        slot = self._slot.get(token)
        if slot is None:
            slot = self._slot[token] = len(self._slot)
            if slot == len(self._ids):
                self._ids = np.concatenate((self._ids, np.zeros_like(self._ids)))
                self._scaled = np.concatenate((self._scaled, np.zeros_like(self._scaled)))
            self._ids[slot] = token
            self._scaled[slot] = 0.0
        self._scaled[slot] += weight / self._scale()

    def count(self, token: int) -> float:
        """The token's decayed occurrence count (what the frequency penalty multiplies)."""
        slot = self._slot.get(token)
        return 0.0 if slot is None else float(self._scaled[slot] * self._scale())

    def _scale(self) -> float:
        decay = self.params.penalty_decay
        return decay ** self._steps if decay > 0 else 1.0

    def _penalties(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, amounts to subtract) for this row."""
        n = len(self._slot)
        params = self.params
        amounts = params.presence_penalty + self._scaled[:n] * (self._scale() * params.frequency_penalty)
        return self._ids[:n], amounts


def _penalise_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> None:
    """Every row's bans and penalties in three indexed writes, not three per row."""
    device = logits.device
    never = samplers[0].never
    if never is not None and never.numel() and all(s.never is never for s in samplers):
        logits[:, never.to(device)] = float("-inf")
    else:
        for row, sampler in zip(logits, samplers, strict=True):
            if sampler.never is not None and sampler.never.numel():
                row[sampler.never.to(device)] = float("-inf")
    banned = [(i, token) for i, s in enumerate(samplers) for token in s.banned]
    if banned:
        rows, ids = zip(*banned, strict=True)
        logits[torch.tensor(rows, device=device), torch.tensor(ids, device=device)] = float("-inf")
    parts = [s._penalties() for s in samplers]
    counts = [len(ids) for ids, _ in parts]
    if sum(counts):
        rows_index = torch.from_numpy(np.repeat(np.arange(len(samplers)), counts)).to(device)
        ids_index = torch.from_numpy(np.concatenate([ids for ids, _ in parts])).to(device)
        amounts = torch.from_numpy(np.concatenate([a for _, a in parts])).to(device, logits.dtype)
        logits.index_put_((rows_index, ids_index), -amounts, accumulate=True)


def _candidates(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's ``k`` most probable tokens, sorted: (values, ids, exact), where the first ``exact``
    of a row are certainly its true top list (see the module docstring). k ≥ width: all, exact.

    The narrowing runs over levels of column maxima (each level ``CHUNK`` times shorter, while it
    keeps at least 2k columns): the top k columns of the coarsest level, then of the ``k × CHUNK``
    columns under them one level finer, down to the probabilities. A column left out at any level
    has its maximum at or below the smallest one kept (``th``), so everything above ``th`` is found.
    """
    rows, width = probs.shape
    if k >= width:
        values, ids = torch.sort(probs, dim=-1, descending=True)
        return values, ids, torch.full((rows,), width, device=probs.device)
    levels = [probs]  # levels[i + 1][:, j] = max of levels[i][:, j + m * parts], m < CHUNK
    while levels[-1].shape[1] % CHUNK == 0 and levels[-1].shape[1] // CHUNK >= 2 * k:
        levels.append(levels[-1].view(rows, CHUNK, -1).amax(dim=1))
    if len(levels) == 1:
        values, ids = torch.topk(probs, k, dim=-1)
        return values, ids, (values > values[:, -1:]).sum(dim=-1)
    top = torch.topk(levels[-1], k, dim=-1, sorted=False)
    ids = top.indices
    for finer in reversed(levels[:-1]):
        parts = finer.shape[1] // CHUNK
        # The smallest maximum kept at the level being left; at the finest level it bounds the result.
        th = top.values.amin(dim=-1, keepdim=True)
        columns = (ids.unsqueeze(-1) + torch.arange(CHUNK, device=ids.device) * parts).view(rows, -1)
        top = torch.topk(finer.gather(1, columns), k, dim=-1, sorted=finer is probs)
        ids = columns.gather(1, top.indices)
    return top.values, ids, (top.values > th).sum(dim=-1)


def _ties_by_id(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted candidates with equal values in ascending id order: ``topk`` and ``sort`` leave ties
    in no particular order, and the draw walks the list, so without this two paths (or two
    versions of torch) could draw different tokens of the same probability for the same number."""
    # One sort of int64 keys: a probability's float32 bits order like it (p >= 0), then the id reversed.
    keys = (values.view(torch.int32).long() << 32) | (0xFFFFFFFF - ids)
    order = keys.sort(dim=-1, descending=True).indices
    return values.gather(1, order), ids.gather(1, order)


def _draw(values: torch.Tensor, ids: torch.Tensor, exact: torch.Tensor, complete: bool,
          samplers: list[RowSampler], draws: list[float]) -> list[int | None]:
    """One token per row from its sorted candidates (``complete``: the whole vocabulary), or None
    where the cut is not among them. ``draws`` are the rows' uniform numbers in [0, 1)."""
    k = values.shape[1]
    device = values.device
    # float32 parameters as the kernel gets them, float64 sums as the kernel makes them (see there)
    top_p = torch.tensor([s.params.top_p for s in samplers], dtype=values.dtype, device=device).unsqueeze(1)
    top_p = top_p.double()
    cumulative = values.double().cumsum(dim=-1)
    cut = torch.searchsorted(cumulative, top_p).squeeze(1)  # first index where the sum reaches top_p
    cut = cut.masked_fill(top_p.squeeze(1) >= 1, k)  # top-p 1 cuts nothing, whatever the rounding
    cutoff = values.gather(1, cut.clamp(max=k - 1).unsqueeze(1))
    keep = (values >= cutoff).sum(dim=-1)  # ties with the cut-off token stay in
    # A row is resolved when its cut lies in its exact prefix and no tie could reach past the list.
    resolved = (cut < exact) & ((keep < k) | complete)
    if complete:
        resolved |= cut >= k  # rounding kept the sum below top_p: keep everything, as before
    top_k = torch.tensor([s.params.top_k for s in samplers], device=device)
    limited = top_k > 0
    keep = torch.where(limited, torch.minimum(keep, top_k), keep)
    resolved |= limited & (top_k <= exact)  # the nucleus reaches past top_k: exactly top_k stay
    keep = keep.clamp(min=1, max=k)
    # The walk below goes in the canonical order of ties, needed only as far as the last kept
    # token's ties reach (the cut and the counts above depend on the values alone).
    ties_end = (values >= values.gather(1, (keep - 1).unsqueeze(1))).sum(dim=-1)  # 0 in a NaN row
    span = int(torch.maximum(ties_end, keep).max())
    values, ids = _ties_by_id(values[:, :span], ids[:, :span])
    k = span
    inverse_t = torch.tensor([1.0 / s.params.temperature for s in samplers], dtype=values.dtype, device=device)
    # Relative to the row's top probability, so a low temperature cannot underflow every weight.
    weights = (values / values[:, :1]).pow(inverse_t.unsqueeze(1))
    weights = weights.masked_fill(torch.arange(k, device=device) >= keep.unsqueeze(1), 0.0)
    running = weights.double().cumsum(dim=-1)
    total = running.gather(1, (keep - 1).unsqueeze(1))
    target = torch.tensor(draws, dtype=torch.float64, device=device).unsqueeze(1) * total
    index = torch.searchsorted(running, target, right=True).squeeze(1)
    index = torch.minimum(index, keep - 1)
    chosen = ids.gather(1, index.unsqueeze(1)).squeeze(1).tolist()
    ok = resolved.tolist()
    kept = keep.tolist()
    for sampler, size, good in zip(samplers, kept, ok, strict=True):
        if good:
            sampler.last_nucleus = size
    return [token if good else None for token, good in zip(chosen, ok, strict=True)]


def _first_k(samplers: list[RowSampler]) -> int:
    seen = [s.last_nucleus for s in samplers]
    if any(n is None for n in seen):
        return CANDIDATES
    wanted = 2 * max(n for n in seen if n is not None)
    return min(CANDIDATES, max(MIN_CANDIDATES, 1 << (wanted - 1).bit_length()))


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler], *, cpu_kernel: bool | None = None
                ) -> list[int]:
    """One token per row of ``logits`` (B, V), on whatever device they are; modifies ``logits``.

    ``cpu_kernel``: draw CPU rows with the compiled kernel (``bot.inference.nucleus``); None: where
    it works here (checked once), False: PyTorch's path (the one a CUDA device runs)."""
    _penalise_rows(logits, samplers)
    probs = torch.softmax(logits.float(), dim=-1)
    width = probs.shape[1]
    tokens: list[int | None] = [None] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.params.temperature == 0 or s.params.top_p == 0]
    if greedy:
        best = probs[greedy].argmax(dim=-1).tolist()
        for i, token in zip(greedy, best, strict=True):
            tokens[i] = token
    draws = {i: s.rng.random() for i, s in enumerate(samplers) if tokens[i] is None}
    pending = list(draws)
    if pending and probs.device.type == "cpu" and (nucleus_works() if cpu_kernel is None else cpu_kernel):
        rows = probs if len(pending) == len(samplers) else probs[pending]
        picked = draw_rows(rows, [samplers[i] for i in pending], [draws[i] for i in pending])
        for i, token in zip(pending, picked, strict=True):
            tokens[i] = token
        pending = [i for i in pending if tokens[i] is None]  # rows without a probability: below
    k = _first_k([samplers[i] for i in pending]) if pending else 0
    while pending:
        rows = probs if len(pending) == len(samplers) else probs[pending]
        values, ids, exact = _candidates(rows, min(k, width))
        picked = _draw(values, ids, exact, k >= width, [samplers[i] for i in pending],
                       [draws[i] for i in pending])
        for i, token in zip(pending, picked, strict=True):
            tokens[i] = token
        pending = [i for i in pending if tokens[i] is None]
        # Wider each round, up to the whole row (sorted in full).
        k = next((n for n in (CANDIDATES, WIDE_CANDIDATES) if n > k), width)
    picks = [t for t in tokens if t is not None]
    if len(picks) != len(tokens):  # the full sort resolves every row; anything else is a bug here
        raise RuntimeError("a row was left without a token")
    return picks
