"""Where threads, the message log and saved states live: the Store contract and its implementations."""

from bot.storage.protocol import Store
from bot.storage.records import Role, StateDraft, Status, StoredMessage, StoredState, ThreadInfo
from bot.storage.sqlite import SQLiteStore

__all__ = ["Role", "SQLiteStore", "StateDraft", "Status", "Store", "StoredMessage", "StoredState", "ThreadInfo"]
