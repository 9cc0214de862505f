"""The core's error hierarchy: each error carries a message fit to show a user or an operator."""


class RavenError(Exception):
    """Base of every error the core raises on purpose."""


class ConfigError(RavenError):
    """A setting is missing or malformed; raised at start-up."""


class ModelLoadError(RavenError):
    """A checkpoint is missing, unreadable or of a shape we do not know."""


class PersonaError(RavenError):
    """A persona name is invalid or unknown, or a persona file is malformed."""


class InputError(RavenError):
    """A user's message cannot be accepted; ``reason`` says why in one word (``empty``, ``too_long``)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class StoreError(RavenError):
    """The database cannot be used (e.g. written by a newer Raven)."""


class StateError(RavenError):
    """A stored model state cannot be used (corrupt, stale, wrong shape)."""


class NonFiniteLogitsError(RavenError):
    """The forward produced NaN/inf logits (fp16 overflowed); sampling from them would emit garbage."""


class EngineBusy(RavenError):
    """The engine's queue is full; the message says how many are ahead."""

    def __init__(self, ahead: int) -> None:
        super().__init__(f"busy, {ahead} ahead of you")
        self.ahead = ahead
