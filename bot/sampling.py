"""Token sampling for a batch of rows, each with its own parameters and random generator.

Semantics follow the ``rwkv`` package's pipeline: presence/frequency penalties on tokens already
generated (decaying each step), top-p and top-k on the softmax, then temperature. A full sort of a
65,536-wide row costs ~4 ms on our CPU, so the top-p cut is found among the top candidates first and
only a row whose top 512 tokens do not reach ``top_p`` is sorted in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CANDIDATES = 512
WIDE_CANDIDATES = 8192
END_OF_TEXT = 0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 0.3
    top_k: int = 0
    presence_penalty: float = 0.5
    frequency_penalty: float = 0.5
    penalty_decay: float = 0.996
    max_tokens: int = 400


@dataclass
class RowSampler:
    """One generation's sampling state: its parameters, the penalty counts and its own RNG, so a
    reply is the same whether its thread is served alone or batched with others."""

    params: SamplingParams
    seed: int
    #: ids never to sample (the tokenizer cannot decode them); shared, read-only
    never: torch.Tensor | None = None
    occurrence: dict[int, float] = field(default_factory=dict)
    banned: set[int] = field(default_factory=lambda: {END_OF_TEXT})
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def record(self, token: int, text: str) -> None:
        decay = self.params.penalty_decay
        for key in self.occurrence:
            self.occurrence[key] *= decay
        # Like the package: spaces and digits are not penalised, so numbers and layout stay free.
        weight = 0.0 if text and text in " \t0123456789" else 1.0
        self.occurrence[token] = self.occurrence.get(token, 0.0) + weight


def _pick(values: torch.Tensor, ids: torch.Tensor, cumulative: torch.Tensor, sampler: RowSampler) -> int:
    """Sample among candidates sorted by probability (``values``), with their cumulative sum."""
    params = sampler.params
    keep = int(torch.searchsorted(cumulative, torch.tensor([params.top_p], dtype=cumulative.dtype))) + 1
    keep = max(1, min(keep, values.shape[0]))
    # The package keeps every token at least as probable as the cut-off one (ties included).
    keep = int((values >= values[keep - 1]).sum())
    if params.top_k > 0:
        keep = min(keep, params.top_k)
    chosen = values[:keep]
    if params.temperature != 1.0:
        chosen = chosen ** (1.0 / params.temperature)
    index = int(torch.multinomial(chosen / chosen.sum(), 1, generator=sampler.generator))
    return int(ids[index])


def _penalise_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> None:
    """Every row's bans and penalties in three indexed writes, not three per row."""
    never = samplers[0].never
    if never is not None and never.numel() and all(s.never is never for s in samplers):
        logits[:, never] = float("-inf")
    else:
        for row, sampler in zip(logits, samplers, strict=True):
            if sampler.never is not None and sampler.never.numel():
                row[sampler.never] = float("-inf")
    banned = [(i, token) for i, s in enumerate(samplers) for token in s.banned]
    if banned:
        rows, ids = zip(*banned, strict=True)
        logits[list(rows), list(ids)] = float("-inf")
    rows_list: list[int] = []
    ids_list: list[int] = []
    amounts: list[float] = []
    for i, sampler in enumerate(samplers):
        params = sampler.params
        for token, count in sampler.occurrence.items():
            rows_list.append(i)
            ids_list.append(token)
            amounts.append(params.presence_penalty + count * params.frequency_penalty)
    if rows_list:
        index = (torch.tensor(rows_list), torch.tensor(ids_list))
        logits.index_put_(index, -torch.tensor(amounts, dtype=logits.dtype), accumulate=True)


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """One token per row of ``logits`` (B, V); modifies ``logits`` in place."""
    _penalise_rows(logits, samplers)
    logits = logits.float()
    width = logits.shape[1]
    k = min(CANDIDATES, width)
    # The candidates' probabilities without a softmax over the whole vocabulary: exp(logit - lse).
    top_logits, ids = torch.topk(logits, k, dim=-1)
    values = torch.exp(top_logits - torch.logsumexp(logits, dim=-1, keepdim=True))
    cumulative = torch.cumsum(values, dim=-1)
    tokens: list[int] = []
    for i, sampler in enumerate(samplers):
        params = sampler.params
        if params.temperature == 0 or params.top_p == 0:
            tokens.append(int(ids[i, 0]))
        elif float(cumulative[i, -1]) >= params.top_p or k == width:
            tokens.append(_pick(values[i], ids[i], cumulative[i], sampler))
        else:  # a flat distribution: the cut lies beyond the candidates; widen, then sort the row
            probs = torch.softmax(logits[i], dim=-1)
            wide = min(WIDE_CANDIDATES, width)
            row_values, row_ids = torch.topk(probs, wide)
            cumulative_row = torch.cumsum(row_values, 0)
            if float(cumulative_row[-1]) < params.top_p and wide < width:
                row_values, row_ids = torch.sort(probs, descending=True)
                cumulative_row = torch.cumsum(row_values, 0)
            tokens.append(_pick(row_values, row_ids, cumulative_row, sampler))
    return tokens
