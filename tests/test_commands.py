"""The chat commands, parsed once in the core for every platform."""

from __future__ import annotations

import pytest

from bot.core.commands import COMMANDS, HELP_TEXT, Command, parse_command


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/advisor sql why?", Command("advisor", "sql", "why?")),
        ("/advisor SQL", Command("advisor", "sql", "")),
        ("/advisor", Command("advisor", "", "")),
        ("/advisor   ", Command("advisor", "", "")),
        ("/advisor  sql   why is it   slow?  ", Command("advisor", "sql", "why is it   slow?")),
        ("/advisor sql\nwhy is this slow?", Command("advisor", "sql", "why is this slow?")),
        ("/advisor sql\nline one\nline two", Command("advisor", "sql", "line one\nline two")),
        ("/ADVISOR Project plan the release", Command("advisor", "project", "plan the release")),
        ("/reset", Command("reset")),
        ("/reset please", Command("reset")),
        ("/Personas", Command("personas")),
        ("/help", Command("help")),
        ("   /help  ", Command("help")),
        ("\n\t/reset\n", Command("reset")),
        ("/unknown x", None),
        ("/", None),
        ("/ help", None),
        ("/helpme", None),
        ("hello /help", None),
        ("plain text", None),
        ("", None),
        ("   ", None),
        ("//reset", None),
    ],
)
def test_parse_command(text: str, expected: Command | None) -> None:
    assert parse_command(text) == expected


def test_help_text_mentions_every_command() -> None:
    assert COMMANDS == ("advisor", "reset", "personas", "help")
    for name in COMMANDS:
        assert f"/{name}" in HELP_TEXT
