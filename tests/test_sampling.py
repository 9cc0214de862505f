"""Sampling semantics (the rwkv package's pipeline is the model for them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bot.inference.sampling import END_OF_TEXT, RowSampler, SamplingParams, sample_rows


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
    assert sampler.count(4) == 0.5
    sampler.record(9, " ")  # spaces are not penalised (as in the package)
    assert sampler.count(9) == 0.0 and sampler.count(4) == 0.25


def test_unknown_token_ids_are_never_sampled() -> None:
    never = torch.tensor([3])
    sampler = RowSampler(SamplingParams(temperature=0), seed=1, never=never)
    assert sample_rows(logits_with_peak(3).unsqueeze(0), [sampler])[0] != 3


def test_a_flat_distribution_beyond_the_candidates_is_still_sampled_correctly() -> None:
    # 65,536 equal logits: the top-p cut lies beyond the first 1,024 candidates (full-sort path).
    logits = torch.zeros(1, 65536)
    picks = {sample_rows(logits.clone(), [RowSampler(SamplingParams(top_p=0.5), seed=s)])[0] for s in range(20)}
    assert len(picks) > 15  # spread over the vocabulary, not stuck in the candidate set


# --- the rwkv package's PIPELINE.sample_logits as the oracle for the candidate search ---------------

class _FixedDraw:
    """Stands in for a row's random.Random: always returns the same number in [0, 1)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def _package_distribution(logits: torch.Tensor, params: SamplingParams, monkeypatch: pytest.MonkeyPatch
                          ) -> np.ndarray:
    """The probabilities the package's ``sample_logits`` draws from (read off its ``np.random.choice``)."""
    from rwkv.utils import PIPELINE

    seen: list[np.ndarray] = []

    def choice(a: int, p: np.ndarray) -> int:
        seen.append(np.asarray(p, dtype=np.float64))
        return 0

    monkeypatch.setattr(np.random, "choice", choice)
    PIPELINE.sample_logits(None, logits.clone(), temperature=params.temperature, top_p=params.top_p,
                           top_k=params.top_k)
    monkeypatch.undo()
    return seen[0]


def _our_counts(logits: torch.Tensor, params: SamplingParams, draws: int, first_search: int | None,
                kernel: bool = False) -> np.ndarray:
    """How many of ``draws`` evenly spaced uniform numbers pick each token: draws × the probability
    our sampler gives it, to within one."""
    samplers = []
    for j in range(draws):
        sampler = RowSampler(params, seed=0)
        sampler.rng = _FixedDraw((j + 0.5) / draws)  # type: ignore[assignment]
        sampler.banned.clear()  # the package bans nothing by itself
        sampler.last_nucleus = first_search
        samplers.append(sampler)
    tokens = sample_rows(logits.expand(draws, -1).clone(), samplers, cpu_kernel=kernel)
    return np.bincount(np.array(tokens), minlength=logits.shape[0])


