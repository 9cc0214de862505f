"""The ``raven`` console script as a user runs it: help, the persona list, and the terminal chat
driven through stdin in a real subprocess (real model loader, real SQLite file)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

RAVEN = str(Path(sys.executable).parent / "raven")
PERSONA_LINES = ["- `default` — General assistant", "- `project` — Project advisor", "- `sql` — SQL advisor"]


def run_raven(*args: str, cwd: Path, stdin: str = "", timeout: float = 120,
              **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    clean.update(env)
    return subprocess.run([RAVEN, *args], input=stdin, env=clean, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def chat_env(tmp_path: Path, tiny_v7_path: Path) -> dict[str, str]:
    return {"RAVEN_MODEL": str(tiny_v7_path), "RAVEN_DATA_DIR": str(tmp_path / "data"), "RAVEN_SEED": "1",
            "RAVEN_MAX_REPLY_TOKENS": "20"}


def rows(db: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run_raven("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("run", "chat", "web", "personas", "make-model", "convert", "bench"):
        assert f" {command} " in result.stdout
    chat = run_raven("chat", "--help", cwd=tmp_path)
    assert chat.returncode == 0 and "--thread" in chat.stdout and "--persona" in chat.stdout


def test_personas_command_lists_the_builtins(tmp_path: Path) -> None:
    result = run_raven("personas", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["default", "project", "sql"]
    assert "SQL advisor — Reviews queries" in lines[2]


def without_notice(printed: str) -> str:
    return re.sub(r"\s*\[reply cut off[^\]]*\]\s*$", "", printed)


def test_chat_through_stdin_and_resume(tmp_path: Path, chat_env: dict[str, str]) -> None:
    first = run_raven("chat", "--thread", "t1", cwd=tmp_path, stdin="hello\n/personas\n", **chat_env)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert out.endswith("\n")
    reply_1, sep, persona_list = out.partition("Personas:\n")
    assert sep, out
    assert reply_1.strip(), "no reply to 'hello'"
    assert persona_list.splitlines() == [
        line for line in persona_list.splitlines() if line.startswith(tuple(PERSONA_LINES))]
    assert len(persona_list.splitlines()) == 3
    assert "DEMO" not in first.stderr  # a configured model is no demo

    second = run_raven("chat", "--thread", "t1", cwd=tmp_path, stdin="again\n", **chat_env)
    assert second.returncode == 0, second.stderr
    reply_2 = second.stdout
    assert reply_2.strip() and reply_2.endswith("\n")

    db = tmp_path / "data" / "raven.db"
    assert rows(db, "SELECT key, persona, epoch FROM threads") == [("terminal:t1", "default", 0)]
    log = rows(db, "SELECT id, role, text, status, epoch FROM messages WHERE thread_key = ? ORDER BY id",
               ("terminal:t1",))
    assert [(role, status, epoch) for _, role, _, status, epoch in log] == [
        ("user", "answered", 0), ("assistant", "done", 0), ("user", "done", 0),
        ("user", "answered", 0), ("assistant", "done", 0)]
    # /personas is kept as written, as a command (status done), not a message the model read
    assert [log[0][2], log[2][2], log[3][2]] == ["hello", "/personas", "again"]
    # What was printed is what was stored (the log keeps the reply as one paragraph); a notice such
    # as "[reply cut off at the 20-token limit]" is printed apart, in brackets, and not stored.
    assert squash(log[1][2]) == squash(without_notice(reply_1))
    assert squash(log[4][2]) == squash(without_notice(reply_2))
    # The state saved after the second turn follows its reply (the current slot); the other slot keeps
    # the one from before it, after the first reply.
    assert rows(db, "SELECT s.thread_key, s.epoch, s.last_message_id, s.slot = t.state_slot FROM states s "
                    "JOIN threads t ON t.key = s.thread_key ORDER BY s.last_message_id") == [
        ("terminal:t1", 0, log[1][0], 0), ("terminal:t1", 0, log[4][0], 1)]
    # Every turn was delivered (printed), and owned by the process that answered it.
    assert rows(db, "SELECT phase FROM turns ORDER BY id") == [("delivered",), ("delivered",)]


def test_persona_option_switches_the_thread(tmp_path: Path, chat_env: dict[str, str]) -> None:
    result = run_raven("chat", "--thread", "t2", "--persona", "sql", cwd=tmp_path, stdin="why?\n", **chat_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Now talking with **SQL advisor**")
    db = tmp_path / "data" / "raven.db"
    assert rows(db, "SELECT key, persona, epoch FROM threads") == [("terminal:t2", "sql", 1)]
    log = rows(db, "SELECT role, text, epoch FROM messages ORDER BY id")
    assert [(role, epoch) for role, _, epoch in log] == [("user", 0), ("user", 1), ("assistant", 1)]
    assert [log[0][1], log[1][1]] == ["/advisor sql", "why?"]


def test_demo_model_when_none_is_configured(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = run_raven("chat", cwd=tmp_path, stdin="", RAVEN_DATA_DIR=str(data))
    assert result.returncode == 0, result.stderr
    assert "Raven is running the DEMO model" in result.stderr
    assert "DEMO" not in result.stdout
    assert (data / "demo-rwkv7-tiny.pth").is_file()
    assert not list(data.glob("*.partial"))


def test_missing_model_file_fails_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "absent.pth"
    result = run_raven("chat", cwd=tmp_path, stdin="hello\n", RAVEN_MODEL=str(missing),
                       RAVEN_DATA_DIR=str(tmp_path / "data"))
    assert result.returncode != 0
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "demo-rwkv7-tiny.pth").exists()


def test_fork_in_the_terminal_continues_in_a_copy_of_the_thread(tmp_path: Path, chat_env: dict[str, str]) -> None:
    result = run_raven("chat", "--thread", "t5", cwd=tmp_path, stdin="hello\n/fork\nnext question\n", **chat_env)
    assert result.returncode == 0, result.stderr
    assert "[forked: now in thread 't5-fork-1'; `raven chat --thread t5` goes back to 't5']" in result.stdout
    db = tmp_path / "data" / "raven.db"
    original = rows(db, "SELECT role, text FROM messages WHERE thread_key = 'terminal:t5' ORDER BY id")
    forked = rows(db, "SELECT role, text FROM messages WHERE thread_key = 'terminal:t5-fork-1' ORDER BY id")
    assert [role for role, _ in original] == ["user", "assistant"]  # the original stays as it was
    assert forked[:2] == original and forked[2] == ("user", "next question") and forked[3][0] == "assistant"
    assert rows(db, "SELECT forked_from FROM threads WHERE key = 'terminal:t5-fork-1'") == [("terminal:t5",)]


def test_ctrl_c_while_a_reply_is_written_stops_it_and_keeps_what_was_written(
        tmp_path: Path, chat_env: dict[str, str]) -> None:
    """On a terminal (stdin is a pty), SIGINT during a reply is /stop; at the prompt it quits."""
    import pty
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    env.update(chat_env, RAVEN_MAX_REPLY_TOKENS="8000", RAVEN_REPLY_TIMEOUT_S="600")
    master, slave = pty.openpty()
    process = subprocess.Popen([RAVEN, "chat", "--thread", "tc"], stdin=slave, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    db = tmp_path / "data" / "raven.db"

    def phase() -> str | None:
        if not db.exists():
            return None
        try:
            found = rows(db, "SELECT phase FROM turns ORDER BY id DESC LIMIT 1")
        except sqlite3.OperationalError:  # the file exists a moment before its migrations have run
            return None
        return str(found[0][0]) if found else None

    try:
        deadline = time.monotonic() + 90
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.write(master, b"tell me everything\n")
        while phase() != "generating" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # some of it written
        process.send_signal(signal.SIGINT)
        while phase() != "delivered" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None  # still running: the reply was stopped, not the chat
        assert rows(db, "SELECT reason FROM turns") == [("halted",)]
        reply = rows(db, "SELECT text FROM messages WHERE role = 'assistant'")
        assert len(reply) == 1 and reply[0][0]
        process.send_signal(signal.SIGINT)  # at the prompt: quits
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
        os.close(slave)
    assert process.returncode == 0, process.stderr.read().decode() if process.stderr else ""
