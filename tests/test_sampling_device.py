"""The sampler works where the logits are: it never copies a full row of the vocabulary to the CPU
(``.cpu()``, ``.numpy()``, ``.tolist()``, ``.item()``, ``.to("cpu")``), so on CUDA a decode step
brings back B token ids, not B × 65,536 logits. This is PyTorch's path (``cpu_kernel=False``), the
one a CUDA device runs; on the CPU the compiled kernel reads the rows through a numpy view instead.
Watched on the CPU with a torch function mode that sees every tensor method call; the mode itself is
checked to catch each kind of copy."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bot.inference.sampling import RowSampler, SamplingParams, sample_rows

COPIES = {"cpu", "numpy", "tolist", "item", "to"}


class WatchCopies(TorchFunctionMode):
    """Records copies to the host of tensors with at least ``width`` elements."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.seen: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in COPIES and args and isinstance(args[0], torch.Tensor) and args[0].numel() >= self.width:
            target = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
            if name != "to" or any(torch.device(t).type == "cpu" for t in target):
                self.seen.append(name)
        return func(*args, **kwargs)


VOCAB = 65536


def _samplers(n: int, **params: Any) -> list[RowSampler]:
    out = [RowSampler(SamplingParams(**params), seed=i, never=torch.tensor([3, 4])) for i in range(n)]
    for s in out:
        for t in (10, 11, 10):
            s.record(t, "a")
    return out


def test_the_watch_catches_every_kind_of_copy() -> None:
    logits = torch.randn(2, VOCAB)
    for copy in (lambda: logits.cpu(), lambda: logits.numpy(), lambda: logits.tolist(),
                 lambda: logits.to("cpu"), lambda: logits[0].to(device="cpu")):
        with WatchCopies(VOCAB) as watch:
            copy()
        assert watch.seen, "the watch missed a copy"


@pytest.mark.parametrize(("rows", "params"), [
    (64, {}),  # chat defaults: penalties, top-p 0.3
    (8, {"top_p": 1.0}),  # a flat cut: the wider searches and the full sort
    (4, {"top_k": 5, "temperature": 0.7}),
    (3, {"temperature": 0.0}),  # greedy
])
def test_sampling_never_copies_a_full_row_to_the_host(rows: int, params: dict[str, Any]) -> None:
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    samplers = _samplers(rows, **params)
    with WatchCopies(VOCAB) as watch:
        picks = sample_rows(logits.clone(), samplers, cpu_kernel=False)
    assert watch.seen == []
    assert len(picks) == rows and all(0 <= t < VOCAB and t not in (0, 3, 4) for t in picks)
