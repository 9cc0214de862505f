"""Split a long reply into platform-sized messages at line boundaries, keeping code fences balanced.

A message cut inside a fenced code block is closed with a fence and the next one reopens it with the
same info string, so every message renders on its own.
"""

from __future__ import annotations

FENCE = "```"
MIN_LIMIT = 64


def fence_state(text: str) -> str | None:
    """The fence opener still open at the end of ``text`` (e.g. ```` ```sql ````), or None."""
    open_fence: str | None = None
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith(FENCE):
            open_fence = None if open_fence is not None else stripped
    return open_fence


def _hard_cut(line: str, limit: int) -> list[str]:
    return [line[i:i + limit] for i in range(0, len(line), limit)] or [""]


def split_message(text: str, limit: int) -> list[str]:
    """Pieces of at most ``limit`` characters, split at newlines where possible."""
    if limit < MIN_LIMIT:
        raise ValueError(f"limit too small to split with code fences (at least {MIN_LIMIT})")
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    current = ""
    budget = limit - len(FENCE) - 1  # room to close a fence at the end of a piece
    # A line longer than a piece is hard-cut, leaving room for a reopened fence line before it.
    width = budget - min(40, budget // 2)
    lines = text.split("\n")
    for index, line in enumerate(lines):
        addition = line if index == len(lines) - 1 else line + "\n"
        for part in (_hard_cut(addition, width) if len(addition) > width else [addition]):
            if current and len(current) + len(part) > budget:
                fence_now = fence_state(current)
                body = current.rstrip("\n")
                if fence_now is not None:
                    body += "\n" + FENCE
                pieces.append(body)
                current = (fence_now + "\n") if fence_now is not None else ""
            current += part
    if current.strip():
        pieces.append(current.rstrip("\n"))
    return pieces
