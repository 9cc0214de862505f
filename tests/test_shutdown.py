"""The real ``raven run`` process, stopped with SIGTERM while it writes a reply, against the local
stand-in of Slack (Socket Mode and the Web API on 127.0.0.1): what the user sees on the platform
must be the reply the log stored, whole, and the process must exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from adapters.slack_mrkdwn import to_mrkdwn
from adapters.streaming import MARK
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.slack_server import FakeSlack
from tests.test_slack_adapter import BOT, USER, event_body, mention

RAVEN = str(Path(sys.executable).with_name("raven"))


def environment(tmp_path: Path, model: Path, fake: FakeSlack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    env.update(RAVEN_MODEL=str(model), RAVEN_DATA_DIR=str(tmp_path / "data"), RAVEN_SEED="1",
               RAVEN_MAX_REPLY_TOKENS="1500", RAVEN_LOG_LEVEL="INFO", SLACK_BOT_TOKEN="xoxb-test",
               SLACK_APP_TOKEN="xapp-test", SLACK_API_URL=fake.base_url, SLACK_UPDATE_INTERVAL_S="1")
    env.update(extra)
    return env


def stored(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return [tuple(row) for row in conn.execute("SELECT role, status, text FROM messages ORDER BY id")]


def recorded_with_mark(db: Path) -> bool:
    """The newest delivery record shows the still-writing mark (the database may not exist yet)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT shown FROM deliveries ORDER BY updated_at DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # the file exists a moment before its migrations have run
        return False
    return bool(row) and str(row[0]).endswith(MARK)


def squash(text: str) -> str:
    return " ".join(text.split())


def turn_phases(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT phase FROM turns ORDER BY id")]


async def run_until_sigterm(tmp_path: Path, model: Path, **extra: str) -> tuple[FakeSlack, int, str]:
    fake = FakeSlack(bot_user_id=BOT, users={USER: "Alice"})
    await fake.start()
    try:
        process = await asyncio.create_subprocess_exec(
            RAVEN, "run", cwd=tmp_path, env=environment(tmp_path, model, fake, **extra),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await fake.wait_connected(within=90)
            await fake.send_envelope("events_api", event_body(mention("700.000001", "tell me everything")))
            # Mid-reply: the turn is generating and its first message is posted and recorded (a signal
            # in the moment between the post and the turn's start is a different case).
            db = tmp_path / "data" / "raven.db"
            await fake.wait_for(lambda: bool(fake.calls_to("chat.postMessage")) and recorded_with_mark(db)
                                and "generating" in turn_phases(db), within=60)
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), 120)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return fake, int(process.returncode or 0), err.decode()
    finally:
        await fake.close()


@pytest.mark.timeout(240)
async def test_sigterm_mid_reply_finishes_and_delivers_the_whole_stored_reply(
        tmp_path: Path, tiny_v7_path: Path) -> None:
    fake, code, err = await run_until_sigterm(tmp_path, tiny_v7_path)
    assert code == 0, err
    assert "finishing the replies in flight" in err
    db = tmp_path / "data" / "raven.db"
    log = stored(db)
    assert [(role, status) for role, status, _ in log] == [("user", "answered"), ("assistant", "done")]
    messages = fake.thread("C1", "700.000001")
    assert messages and not any(m.text.endswith(MARK) for m in messages)  # nothing left "still writing"
    shown = "".join(m.text for m in messages)
    assert to_mrkdwn(log[1][2])[-60:].strip() in shown  # the end of the stored reply reached the user
    assert turn_phases(db) == ["delivered"]


@pytest.mark.timeout(240)
async def test_sigterm_with_no_grace_left_cuts_the_reply_off_cleanly(tmp_path: Path, tiny_v7_path: Path) -> None:
    fake, code, err = await run_until_sigterm(tmp_path, tiny_v7_path, RAVEN_SHUTDOWN_GRACE_S="0",
                                              RAVEN_MAX_REPLY_TOKENS="8000", RAVEN_REPLY_TIMEOUT_S="600")
    assert code == 0, err
    db = tmp_path / "data" / "raven.db"
    log = stored(db)
    assert [(role, status) for role, status, _ in log] == [("user", "answered"), ("assistant", "done")]
    messages = fake.thread("C1", "700.000001")
    assert messages and not any(m.text.endswith(MARK) for m in messages)
    assert messages[-1].text.endswith("_(reply cut off: Raven is restarting)_")
    assert to_mrkdwn(log[1][2])[-40:].strip() in "".join(m.text for m in messages)
    assert turn_phases(db) == ["delivered"]


