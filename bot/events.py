"""The one type that crosses from adapters into the core, and the key that names a thread."""

from __future__ import annotations

from dataclasses import dataclass

_SEPARATOR = ":"


@dataclass(frozen=True, slots=True)
class ThreadKey:
    """Names one conversation everywhere in the core: the store, the state cache, the engine."""

    platform: str
    thread_id: str

    def __post_init__(self) -> None:
        if not self.platform or _SEPARATOR in self.platform:
            raise ValueError(f"invalid platform name {self.platform!r}")
        if not self.thread_id:
            raise ValueError("thread_id must not be empty")

    def __str__(self) -> str:
        return f"{self.platform}{_SEPARATOR}{self.thread_id}"

    @classmethod
    def parse(cls, text: str) -> ThreadKey:
        platform, sep, thread_id = text.partition(_SEPARATOR)
        if not sep:
            raise ValueError(f"not a thread key: {text!r}")
        return cls(platform, thread_id)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file attached to a message. ``content`` is None when the adapter did not fetch it (it fetches
    only what the core will read: ``bot.core.attachments.wanted``)."""

    name: str
    size: int
    content: bytes | None = None


@dataclass(frozen=True, slots=True)
class EarlierMessage:
    """A message written in a platform thread before Raven was called into it (adopting the thread)."""

    author: str
    text: str
    from_bot: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    """A user's message, already translated from the platform's own shape.

    Adapters map native slash commands onto the same text form (``/advisor sql why?``) so
    that the core parses every command in one place. ``addressed`` says the text was written to
    the bot (the words after a mention, or a direct message): then a command word counts without
    its slash too (``@Raven reset``), and an empty text asks for the help.

    ``channel`` names the room the thread is in (a Discord channel, a Slack channel; None where there
    is none, as on the web) for the per-channel limits. ``admin``: the platform says the sender holds
    an admin role (``DISCORD_ADMIN_ROLES``, Slack workspace admins), so the limits do not apply.
    ``private``: the reply is shown to the sender alone (an ephemeral message, which no one can edit
    after a crash), so a turn lost mid-way is not repaired by posting in the thread for everyone.
    """

    thread: ThreadKey
    user_id: str
    user_name: str
    text: str
    message_id: str | None = None
    addressed: bool = False
    attachments: tuple[Attachment, ...] = ()
    channel: str | None = None
    admin: bool = False
    private: bool = False

    @property
    def platform(self) -> str:
        return self.thread.platform
