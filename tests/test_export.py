"""``raven export`` round trip: threads written through the real store (as the service writes them),
exported by the real console script, parsed back, and compared value by value with the log."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from bot.events import ThreadKey
from bot.storage import SQLiteStore, StoredMessage

RAVEN = str(Path(sys.executable).parent / "raven")
WEB = ThreadKey("web", "alice/42")
SLACK = ThreadKey("slack", "C1:1700000000.000100")
TERMINAL = ThreadKey("terminal", "default")
TRICKY = 'a "quoted", comma\nsecond line\r\nwith CRLF; 你好 🙂 \\ back\tslash'


def raven(*args: str, db: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    env["RAVEN_DATABASE"] = str(db)
    return subprocess.run([RAVEN, *args], env=env, cwd=cwd, capture_output=True, text=True, encoding="utf-8",
                          timeout=60)


async def write_threads(db: Path) -> dict[ThreadKey, list[StoredMessage]]:
    """Three platforms' threads: answered turns, a notice, a failed message, a persona switch."""
    async with SQLiteStore(db) as store:
        for key, persona in ((WEB, "sql"), (SLACK, "default"), (TERMINAL, "project")):
            accepted = await store.accept(key, persona, f"first question in {key}", author="alice",
                                          platform_message_id="1700000000.000100" if key == SLACK else None)
            await store.finish_turn(key, accepted.message.id, f"answer in {key}", None, turn_id=accepted.turn_id)
        second = await store.accept(WEB, "sql", TRICKY, author="Ålice O'Brien")
        await store.finish_turn(WEB, second.message.id, "```sql\nSELECT 1;\n```", None, turn_id=second.turn_id)
        await store.add_message(SLACK, "notice", "Raven is busy right now")
        failed = await store.accept(SLACK, "default", "this one failed", author="bob")
        assert failed.turn_id is not None
        await store.end_turn(failed.turn_id, "failed", "error")
        await store.restart_thread(TERMINAL, "sql")
        await store.add_message(TERMINAL, "user", "after the switch", author="carol", status="done")
        return {key: await store.messages(key) for key in (WEB, SLACK, TERMINAL)}


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, dict[ThreadKey, list[StoredMessage]]]:
    db = tmp_path / "data" / "raven.db"
    return db, asyncio.run(write_threads(db))


def expected_rows(messages: dict[ThreadKey, list[StoredMessage]], keys: list[ThreadKey]) -> list[dict[str, Any]]:
    """The rows of ``keys``' threads in that order, each thread's messages oldest first."""
    persona = {WEB: "sql", SLACK: "default", TERMINAL: "sql"}  # the thread's persona now
    return [{"thread": str(key), "persona": persona[key], "epoch": m.epoch, "message_id": m.id,
             "platform_message_id": m.platform_message_id, "role": m.role, "author": m.author, "text": m.text,
             "status": m.status, "created_at": m.created_at}
            for key in keys for m in messages[key]]


def parsed_time(row: dict[str, Any]) -> dict[str, Any]:
    stamp = datetime.fromisoformat(row["created_at"])
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    return {**row, "created_at": stamp.timestamp()}


def same(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [{**r, "created_at": None} for r in rows] == [{**e, "created_at": None} for e in expected]
    for got, want in zip(rows, expected, strict=True):
        assert got["created_at"] == pytest.approx(want["created_at"], abs=1e-6)


def test_jsonl_of_every_thread_round_trips(tmp_path: Path, log: tuple[Path, dict[ThreadKey, list[StoredMessage]]]
                                           ) -> None:
    db, messages = log
    result = raven("export", "--format", "jsonl", db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [parsed_time(json.loads(line)) for line in result.stdout.splitlines()]
    same(rows, expected_rows(messages, sorted([WEB, SLACK, TERMINAL], key=str)))  # every thread, in key order
    assert len(rows) == 11 and result.stderr.strip() == "exported 11 messages"
    tricky = next(r for r in rows if r["author"] == "Ålice O'Brien")
    assert tricky["text"] == TRICKY and tricky["status"] == "answered"
    assert {(r["role"], r["status"]) for r in rows} >= {("notice", "done"), ("user", "failed")}
    assert [r["epoch"] for r in rows if r["thread"] == str(TERMINAL)] == [0, 0, 1]


def test_csv_of_one_thread_to_a_file_round_trips(tmp_path: Path,
                                                  log: tuple[Path, dict[ThreadKey, list[StoredMessage]]]) -> None:
    db, messages = log
    out = tmp_path / "export" / "web.csv"
    out.parent.mkdir()
    result = raven("export", "--thread", str(WEB), "--thread", str(SLACK), "--format", "csv", "--output", str(out),
                   db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and f"to {out}" in result.stderr
    with out.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["thread", "persona", "epoch", "message_id", "platform_message_id", "role",
                                     "author", "text", "status", "created_at"]
        rows = [parsed_time({**r, "epoch": int(r["epoch"]), "message_id": int(r["message_id"]),
                             "platform_message_id": r["platform_message_id"] or None}) for r in reader]
    same(rows, expected_rows(messages, [WEB, SLACK]))  # the threads asked for, in that order
    assert sorted(p.name for p in out.parent.iterdir()) == ["web.csv"]  # no partial file left


def test_an_unknown_thread_or_format_is_refused(tmp_path: Path,
                                                log: tuple[Path, dict[ThreadKey, list[StoredMessage]]]) -> None:
    db, _ = log
    out = tmp_path / "out.jsonl"
    unknown = raven("export", "--thread", str(WEB), "--thread", "web:nobody/1", "--output", str(out), db=db,
                    cwd=tmp_path)
    assert unknown.returncode == 1 and "no such thread: web:nobody/1" in unknown.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert raven("export", "--thread", "no-colon", db=db, cwd=tmp_path).returncode == 2
    bad = raven("export", "--format", "xml", db=db, cwd=tmp_path)
    assert bad.returncode == 2 and "--format must be jsonl or csv" in bad.stderr
    missing = raven("export", db=tmp_path / "none.db", cwd=tmp_path)
    assert missing.returncode == 1 and "no database at" in missing.stderr
    assert not (tmp_path / "none.db").exists()
