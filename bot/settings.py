"""One typed settings object, read once from the environment and ``.env``.

Every field is documented in ``.env.example``. A missing or malformed value raises
:class:`ConfigError` at start-up naming the environment variable, never a traceback later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.errors import ConfigError

IdList = Annotated[list[str], NoDecode]


def _ids(name: str) -> Any:
    """A comma-separated list of IDs (empty: no restriction)."""
    return Field(default_factory=list, validation_alias=AliasChoices(name))


def _secret(name: str) -> Any:
    return Field(None, validation_alias=AliasChoices(name))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True, env_ignore_empty=True,
        frozen=True,
    )

    # --- model -------------------------------------------------------------------------------------
    model_path: Path | None = Field(None, validation_alias=AliasChoices("RAVEN_MODEL"))
    strategy: str = Field("cpu fp32", validation_alias=AliasChoices("RAVEN_STRATEGY"))
    tokenizer: str = Field("rwkv_vocab_v20230424", validation_alias=AliasChoices("RAVEN_TOKENIZER"))
    backend: Literal["auto", "batched", "package"] = Field("auto", validation_alias=AliasChoices("RAVEN_BACKEND"))
    torch_threads: int = Field(0, ge=0, validation_alias=AliasChoices("RAVEN_TORCH_THREADS"))

    # --- storage and personas ----------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), validation_alias=AliasChoices("RAVEN_DATA_DIR"))
    database: Path | None = Field(None, validation_alias=AliasChoices("RAVEN_DATABASE"))
    personas_dir: Path | None = Field(None, validation_alias=AliasChoices("RAVEN_PERSONAS_DIR"))
    default_persona: str = Field("default", validation_alias=AliasChoices("RAVEN_DEFAULT_PERSONA"))
    max_message_chars: int = Field(8000, ge=1, validation_alias=AliasChoices("RAVEN_MAX_MESSAGE_CHARS"))
    dedupe_ttl_s: int = Field(3600, ge=600, validation_alias=AliasChoices("RAVEN_DEDUPE_TTL_S"))

    # --- sampling (a persona's front matter can override each) -------------------------------------
    temperature: float = Field(1.0, ge=0.0, le=5.0, validation_alias=AliasChoices("RAVEN_TEMPERATURE"))
    top_p: float = Field(0.3, ge=0.0, le=1.0, validation_alias=AliasChoices("RAVEN_TOP_P"))
    top_k: int = Field(0, ge=0, validation_alias=AliasChoices("RAVEN_TOP_K"))
    presence_penalty: float = Field(0.5, ge=0.0, validation_alias=AliasChoices("RAVEN_PRESENCE_PENALTY"))
    frequency_penalty: float = Field(0.5, ge=0.0, validation_alias=AliasChoices("RAVEN_FREQUENCY_PENALTY"))
    penalty_decay: float = Field(0.996, gt=0.0, le=1.0, validation_alias=AliasChoices("RAVEN_PENALTY_DECAY"))
    max_reply_tokens: int = Field(400, ge=1, le=8192, validation_alias=AliasChoices("RAVEN_MAX_REPLY_TOKENS"))
    seed: int | None = Field(None, validation_alias=AliasChoices("RAVEN_SEED"))
    show_thinking: bool = Field(False, validation_alias=AliasChoices("RAVEN_SHOW_THINKING"))

    # --- engine --------------------------------------------------------------------------------------
    max_batch: int = Field(32, ge=1, le=1024, validation_alias=AliasChoices("RAVEN_MAX_BATCH"))
    prefill_chunk: int = Field(256, ge=1, le=4096, validation_alias=AliasChoices("RAVEN_PREFILL_CHUNK"))
    max_queue: int = Field(64, ge=1, validation_alias=AliasChoices("RAVEN_MAX_QUEUE"))
    reply_timeout_s: float = Field(180.0, gt=0, validation_alias=AliasChoices("RAVEN_REPLY_TIMEOUT_S"))
    state_cache_mb: int = Field(512, ge=0, validation_alias=AliasChoices("RAVEN_STATE_CACHE_MB"))

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias=AliasChoices("RAVEN_LOG_LEVEL")
    )

    # --- Discord -------------------------------------------------------------------------------------
    discord_token: SecretStr | None = _secret("DISCORD_TOKEN")
    discord_command_guilds: IdList = _ids("DISCORD_COMMAND_GUILDS")
    discord_allowed_guilds: IdList = _ids("DISCORD_ALLOWED_GUILDS")
    discord_allowed_channels: IdList = _ids("DISCORD_ALLOWED_CHANNELS")
    discord_allowed_roles: IdList = _ids("DISCORD_ALLOWED_ROLES")
    discord_answer_dms: bool = Field(True, validation_alias=AliasChoices("DISCORD_ANSWER_DMS"))
    discord_edit_interval_s: float = Field(1.0, ge=1.0, validation_alias=AliasChoices("DISCORD_EDIT_INTERVAL_S"))

    # --- Slack ---------------------------------------------------------------------------------------
    slack_bot_token: SecretStr | None = _secret("SLACK_BOT_TOKEN")
    slack_app_token: SecretStr | None = _secret("SLACK_APP_TOKEN")
    slack_signing_secret: SecretStr | None = _secret("SLACK_SIGNING_SECRET")
    slack_api_url: str = Field("https://slack.com/api/", validation_alias=AliasChoices("SLACK_API_URL"))
    slack_http_host: str = Field("0.0.0.0", validation_alias=AliasChoices("SLACK_HTTP_HOST"))
    slack_http_port: int = Field(3000, ge=1, le=65535, validation_alias=AliasChoices("SLACK_HTTP_PORT"))
    slack_http_path: str = Field("/slack/events", validation_alias=AliasChoices("SLACK_HTTP_PATH"))
    slack_allowed_channels: IdList = _ids("SLACK_ALLOWED_CHANNELS")
    slack_update_interval_s: float = Field(1.2, ge=1.0, validation_alias=AliasChoices("SLACK_UPDATE_INTERVAL_S"))
    slack_max_message_chars: int = Field(
        3900, ge=100, le=40000, validation_alias=AliasChoices("SLACK_MAX_MESSAGE_CHARS")
    )

    # --- web chat page and HTTP API ------------------------------------------------------------------
    web_enabled: bool = Field(False, validation_alias=AliasChoices("RAVEN_WEB_ENABLED"))
    web_host: str = Field("127.0.0.1", validation_alias=AliasChoices("RAVEN_WEB_HOST"))
    web_port: int = Field(8001, ge=0, le=65535, validation_alias=AliasChoices("RAVEN_WEB_PORT"))
    web_token: SecretStr | None = _secret("RAVEN_WEB_TOKEN")
    web_cors_origins: IdList = _ids("RAVEN_WEB_CORS_ORIGINS")
    web_max_body_bytes: int = Field(65536, ge=1024, validation_alias=AliasChoices("RAVEN_WEB_MAX_BODY_BYTES"))

    @field_validator(
        "discord_command_guilds", "discord_allowed_guilds", "discord_allowed_channels",
        "discord_allowed_roles", "slack_allowed_channels", "web_cors_origins", mode="before",
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("discord_token", "slack_bot_token", "slack_app_token", "slack_signing_secret",
                     "web_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model_path", "personas_dir", "database", mode="before")
    @classmethod
    def _blank_path_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_web_binding(self) -> Settings:
        local = self.web_host in ("127.0.0.1", "localhost", "::1")
        if self.web_enabled and not local and self.web_token is None:
            raise ValueError(
                "RAVEN_WEB_TOKEN must be set when RAVEN_WEB_HOST binds beyond localhost "
                f"({self.web_host!r})"
            )
        return self

    @property
    def database_path(self) -> Path:
        return self.database or self.data_dir / "raven.db"

    @property
    def discord_enabled(self) -> bool:
        return self.discord_token is not None

    @property
    def slack_enabled(self) -> bool:
        return self.slack_bot_token is not None


def _variable_name(loc: tuple[Any, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    info = Settings.model_fields.get(field)
    alias = getattr(info, "validation_alias", None) if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field.upper()


def load_settings(env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one message naming each variable."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = _variable_name(error.get("loc", ()))
            if not error.get("loc"):
                problems.append(error["msg"].removeprefix("Value error, "))
            else:
                shown = "" if "token" in name.lower() or "secret" in name.lower() else f" (got {error.get('input')!r})"
                problems.append(f"{name}: {error['msg']}{shown}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None
