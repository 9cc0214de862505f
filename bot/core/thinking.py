"""Hide a leading ``<think>…</think>`` block that newer RWKV G-series models may emit."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def strip_thinking(text: str) -> str:
    stripped = text.lstrip()
    if not stripped.startswith(OPEN):
        return text
    end = stripped.find(CLOSE)
    return "" if end < 0 else stripped[end + len(CLOSE):].lstrip()


class ThinkingFilter:
    """Streams a reply with its leading think block removed (unless ``show``)."""

    def __init__(self, show: bool = False) -> None:
        self.show = show
        self._seen = ""
        self._shown = 0

    def feed(self, chunk: str) -> str:
        self._seen += chunk
        if self.show:
            return chunk
        stripped = self._seen.lstrip()
        if OPEN.startswith(stripped[: len(OPEN)]) and len(stripped) < len(OPEN):
            return ""  # could still become "<think>"
        visible = strip_thinking(self._seen) if stripped.startswith(OPEN) else self._seen
        if stripped.startswith(OPEN) and CLOSE not in stripped:
            return ""
        # ``visible`` is a suffix of everything seen so far; emit what has not been emitted.
        new = visible[self._shown:] if len(visible) >= self._shown else ""
        self._shown = len(visible)
        return new
