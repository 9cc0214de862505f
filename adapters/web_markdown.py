"""Replies as HTML for the web page: Markdown rendered by markdown-it-py, then cleaned by nh3
(Rust's ammonia) against an allow-list, so nothing a reply says can run in the page: no script or
style elements, no event-handler attributes, no ``javascript:`` or ``data:`` links, no raw HTML.

Done on the server so the page needs no Markdown library of its own, and so an API client gets
the same HTML the page shows.
"""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt

# Raw HTML in a reply is shown as text; single line breaks stay line breaks (the log folds blank lines).
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(["table", "strikethrough"])

_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "s", "del", "code", "pre",
    "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
}
# No style attributes: the page's Content-Security-Policy would refuse them anyway.
_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}}


def render(text: str) -> str:
    """Sanitised HTML for ``text`` (Markdown). Images become nothing: the page loads nothing from
    elsewhere."""
    return nh3.clean(
        _MARKDOWN.render(text),
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )
