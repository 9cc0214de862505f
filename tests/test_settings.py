"""Settings: defaults, the environment, a ``.env`` file, the sections (core ``RAVEN_*`` with the
adapters' ``DISCORD_*``, ``SLACK_*`` and ``RAVEN_WEB_*`` nested in it), the sampling ranges shared with
persona files, and errors that name the variable (never a secret's value), down to the ``raven``
command's exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.settings import DiscordSettings, SlackSettings, WebSettings
from bot.app.settings import load_settings, variables
from bot.core.personas import parse_persona
from bot.errors import ConfigError, PersonaError
from bot.settings import CoreSettings, Sampling

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
    assert s.model is None and s.strategy == "cpu fp32" and s.backend == "auto"
    assert s.tokenizer == "rwkv_vocab_v20230424"
    assert s.data_dir == Path("data") and s.database is None
    assert s.database_path == Path("data") / "raven.db"
    assert s.default_persona == "default" and s.personas_dir is None
    assert (s.temperature, s.top_p, s.top_k) == (1.0, 0.3, 0)
    assert (s.max_reply_tokens, s.max_batch, s.max_message_chars, s.dedupe_ttl_s) == (400, 32, 8000, 3600)
    assert s.seed is None and s.show_thinking is False
    assert s.discord.token is None and not s.discord.enabled
    assert s.slack.bot_token is None and not s.slack.enabled
    assert (s.web.enabled, s.web.host, s.web.port, s.web.token) == (False, "127.0.0.1", 8001, None)
    assert s.discord.allowed_channels == [] and s.web.cors_origins == []
    assert s.sampling == Sampling() and isinstance(s, CoreSettings)


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
    assert s.model == tmp_path / "m.pth" and s.strategy == "cuda fp16" and s.top_p == 0.7
    assert (s.max_batch, s.seed, s.show_thinking, s.backend) == (4, 42, True, "package")
    assert s.database_path == tmp_path / "d" / "raven.db"
    assert s.discord.allowed_channels == ["111", "222", "333"]
    assert s.discord.allowed_guilds == []
    assert s.discord.token is not None and s.discord.token.get_secret_value() == "discord-token-value"
    assert "discord-token-value" not in repr(s)  # secrets stay out of reprs and logs
    assert s.discord.enabled and s.slack.enabled and s.log_level == "DEBUG"


def test_blank_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAVEN_MODEL", "DISCORD_TOKEN", "RAVEN_SEED", "RAVEN_PERSONAS_DIR"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "   ")
    s = load_settings(env_file=None)
    assert s.model is None and s.discord.token is None and s.seed is None and s.personas_dir is None
    assert s.slack.bot_token is None and not s.slack.enabled


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text(
        "# a comment\nRAVEN_TOP_K=17\nRAVEN_DEFAULT_PERSONA=sql\nSLACK_ALLOWED_CHANNELS=C1,C2\n"
        "RAVEN_MAX_REPLY_TOKENS=99\nUNRELATED=ignored\n",
        encoding="utf-8",
    )
    s = load_settings(env_file=env_file)
    assert (s.top_k, s.default_persona, s.slack.allowed_channels, s.max_reply_tokens) == (17, "sql", ["C1", "C2"], 99)
    monkeypatch.setenv("RAVEN_TOP_K", "3")
    assert load_settings(env_file=env_file).top_k == 3
    # The default env_file is ".env" in the working directory.
    (tmp_path / ".env").write_text("RAVEN_TOP_K=5\n", encoding="utf-8")
    monkeypatch.delenv("RAVEN_TOP_K")
    assert load_settings().top_k == 5
    assert load_settings(env_file=None).top_k == 0
    # Every section reads the same file, and none reads ".env" when told not to.
    (tmp_path / ".env").write_text("DISCORD_TOKEN=d\nSLACK_HTTP_PORT=4000\nRAVEN_WEB_PORT=9001\n", encoding="utf-8")
    s = load_settings()
    assert (s.discord.enabled, s.slack.http_port, s.web.port) == (True, 4000, 9001)
    s = load_settings(env_file=None)
    assert (s.discord.enabled, s.slack.http_port, s.web.port) == (False, 3000, 8001)


def test_the_sections_read_the_variables_users_already_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each section reads its fields under its prefix: the variable names did not change."""
    env = {"DISCORD_EDIT_INTERVAL_S": "2.5", "DISCORD_ANSWER_DMS": "false", "DISCORD_COMMAND_GUILDS": "1,2",
           "SLACK_UPDATE_INTERVAL_S": "3", "SLACK_APP_TOKEN": "xapp-1", "SLACK_HTTP_PATH": "/hooks",
           "RAVEN_WEB_PORT": "9000", "RAVEN_WEB_ENABLED": "true", "RAVEN_WEB_CORS_ORIGINS": "http://a, http://b",
           "RAVEN_TEMPERATURE": "0.7", "RAVEN_MAX_REPLY_TOKENS": "99", "RAVEN_MODEL": "m.pth"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings(env_file=None)
    assert (s.discord.edit_interval_s, s.discord.answer_dms, s.discord.command_guilds) == (2.5, False, ["1", "2"])
    assert (s.slack.update_interval_s, s.slack.http_path) == (3.0, "/hooks")
    assert s.slack.app_token is not None and not s.slack.enabled  # enabled by SLACK_BOT_TOKEN only
    assert (s.web.port, s.web.enabled, s.web.cors_origins) == (9000, True, ["http://a", "http://b"])
    assert (s.temperature, s.max_reply_tokens, s.model) == (0.7, 99, Path("m.pth"))
    assert s.sampling == Sampling(temperature=0.7, max_reply_tokens=99)
    # A section alone reads the same variables.
    assert DiscordSettings(_env_file=None).edit_interval_s == 2.5  # type: ignore[call-arg]
    assert SlackSettings(_env_file=None).update_interval_s == 3.0  # type: ignore[call-arg]
    assert WebSettings(_env_file=None).port == 9000  # type: ignore[call-arg]
    assert CoreSettings(_env_file=None).temperature == 0.7  # type: ignore[call-arg]
    # The core's prefix covers RAVEN_WEB, RAVEN_DISCORD…: none of them is read into a section.
    monkeypatch.setenv("RAVEN_WEB", "not json")
    monkeypatch.setenv("RAVEN_DISCORD", '{"token": "x"}')
    s = load_settings(env_file=None)
    assert s.web.port == 9000 and s.discord.token is None


def test_overrides_take_core_fields_by_name_and_sections_as_mappings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAVEN_WEB_PORT", "9000")
    monkeypatch.setenv("RAVEN_WEB_HOST", "::1")
    s = load_settings(env_file=None, seed=3, web={"port": 0}, discord={"token": "t"})
    assert (s.seed, s.web.port, s.web.host, s.discord.enabled) == (3, 0, "::1", True)  # the rest from the environment
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None, web={"port": -1}, top_k=-1)
    assert "RAVEN_WEB_PORT:" in str(info.value) and "RAVEN_TOP_K:" in str(info.value)
    with pytest.raises(TypeError, match="discord_token"):  # a misspelt override is never ignored
        load_settings(env_file=None, discord_token="t")
    with pytest.raises(TypeError, match="web_port"):
        load_settings(env_file=None, web={"web_port": 0})


