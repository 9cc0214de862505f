"""Cleaning of user text before it is stored or read by the model."""

from __future__ import annotations

import re
import unicodedata

from bot.errors import InputError

# C0/C1 control characters except tab and newline; also lone surrogates that cannot be encoded.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def without_controls(text: str) -> str:
    """What the model wrote, without control characters (a random or small model can emit any byte):
    shown and stored alike, so what a user sees is what the log keeps (a browser, for one, shows a
    NUL as U+FFFD). The model's own token ids are kept as they were."""
    return _CONTROL.sub("", text)


def clean_text(raw: str | bytes, max_chars: int) -> str:
    """Normalised text, or :class:`InputError` with a message fit for the user."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    text = raw.encode("utf-8", errors="ignore").decode("utf-8")  # drops lone surrogates
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text).strip()
    if not text:
        raise InputError("That message is empty — there is nothing to answer.", "empty")
    if len(text) > max_chars:
        raise InputError(
            f"That message is {len(text):,} characters long; the limit is {max_chars:,}. "
            "Please shorten it or split it up.",
            "too_long",
        )
    return text
