"""Where threads, the message log and saved states live: the Store contract and its implementations."""

from bot.storage.sqlite import Store, StoredMessage, StoredState, ThreadInfo

__all__ = ["Store", "StoredMessage", "StoredState", "ThreadInfo"]
