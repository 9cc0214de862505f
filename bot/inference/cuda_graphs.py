"""The decode step as CUDA graphs, one per batch size: ~3,500 small kernels a step launched as one.

Why: on a GPU a decode step of a small model is bound by kernel launches, not by the GPU: 12 layers
of ~290 PyTorch ops each, every one a few microseconds of Python and driver work. A captured graph
replays the same kernels, on the same memory, with one launch. It applies to the decode step only
(a prefill's length varies): its inputs are the token ids (copied into the graph's own tensor) and
the state pool, which the backend allocates once and only ever updates in place, so a replay reads
and writes the live states.

Each batch size runs eagerly the first time (cuBLAS and the allocator initialise on it), is captured
the second time (capturing runs nothing, so no state moves twice) and replayed from then on. Any
failure to capture turns graphs off for the backend, with one warning: the eager step is always
there. All graphs share one memory pool; the logits are copied out of it at every replay, so a
caller that keeps or edits them (the sampler writes penalties into them) never sees the next step's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class StepGraphs:
    """``step(ids) -> logits`` (no host synchronisation inside) captured per batch size."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self._step = step
        self._device = device
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._seen: set[int] = set()
        self._pool: Any = None  # torch.cuda.graph_pool_handle(): shared by every batch size's graph
        self.disabled: str | None = None  # why graphs are off, once a capture failed

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def summary(self) -> str:
        if self.disabled:
            return f"CUDA graphs off ({self.disabled})"
        return f"CUDA graphs for batch sizes {self.captured or 'none yet'}"

    def run(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The logits for ``ids`` (B,) from this batch size's graph, or None: run the step eagerly."""
        if self.disabled is not None:
            return None
        B = int(ids.shape[0])
        entry = self._graphs.get(B)
        if entry is None:
            if B not in self._seen:  # the warm-up: this call runs eagerly
                self._seen.add(B)
                return None
            try:
                entry = self._graphs[B] = self._capture(B)
            except Exception as exc:  # a kernel that cannot be captured: eager from now on
                self.disabled = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture failed at batch size %d (%s); decode steps run eagerly", B, exc)
                return None
            log.info("captured the decode step at batch size %d as a CUDA graph", B)
        graph, static_ids, logits = entry
        static_ids.copy_(ids)
        graph.replay()
        return logits.clone()

    def _capture(self, B: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_ids = torch.zeros(B, dtype=torch.long, device=self._device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(static_ids)
        return graph, static_ids, logits
