"""What the engine needs from a model: a pool of state slots, prefill, and one batched decode step.

A *state* is the ``rwkv`` package's own format: a list of tensors per layer. RWKV-7 keeps three per
layer: ``att_x_prev`` (C), the wkv matrix (H, 64, 64, always fp32) and ``ffn_x_prev`` (C); RWKV-4
keeps five. Every backend reads and writes that format, so a state made by one backend continues in
another and a saved state survives a change between them.

The engine keeps the threads it is serving in slots ``0 .. n-1`` of the pool, compacted: a batched
decode step works on the first ``n`` slots without gathering anything.

A :class:`ModelState` is what the engine hands out and takes back: a state with the logits for the
next token (``bot.inference.state_codec`` turns it into bytes for the store and back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

State = list[torch.Tensor]


@dataclass
class ModelState:
    """The model after reading some tokens: the recurrent state and the logits for the next token."""

    state: State
    logits: torch.Tensor
    token_count: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state) + self.logits.numel() * 4


class Backend(Protocol):
    family: str
    vocab_size: int
    n_layer: int
    n_embd: int
    device: torch.device
    max_slots: int

    def zero_state(self) -> State:
        """A fresh state on the CPU, in the package's layout."""
        ...

    def load_slot(self, slot: int, state: State) -> None:
        """Copy ``state`` into ``slot``."""
        ...

    def read_slot(self, slot: int) -> State:
        """A detached CPU copy of the state in ``slot`` (safe to keep and to serialise)."""
        ...

    def move_slot(self, src: int, dst: int) -> None:
        """Copy ``src`` into ``dst`` (used to keep active slots compacted)."""
        ...

    def prefill(self, slot: int, tokens: Sequence[int]) -> torch.Tensor:
        """Feed ``tokens`` to the state in ``slot``; returns fp32 CPU logits (V,) after the last."""
        ...

    def prefill_rows(self, first_slot: int, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Equal-length token lists into consecutive slots from ``first_slot``; logits (S, V)."""
        ...

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """One token per slot ``0 .. len(tokens)-1``; returns fp32 logits (B, V) on ``device``: the
        sampler runs where they are, so a GPU step copies back B token ids, not B × vocab logits."""
        ...


def clone_state(state: State) -> State:
    """A compact, detached copy: states after a sequence forward can be views into big buffers."""
    return [t.detach().to("cpu", copy=True).contiguous() for t in state]
