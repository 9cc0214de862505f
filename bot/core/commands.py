"""The chat commands every platform shares, parsed once here.

Two forms reach the core:

- typed with a slash (``/advisor sql why?``, ``/reset``, ``/help``), or mapped from a platform's
  native slash command onto that text: always a command when the word is one of ours;
- addressed to the bot without a slash (the words after a mention, or a direct message):
  ``@Raven advisor sql why?``, ``@Raven reset``. Here a command word counts only when what follows
  is that command's argument — ``advisor`` followed by a persona's name (or nothing), the other
  commands alone (trailing punctuation allowed). "@Raven help me with this join" and
  "@Raven reset the counter please" are ordinary messages.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

CommandName = Literal["advisor", "reset", "personas", "help"]
COMMANDS: tuple[CommandName, ...] = ("advisor", "reset", "personas", "help")
_TRAILING = ":,.!?"

HELP_TEXT = (
    "Commands:\n"
    "- `/advisor <persona> [question]` — start this thread over with a persona (and ask it something)\n"
    "- `/reset` — start this thread over with its current persona (the log is kept)\n"
    "- `/personas` — list the personas\n"
    "- `/help` — this text\n"
    "After a mention the same words work without the slash (`@Raven advisor sql`). "
    "Anything else is a message to the current persona."
)


@dataclass(frozen=True)
class Command:
    name: CommandName
    argument: str = ""  # the persona name for /advisor
    rest: str = ""  # the question after /advisor <persona>


def _split_first(text: str) -> tuple[str, str]:
    """The first word and the rest; a line break ends the first word too."""
    stripped = text.strip()
    for index, char in enumerate(stripped):
        if char.isspace():
            return stripped[:index], stripped[index:].strip()
    return stripped, ""


def parse_command(text: str, *, addressed: bool = False, personas: Collection[str] = ()) -> Command | None:
    """The command ``text`` holds, or None for an ordinary message.

    ``addressed``: the text followed a mention (or came in a direct message), so a command word
    without the slash counts too, under the stricter rule above; ``personas`` are the names that
    make ``advisor <name>`` a command in that form.
    """
    stripped = text.strip()
    slashed = stripped.startswith("/")
    if not slashed and not addressed:
        return None
    if slashed and (len(stripped) == 1 or stripped[1].isspace()):
        return None  # "/ help" is not a command
    head, tail = _split_first(stripped[1:] if slashed else stripped)
    name = head.lower() if slashed else head.lower().rstrip(_TRAILING)
    if name not in COMMANDS:
        return None
    if name == "advisor":
        persona, rest = _split_first(tail)
        persona = persona.lower()
        if not slashed and persona and persona.rstrip(_TRAILING) not in personas:
            return None  # "advisor me on this": not a persona, so an ordinary message
        return Command("advisor", persona if slashed else persona.rstrip(_TRAILING), rest)
    if not slashed and tail:
        return None  # "reset the counter please"
    return Command(name)  # type: ignore[arg-type]


def as_text(command: Command) -> str:
    """The command in its slash form (as the log keeps it)."""
    parts = [f"/{command.name}", command.argument, command.rest]
    return " ".join(part for part in parts if part)