def _bounds(field: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for item in Sampling.model_fields[field].metadata:
        for kind in ("gt", "ge", "lt", "le"):
            if getattr(item, kind, None) is not None:  # annotated_types' Gt, Ge, Lt, Le
                found[kind] = getattr(item, kind)
    return found


@pytest.mark.parametrize("field", list(Sampling.model_fields))
def test_a_persona_override_has_the_setting_s_range(field: str) -> None:
    """One range for the setting and a persona's override of it: the value just outside it is refused
    by both, and the persona's message states the numbers of the setting's constraint."""
    bounds = _bounds(field)
    assert bounds, f"{field} has no range"
    whole = Sampling.model_fields[field].annotation is int
    outside = []
    if "ge" in bounds or "gt" in bounds:
        low = bounds.get("ge", bounds.get("gt", 0))
        outside.append(low - 1 if whole else (low - 0.5 if "ge" in bounds else low))
    if "le" in bounds:
        outside.append(bounds["le"] + 1)
    words = Sampling.range_text(field)
    for number in bounds.values():
        assert f"{number:g}" in words
    for value in outside:
        with pytest.raises(PersonaError) as info:
            parse_persona("p", f"---\n{field}: {value}\n---\nPrompt.\n", "p.md")
        assert str(info.value) == f"persona file p.md: {field} must be {words}"
        assert f"RAVEN_{field.upper()}:" in config_error(**{f"RAVEN_{field.upper()}": str(value)})
    inside = Sampling().model_dump()[field]
    assert parse_persona("p", f"---\n{field}: {inside}\n---\nPrompt.\n").sampling == {field: inside}


def test_range_text_reads_the_constraints() -> None:
    assert Sampling.range_text("temperature") == "between 0 and 5"
    assert Sampling.range_text("top_k") == "at least 0"
    assert Sampling.range_text("penalty_decay") == "between 0 (excluded) and 1"


def test_env_example_documents_every_variable_with_its_default() -> None:
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    documented = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")}
    assert set(variables()) - documented == set()
    assert documented - set(variables()) == set()  # nothing documented that is not read
    assert load_settings(env_file=ROOT / ".env.example") == load_settings(env_file=None)


@pytest.mark.parametrize(
    ("name", "value"),
    [("RAVEN_TOP_P", "abc"), ("RAVEN_TOP_P", "1.5"), ("RAVEN_MAX_BATCH", "0"), ("RAVEN_BACKEND", "gpu"),
     ("RAVEN_SEED", "x"), ("RAVEN_DEDUPE_TTL_S", "10"), ("SLACK_HTTP_PORT", "70000"),
     ("RAVEN_SHOW_THINKING", "maybe"), ("RAVEN_LOG_LEVEL", "LOUD"), ("RAVEN_TEMPERATURE", "nan"),
     # the adapters' sections name their variables the same way
     ("DISCORD_EDIT_INTERVAL_S", "0.5"), ("DISCORD_ANSWER_DMS", "maybe"), ("SLACK_UPDATE_INTERVAL_S", "x"),
     ("SLACK_MAX_MESSAGE_CHARS", "10"), ("RAVEN_WEB_PORT", "99999"), ("RAVEN_WEB_MAX_BODY_BYTES", "10")],
)
def test_malformed_value_names_the_variable(name: str, value: str) -> None:
    message = config_error(**{name: value})
    assert f"{name}:" in message
    assert repr(value) in message  # a non-secret's bad value is shown to help fix it


def test_every_problem_is_reported_at_once() -> None:
    message = config_error(RAVEN_TOP_P="abc", RAVEN_MAX_BATCH="0")
    assert "RAVEN_TOP_P" in message and "RAVEN_MAX_BATCH" in message
    message = config_error(RAVEN_TOP_P="abc", DISCORD_EDIT_INTERVAL_S="0", SLACK_HTTP_PORT="0", RAVEN_WEB_PORT="-1")
    lines = message.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "RAVEN_TOP_P", "DISCORD_EDIT_INTERVAL_S", "SLACK_HTTP_PORT", "RAVEN_WEB_PORT"]


def test_web_beyond_localhost_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(RAVEN_WEB_ENABLED="true", RAVEN_WEB_HOST="0.0.0.0")
    assert "RAVEN_WEB_TOKEN" in message and "0.0.0.0" in message
    monkeypatch.setenv("RAVEN_WEB_ENABLED", "true")
    assert load_settings(env_file=None).web.host == "127.0.0.1"  # localhost needs none
    monkeypatch.setenv("RAVEN_WEB_HOST", "0.0.0.0")
    monkeypatch.setenv("RAVEN_WEB_TOKEN", "web-secret")
    assert load_settings(env_file=None).web.enabled


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
