"""`raven run` as a user starts it: the configured adapters in one process, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

RAVEN = str(Path(sys.executable).with_name("raven"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_run_serves_the_web_adapter_and_stops_cleanly_on_sigterm(tiny_v7_path: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    env |= {"RAVEN_MODEL": str(tiny_v7_path), "RAVEN_DATA_DIR": str(tmp_path / "data"), "RAVEN_SEED": "1",
            "RAVEN_MAX_REPLY_TOKENS": "12", "RAVEN_WEB_ENABLED": "true", "RAVEN_WEB_PORT": str(port)}
    process = subprocess.Popen([RAVEN, "run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "raven run did not start serving"
            time.sleep(0.2)
        answer = httpx.post(f"{base}/generate-response", timeout=60, json={
            "user_message": "hello", "user_id": "ann", "discussion_id": "1", "prompt_file": "SQLAdvisor"})
        assert answer.status_code == 200 and answer.json()["generated_text"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    with sqlite3.connect(tmp_path / "data" / "raven.db") as db:
        rows = db.execute("SELECT role, status FROM messages WHERE thread_key = 'web:ann/1' ORDER BY id").fetchall()
    assert rows[-2:] == [("user", "answered"), ("assistant", "done")]


def test_run_and_web_refuse_the_same_bad_setting_with_the_same_status(tmp_path: Path) -> None:
    """A settings error exits 2 whichever command reads the settings, before anything is created."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    env |= {"RAVEN_DATA_DIR": str(tmp_path / "data"), "RAVEN_WEB_ENABLED": "true"}
    cases = [({"RAVEN_TOP_P": "abc"}, "RAVEN_TOP_P: "), ({"RAVEN_WEB_PORT": "99999"}, "RAVEN_WEB_PORT: "),
             ({"RAVEN_WEB_HOST": "0.0.0.0"}, "RAVEN_WEB_TOKEN must be set")]
    for bad, complaint in cases:
        for command in ("run", "web"):
            done = subprocess.run([RAVEN, command], cwd=tmp_path, env=env | bad, capture_output=True, text=True,
                                  timeout=60, stdin=subprocess.DEVNULL)
            assert done.returncode == 2, (command, bad, done.stderr)
            assert complaint in done.stderr and "Traceback" not in done.stderr, (command, done.stderr)
    assert not (tmp_path / "data").exists()
