"""Splitting long replies into platform-sized messages, and rendering a streamed reply as posted and
edited messages (the part Discord and Slack share)."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Iterable

import pytest

from adapters.streaming import CONTINUED, PLACEHOLDER, StreamRenderer
from adapters.text_split import FENCE, split_message

# --- split_message -------------------------------------------------------------------------------


def fence_lines(piece: str) -> list[str]:
    return [line.strip() for line in piece.split("\n") if line.strip().startswith(FENCE)]


def code_reply(length: int = 5000) -> str:
    code = "\n".join(f"    value_{i} = compute(item_{i}, factor={i})  # step {i}" for i in range(80))
    head = "Here is the fix for the loader:\n\n```python\ndef load(path):\n" + code + "\n    return value_0\n```\n\n"
    tail = "That should do it. " + "More explanation follows here. " * 40
    return (head + tail)[:length - 1] + "."


def test_short_text_is_unchanged() -> None:
    for text in ("", "hi", "a\n\nb", "x" * 2000, "```sql\nSELECT 1;\n```"):
        assert split_message(text, 2000) == [text]


def test_long_plain_text_splits_at_newlines() -> None:
    lines = [f"Line {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(300)]
    text = "\n".join(lines)
    pieces = split_message(text, 500)
    assert len(pieces) > 1
    assert all(len(piece) <= 500 for piece in pieces)
    # Every cut fell between lines: each piece is whole lines, and together they are the text.
    for piece in pieces:
        assert all(line in lines for line in piece.split("\n"))
    assert "\n".join(pieces) == text


def test_code_block_stays_balanced_across_pieces() -> None:
    text = code_reply()
    assert len(text) == 5000 and text.count("```python") == 1
    pieces = split_message(text, 2000)
    assert len(pieces) == 3
    assert all(len(piece) <= 2000 for piece in pieces)
    for piece in pieces:
        assert len(fence_lines(piece)) % 2 == 0, piece[:80]
    # The cut inside the code block closes it, and the next piece reopens it with the same opener.
    assert pieces[0].endswith("\n```") and pieces[1].startswith("```python\n")
    assert pieces[1].endswith("\n```") and pieces[2].startswith("```python\n")

    # Removing the added close/reopen fences gives back the original text exactly.
    restored = [pieces[0].removesuffix("\n```"),
                pieces[1].removeprefix("```python\n").removesuffix("\n```"),
                pieces[2].removeprefix("```python\n")]
    assert "\n".join(restored) == text


def test_fence_info_string_is_kept_when_reopening() -> None:
    text = "```sql\n" + "\n".join(f"SELECT {i} FROM t WHERE x = {i};" for i in range(200)) + "\n```"
    pieces = split_message(text, 300)
    assert len(pieces) > 2
    for piece in pieces:
        assert piece.startswith("```sql\n") and piece.endswith("\n```") and len(piece) <= 300
        assert len(fence_lines(piece)) == 2


def test_a_line_longer_than_the_limit_is_hard_cut() -> None:
    line = "".join(f"{i:05d}" for i in range(1000))  # 5,000 characters, no newline
    text = "intro\n" + line + "\noutro"
    pieces = split_message(text, 2000)
    assert [len(piece) for piece in pieces] == [1962, 1956, 1094]
    assert all(len(piece) <= 2000 for piece in pieces)
    # The cuts fell inside the long line, so the pieces simply concatenate back to the text.
    assert "".join(pieces) == text
    assert pieces[0].startswith("intro\n") and pieces[-1].endswith("\noutro")


@pytest.mark.parametrize("limit", [-5, 0, 1, 10, 37])
def test_limit_too_small(limit: int) -> None:
    with pytest.raises(ValueError, match="too small"):
        split_message("x" * 100, limit)


@pytest.mark.parametrize("limit", [38, 40, 44, 45, 60, 64])
def test_every_accepted_limit_keeps_the_text(limit: int) -> None:
    """A limit is either refused as too small, or the text comes back whole in pieces within it."""
    text = "x" * 100 + "\n" + "y" * 10
    try:
        pieces = split_message(text, limit)
    except ValueError as exc:
        assert "too small" in str(exc)
        return
    assert all(len(piece) <= limit for piece in pieces)
    assert "".join(pieces).replace("\n", "") == text.replace("\n", "")


# --- StreamRenderer ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def renderer_on(clock: FakeClock, rec: Recorder, **options: object) -> StreamRenderer[int]:
    """A renderer on the fake clock; where it can be given a sleep function, that sleep moves the fake
    clock too, so waiting out the edit interval costs no real time."""
    if "sleep" in StreamRenderer.__dataclass_fields__:
        options["sleep"] = clock.sleep
    return StreamRenderer(rec.post, rec.edit, clock=clock, **options)  # type: ignore[arg-type]


class Recorder:
    """post/edit coroutines that record (what, when, which message, text)."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float, int, str]] = []
        self.current: dict[int, str] = {}

    def _now(self) -> float:
        return self.clock() if self.clock is not None else time.monotonic()

    async def post(self, text: str) -> int:
        handle = len(self.current)
        self.current[handle] = text
        self.calls.append(("post", self._now(), handle, text))
        return handle

    async def edit(self, handle: int, text: str) -> None:
        assert handle in self.current, "edit of a message never posted"
        self.current[handle] = text
        self.calls.append(("edit", self._now(), handle, text))

    def times(self, handle: int) -> list[float]:
        return [when for _, when, h, _ in self.calls if h == handle]


