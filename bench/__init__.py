"""``raven bench``: the engine measured against the plain ``rwkv`` package (not part of the runtime)."""
