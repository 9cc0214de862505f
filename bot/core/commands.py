"""The chat commands every platform shares, parsed once here.

Two forms reach the core:

- typed with a slash (``/advisor sql why?``, ``/reset``, ``/help``), or mapped from a platform's
  native slash command onto that text: always a command when the word is one of ours;
- addressed to the bot without a slash (the words after a mention, or a direct message):
  ``@Raven advisor sql why?``, ``@Raven reset``. Here a command word counts only when what follows
  is that command's argument — ``advisor`` followed by a persona's name (or nothing), the other
  commands alone (trailing punctuation allowed). "@Raven help me with this join" and
  "@Raven reset the counter please" are ordinary messages;
- ChatRWKV's own words: ``+reset``, ``++`` (retry) and ``+++`` (continue) alone on the line, and the
  one-shot modes ``+gen <text>`` (free generation), ``+i <instruction>`` and ``+qa <question>``, which
  answer from a fresh state and leave the thread as it was.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

CommandName = Literal["advisor", "reset", "personas", "help", "retry", "continue", "stop", "fork", "forget",
                      "summary", "gen", "instruct", "qa"]
COMMANDS: tuple[CommandName, ...] = ("advisor", "reset", "personas", "help", "retry", "continue", "stop", "fork",
                                     "forget", "summary")
ALIASES: dict[str, CommandName] = {"+reset": "reset", "++": "retry", "+++": "continue"}
"""ChatRWKV's chat commands, accepted as they are."""
ONE_SHOT: dict[str, CommandName] = {"+gen": "gen", "+i": "instruct", "+qa": "qa"}
"""ChatRWKV's one-shot modes: the word, then the text to answer (in ``rest``)."""
FORGET_CONFIRMATION = "confirm"
_TRAILING = ":,.!?"

HELP_TEXT = (
    "Commands:\n"
    "- `/advisor <persona> [question]` — start this thread over with a persona (and ask it something)\n"
    "- `/reset` — start this thread over with its current persona (the log is kept)\n"
    "- `/retry` (or `++`) — a new reply to your last message, in place of the last reply\n"
    "- `/continue` (or `+++`) — make the last reply longer\n"
    "- `/stop` — stop the reply being written (what was written is kept)\n"
    "- `/fork` — a new thread that starts where this one is now (this one is unchanged)\n"
    "- `/forget` — delete this thread's log and saved state (asks you to confirm)\n"
    "- `/summary` — a summary of this thread so far (the thread itself is unchanged)\n"
    "- `+gen <text>`, `+i <instruction>`, `+qa <question>` — one-shot: free generation, an instruction, "
    "a single question, answered from a fresh start (the thread is unchanged)\n"
    "- `/personas` — list the personas\n"
    "- `/help` — this text\n"
    "After a mention the same words work without the slash (`@Raven advisor sql`). "
    "Anything else is a message to the current persona."
)


@dataclass(frozen=True)
class Command:
    name: CommandName
    argument: str = ""  # the persona name for /advisor; "confirm" for /forget
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
    if stripped.lower() in ALIASES:
        return Command(ALIASES[stripped.lower()])
    word, after = _split_first(stripped)
    if word.lower() in ONE_SHOT:
        return Command(ONE_SHOT[word.lower()], rest=after)
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
    if name == "forget":
        confirmed = tail.lower().rstrip(_TRAILING) == FORGET_CONFIRMATION
        if not slashed and tail and not confirmed:
            return None  # "forget it, never mind"
        return Command("forget", FORGET_CONFIRMATION if confirmed else "")
    if not slashed and tail:
        return None  # "reset the counter please"
    return Command(name)  # type: ignore[arg-type]


def as_text(command: Command) -> str:
    """The command in its slash form (as the log keeps it)."""
    parts = [f"/{command.name}", command.argument, command.rest]
    return " ".join(part for part in parts if part)
