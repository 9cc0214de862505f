"""Prompt formats per model family, and the canonical token sequence of a thread.

A thread's model context is always the concatenation of separately tokenized segments:

    system segment | user turn | reply segment | user turn | reply segment | ...

A reply segment is the token ids the model generated (up to the turn separator), which the log
keeps beside the reply's text. The saved state after a turn is exactly "the model after reading
these segments", whether it was reached turn by turn or rebuilt from the log in one go; that is what
makes resuming from a saved state equivalent to re-reading the history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.core.personas import Persona
from bot.inference.tokenizer import Tokenizer

FORMAT_VERSION = "1"
_BLANK_LINES = re.compile(r"\n\s*\n+")


@dataclass(frozen=True)
class Roles:
    system: str
    user: str
    bot: str


DEFAULT_ROLES = {
    # World / G-series models (RWKV-5/6/7): "System: …\n\nUser: …\n\nAssistant: …"
    "world": Roles(system="System", user="User", bot="Assistant"),
    # Raven (RWKV-4, Pile tokenizer) chat models were tuned on Bob/Alice transcripts.
    "raven": Roles(system="", user="Bob", bot="Alice"),
}


def roles_for(family: str, persona: Persona) -> Roles:
    base = DEFAULT_ROLES["raven" if family == "v4" else "world"]
    return Roles(
        system=persona.roles.get("system_role", base.system),
        user=persona.roles.get("user_role", base.user),
        bot=persona.roles.get("bot_role", base.bot),
    )


def _single_paragraph(text: str) -> str:
    """A blank line ends a turn in these formats, so blank lines inside a turn become single newlines."""
    return _BLANK_LINES.sub("\n", text.strip())


class PromptFormat:
    def __init__(self, tokenizer: Tokenizer, family: str, persona: Persona) -> None:
        self.tokenizer = tokenizer
        self.roles = roles_for(family, persona)
        self.persona = persona

    #: a blank line ends a turn in these formats
    separator = "\n\n"

    @property
    def stop_strings(self) -> list[str]:
        return [self.separator, f"\n{self.roles.user}:"]

    def separator_tokens(self) -> list[int]:
        return self.tokenizer.encode(self.separator)

    def system_text(self) -> str:
        prompt = _single_paragraph(self.persona.prompt)
        return f"{self.roles.system}: {prompt}\n\n" if self.roles.system else f"{prompt}\n\n"

    def system_tokens(self) -> list[int]:
        return self.tokenizer.encode(self.system_text())

    def user_turn_tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(f"{self.roles.user}: {_single_paragraph(text)}\n\n{self.roles.bot}:")

    def earlier_message_tokens(self, author: str, text: str) -> list[int]:
        """A message from before Raven joined the thread (adopted): a line of the transcript under its
        author's name, with no turn for the bot after it."""
        name = " ".join(author.split()) or "Someone"
        return self.tokenizer.encode(f"{name}: {_single_paragraph(text)}\n\n")

    def reply_tokens(self, reply: str) -> list[int]:
        """A reply's segment re-tokenized from its text: used only when the log lacks the token ids
        the model actually read (e.g. after a change of tokenizer)."""
        return self.tokenizer.encode(f" {_single_paragraph(reply)}\n\n")

    def clean_reply(self, raw: str) -> str:
        return _single_paragraph(raw)
