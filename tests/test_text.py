"""Cleaning of user text before it is stored or read by the model."""

from __future__ import annotations

import pytest

from bot.core.text import clean_text
from bot.errors import InputError


@pytest.mark.parametrize("raw", ["", "   ", "\n\n\t \r\n", "\x00\x1b\x7f", b"", b"  \n"])
def test_empty_or_blank_is_refused(raw: str | bytes) -> None:
    with pytest.raises(InputError, match="empty"):
        clean_text(raw, 100)


def test_over_the_limit_is_refused_naming_the_limit() -> None:
    assert clean_text("x" * 8000, 8000) == "x" * 8000
    with pytest.raises(InputError) as info:
        clean_text("x" * 8001, 8000)
    assert "8,001" in str(info.value) and "the limit is 8,000" in str(info.value)
    # The limit applies to the cleaned text: surrounding blanks and control characters do not count.
    assert clean_text("  " + "y" * 10 + "\x00\n ", 10) == "y" * 10


def test_control_characters_removed_newlines_and_tabs_kept() -> None:
    raw = "a\x00b\x1b[31mred\x1b[0m\x7f\x85\x9fc\n\td\x08e\x0bf\x0cg"
    assert clean_text(raw, 100) == "ab[31mred[0mc\n\tdefg"


def test_line_endings_are_normalised() -> None:
    assert clean_text("one\r\ntwo\rthree\nfour", 100) == "one\ntwo\nthree\nfour"
    assert "\r" not in clean_text("x\r\n\r\ny", 100)


def test_unicode_is_nfc_normalised() -> None:
    assert clean_text("cafe\u0301", 100) == "caf\u00e9"


def test_invalid_utf8_bytes_decode_with_replacement() -> None:
    assert clean_text(b"caf\xe9 ok \xff\xfe", 100) == "caf\ufffd ok \ufffd\ufffd"
    assert clean_text("naïve ✓".encode(), 100) == "naïve ✓"


def test_lone_surrogates_do_not_crash_and_are_encodable() -> None:
    cleaned = clean_text("a\ud800b\udfffc", 100)
    cleaned.encode("utf-8")  # would raise UnicodeEncodeError if a surrogate survived
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in cleaned)
    assert cleaned.startswith("a") and cleaned.endswith("c") and "b" in cleaned


def test_lone_surrogates_are_dropped() -> None:
    """bot/text.py says lone surrogates are dropped; a stray '?' in their place is not dropping."""
    assert clean_text("a\ud800b\udfffc", 100) == "abc"


def test_control_characters_a_model_writes_are_neither_shown_nor_stored() -> None:
    from bot.core.text import without_controls

    assert without_controls("a\x00b\x07c\td\ne\x1bf\x7fg\x85h\rj") == "abc\td\nefghj"
    assert without_controls("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
