"""The chat core: turns events into replies (commands, personas, prompts, the chat service)."""