async def fake_stream(parts: Iterable[str], clock: FakeClock, step: float) -> AsyncIterator[str]:
    for part in parts:
        clock.now += step
        yield part


WORDS = [f"word{i:03d} " if i % 9 else f"line{i:03d}\n" for i in range(400)]


async def test_edits_are_rate_limited_and_final_text_complete() -> None:
    clock = FakeClock()
    rec = Recorder(clock)
    renderer = renderer_on(clock, rec, limit=2000, min_interval_s=1.0)
    full = await renderer.render(fake_stream(WORDS[:150], clock, 0.05))
    assert full == "".join(WORDS[:150])
    assert len(rec.current) == 1 and renderer.messages == [0]
    assert rec.current[0] == full.rstrip("\n")  # the last edit shows all of it, without the placeholder
    times = rec.times(0)
    assert len(times) >= 5  # it streamed: posted early, edited several times
    assert rec.calls[0][0] == "post" and rec.calls[0][1] == pytest.approx(100.05)
    intermediate = times[:-1]  # every edit while streaming
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(intermediate))
    # While streaming, the message says it is not finished yet.
    assert all(text.endswith(PLACEHOLDER) for kind, _, _, text in rec.calls[:-1])
    assert not rec.calls[-1][3].endswith(PLACEHOLDER)


async def test_final_edit_also_respects_the_interval() -> None:
    """DISCORD_EDIT_INTERVAL_S / SLACK_UPDATE_INTERVAL_S are "seconds between edits of a streamed
    message": the closing edit must not land right after the previous one (real clock)."""
    rec = Recorder()
    renderer: StreamRenderer[int] = StreamRenderer(rec.post, rec.edit, limit=2000, min_interval_s=0.25)

    async def stream() -> AsyncIterator[str]:
        yield "first"  # posted at once
        await asyncio.sleep(0.3)
        yield " second"  # edited: 0.3 s since the post
        yield " third"  # too soon for an edit; the stream ends right after it

    assert await renderer.render(stream()) == "first second third"
    assert rec.current[0] == "first second third"
    times = rec.times(0)
    assert len(times) == 3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.25
    assert gaps[1] >= 0.25 * 0.95, gaps