@pytest.mark.timeout(300)
async def test_sigkill_mid_reply_then_restart_repairs_what_the_user_sees(tmp_path: Path, tiny_v7_path: Path) -> None:
    fake = FakeSlack(bot_user_id=BOT, users={USER: "Alice"})
    await fake.start()
    env = environment(tmp_path, tiny_v7_path, fake, RAVEN_INSTANCE_LEASE_S="3", RAVEN_MAX_REPLY_TOKENS="8000",
                      RAVEN_REPLY_TIMEOUT_S="600")
    try:
        first = await asyncio.create_subprocess_exec(RAVEN, "run", cwd=tmp_path, env=env,
                                                     stdout=asyncio.subprocess.DEVNULL,
                                                     stderr=asyncio.subprocess.DEVNULL)
        try:
            await fake.wait_connected(within=90)
            await fake.send_envelope("events_api", event_body(mention("800.000001", "tell me everything")))
            await fake.wait_for(lambda: bool(fake.calls_to("chat.postMessage")), within=60)
            await asyncio.sleep(1.5)  # a few edits in, still writing
            # Killed while the last message shows the still-writing mark (a long reply fills one
            # message, finishes it without the mark and opens the next: not a moment to kill at).
            await fake.wait_for(lambda: fake.thread("C1", "800.000001")[-1].text.endswith(MARK)
                                and recorded_with_mark(tmp_path / "data" / "raven.db"), within=30)
        finally:
            first.kill()  # SIGKILL: no chance to clean up
            await first.wait()
        messages = fake.thread("C1", "800.000001")
        assert messages and messages[-1].text.endswith(MARK)  # what a kill leaves behind

        second = await asyncio.create_subprocess_exec(RAVEN, "run", cwd=tmp_path, env=env,
                                                      stdout=asyncio.subprocess.DEVNULL,
                                                      stderr=asyncio.subprocess.PIPE)
        try:
            def repaired() -> bool:
                shown = fake.thread("C1", "800.000001")
                return not any(m.text.endswith(MARK) for m in shown) and any(
                    "restarted while answering" in m.text for m in shown)
            await fake.wait_for(repaired, within=60)
        finally:
            second.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 0, err.decode()
        db = tmp_path / "data" / "raven.db"
        log = stored(db)
        assert [(role, status) for role, status, _ in log][:1] == [("user", "interrupted")]
        assert log[-1][0] == "notice" and "restarted" in log[-1][2]
        assert turn_phases(db) == ["interrupted"]
    finally:
        await fake.close()


# --- Discord: the same, through DISCORD_API_URL / DISCORD_GATEWAY_URL pointed at the stand-in ----------


