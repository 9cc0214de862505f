"""The plain ``rwkv`` package behind the engine's backend interface, one sequence at a time.

Serves every family the package knows (RWKV-4/5/6, and RWKV-7 as the reference the batched path is
checked against). A "batched" decode here is a loop over slots. With ``watch_threads`` (the bot, where
``RAVEN_TORCH_THREADS`` is 0) a CPU model's torch thread count is re-checked while it runs, as the
batched backend's is (``bot.inference.thread_watch``); the benchmark's reference runs without.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bot.inference.backend import State, clone_state
from bot.inference.machine import usable_cores
from bot.inference.rwkv_package import load_package_model
from bot.inference.thread_watch import ThreadWatch, follow_for_prefill, thread_options, watched_step

PREFILL_CHUNK = 256


class PackageBackend:
    def __init__(self, path: Path, strategy: str = "cpu fp32", max_slots: int = 64,
                 watch_threads: bool = False) -> None:
        family, model = load_package_model(path, strategy)
        self.family: str = family
        self.model: Any = model
        self.strategy = strategy
        self.max_slots = max_slots
        self.n_layer = int(model.args.n_layer)
        self.n_embd = int(model.args.n_embd)
        self.vocab_size = int(model.w["emb.weight"].shape[0]) if family != "v7" else int(model.args.vocab_size)
        self.device = torch.device(strategy.split()[0].split("->")[0].strip())
        self._slots: list[State | None] = [None] * max_slots
        self._template = self._make_zero_state()
        options = thread_options(usable_cores())
        self.thread_watch: ThreadWatch | None = None
        if watch_threads and self.device.type == "cpu" and len(options) > 1:
            self.thread_watch = ThreadWatch(options, (options[0], options[0]))  # all cores to begin with

    def _make_zero_state(self) -> State:
        if self.family == "v7":
            return clone_state(self.model.generate_zero_state())
        # The v4-v6 forward builds its zero state on the first call; a one-token run shows the layout.
        _, state = self.model.forward([0], None)
        return [torch.zeros_like(t) if i % 5 != 3 or self.family != "v4" else torch.full_like(t, -1e30)
                for i, t in enumerate(clone_state(state))]

    def zero_state(self) -> State:
        return [t.clone() for t in self._template]

    def _device_state(self, state: State) -> State:
        template = self.model.generate_zero_state() if self.family == "v7" else None
        if template is None:
            return [t.clone() for t in state]
        return [t.to(device=ref.device, dtype=ref.dtype).clone() for t, ref in zip(state, template, strict=True)]

    def load_slot(self, slot: int, state: State) -> None:
        self._slots[slot] = self._device_state(state)

    def read_slot(self, slot: int) -> State:
        state = self._slots[slot]
        assert state is not None, f"slot {slot} is empty"
        return clone_state(state)

    def move_slot(self, src: int, dst: int) -> None:
        self._slots[dst] = self._slots[src]
        self._slots[src] = None

    def prefill(self, slot: int, tokens: Sequence[int]) -> torch.Tensor:
        state = self._slots[slot]
        assert state is not None and tokens, "prefill needs a loaded slot and at least one token"
        if self.thread_watch is not None:
            follow_for_prefill(self.thread_watch, len(tokens))
        logits: torch.Tensor | None = None
        for start in range(0, len(tokens), PREFILL_CHUNK):
            logits, state = self.model.forward(list(tokens[start:start + PREFILL_CHUNK]), state)
        self._slots[slot] = state
        assert logits is not None
        return logits.float().cpu()

    def prefill_rows(self, first_slot: int, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.stack([self.prefill(first_slot + i, row) for i, row in enumerate(rows)])

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        watch = self.thread_watch
        if watch is not None and torch.get_num_threads() in watch.options:
            logits, _ = watched_step(watch, len(tokens), lambda: self._decode(tokens))
            return logits
        return self._decode(tokens)

    def _decode(self, tokens: Sequence[int]) -> torch.Tensor:
        rows = []
        for slot, token in enumerate(tokens):
            state = self._slots[slot]
            assert state is not None, f"slot {slot} is empty"
            logits, self._slots[slot] = self.model.forward([token], state)
            rows.append(logits.float())
        return torch.stack(rows)  # on the model's device, like the batched backend's
