"""Hot model states in memory, up to a byte budget (LRU); everything else lives in SQLite.

Also the (de)serialisation of states for the store, with the checks that keep a corrupt or
mismatched blob from ever being loaded into the model.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass

import torch

from bot.engine import ModelState
from bot.errors import StateError
from bot.events import ThreadKey


@dataclass(frozen=True)
class CachedState:
    model: ModelState
    fingerprint: str
    epoch: int
    last_message_id: int


class StateCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[ThreadKey, CachedState] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def __contains__(self, key: ThreadKey) -> bool:
        return key in self._items

    def get(self, key: ThreadKey) -> CachedState | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: ThreadKey, item: CachedState) -> None:
        self.discard(key)
        size = item.model.nbytes()
        if size > self.budget_bytes:
            return
        self._items[key] = item
        self._bytes += size
        while self._bytes > self.budget_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.model.nbytes()
            self.evictions += 1

    def discard(self, key: ThreadKey) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item.model.nbytes()


def encode_state(model: ModelState) -> bytes:
    buffer = io.BytesIO()
    torch.save({"state": [t.contiguous() for t in model.state], "logits": model.logits,
                "token_count": model.token_count}, buffer)
    return buffer.getvalue()


def decode_state(blob: bytes, template: list[torch.Tensor], vocab_size: int) -> ModelState:
    """Parse a stored blob and check it against the model's own state layout."""
    try:
        data = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StateError(f"state blob is unreadable: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("state"), list):
        raise StateError("state blob has the wrong structure")
    state, logits = data["state"], data.get("logits")
    if len(state) != len(template):
        raise StateError(f"state has {len(state)} tensors, the model expects {len(template)}")
    for index, (tensor, expected) in enumerate(zip(state, template, strict=True)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected.shape:
            raise StateError(f"state tensor {index} has the wrong shape")
        if torch.isnan(tensor).any():
            raise StateError(f"state tensor {index} holds NaN")
    if not isinstance(logits, torch.Tensor) or logits.shape != (vocab_size,):
        raise StateError("stored logits have the wrong shape")
    return ModelState([t.to(expected.dtype) for t, expected in zip(state, template, strict=True)],
                      logits.float(), int(data.get("token_count", 0)))