def discord_environment(tmp_path: Path, model: Path, fake: FakeDiscord, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    env.update(RAVEN_MODEL=str(model), RAVEN_DATA_DIR=str(tmp_path / "data"), RAVEN_SEED="1",
               RAVEN_MAX_REPLY_TOKENS="1500", RAVEN_LOG_LEVEL="INFO", DISCORD_TOKEN="fake-token",
               DISCORD_API_URL=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url)
    env.update(extra)
    return env


async def start_discord_raven(tmp_path: Path, env: dict[str, str], fake: FakeDiscord,
                              stderr: int = asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(RAVEN, "run", cwd=tmp_path, env=env,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
    await fake.wait_identified(within=90)
    await asyncio.sleep(3)  # discord.py waits ~2 s for its guilds before it reports ready
    return process


async def ask_until_streaming(fake: FakeDiscord) -> str:
    asked = await fake.user_message(fake.general_id, "tell me everything", mention_bot=True)
    await fake.wait_for(lambda: bool(fake.bot_messages(asked["id"])), within=60)  # the thread is the message's id
    return str(asked["id"])


@pytest.mark.timeout(240)
async def test_discord_sigterm_mid_reply_delivers_the_whole_stored_reply(tmp_path: Path, tiny_v7_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        process = await start_discord_raven(tmp_path, discord_environment(tmp_path, tiny_v7_path, fake), fake,
                                            stderr=asyncio.subprocess.PIPE)
        try:
            thread_id = await ask_until_streaming(fake)
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), 120)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, err.decode()
        db = tmp_path / "data" / "raven.db"
        log = stored(db)
        assert [(role, status) for role, status, _ in log] == [("user", "answered"), ("assistant", "done")]
        messages = fake.bot_messages(thread_id)
        assert messages and not any(m["content"].endswith(MARK) for m in messages)
        assert log[1][2][-60:].strip() in "".join(m["content"] for m in messages)
        assert turn_phases(db) == ["delivered"]
    finally:
        await fake.close()


@pytest.mark.timeout(300)
async def test_discord_sigkill_mid_reply_then_restart_repairs_what_the_user_sees(
        tmp_path: Path, tiny_v7_path: Path) -> None:
    fake = FakeDiscord()
    await fake.start()
    env = discord_environment(tmp_path, tiny_v7_path, fake, RAVEN_INSTANCE_LEASE_S="3",
                              RAVEN_MAX_REPLY_TOKENS="8000", RAVEN_REPLY_TIMEOUT_S="600")
    try:
        first = await start_discord_raven(tmp_path, env, fake)
        try:
            thread_id = await ask_until_streaming(fake)
            # Killed while the last message shows the still-writing mark and its delivery record says
            # so (a message posted a moment before its record is written is the one thing a repair
            # cannot know of); at once, since how long a random model's reply runs depends on its seed.
            await fake.wait_for(lambda: fake.bot_messages(thread_id)[-1]["content"].endswith(MARK)
                                and recorded_with_mark(tmp_path / "data" / "raven.db"), within=30)
        finally:
            first.kill()
            await first.wait()
        assert fake.bot_messages(thread_id)[-1]["content"].endswith(MARK)

        db = tmp_path / "data" / "raven.db"
        second = await start_discord_raven(tmp_path, env, fake, stderr=asyncio.subprocess.PIPE)
        try:
            # Whichever way the kill fell: mid-reply, the turn is interrupted and its thread says so; after
            # the reply was stored but before its last edit, the messages are edited to the stored reply.
            def repaired() -> bool:
                shown = fake.bot_messages(thread_id)
                if any(m["content"].endswith(MARK) for m in shown):
                    return False
                if any("restarted while answering" in fake.shown(m) for m in shown):
                    return True
                stored_replies = [text for role, _, text in stored(db) if role == "assistant"]
                return bool(stored_replies) and squash(stored_replies[-1])[-40:] in squash(
                    "".join(m["content"] for m in shown))
            await fake.wait_for(repaired, within=60)
        finally:
            second.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(second.communicate(), 60)
        assert second.returncode == 0, err.decode()
        assert turn_phases(db) in (["interrupted"], ["delivered"])
    finally:
        await fake.close()


# --- two processes on one database ---------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_raven_chat_beside_raven_run_leaves_the_servers_reply_alone(tmp_path: Path, tiny_v7_path: Path) -> None:
    """``raven chat`` started (and finished) while ``raven run`` is writing a reply on the same database:
    its start-up recovery must not call the server's live turn interrupted, and both replies land."""
    fake = FakeSlack(bot_user_id=BOT, users={USER: "Alice"})
    await fake.start()
    env = environment(tmp_path, tiny_v7_path, fake, RAVEN_MAX_REPLY_TOKENS="3000", RAVEN_REPLY_TIMEOUT_S="600")
    try:
        server = await asyncio.create_subprocess_exec(RAVEN, "run", cwd=tmp_path, env=env,
                                                      stdout=asyncio.subprocess.DEVNULL,
                                                      stderr=asyncio.subprocess.PIPE)
        try:
            await fake.wait_connected(within=90)
            await fake.send_envelope("events_api", event_body(mention("900.000001", "tell me everything")))
            await fake.wait_for(lambda: bool(fake.calls_to("chat.postMessage")), within=60)  # writing now
            chat_env = {k: v for k, v in env.items() if not k.startswith("SLACK_")}
            chat = await asyncio.create_subprocess_exec(
                RAVEN, "chat", "--thread", "side", cwd=tmp_path, env={**chat_env, "RAVEN_MAX_REPLY_TOKENS": "20"},
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, chat_err = await asyncio.wait_for(chat.communicate(b"hello from the terminal\n"), 120)
            assert chat.returncode == 0, chat_err.decode()
            db = tmp_path / "data" / "raven.db"
            with sqlite3.connect(db) as conn:
                server_turn = conn.execute(
                    "SELECT t.phase FROM turns t JOIN messages m ON m.id = t.message_id "
                    "WHERE m.thread_key LIKE 'slack:%' ").fetchall()
            assert server_turn in ([("generating",)], [("generated",)], [("delivered",)])  # still its own
        finally:
            server.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(server.communicate(), 120)
        assert server.returncode == 0, err.decode()
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT m.thread_key, m.status, t.phase FROM turns t JOIN messages m ON m.id = t.message_id "
                "ORDER BY t.id").fetchall()
        by_platform = {key.split(":")[0]: (status, phase) for key, status, phase in rows}
        assert by_platform == {"slack": ("answered", "delivered"), "terminal": ("answered", "delivered")}
        assert not any(role == "notice" for role, _, _ in stored(db))  # nobody was told of a lost turn
        messages = fake.thread("C1", "900.000001")
        assert messages and not any(m.text.endswith(MARK) for m in messages)
    finally:
        await fake.close()
