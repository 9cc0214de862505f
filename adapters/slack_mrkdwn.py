"""Translate text between Slack and the core: the model's Markdown into Slack's mrkdwn, and Slack's
encoded message text back into plain text.

mrkdwn is not Markdown: ``*bold*``, ``_italic_``, ``~strike~``, ``<url|text>``; no headings, tables or
nested emphasis. Slack sends and expects ``&``, ``<`` and ``>`` encoded as ``&amp;``, ``&lt;``,
``&gt;`` everywhere in a message's text, code included (its clients decode them inside code blocks
too, and a bare ``<`` would start a control sequence such as ``<!channel>``). So escaping is applied to
every character the model wrote; only formatting is left alone inside code.
"""

from __future__ import annotations

import re

__all__ = ["escape", "from_slack", "to_mrkdwn", "unescape"]

_BOLD = "\x00"  # stands for a bold asterisk while italics are converted

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$")
_RULE = re.compile(r"^\s{0,3}([-*_])(?:\s*\1){2,}\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(.*)$")
_TASK = re.compile(r"^\[([ xX])\]\s+")
_QUOTE = re.compile(r"^(\s*)>\s?(.*)$")
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")

_INLINE = re.compile(
    r"(?P<code>(?P<ticks>`+)(?P<body>.+?)(?P=ticks))"
    r"|(?P<image>!\[(?P<alt>[^\]]*)\]\((?P<iurl>[^)\s]+)(?:\s+\"[^\"]*\")?\))"
    r"|(?P<link>\[(?P<label>[^\]]+)\]\((?P<url>[^)\s]+)(?:\s+\"[^\"]*\")?\))"
    r"|(?P<auto><(?P<aurl>(?:https?|mailto):[^>\s]+)>)"
)
_URL_SCHEME = re.compile(r"^(?:https?|mailto):", re.IGNORECASE)

_BOLD_ITALIC = re.compile(r"\*\*\*(?=\S)(.+?)(?<=\S)\*\*\*")
_BOLD_STARS = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_BOLD_UNDERSCORES = re.compile(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)")
_ITALIC_STAR = re.compile(r"(?<![\w*\\])\*(?=[^\s*])(.+?)(?<=[^\s*\\])\*(?![\w*])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")


def escape(text: str) -> str:
    """Encode Slack's three control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _emphasis(text: str) -> str:
    text = _BOLD_ITALIC.sub(lambda m: f"{_BOLD}_{m.group(1)}_{_BOLD}", text)
    text = _BOLD_STARS.sub(lambda m: f"{_BOLD}{m.group(1)}{_BOLD}", text)
    text = _BOLD_UNDERSCORES.sub(lambda m: f"{_BOLD}{m.group(1)}{_BOLD}", text)
    text = _ITALIC_STAR.sub(r"_\1_", text)
    text = _STRIKE.sub(r"~\1~", text)
    return text.replace(_BOLD, "*")


def _link(url: str, label: str) -> str:
    if not _URL_SCHEME.match(url):
        return f"{label} ({escape(url)})"
    label = label.replace("|", "¦")
    return f"<{escape(url)}|{label}>"


def _inline(text: str) -> str:
    """Convert one line outside code blocks: code spans stay as they are, links become ``<url|text>``."""
    out: list[str] = []
    position = 0
    for match in _INLINE.finditer(text):
        out.append(_emphasis(escape(text[position:match.start()])))
        if match.group("code"):
            out.append(match.group("ticks") + escape(match.group("body")) + match.group("ticks"))
        elif match.group("image"):
            alt = match.group("alt") or match.group("iurl")
            out.append(_link(match.group("iurl"), _emphasis(escape(alt))))
        elif match.group("link"):
            out.append(_link(match.group("url"), _emphasis(escape(match.group("label")))))
        else:
            url = match.group("aurl")
            out.append(f"<{escape(url)}>")
        position = match.end()
    out.append(_emphasis(escape(text[position:])))
    return "".join(out)


def _line(line: str) -> str:
    heading = _HEADING.match(line)
    if heading:
        title = re.sub(r"\*\*|__", "", heading.group(1)).strip()
        return f"*{_inline(title)}*" if title else ""
    if _RULE.match(line):
        return "──────────"
    bullet = _BULLET.match(line)
    if bullet:
        indent, rest = bullet.groups()
        task = _TASK.match(rest)
        marker = "•"
        if task:
            marker = "☐" if task.group(1) == " " else "☑"
            rest = rest[task.end():]
        return f"{indent}{marker} {_inline(rest)}"
    quote = _QUOTE.match(line)
    if quote:
        indent, rest = quote.groups()
        return f"{indent}> {_inline(rest)}"
    return _inline(line)


def _table(rows: list[str]) -> list[str]:
    """A Markdown table shows as a code block (Slack has no tables); anything else line by line."""
    if len(rows) >= 2 and _TABLE_RULE.match(rows[1]):
        return ["```", *(escape(row.strip()) for row in rows), "```"]
    return [_line(row) for row in rows]


def to_mrkdwn(markdown: str) -> str:
    """Convert the model's Markdown into mrkdwn. An unclosed code fence (a reply still streaming, or a
    model that forgot it) is closed so the block renders as code."""
    out: list[str] = []
    table: list[str] = []
    fence: str | None = None  # the opening fence while inside a code block
    for line in markdown.split("\n"):
        if fence is not None:
            closing = _FENCE.match(line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence) \
                    and not closing.group(2).strip():
                out.append("```")
                fence = None
            else:
                out.append(escape(line))
            continue
        opening = _FENCE.match(line)
        if opening and not (opening.group(1)[0] == "`" and "`" in opening.group(2)):
            out.extend(_table(table))
            table = []
            fence = opening.group(1)
            out.append("```")  # Slack shows an info string (```sql) as code text: drop it
            continue
        if _TABLE_ROW.match(line):
            table.append(line)
            continue
        out.extend(_table(table))
        table = []
        out.append(_line(line))
    out.extend(_table(table))
    if fence is not None:
        out.append("```")
    return "\n".join(out)


# --- Slack → core ----------------------------------------------------------------------------------
_SPECIAL = re.compile(r"<([^<>]+)>")


def from_slack(text: str, bot_user_id: str | None = None) -> str:
    """Slack's encoded message text as plain text for the core: the bot's own mention removed,
    other mentions, channels and links readable, entities decoded."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>[ \t]*[:,]?[ \t]*", "", text)

    def replace(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        if target.startswith("@"):
            return "@" + (label or target[1:])
        if target.startswith("#"):
            return "#" + (label or target[1:])
        if target.startswith("!"):
            return label or "@" + target[1:].split("^")[0]
        if label and target not in (label, "mailto:" + label):
            return f"{label} ({target})"
        return label or target

    return unescape(_SPECIAL.sub(replace, text)).strip()
