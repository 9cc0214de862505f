"""Settings: defaults, the environment, a ``.env`` file, and errors that name the variable (never a
secret's value), down to the ``raven`` command's exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import AliasChoices

from bot.errors import ConfigError
from bot.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
RAVEN = str(Path(sys.executable).parent / "raven")
PREFIXES = ("RAVEN_", "DISCORD_", "SLACK_")


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No influence from the developer's environment or a ``.env`` in the working directory."""
    for name in list(os.environ):
        if name.startswith(PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def config_error(**env: str) -> str:
    mp = pytest.MonkeyPatch()
    try:
        for name, value in env.items():
            mp.setenv(name, value)
        with pytest.raises(ConfigError) as info:
            load_settings(env_file=None)
        return str(info.value)
    finally:
        mp.undo()


def test_defaults() -> None:
    s = load_settings(env_file=None)
    assert s.model_path is None and s.strategy == "cpu fp32" and s.backend == "auto"
    assert s.tokenizer == "rwkv_vocab_v20230424"
    assert s.data_dir == Path("data") and s.database is None
    assert s.database_path == Path("data") / "raven.db"
    assert s.default_persona == "default" and s.personas_dir is None
    assert (s.temperature, s.top_p, s.top_k) == (1.0, 0.3, 0)
    assert (s.max_reply_tokens, s.max_batch, s.max_message_chars, s.dedupe_ttl_s) == (400, 32, 8000, 3600)
    assert s.seed is None and s.show_thinking is False
    assert s.discord_token is None and not s.discord_enabled
    assert s.slack_bot_token is None and not s.slack_enabled
    assert (s.web_enabled, s.web_host, s.web_port, s.web_token) == (False, "127.0.0.1", 8001, None)
    assert s.discord_allowed_channels == [] and s.web_cors_origins == []


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = {
        "RAVEN_MODEL": str(tmp_path / "m.pth"), "RAVEN_STRATEGY": "cuda fp16", "RAVEN_TOP_P": "0.7",
        "RAVEN_MAX_BATCH": "4", "RAVEN_SEED": "42", "RAVEN_SHOW_THINKING": "true",
        "RAVEN_DATA_DIR": str(tmp_path / "d"), "RAVEN_BACKEND": "package",
        "DISCORD_ALLOWED_CHANNELS": " 111, 222 ,,333 ", "DISCORD_TOKEN": "discord-token-value",
        "SLACK_BOT_TOKEN": "xoxb-1", "RAVEN_LOG_LEVEL": "DEBUG",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    s = load_settings(env_file=None)
    assert s.model_path == tmp_path / "m.pth" and s.strategy == "cuda fp16" and s.top_p == 0.7
    assert (s.max_batch, s.seed, s.show_thinking, s.backend) == (4, 42, True, "package")
    assert s.database_path == tmp_path / "d" / "raven.db"
    assert s.discord_allowed_channels == ["111", "222", "333"]
    assert s.discord_allowed_guilds == []
    assert s.discord_token is not None and s.discord_token.get_secret_value() == "discord-token-value"
    assert "discord-token-value" not in repr(s)  # secrets stay out of reprs and logs
    assert s.discord_enabled and s.slack_enabled and s.log_level == "DEBUG"


def test_blank_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAVEN_MODEL", "DISCORD_TOKEN", "RAVEN_SEED", "RAVEN_PERSONAS_DIR"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "   ")
    s = load_settings(env_file=None)
    assert s.model_path is None and s.discord_token is None and s.seed is None and s.personas_dir is None
    assert s.slack_bot_token is None and not s.slack_enabled


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text(
        "# a comment\nRAVEN_TOP_K=17\nRAVEN_DEFAULT_PERSONA=sql\nSLACK_ALLOWED_CHANNELS=C1,C2\n"
        "RAVEN_MAX_REPLY_TOKENS=99\nUNRELATED=ignored\n",
        encoding="utf-8",
    )
    s = load_settings(env_file=env_file)
    assert (s.top_k, s.default_persona, s.slack_allowed_channels, s.max_reply_tokens) == (17, "sql", ["C1", "C2"], 99)
    monkeypatch.setenv("RAVEN_TOP_K", "3")
    assert load_settings(env_file=env_file).top_k == 3
    # The default env_file is ".env" in the working directory.
    (tmp_path / ".env").write_text("RAVEN_TOP_K=5\n", encoding="utf-8")
    monkeypatch.delenv("RAVEN_TOP_K")
    assert load_settings().top_k == 5
    assert load_settings(env_file=None).top_k == 0


def test_env_example_documents_every_variable_with_its_default() -> None:
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    documented = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")}
    names = set()
    for info in Settings.model_fields.values():
        alias = info.validation_alias
        assert isinstance(alias, AliasChoices)
        names.add(str(alias.choices[0]))
    assert names - documented == set()
    assert load_settings(env_file=ROOT / ".env.example") == load_settings(env_file=None)


@pytest.mark.parametrize(
    ("name", "value"),
    [("RAVEN_TOP_P", "abc"), ("RAVEN_TOP_P", "1.5"), ("RAVEN_MAX_BATCH", "0"), ("RAVEN_BACKEND", "gpu"),
     ("RAVEN_SEED", "x"), ("RAVEN_DEDUPE_TTL_S", "10"), ("SLACK_HTTP_PORT", "70000"),
     ("RAVEN_SHOW_THINKING", "maybe"), ("RAVEN_LOG_LEVEL", "LOUD")],
)
def test_malformed_value_names_the_variable(name: str, value: str) -> None:
    message = config_error(**{name: value})
    assert f"{name}:" in message
    assert repr(value) in message  # a non-secret's bad value is shown to help fix it


def test_every_problem_is_reported_at_once() -> None:
    message = config_error(RAVEN_TOP_P="abc", RAVEN_MAX_BATCH="0")
    assert "RAVEN_TOP_P" in message and "RAVEN_MAX_BATCH" in message


def test_web_beyond_localhost_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(RAVEN_WEB_ENABLED="true", RAVEN_WEB_HOST="0.0.0.0")
    assert "RAVEN_WEB_TOKEN" in message and "0.0.0.0" in message
    monkeypatch.setenv("RAVEN_WEB_ENABLED", "true")
    assert load_settings(env_file=None).web_host == "127.0.0.1"  # localhost needs none
    monkeypatch.setenv("RAVEN_WEB_HOST", "0.0.0.0")
    monkeypatch.setenv("RAVEN_WEB_TOKEN", "web-secret")
    assert load_settings(env_file=None).web_enabled


def test_secret_values_never_appear_in_errors() -> None:
    secrets = {"DISCORD_TOKEN": "discord-SECRET-4242", "SLACK_BOT_TOKEN": "xoxb-SECRET-77",
               "SLACK_SIGNING_SECRET": "signing-SECRET-9", "RAVEN_WEB_TOKEN": "web-SECRET-3"}
    message = config_error(RAVEN_TOP_P="abc", RAVEN_WEB_ENABLED="true", RAVEN_WEB_HOST="0.0.0.0",
                           SLACK_HTTP_PORT="0", **secrets)
    assert "RAVEN_TOP_P" in message and "SLACK_HTTP_PORT" in message
    for value in secrets.values():
        assert value not in message
        assert "SECRET" not in message


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    env.update(extra)
    return env


def test_raven_run_refuses_a_malformed_variable(tmp_path: Path) -> None:
    result = subprocess.run(
        [RAVEN, "run"], env=_env(RAVEN_TOP_P="abc", DISCORD_TOKEN="discord-SECRET-4242",
                                 RAVEN_DATA_DIR=str(tmp_path / "data")),
        cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "RAVEN_TOP_P" in result.stderr and "'abc'" in result.stderr
    assert "Traceback" not in result.stderr and "discord-SECRET-4242" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()  # refused before anything was created
