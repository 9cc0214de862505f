"""Each adapter's settings section, read from the environment and ``.env`` under its own prefix
(``DISCORD_*``, ``SLACK_*``, ``RAVEN_WEB_*``; every variable is documented in ``.env.example``).

They live here, next to the adapters and out of the core, and import no platform SDK: the
composition root (``bot/app/settings.py``) reads them at start-up, also for ``raven chat``, which
never loads discord.py, slack_bolt or FastAPI.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from bot.settings import IdList, Secret, Section

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class DiscordSettings(Section):
    """The Discord adapter (``DISCORD_*``); it starts when ``DISCORD_TOKEN`` is set."""

    model_config = SettingsConfigDict(env_prefix="DISCORD_")

    token: Secret = None
    command_guilds: IdList = Field(default_factory=list)
    allowed_guilds: IdList = Field(default_factory=list)
    allowed_channels: IdList = Field(default_factory=list)
    allowed_roles: IdList = Field(default_factory=list)
    admin_roles: IdList = Field(default_factory=list)  # members with one are exempt from RAVEN_RATE_*
    answer_dms: bool = True
    edit_interval_s: float = Field(1.0, ge=1.0)
    retry_budget_s: float = Field(60.0, gt=0)
    api_url: str | None = None  # Discord's REST API through a proxy (or a local stand-in)
    gateway_url: str | None = None  # the gateway's websocket, likewise

    @property
    def enabled(self) -> bool:
        return self.token is not None


class SlackSettings(Section):
    """The Slack adapter (``SLACK_*``); it starts when ``SLACK_BOT_TOKEN`` is set."""

    model_config = SettingsConfigDict(env_prefix="SLACK_")

    bot_token: Secret = None
    app_token: Secret = None
    signing_secret: Secret = None
    api_url: str = "https://slack.com/api/"
    http_host: str = "0.0.0.0"
    http_port: int = Field(3000, ge=1, le=65535)
    http_path: str = "/slack/events"
    allowed_channels: IdList = Field(default_factory=list)
    admins_exempt: bool = False  # workspace admins and owners (users.info) are exempt from RAVEN_RATE_*
    update_interval_s: float = Field(1.2, ge=1.0)
    max_message_chars: int = Field(3900, ge=100, le=40000)
    retry_budget_s: float = Field(60.0, gt=0)

    @property
    def enabled(self) -> bool:
        return self.bot_token is not None


class WebSettings(Section):
    """The web chat page and HTTP API (``RAVEN_WEB_*``): served by ``raven run`` when
    ``RAVEN_WEB_ENABLED`` is set, and always by ``raven web``."""

    model_config = SettingsConfigDict(env_prefix="RAVEN_WEB_")

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    token: Secret = None
    cors_origins: IdList = Field(default_factory=list)
    max_body_bytes: int = Field(65536, ge=1024)

    @property
    def local(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @model_validator(mode="after")
    def _check_binding(self) -> WebSettings:
        if self.enabled and not self.local and self.token is None:
            raise ValueError(
                f"{self.variable('token')} must be set when {self.variable('host')} binds beyond localhost "
                f"({self.host!r})"
            )
        return self
