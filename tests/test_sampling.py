"""Sampling semantics (the rwkv package's pipeline is the model for them)."""

from __future__ import annotations

import torch

from bot.sampling import END_OF_TEXT, RowSampler, SamplingParams, sample_rows


def logits_with_peak(peak: int, width: int = 1000) -> torch.Tensor:
    logits = torch.zeros(width)
    logits[peak] = 10.0
    return logits


def test_greedy_when_temperature_or_top_p_is_zero() -> None:
    rows = torch.randn(3, 500)
    expected = [int(torch.argmax(row)) for row in rows]
    samplers = [RowSampler(SamplingParams(temperature=0), seed=i) for i in range(3)]
    assert sample_rows(rows.clone(), samplers) == expected
    samplers = [RowSampler(SamplingParams(top_p=0), seed=i) for i in range(3)]
    assert sample_rows(rows.clone(), samplers) == expected


def test_small_top_p_keeps_only_the_most_likely_token() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 0.0]])
    picks = {sample_rows(logits.clone(), [RowSampler(SamplingParams(top_p=0.1), seed=s)])[0] for s in range(30)}
    assert picks == {1}


def test_top_k_limits_the_candidates() -> None:
    logits = torch.zeros(1, 50)
    logits[0, 1:4] = torch.tensor([3.0, 2.9, 2.8])  # (id 0 is end-of-text, banned at first)
    picks = {sample_rows(logits.clone(), [RowSampler(SamplingParams(top_p=1.0, top_k=2), seed=s)])[0]
             for s in range(60)}
    assert picks == {1, 2}


def test_the_same_seed_gives_the_same_tokens_whatever_the_batch() -> None:
    torch.manual_seed(0)
    row = torch.randn(2000) * 2
    alone = [sample_rows(row.clone().unsqueeze(0), [s])[0] for s in [RowSampler(SamplingParams(top_p=0.9), 7)]]
    batch = torch.stack([torch.randn(2000), row, torch.randn(2000)])
    samplers = [RowSampler(SamplingParams(top_p=0.9), 1), RowSampler(SamplingParams(top_p=0.9), 7),
                RowSampler(SamplingParams(top_p=0.9), 3)]
    assert sample_rows(batch, samplers)[1] == alone[0]


def test_end_of_text_is_banned_until_the_reply_has_content() -> None:
    sampler = RowSampler(SamplingParams(temperature=0), seed=1)
    assert sample_rows(logits_with_peak(END_OF_TEXT).unsqueeze(0), [sampler])[0] != END_OF_TEXT
    sampler.banned.discard(END_OF_TEXT)
    assert sample_rows(logits_with_peak(END_OF_TEXT).unsqueeze(0), [sampler])[0] == END_OF_TEXT


def test_penalties_push_down_repeated_tokens_and_decay() -> None:
    params = SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=1.0, penalty_decay=0.5)
    sampler = RowSampler(params, seed=1)
    logits = torch.zeros(10)
    logits[4], logits[5] = 3.0, 2.5
    assert sample_rows(logits.clone().unsqueeze(0), [sampler])[0] == 4
    sampler.record(4, "x")
    assert sample_rows(logits.clone().unsqueeze(0), [sampler])[0] == 5  # 3 - (1 + 1) < 2.5
    sampler.record(7, "y")  # decays token 4's count to 0.5
    assert sampler.occurrence[4] == 0.5
    sampler.record(9, " ")  # spaces are not penalised (as in the package)
    assert sampler.occurrence[9] == 0.0


def test_unknown_token_ids_are_never_sampled() -> None:
    never = torch.tensor([3])
    sampler = RowSampler(SamplingParams(temperature=0), seed=1, never=never)
    assert sample_rows(logits_with_peak(3).unsqueeze(0), [sampler])[0] != 3


def test_a_flat_distribution_beyond_the_candidates_is_still_sampled_correctly() -> None:
    # 65,536 equal logits: the top-p cut lies beyond the first 1,024 candidates (full-sort path).
    logits = torch.zeros(1, 65536)
    picks = {sample_rows(logits.clone(), [RowSampler(SamplingParams(top_p=0.5), seed=s)])[0] for s in range(20)}
    assert len(picks) > 15  # spread over the vocabulary, not stuck in the candidate set
