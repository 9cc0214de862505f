"""``raven doctor`` as an operator runs it: the real console script in a subprocess, on a good set-up
(the generated checkpoint, a real database written by the real store) and on broken ones, each of
which must name the problem, say what to change, and end with a non-zero exit status."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bot.events import ThreadKey
from bot.inference.checkpoint import make_checkpoint
from bot.inference.machine import detect
from bot.storage import SQLiteStore
from bot.storage.migrations import SCHEMA_VERSION

RAVEN = str(Path(sys.executable).parent / "raven")


def doctor(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    clean.update(env)
    return subprocess.run([RAVEN, "doctor"], env=clean, cwd=cwd, capture_output=True, text=True, timeout=120)


def lines(result: subprocess.CompletedProcess[str], level: str, check: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.split()[:2] == [level, check]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def base_env(tmp_path: Path, tiny_v7_path: Path) -> dict[str, str]:
    # a port nobody uses, so that another test's server on 8001 changes nothing here
    return {"RAVEN_MODEL": str(tiny_v7_path), "RAVEN_DATA_DIR": str(tmp_path / "data"),
            "RAVEN_WEB_PORT": str(free_port())}


async def write_threads(db: Path) -> None:
    async with SQLiteStore(db) as store:
        key = ThreadKey("terminal", "t1")
        await store.ensure_thread(key, "sql")
        await store.add_message(key, "user", "why is my join slow?")
        await store.add_message(key, "assistant", "show me the plan")


def test_a_good_set_up_passes_every_check(tmp_path: Path, base_env: dict[str, str]) -> None:
    asyncio.run(write_threads(tmp_path / "data" / "raven.db"))
    result = doctor(tmp_path, **base_env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert not [line for line in out.splitlines() if line.startswith("fail")], out
    [model] = lines(result, "ok", "model")
    assert "RWKV-7, 3 layers, width 128, vocabulary 65536" in model and base_env["RAVEN_MODEL"] in model
    assert "matches the model's vocabulary of 65536" in lines(result, "ok", "tokenizer")[0]
    [database] = lines(result, "ok", "database")
    assert f"journal wal, schema v{SCHEMA_VERSION}, 1 threads, 2 messages" in database
    assert lines(result, "ok", "personas") == ["ok    personas  3 parse: default, project, sql"]
    [strategy] = lines(result, "ok", "strategy")
    assert strategy.startswith("ok    strategy  cpu fp32 needs ~") and "fits here: " in strategy
    [cpu] = lines(result, "ok", "cpu")
    machine = detect()
    assert f"{machine.kind}, {machine.cores} usable cores, torch kernels {machine.capability}" in cpu
    assert "cpu bf16" in cpu  # what the CPU means for bf16, either way
    assert lines(result, "ok", "ports") == [f"ok    ports     127.0.0.1:{base_env['RAVEN_WEB_PORT']} is free "
                                            "(RAVEN_WEB_HOST:RAVEN_WEB_PORT)"]
    assert out.splitlines()[-1].endswith("0 failures: Raven can start")


def wrong_shape_model(tmp_path: Path) -> Path:
    path = make_checkpoint(tmp_path / "bad.pth", "v7", "tiny", seed=1)
    sd = torch.load(path, weights_only=True)
    sd["blocks.1.att.key.weight"] = sd["blocks.1.att.key.weight"][:64].clone()
    torch.save(sd, path)
    return path


def broken_persona_dir(tmp_path: Path) -> Path:
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "broken.md").write_text("---\nname: [unclosed\n---\nYou are broken.\n", encoding="utf-8")
    (personas / "fine.md").write_text("---\nname: Fine\n---\nYou are fine.\n", encoding="utf-8")
    return personas


def newer_database(tmp_path: Path) -> Path:
    db = tmp_path / "newer.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    return db


@pytest.mark.parametrize(("case", "check", "expected", "fix"), [
    ("missing model", "model", "does not exist (expected an RWKV .pth checkpoint)", "set RAVEN_MODEL to an existing"),
    ("wrong-shape model", "model", "blocks.1.att.key.weight has shape (64, 128), expected (128, 128)",
     "download it again"),
    ("database dir under a file", "database", "is not a directory", "set RAVEN_DATA_DIR"),
    ("database from a newer Raven", "database", "schema v99: written by a newer Raven", "upgrade Raven"),
    ("broken persona file", "personas", "broken: persona file", "fix the file"),
    ("malformed Slack token", "slack", "SLACK_BOT_TOKEN is not shaped like a Slack bot token",
     "copy the Bot User OAuth Token"),
    ("Slack without a mode", "slack", "neither SLACK_APP_TOKEN (Socket Mode) nor SLACK_SIGNING_SECRET",
     "set SLACK_APP_TOKEN"),
    ("port in use", "ports", "in use by another program",
     "stop what listens there, or change RAVEN_WEB_HOST:RAVEN_WEB_PORT"),
    ("cuda without a GPU", "strategy", "'cuda fp16' needs CUDA", 'set RAVEN_STRATEGY="cpu fp32"'),
])
def test_a_broken_set_up_names_the_problem_and_fails(tmp_path: Path, base_env: dict[str, str], case: str,
                                                     check: str, expected: str, fix: str) -> None:
    env = dict(base_env)
    listener = None
    if case == "missing model":
        env["RAVEN_MODEL"] = str(tmp_path / "nowhere.pth")
    elif case == "wrong-shape model":
        env["RAVEN_MODEL"] = str(wrong_shape_model(tmp_path))
    elif case == "database dir under a file":
        (tmp_path / "a-file").write_text("not a directory")
        env["RAVEN_DATA_DIR"] = str(tmp_path / "a-file" / "data")
    elif case == "database from a newer Raven":
        env["RAVEN_DATABASE"] = str(newer_database(tmp_path))
    elif case == "broken persona file":
        env["RAVEN_PERSONAS_DIR"] = str(broken_persona_dir(tmp_path))
    elif case == "malformed Slack token":
        env |= {"SLACK_BOT_TOKEN": "xoxb-12345", "SLACK_APP_TOKEN": "xapp-1-A0AAAAAAA-1234-abcdef"}
    elif case == "Slack without a mode":
        env["SLACK_BOT_TOKEN"] = "xoxb-1234-5678-abcdefABCDEF"
    elif case == "port in use":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        env |= {"RAVEN_WEB_ENABLED": "true", "RAVEN_WEB_PORT": str(listener.getsockname()[1])}
    elif case == "cuda without a GPU":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        env["RAVEN_STRATEGY"] = "cuda fp16"
    try:
        result = doctor(tmp_path, **env)
    finally:
        if listener is not None:
            listener.close()
    assert result.returncode == 1, result.stdout + result.stderr
    failing = lines(result, "fail", check)
    assert len(failing) == 1 and expected in failing[0], result.stdout
    after = result.stdout.splitlines()[result.stdout.splitlines().index(failing[0]) + 1]
    assert after.strip().startswith("→ ") and fix in after, result.stdout
    assert result.stdout.splitlines()[-1].endswith("Raven would not start as configured")
    if case == "broken persona file":  # the others still parse, and say so
        assert lines(result, "ok", "personas")[0].endswith("4 parse: default, fine, project, sql")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_an_unwritable_database_dir_fails(tmp_path: Path, base_env: dict[str, str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o500)
    try:
        result = doctor(tmp_path, **base_env)
    finally:
        data.chmod(0o700)
    assert result.returncode == 1
    assert "is not writable" in lines(result, "fail", "database")[0]


def test_no_token_value_is_ever_printed(tmp_path: Path, base_env: dict[str, str]) -> None:
    secrets = {
        "DISCORD_TOKEN": "Bot MTAxNzM0NzE3ODk1NzY3ODcyMA.GhIjKl.SECRETdiscordVALUEabcdefghijklmnop",
        "SLACK_BOT_TOKEN": "xoxb-SECRETslackBOT",  # malformed: one part
        "SLACK_APP_TOKEN": "xapp-1-A0SECRETAPP-1234-f0f0f0f0f0f0",  # well-formed
        "RAVEN_WEB_TOKEN": "SECRETweb",  # short
    }
    result = doctor(tmp_path, **base_env, **secrets)
    assert result.returncode == 1
    printed = result.stdout + result.stderr
    for name, value in secrets.items():
        pieces = [p for p in value.removeprefix("Bot ").replace(".", "-").split("-") if len(p) > 5]
        for piece in (value, value.removeprefix("Bot "), *pieces):
            assert piece not in printed, f"{name}'s value appears in the output"
    assert "SECRET" not in printed
    assert "DISCORD_TOKEN starts with 'Bot '" in lines(result, "fail", "discord")[0]
    assert "SLACK_BOT_TOKEN is not shaped like a Slack bot token" in lines(result, "fail", "slack")[0]
    assert "RAVEN_WEB_TOKEN is short" in lines(result, "warn", "web")[0]


def test_cpu_bf16_where_it_is_emulated_is_a_warning(tmp_path: Path, base_env: dict[str, str]) -> None:
    # ATEN_CPU_CAPABILITY=avx2 holds torch's kernels below AVX-512, as on a CPU without native bf16
    result = doctor(tmp_path, **base_env, RAVEN_STRATEGY="cpu bf16", ATEN_CPU_CAPABILITY="avx2")
    assert result.returncode == 0, result.stdout  # slow, not broken
    [cpu] = lines(result, "warn", "cpu")
    assert "every bf16 matmul is emulated" in cpu and 'RAVEN_STRATEGY="cpu fp32"' in cpu
    assert "fits here: cpu fp32" in lines(result, "ok", "strategy")[0]


async def run_doctor(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``raven doctor`` while this event loop serves the platform stand-ins."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    clean.update(env)
    process = await asyncio.create_subprocess_exec(RAVEN, "doctor", *args, env=clean, cwd=cwd,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return subprocess.CompletedProcess([RAVEN, "doctor"], int(process.returncode or 0), out.decode(), err.decode())


DISCORD_OK = "MTAxNzM0NzE3ODk1NzY3ODcyMA.GhIjKl.discordVALUEabcdefghijklmnop"
SLACK_OK = "xoxb-1234-5678-abcdefABCDEF"
SLACK_APP_OK = "xapp-1-A0APP-1234-f0f0f0f0f0f0"


async def test_the_platforms_are_asked_whether_the_tokens_work(tmp_path: Path, base_env: dict[str, str]) -> None:
    from tests.fakes.discord_server import FakeDiscord
    from tests.fakes.slack_server import FakeSlack

    discord, slack = FakeDiscord(), FakeSlack(bot_user_id="UBOT")
    await discord.start()
    await slack.start()
    try:
        env = {**base_env, "DISCORD_TOKEN": DISCORD_OK, "DISCORD_API_URL": discord.api_base,
               "SLACK_BOT_TOKEN": SLACK_OK, "SLACK_APP_TOKEN": SLACK_APP_OK, "SLACK_API_URL": slack.base_url}
        good = await run_doctor(tmp_path, env)
        assert good.returncode == 0, good.stdout + good.stderr
        assert any("Discord accepts the token: the bot is" in line for line in lines(good, "ok", "discord"))
        assert "ok    slack     Slack accepts the bot token: raven in Fake" in good.stdout
        assert len(slack.calls_to("auth.test")) == 1
        discord.fail_next("GET", r"/users/@me", 401, message="401: Unauthorized")
        slack.fail("auth.test", "invalid_auth", status=200)
        bad = await run_doctor(tmp_path, env)
        assert bad.returncode == 1
        assert "Discord rejects DISCORD_TOKEN (401 Unauthorized)" in lines(bad, "fail", "discord")[0]
        assert "Slack rejects SLACK_BOT_TOKEN (invalid_auth)" in lines(bad, "fail", "slack")[0]
        for secret in (DISCORD_OK, SLACK_OK, SLACK_APP_OK):
            assert secret not in bad.stdout + bad.stderr
    finally:
        await discord.close()
        await slack.close()
    # nothing listening there any more: a warning, not a failure, and --offline asks nobody
    gone = await run_doctor(tmp_path, env)
    assert gone.returncode == 0 and "could not reach 127.0.0.1" in lines(gone, "warn", "discord")[0]
    offline = await run_doctor(tmp_path, env, "--offline")
    assert offline.returncode == 0 and "could not reach" not in offline.stdout


def test_limits_and_who_is_exempt_are_reported_and_a_misspelt_exemption_warns(
        tmp_path: Path, base_env: dict[str, str]) -> None:
    good = doctor(tmp_path, **base_env, RAVEN_RATE_MESSAGES_PER_MINUTE="20", RAVEN_RATE_CHANNEL_TOKENS_PER_DAY="50000",
                  RAVEN_ADMINS="discord:123456789012345678,slack:U0123ABC", DISCORD_ADMIN_ROLES="223456789012345678",
                  SLACK_ADMINS_EXEMPT="true")
    assert good.returncode == 0, good.stdout + good.stderr
    [line] = lines(good, "ok", "limits")
    assert line.endswith("per user 20 messages/min; per channel 50000 tokens/day; exempt: 2 user(s), "
                         "1 Discord role(s), Slack workspace admins"), good.stdout
    bad = doctor(tmp_path, **base_env, RAVEN_ADMINS="alice,discord:123456789012345678",
                 DISCORD_ADMIN_ROLES="Moderators")
    assert bad.returncode == 0, bad.stdout + bad.stderr  # Raven would start: a warning, not a failure
    [warning] = lines(bad, "warn", "limits")
    assert "RAVEN_ADMINS entry 'alice' is not platform:user id" in warning
    assert "DISCORD_ADMIN_ROLES has 'Moderators', which is not a Discord ID" in warning
    after = bad.stdout.splitlines()[bad.stdout.splitlines().index(warning) + 1]
    assert "Copy ID" in after
