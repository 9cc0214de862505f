"""The chat commands every platform shares, parsed once here.

Adapters map native slash commands and mention-prefixed text (``@raven advisor sql``) onto the
text form: ``/advisor <persona> [question]``, ``/reset``, ``/personas``, ``/help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CommandName = Literal["advisor", "reset", "personas", "help"]
COMMANDS: tuple[CommandName, ...] = ("advisor", "reset", "personas", "help")

HELP_TEXT = (
    "Commands:\n"
    "- `/advisor <persona> [question]` — start this thread over with a persona (and ask it something)\n"
    "- `/reset` — start this thread over with its current persona (the log is kept)\n"
    "- `/personas` — list the personas\n"
    "- `/help` — this text\n"
    "Anything else is a message to the current persona."
)


@dataclass(frozen=True)
class Command:
    name: CommandName
    argument: str = ""  # the persona name for /advisor
    rest: str = ""  # the question after /advisor <persona>


def parse_command(text: str) -> Command | None:
    """A command if ``text`` starts with one of ours; anything else is an ordinary message."""
    stripped = text.strip()
    if not stripped.startswith("/"):
        return None
    head, _, tail = stripped[1:].partition(" ")
    name = head.lower()
    if name not in COMMANDS:
        return None
    if name == "advisor":
        tail = tail.strip()
        persona, _, rest = tail.partition(" ")
        if "\n" in persona:
            persona, _, more = persona.partition("\n")
            rest = more + (" " + rest if rest else "")
        return Command("advisor", persona.strip().lower(), rest.strip())
    return Command(name)  # type: ignore[arg-type]
