"""Raven's library: the chat core and what it stands on.

Layers (the arrows point one way; ``tests/test_architecture.py`` checks them):

- ``bot.core``: events become turns: commands, personas, prompts, the chat service, thread states;
- ``bot.inference``: the model: the engine and its worker thread, sampling, backends, checkpoints,
  tokenizers, the state codec;
- ``bot.storage``: the Store contract and its SQLite implementation;
- ``bot.errors``, ``bot.events``, ``bot.settings``: the vocabulary every layer shares;
- ``bot.app``: the composition root (assembly and the ``raven`` command line), the only place that
  knows the adapters.
"""
