"""Files attached to a message, read into it as text.

Only text-like files are read (by name: the suffixes below), each up to a size limit and only when
they decode as UTF-8; every other file gets a one-line note saying it was not read and why, so the
model — and the log — know it was there. The note and the file's text become part of the stored
message, so a rebuild from the log reads exactly what the model read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

from bot.core.text import clean_text
from bot.errors import InputError
from bot.events import Attachment

READABLE_SUFFIXES = frozenset({
    ".txt", ".md", ".markdown", ".rst", ".sql", ".py", ".json", ".jsonl", ".csv", ".tsv", ".log", ".yaml",
    ".yml", ".toml", ".ini", ".cfg", ".conf", ".xml", ".html", ".css", ".js", ".ts", ".tsx", ".jsx", ".sh",
    ".go", ".rs", ".java", ".kt", ".c", ".h", ".cpp", ".hpp", ".cs", ".rb", ".php", ".swift", ".r", ".diff",
    ".patch",
})
"""Suffixes read as text. Anything else (images, archives, PDFs, office files…) is noted, not read."""


def _suffix(name: str) -> str:
    return PurePosixPath(name.lower()).suffix


def wanted(name: str, size: int, max_bytes: int) -> bool:
    """Whether an adapter should fetch the file's bytes: the core will read it only if this holds."""
    return _suffix(name) in READABLE_SUFFIXES and 0 <= size <= max_bytes


def _safe_name(name: str) -> str:
    """The file's own name only (no path), cleaned, for the label the model reads."""
    base = PurePosixPath(name.replace("\\", "/")).name or "file"
    try:
        return clean_text(base, 200).replace("\n", " ")
    except InputError:
        return "file"


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks inside the text, so the file cannot close it."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def render(attachments: Sequence[Attachment], max_bytes: int, max_files: int) -> str:
    """The attachments as text to append to the message ("" when there are none)."""
    parts: list[str] = []
    for index, attachment in enumerate(attachments):
        name = _safe_name(attachment.name)
        reason = _not_read(attachment, index, max_bytes, max_files)
        if reason is not None:
            parts.append(f"[Attached file {name}: not read — {reason}]")
            continue
        assert attachment.content is not None
        text = attachment.content.decode("utf-8").removeprefix("\ufeff")
        text = clean_text(text, max_bytes + 1) if text.strip() else ""
        fence = _fence(text)
        parts.append(f"[Attached file {name}]\n{fence}\n{text}\n{fence}")
    return "\n\n".join(parts)


def _not_read(attachment: Attachment, index: int, max_bytes: int, max_files: int) -> str | None:
    if index >= max_files:
        return f"only {max_files} files are read from one message"
    if _suffix(attachment.name) not in READABLE_SUFFIXES:
        return "not a text file Raven reads"
    if attachment.size > max_bytes or (attachment.content is not None and len(attachment.content) > max_bytes):
        return f"{attachment.size:,} bytes, over the {max_bytes:,}-byte limit"
    if attachment.content is None:
        return "it could not be fetched"
    if b"\x00" in attachment.content:
        return "it looks binary"
    try:
        attachment.content.decode("utf-8")
    except UnicodeDecodeError:
        return "it is not UTF-8 text"
    return None
