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
        ("/retry", Command("retry")),
        ("/continue", Command("continue")),
        ("/stop", Command("stop")),
        ("/fork", Command("fork")),
        ("/forget", Command("forget")),
        ("/forget confirm", Command("forget", "confirm")),
        ("/forget everything", Command("forget")),  # not confirmed: asks again
        ("++", Command("retry")),
        ("  +++ ", Command("continue")),
        ("+reset", Command("reset")),
        ("+RESET", Command("reset")),
        ("++ more please", None),
        ("++++", None),
        ("+", None),
        ("c++ is hard", None),
        ("/summary", Command("summary")),
        ("+gen Once upon a time", Command("gen", rest="Once upon a time")),
        ("+i translate this\ninto French", Command("instruct", rest="translate this\ninto French")),
        ("+QA what is an index?", Command("qa", rest="what is an index?")),
        ("+qa", Command("qa")),
        ("+general question", None),
        ("/gen text", None),  # the one-shot modes have only ChatRWKV's form
    ],
)
def test_parse_command(text: str, expected: Command | None) -> None:
    assert parse_command(text) == expected


def test_help_text_mentions_every_command() -> None:
    assert COMMANDS == ("advisor", "reset", "personas", "help", "retry", "continue", "stop", "fork", "forget",
                        "summary")
    for word in ("+gen", "+i", "+qa", "++", "+++"):
        assert f"`{word}" in HELP_TEXT
    for name in COMMANDS:
        assert f"/{name}" in HELP_TEXT


PERSONAS = {"default", "sql", "project"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the words after a mention: a command word counts only with its own argument
        ("advisor sql why is my join slow?", Command("advisor", "sql", "why is my join slow?")),
        ("Advisor SQL", Command("advisor", "sql", "")),
        ("advisor", Command("advisor", "", "")),
        ("advisor: sql", Command("advisor", "sql", "")),
        ("advisor sql, why?", Command("advisor", "sql", "why?")),
        ("advisor me on this schema", None),  # "me" is not a persona
        ("Reset", Command("reset")),
        ("reset!", Command("reset")),
        ("personas?", Command("personas")),
        ("help", Command("help")),
        ("help me with this join", None),
        ("reset the counter please", None),
        ("resetting the router?", None),
        ("what does advisor mean", None),
        ("helpful", None),
        # the slash form stays a command after a mention too
        ("/reset please", Command("reset")),
        ("/advisor nope", Command("advisor", "nope", "")),
        ("retry", Command("retry")),
        ("stop!", Command("stop")),
        ("stop doing that", None),
        ("forget confirm", Command("forget", "confirm")),
        ("forget it", None),
        ("continue", Command("continue")),
        ("continue with the index question", None),
        ("++", Command("retry")),
    ],
)
def test_parse_addressed_text(text: str, expected: Command | None) -> None:
    assert parse_command(text, addressed=True, personas=PERSONAS) == expected


def test_unaddressed_text_needs_the_slash() -> None:
    assert parse_command("reset", personas=PERSONAS) is None
    assert parse_command("help me", personas=PERSONAS) is None
    assert parse_command("/help", personas=PERSONAS) == Command("help")
