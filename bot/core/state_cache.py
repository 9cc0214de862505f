"""Hot model states in memory, up to a byte budget (LRU); everything else lives in the store."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from bot.events import ThreadKey
from bot.inference.engine import ModelState


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
