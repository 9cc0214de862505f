"""Markdown → mrkdwn and Slack text → plain text, table-driven."""

from __future__ import annotations

import pytest

from adapters.slack_bot import split_advisor
from adapters.slack_mrkdwn import escape, from_slack, to_mrkdwn, unescape

MRKDWN_CASES = [
    ("plain text", "plain text"),
    ("**bold**", "*bold*"),
    ("__bold__", "*bold*"),
    ("*italic* and _italic_", "_italic_ and _italic_"),
    ("***both***", "*_both_*"),
    ("~~gone~~", "~gone~"),
    ("a **bold** and *it* mix", "a *bold* and _it_ mix"),
    ("2 * 3 * 4 stays", "2 * 3 * 4 stays"),
    ("snake_case_name stays", "snake_case_name stays"),
    ("[docs](https://example.com/a?x=1&y=2)", "<https://example.com/a?x=1&amp;y=2|docs>"),
    ("[**bold** link](https://e.com)", "<https://e.com|*bold* link>"),
    ("[relative](docs/x.md)", "relative (docs/x.md)"),
    ("![chart](https://e.com/c.png)", "<https://e.com/c.png|chart>"),
    ("<https://e.com>", "<https://e.com>"),
    ("# Title", "*Title*"),
    ("### **Sub** title ###", "*Sub title*"),
    ("- one\n* two\n+ three", "• one\n• two\n• three"),
    ("- a\n  - nested *x*", "• a\n  • nested _x_"),
    ("- [ ] todo\n- [x] done", "☐ todo\n☑ done"),
    ("1. first\n2. second", "1. first\n2. second"),
    ("> quoted **b**", "> quoted *b*"),
    ("---", "──────────"),
    ("a < b && c > d", "a &lt; b &amp;&amp; c &gt; d"),
    ("<!channel> hi <@U1>", "&lt;!channel&gt; hi &lt;@U1&gt;"),
    ("use `**x** < y` here", "use `**x** &lt; y` here"),
    ("```sql\nSELECT * FROM t WHERE a < 1;\n**not bold**\n```",
     "```\nSELECT * FROM t WHERE a &lt; 1;\n**not bold**\n```"),
    ("~~~\n# not a heading\n~~~", "```\n# not a heading\n```"),
    ("```python\nunclosed = 1", "```\nunclosed = 1\n```"),
    ("| a | b |\n|---|---|\n| 1 | 2 |", "```\n| a | b |\n|---|---|\n| 1 | 2 |\n```"),
    ("| not | a table |", "| not | a table |"),
    ("text\n\n```\ncode\n```\nafter **b**", "text\n\n```\ncode\n```\nafter *b*"),
]


@pytest.mark.parametrize(("markdown", "expected"), MRKDWN_CASES)
def test_markdown_to_mrkdwn(markdown: str, expected: str) -> None:
    assert to_mrkdwn(markdown) == expected


def test_every_control_character_is_escaped_outside_links() -> None:
    text = "x < y\n```\n<script>\n```\n`<b>` & [t](https://a.b)"
    converted = to_mrkdwn(text)
    without_link = converted.replace("<https://a.b|t>", "")
    assert "<" not in without_link and ">" not in without_link
    assert unescape(without_link).count("<") == 3


FROM_SLACK_CASES = [
    ("<@UBOT> hello", "hello"),
    ("<@UBOT>: hello", "hello"),
    ("hi <@UBOT|raven> there", "hi there"),
    ("ask <@U2|bob> and <@U3>", "ask @bob and @U3"),
    ("in <#C1|general> or <#C2>", "in #general or #C2"),
    ("<!here> <!subteam^S1|@devs> <!channel>", "@here @devs @channel"),
    ("see <https://e.com|the docs> or <https://e.com>", "see the docs (https://e.com) or https://e.com"),
    ("<mailto:a@b.c|a@b.c>", "a@b.c"),
    ("a &lt; b &amp;&amp; c &gt; d", "a < b && c > d"),
    ("```\nx &lt;&gt; y\n```", "```\nx <> y\n```"),
]


@pytest.mark.parametrize(("slack", "expected"), FROM_SLACK_CASES)
def test_from_slack(slack: str, expected: str) -> None:
    assert from_slack(slack, "UBOT") == expected


def test_escape_round_trip() -> None:
    text = "a & b <c> &amp;"
    assert unescape(escape(text)) == text


def test_split_advisor() -> None:
    assert split_advisor(" SQL  why is it slow? ") == ("sql", "why is it slow?")
    assert split_advisor("") == ("", "")
