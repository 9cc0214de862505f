"""Where threads, the message log and saved states live: the Store contract and its implementations."""
