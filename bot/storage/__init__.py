"""Where threads, the message log and saved states live: the Store contract and its implementations."""

from bot.storage.protocol import Store
from bot.storage.records import (
    IN_FLIGHT,
    INTERRUPTED_NOTICE,
    Accepted,
    Delivery,
    Exchange,
    Phase,
    Repair,
    Role,
    StateDraft,
    Status,
    StoredMessage,
    StoredState,
    ThreadInfo,
    TurnRecord,
)
from bot.storage.sqlite import SQLiteStore

__all__ = [
    "INTERRUPTED_NOTICE",
    "IN_FLIGHT",
    "Accepted",
    "Delivery",
    "Exchange",
    "Phase",
    "Repair",
    "Role",
    "SQLiteStore",
    "StateDraft",
    "Status",
    "Store",
    "StoredMessage",
    "StoredState",
    "ThreadInfo",
    "TurnRecord",
]
