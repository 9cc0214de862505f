"""Top-p / top-k sampling of a batch of probability rows on the CPU in one compiled pass per row
(``nucleus_kernel``), for ``sampling.sample_rows``.

Why: PyTorch's path (``sampling._candidates`` and ``_draw``) is some forty small ops; at 64 rows of a
65,536-token vocabulary with a random-weight model's wide nucleus (~300-500 tokens at top-p 0.3) it
took 8-10 ms a step on the Zen 5, a fifth of a bf16 decode step, mostly ``topk`` over thousands of
candidates. The kernel finds each row's exact top list by a threshold instead (see
``nucleus_kernel``) and sorts only the head of it: ~1.8 ms for the same 64 rows. It draws with the same numbers
and the same rules (``sampling``'s docstring), so a row gets the same token either way except where
a draw lands within float rounding of a boundary between two tokens.

The probabilities are read in place (a CPU tensor's numpy view, no copy). The CUDA path stays
PyTorch's, on the device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bot.inference.self_check import kernel_agrees

if TYPE_CHECKING:
    from bot.inference.sampling import RowSampler

log = logging.getLogger(__name__)
CHUNK = 8
"""Strided parts per row: the column maxima are 1/8 of the row (8,192 for 65,536), which the
histogram scans cheaply, and a column rarely holds more than one token above the threshold."""
FIRST_WANT = 512
"""Columns above the first threshold where the row's last nucleus is unknown."""
PARALLEL_MIN = 4
"""Rows below which a call runs on the calling thread alone (one row is ~0.1 ms of work)."""
_kernel: dict[str, Any] = {}


def _rows() -> Any:
    if not _kernel:
        from bot.inference import nucleus_kernel

        _kernel.update(rows=nucleus_kernel.rows, setup=nucleus_kernel.numba_setup)
    return _kernel


def _want(sampler: RowSampler) -> int:
    """Twice the row's last nucleus (a chat's nucleus changes slowly from token to token)."""
    last = sampler.last_nucleus
    return FIRST_WANT if last is None else max(16, 2 * last)


def draw_rows(probs: torch.Tensor, samplers: Sequence[RowSampler], draws: Sequence[float]) -> list[int | None]:
    """One token per row of ``probs`` (B, V) fp32 on the CPU, drawn with ``draws`` (uniform in
    [0, 1)); None for a row with no probability in it (NaN), which the caller's other path decides.
    Sets each resolved row's ``last_nucleus``."""
    kernel = _rows()
    B = probs.shape[0]
    kernel["setup"].use_threads(torch.get_num_threads() if B >= PARALLEL_MIN else 1)
    tokens = np.empty(B, np.int64)
    sizes = np.empty(B, np.int64)
    kernel["rows"](probs.contiguous().numpy(),
                   np.array([s.params.top_p for s in samplers], np.float32),
                   np.array([s.params.top_k for s in samplers], np.int64),
                   np.array([1.0 / s.params.temperature for s in samplers], np.float32),
                   np.array(draws, np.float64), np.array([_want(s) for s in samplers], np.int64),
                   CHUNK, tokens, sizes)
    out: list[int | None] = []
    for sampler, token, size in zip(samplers, tokens.tolist(), sizes.tolist(), strict=True):
        if size > 0:
            sampler.last_nucleus = size
            out.append(token)
        else:
            out.append(None)
    return out


@cache
def nucleus_works() -> bool:
    """numba compiles the kernel here and it draws what PyTorch's path draws, on rows from peaked to
    flat, with top-k and temperatures. A broken or missing install keeps PyTorch's path (one log
    line, never an error)."""
    return kernel_agrees(log, "sampling kernel", _nucleus_works_check)


def _nucleus_works_check() -> bool:
    from bot.inference.sampling import RowSampler, SamplingParams, sample_rows

    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0])
    logits = torch.randn(len(scales), 4096, generator=g) * scales.unsqueeze(1)
    params = [SamplingParams(top_p=0.3), SamplingParams(top_p=0.9, temperature=0.7),
              SamplingParams(top_p=0.5, top_k=5), SamplingParams(top_p=0.3, temperature=1.3),
              SamplingParams(top_p=1.0, top_k=40), SamplingParams(top_p=0.6)]

    def picks(kernel: bool) -> tuple[list[int], list[int | None]]:
        samplers = [RowSampler(p, seed=i) for i, p in enumerate(params)]
        tokens = sample_rows(logits.clone(), samplers, cpu_kernel=kernel)
        return tokens, [s.last_nucleus for s in samplers]

    ok = picks(True) == picks(False)
    return ok
