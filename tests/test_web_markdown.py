"""Replies rendered as Markdown and sanitised: what must render, and hostile input that must not run."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from adapters.web_markdown import render


def test_markdown_renders_headings_lists_tables_links_and_code() -> None:
    html = render(
        "# Plan\n- one\n- two\n1. first\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
        "See [docs](https://example.org/x) and `code`.\n```sql\nSELECT 1 < 2;\n```\n**bold** _it_"
    )
    assert "<h1>Plan</h1>" in html
    assert "<ul>\n<li>one</li>\n<li>two</li>\n</ul>" in html and "<ol>" in html
    assert "<table>" in html and "<th>a</th>" in html and "<td>2</td>" in html
    link = re.search(r"<a [^>]*>docs</a>", html)
    assert link is not None
    assert 'href="https://example.org/x"' in link[0] and 'rel="noopener noreferrer nofollow"' in link[0]
    assert 'target="_blank"' in link[0]
    assert "<code>code</code>" in html and "<pre><code>SELECT 1 &lt; 2;\n</code></pre>" in html
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert render("line one\nline two") == "<p>line one<br>\nline two</p>\n"


HOSTILE = [
    "<script>window.__pwned = 1</script>",
    "<img src=x onerror=\"window.__pwned = 1\">",
    "[click](javascript:window.__pwned=1)",
    "[click](JaVaScRiPt:window.__pwned=1)",
    "[click](  javascript:window.__pwned=1 )",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "![img](https://tracker.example/pixel.png)",
    '<a href="javascript:window.__pwned=1">raw</a>',
    "<svg onload=window.__pwned=1></svg>",
    '<iframe src="https://evil.example"></iframe>',
    "<style>body{display:none}</style>",
    '[x](https://ok.example "t" onmouseover=window.__pwned=1)',
    "`<script>window.__pwned=1</script>`",
    "```html\n<script>window.__pwned=1</script>\n```",
    "<details open ontoggle=window.__pwned=1>",
    "[x](vbscript:msgbox)",
    '<div style="background:url(javascript:window.__pwned=1)">',
]


class Elements(HTMLParser):
    """Every element and attribute the browser would build from the HTML."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, attrs))


SAFE_TAGS = {"p", "br", "code", "pre", "a", "em", "strong"}


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_markdown_cannot_run(text: str) -> None:
    html = render(text)
    for tag, attrs in Elements(html).found:
        assert tag in SAFE_TAGS, (tag, html)
        for name, value in attrs:
            assert not name.startswith("on") and name != "style", (name, html)
            if name == "href":
                assert value is not None and re.match(r"(https?|mailto):", value), (value, html)
        if tag == "a":
            assert ("rel", "noopener noreferrer nofollow") in attrs
    assert "tracker.example" not in html  # an image would be a request to elsewhere