async def test_long_stream_continues_in_new_messages() -> None:
    clock = FakeClock()
    rec = Recorder(clock)
    renderer = renderer_on(clock, rec, limit=300, min_interval_s=1.0)
    full = await renderer.render(fake_stream(WORDS, clock, 0.2))
    assert full == "".join(WORDS)
    assert len(rec.current) >= 10 and renderer.messages == list(range(len(rec.current)))
    assert [c[2] for c in rec.calls if c[0] == "post"] == list(range(len(rec.current)))  # in order
    final = [rec.current[h] for h in renderer.messages]
    assert all(len(text) <= 300 for text in final)
    assert "\n".join(final) == full.rstrip("\n")
    assert not any(text.endswith(PLACEHOLDER) for text in final)
    for handle in renderer.messages:
        times = rec.times(handle)[:-1]
        assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))


async def test_nothing_sent_is_ever_over_the_limit() -> None:
    """Discord refuses a message over 2,000 characters outright; the "still writing" mark must fit too."""
    clock = FakeClock()
    rec = Recorder(clock)
    renderer = renderer_on(clock, rec, limit=100, min_interval_s=1.0)
    parts = ["a" * 50, "b" * 49, "\n", "c" * 30, "\n", "d" * 60]  # 99, 100, ... characters shown mid-stream
    await renderer.render(fake_stream(parts, clock, 1.0))
    too_long = [(kind, len(text)) for kind, _, _, text in rec.calls if len(text) > 100]
    assert too_long == []


async def test_transform_is_applied_to_what_is_shown() -> None:
    clock = FakeClock()
    rec = Recorder(clock)
    renderer = renderer_on(
        clock, rec, limit=2000, min_interval_s=1.0,
        transform=lambda text: re.sub(r"\*\*(.+?)\*\*", r"*\1*", text).upper(),
    )
    full = await renderer.render(fake_stream(["some **bold**", " text", " here"], clock, 2.0))
    assert full == "some **bold** text here"  # the returned text is the raw reply
    assert rec.current[0] == "SOME *BOLD* TEXT HERE"
    assert all("**" not in text and text == text.upper() for _, _, _, text in rec.calls)


async def test_empty_stream_says_no_reply() -> None:
    clock = FakeClock()
    rec = Recorder(clock)
    renderer = renderer_on(clock, rec, limit=2000)

    async def nothing() -> AsyncIterator[str]:
        return
        yield ""  # pragma: no cover

    assert await renderer.render(nothing()) == ""
    assert [c[0] for c in rec.calls] == ["post"] and rec.current == {0: "(no reply)"}


async def test_a_reply_that_fills_its_message_exactly_leaves_no_unfinished_message() -> None:
    """Mid-stream the "still writing" mark pushed 99 characters over a 100-character limit, into a
    second message; the final text (100 characters) must still end both messages cleanly."""
    clock = FakeClock()
    rec = Recorder(clock)
    renderer = renderer_on(clock, rec, limit=100, min_interval_s=1.0)
    parts = ["word " * 10, "word " * 9 + "word", "s"]  # 50, then 99 (+ mark: 2 messages), then 100
    full = await renderer.render(fake_stream(parts, clock, 1.0))
    assert len(full) == 100 and len(rec.current) == 2
    final = [rec.current[h] for h in renderer.messages]
    assert not any(text.endswith(PLACEHOLDER) for text in final), final
    assert "".join(final).replace(" ", "") == full.replace(" ", "")


async def test_messages_a_shorter_final_rendering_no_longer_needs_say_so() -> None:
    clock = FakeClock()
    rec = Recorder(clock)
    # A transform that is not monotone: once the reply ends with "END", it collapses to a short form.
    renderer = renderer_on(clock, rec, limit=100, min_interval_s=1.0,
                           transform=lambda text: "short END" if text.endswith("END") else text)
    await renderer.render(fake_stream(["a" * 90, "\n" + "b" * 60, "END"], clock, 1.0))
    final = [rec.current[h] for h in renderer.messages]
    assert final == ["short END", CONTINUED]
