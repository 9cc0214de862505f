"""The model: one engine that owns it, sampling, backends, checkpoints, tokenizers, the state codec."""