def _logits(kind: str, width: int = 16384) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    if kind == "peaked":  # a trained model: a few tokens carry most of the mass
        logits = torch.randn(width, generator=gen)
        logits[torch.randint(0, width, (6,), generator=gen)] += torch.tensor([9.0, 8.5, 8.0, 7.0, 6.5, 6.0])
        return logits
    if kind == "random":  # a random-weight model: hundreds of tokens in the top-p 0.3 nucleus
        return torch.randn(width, generator=gen) * 2
    if kind == "flat":  # thousands in the nucleus: past the first candidate search
        return torch.randn(width, generator=gen) * 0.5
    if kind == "three":  # a nucleus of exactly three tokens
        logits = torch.zeros(width)
        logits[5:8] = torch.tensor([20.0, 19.9, 19.8])
        return logits
    if kind == "ties":  # the cut falls inside a run of equal logits: all of them stay
        logits = torch.zeros(width)
        logits[100:130] = 6.0
        return logits
    raise ValueError(kind)


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize(("kind", "params", "first_search"), [
    ("peaked", SamplingParams(top_p=0.3), None),
    ("peaked", SamplingParams(top_p=0.9, temperature=0.7), 1),
    ("random", SamplingParams(top_p=0.3), None),
    ("random", SamplingParams(top_p=0.3), 1),  # starts at 64 candidates, must widen
    ("random", SamplingParams(top_p=0.6, top_k=7, temperature=1.3), None),
    ("random", SamplingParams(top_p=0.9, top_k=100), 1),  # top_k past the first 64 candidates
    ("flat", SamplingParams(top_p=0.5), None),  # past 512 and 4,096 candidates: the full sort
    ("flat", SamplingParams(top_p=0.05), 1),
    ("ties", SamplingParams(top_p=0.2), 1),
    ("three", SamplingParams(top_p=0.99, top_k=2), None),  # top_k one short of the nucleus
    # The 30 sixes hold 42.5% of the mass; the cut falls among the zeros, which tie with the last
    # candidates: every zero stays in, so the short list must not be trusted (the full sort decides).
    ("ties", SamplingParams(top_p=0.426), 1),
])
def test_each_token_is_drawn_as_often_as_the_package_would_draw_it(
        kind: str, params: SamplingParams, first_search: int | None, kernel: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    logits = _logits(kind)
    expected = _package_distribution(logits, params, monkeypatch)
    draws = 1000
    counts = _our_counts(logits, params, draws, first_search, kernel)
    support = set(np.flatnonzero(expected).tolist())
    assert set(np.flatnonzero(counts).tolist()) <= support  # never a token the package would not pick
    # Each token owns an interval of [0, 1) as long as its probability: it catches that many of the
    # evenly spaced draws, to within one.
    assert np.abs(counts - expected * draws).max() <= 1.0 + 1e-6
    assert counts.sum() == draws


def test_a_very_low_temperature_still_draws_from_the_nucleus() -> None:
    # p ** (1 / 0.01) underflows float32 for every probability here; relative to the top one it does not.
    logits = torch.zeros(1, 5000)
    logits[0, 10], logits[0, 11] = 4.0, 3.999
    picks = {sample_rows(logits.clone(), [RowSampler(SamplingParams(temperature=0.01, top_p=0.9), seed=s)])[0]
             for s in range(40)}
    assert picks <= {10, 11} and 10 in picks


# --- the CPU kernel (bot.inference.nucleus) against PyTorch's path ---------------------------------

def _chat_rows(rows: int, scale: float, seed: int = 3) -> torch.Tensor:
    """Rows like the benchmark's random-weight model at top-p 0.3 (scale 2: a ~350-token nucleus)."""
    return torch.randn(rows, 65536, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize(("scale", "params"), [
    (2.0, SamplingParams()),  # the chat defaults, penalties included
    (6.0, SamplingParams(top_p=0.9, temperature=0.8)),  # peaked: a handful of tokens
    (1.0, SamplingParams(top_p=0.5)),  # thousands in the nucleus: the kernel widens its threshold
    (2.0, SamplingParams(top_p=0.9, top_k=30, temperature=1.4)),
    (2.0, SamplingParams(top_p=1.0)),  # no cut: the whole vocabulary kept, sorted by radix
    (2.0, SamplingParams(top_p=1.0, temperature=0.7)),
])
def test_the_kernel_draws_the_tokens_pytorchs_path_draws(scale: float, params: SamplingParams) -> None:
    logits = _chat_rows(24, scale)
    runs = []
    for kernel in (True, False):
        samplers = [RowSampler(params, seed=i) for i in range(len(logits))]
        for _step in range(3):  # the penalties and the last nucleus carry from step to step
            tokens = sample_rows(logits.clone(), samplers, cpu_kernel=kernel)
            for sampler, token in zip(samplers, tokens, strict=True):
                sampler.record(token, "x")
        runs.append(([s.count(t) for s, t in zip(samplers, tokens, strict=True)], tokens,
                     [s.last_nucleus for s in samplers]))
    assert runs[0] == runs[1]
    sizes = runs[0][2]
    assert all(n is not None and n >= 1 for n in sizes)
    if params.top_k:
        assert max(sizes) <= params.top_k  # type: ignore[operator]


def test_the_kernel_leaves_a_row_without_probabilities_to_pytorchs_path() -> None:
    logits = _chat_rows(3, 2.0)
    logits[1] = float("nan")  # a broken model's row: the kernel cannot rank it
    from bot.inference.nucleus import draw_rows

    samplers = [RowSampler(SamplingParams(), seed=i) for i in range(3)]
    probs = torch.softmax(logits, dim=-1)
    picked = draw_rows(probs, samplers, [0.5, 0.5, 0.5])
    assert picked[1] is None and picked[0] is not None and picked[2] is not None
    tokens = sample_rows(logits.clone(), [RowSampler(SamplingParams(), seed=i) for i in range(3)], cpu_kernel=True)
    assert len(tokens) == 3 and all(0 <= t < 65536 for t in tokens)


def test_a_kernel_that_disagrees_sends_sampling_to_pytorchs_path(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from bot.inference import nucleus, sampling

    def off_by_one(probs: torch.Tensor, samplers: list[RowSampler], draws: list[float]) -> list[int | None]:
        return [int(probs[i].argmax()) + 1 for i in range(len(samplers))]

    monkeypatch.setattr(sampling, "draw_rows", off_by_one)
    nucleus.nucleus_works.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="bot.inference.nucleus"):
            assert nucleus.nucleus_works() is False
        assert "disagrees" in caplog.text
        logits = _chat_rows(2, 6.0)
        tokens = sample_rows(logits.clone(), [RowSampler(SamplingParams(top_p=0.01), seed=i) for i in range(2)])
        assert tokens == logits.argmax(dim=-1).tolist()  # PyTorch's path: the top token, not its neighbour
    finally:
        nucleus.nucleus_works.cache_clear()


def test_tokens_of_equal_probability_are_walked_in_id_order_on_both_paths() -> None:
    """Five tokens share the top logit exactly (the rest far below): the draw's number picks the
    ``int(u * 5)``-th of them by id, whether the kernel or PyTorch's path draws."""
    import random

    tied = [60001, 7, 31337, 4096, 12]
    logits = torch.full((1, 65536), -30.0)
    logits[0, tied] = 5.0
    for seed in range(40):
        picks = [sample_rows(logits.clone(), [RowSampler(SamplingParams(top_p=0.99, presence_penalty=0,
                                                                       frequency_penalty=0), seed=seed)],
                             cpu_kernel=kernel)[0] for kernel in (True, False)]
        u = random.Random(seed).random()
        assert picks == [sorted(tied)[int(u * 5)]] * 2


@pytest.mark.parametrize(("scale", "top_p", "top_k", "gathered"),
                         [(2.0, 0.3, 0, 1000), (1.0, 0.5, 0, 16000), (2.0, 0.9, 30, 3000), (6.0, 0.9, 0, 3000)])
def test_the_kernels_sorted_head_is_the_start_of_the_full_sort(scale: float, top_p: float, top_k: int,
                                                                gathered: int) -> None:
    """The kernel sorts only the values from one fine bucket below the top-p cut: that head must be
    exactly the first entries of all gathered values sorted, and the cut must lie inside it."""
    from bot.inference import nucleus_kernel as kernel

    probs = torch.softmax(_chat_rows(1, scale, seed=11)[0], dim=-1).numpy()
    ids = np.argsort(-probs, kind="stable")[:gathered].copy()  # gathered candidates, in any order
    np.random.default_rng(0).shuffle(ids)
    vals = probs[ids].copy()
    full, full_ids = kernel._sorted(vals.copy(), ids.copy(), len(vals))
    head, lowest, short = kernel._head(vals, ids, len(vals), np.float32(top_p), top_k)
    assert not short and lowest <= vals[:head].min() and (vals[head:] < lowest).all()
    assert 0 < head < len(vals)
    top, top_ids = kernel._sorted(vals, ids, head)
    np.testing.assert_array_equal(top, full[:head])
    np.testing.assert_array_equal(top_ids, full_ids[:head])
    cut = int(np.argmax(np.cumsum(full, dtype=np.float32) >= top_p))  # where the package's sum stops
    reached = min(cut, top_k - 1) if top_k else cut
    assert reached < head <= 1.5 * reached + 32  # the cut is inside, and little more is sorted
    assert (np.diff(full) <= 0).all() and sorted(full_ids.tolist()) == sorted(ids.tolist())


def test_the_kernel_and_pytorchs_path_agree_on_a_bf16_models_logits() -> None:
    """A bf16 head rounds its logits to 8 bits of mantissa, so a random-weight model's nucleus is
    full of exact ties (before ties were ordered, the two paths drew different tokens for most rows)."""
    logits = _chat_rows(32, 2.0, seed=8).bfloat16().float()
    picks = []
    for kernel in (True, False):
        samplers = [RowSampler(SamplingParams(), seed=i) for i in range(len(logits))]
        picks.append((sample_rows(logits.clone(), samplers, cpu_kernel=kernel), [s.last_nucleus for s in samplers]))
    probs = torch.softmax(logits, dim=-1)
    tied = sum(int((probs[i] == probs[i, t]).sum()) > 1 for i, t in enumerate(picks[0][0]))
    assert tied >= 8  # the case this is about: many drawn tokens share their probability
    assert picks[0] == picks[1]


@pytest.mark.parametrize("rounded", [False, True])
def test_the_radix_sort_orders_a_row_as_the_comparison_sort_does(rounded: bool) -> None:
    """The kernel sorts long heads by radix (gathered again in id order) and short ones by a
    comparison sort of packed keys; both must give value-descending order with ties by id, on
    fp32 rows and on bf16-rounded rows full of ties."""
    from bot.inference import nucleus_kernel as kernel

    logits = _chat_rows(1, 2.0, seed=21)[0]
    probs = torch.softmax(logits.bfloat16().float() if rounded else logits, dim=-1).numpy()
    threshold = np.float32(np.sort(probs)[-5000])
    ids = np.nonzero(probs >= threshold)[0]
    rng = np.random.default_rng(1)
    rng.shuffle(ids)  # the comparison sort gets them in any order
    by_keys = kernel._sorted(probs[ids].copy(), ids.copy(), len(ids))
    by_radix = kernel._radix_sorted(probs, threshold, len(ids))
    assert len(ids) >= kernel.RADIX_MIN
    np.testing.assert_array_equal(by_radix[0], by_keys[0])
    np.testing.assert_array_equal(by_radix[1], by_keys[1])
    order = sorted(ids.tolist(), key=lambda i: (-probs[i], i))
    assert by_radix[1].tolist() == order
    if rounded:
        assert len(np.unique(by_radix[0])) < len(ids) // 2  # the case with ties
