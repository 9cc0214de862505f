"""The core's settings, the sampling parameters, and what every settings section shares.

Settings come in sections, each a pydantic-settings class read from the environment and ``.env``
under its own prefix, so a field's name is its variable's name without the prefix:
:class:`CoreSettings` (``RAVEN_*``) here, and each adapter's section next to the adapter
(``adapters/settings.py``: ``DISCORD_*``, ``SLACK_*``, ``RAVEN_WEB_*``). The composition root
(``bot/app/settings.py``) puts them together and turns validation errors into one
:class:`ConfigError` naming each variable (:func:`problems`), never a traceback later.

Every variable is documented in ``.env.example``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.errors import ConfigError


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _blank_is_unset(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _not_a_bool(value: Any) -> Any:
    # YAML reads `on`/`true` as booleans, and pydantic would take True as 1.
    if isinstance(value, bool):
        raise ValueError("must be a number")
    return value


IdList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]
"""A comma-separated list of IDs (empty: no restriction)."""
Secret = Annotated[SecretStr | None, BeforeValidator(_blank_is_unset)]
"""A token or secret: hidden in reprs, never echoed in errors; blank means unset."""
OptionalPath = Annotated[Path | None, BeforeValidator(_blank_is_unset)]
Number = Annotated[float, BeforeValidator(_not_a_bool), Field(allow_inf_nan=False)]
Count = Annotated[int, BeforeValidator(_not_a_bool)]


class Section(BaseSettings):
    """A settings section: read from the environment and a ``.env`` file (the environment wins),
    each field from the variable ``env_prefix + NAME``. Blank values mean the default; values are
    frozen once read."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True, frozen=True,
    )

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable of ``field`` (``temperature`` → ``RAVEN_TEMPERATURE``)."""
        return f"{cls.model_config.get('env_prefix') or ''}{field}".upper()

    @classmethod
    def variables(cls) -> list[str]:
        """Every variable this section reads (sections nested in it read their own)."""
        return [cls.variable(name) for name, info in cls.model_fields.items()
                if not (isinstance(info.annotation, type) and issubclass(info.annotation, Section))]


class Sampling(BaseModel):
    """How a reply is sampled. The ranges are stated here once: :class:`CoreSettings` inherits these
    fields (``RAVEN_TEMPERATURE``…), and a persona's front matter overrides are validated with this
    same model (:mod:`bot.core.personas`)."""

    model_config = ConfigDict(frozen=True)

    temperature: Number = Field(1.0, ge=0.0, le=5.0)
    top_p: Number = Field(0.3, ge=0.0, le=1.0)
    top_k: Count = Field(0, ge=0)
    presence_penalty: Number = Field(0.5, ge=0.0)
    frequency_penalty: Number = Field(0.5, ge=0.0)
    penalty_decay: Number = Field(0.996, gt=0.0, le=1.0)
    max_reply_tokens: Count = Field(400, ge=1, le=8192)

    @classmethod
    def range_text(cls, field: str) -> str:
        """The accepted range of ``field`` in words, read from its constraints: ``between 0 and 5``,
        ``between 0 (excluded) and 1``, ``at least 0``."""
        bounds: dict[str, Any] = {}
        for item in cls.model_fields[field].metadata:
            for kind in ("gt", "ge", "lt", "le"):
                if getattr(item, kind, None) is not None:  # annotated_types' Gt, Ge, Lt, Le
                    bounds[kind] = getattr(item, kind)
        low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
        if low is not None and high is not None:
            return (f"between {low:g}{' (excluded)' if 'gt' in bounds else ''} "
                    f"and {high:g}{' (excluded)' if 'lt' in bounds else ''}")
        if low is not None:
            return f"{'greater than' if 'gt' in bounds else 'at least'} {low:g}"
        if high is not None:
            return f"{'less than' if 'lt' in bounds else 'at most'} {high:g}"
        return "a number"


class CoreSettings(Sampling, Section):
    """The chat core's settings: model, storage and personas, sampling, engine (``RAVEN_*``)."""

    model_config = SettingsConfigDict(env_prefix="RAVEN_")

    # --- model -------------------------------------------------------------------------------------
    model: OptionalPath = None
    strategy: str = "cpu fp32"
    tokenizer: str = "rwkv_vocab_v20230424"
    backend: Literal["auto", "batched", "package"] = "auto"
    torch_threads: int = Field(0, ge=0)
    cuda_graphs: bool = True

    # --- storage and personas ----------------------------------------------------------------------
    data_dir: Path = Path("data")
    database: OptionalPath = None
    personas_dir: OptionalPath = None
    default_persona: str = "default"
    max_message_chars: int = Field(8000, ge=1)
    dedupe_ttl_s: int = Field(3600, ge=600)
    instance_lease_s: float = Field(30.0, ge=3.0)
    delivery_timeout_s: float = Field(300.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)

    # --- what a message brings: files, and a thread's earlier messages ---------------------------------
    attachment_max_bytes: int = Field(100_000, ge=0)
    attachment_max_files: int = Field(5, ge=0)
    adopt_max_messages: int = Field(50, ge=0)
    adopt_max_chars: int = Field(20_000, ge=0)

    # --- limits and retention (0: none) --------------------------------------------------------------
    rate_messages_per_minute: int = Field(0, ge=0)
    rate_tokens_per_day: int = Field(0, ge=0)
    rate_channel_messages_per_minute: int = Field(0, ge=0)
    rate_channel_tokens_per_day: int = Field(0, ge=0)
    admins: IdList = Field(default_factory=list)  # platform:user id, exempt from the limits
    retention_days: float = Field(0, ge=0)
    state_idle_days: float = Field(0, ge=0)

    # --- sampling: the fields of Sampling (RAVEN_TEMPERATURE…; a persona can override each), and -------
    seed: int | None = None
    show_thinking: bool = False

    # --- engine --------------------------------------------------------------------------------------
    max_batch: int = Field(32, ge=1, le=1024)
    prefill_chunk: int = Field(256, ge=1, le=4096)
    max_queue: int = Field(64, ge=1)
    reply_timeout_s: float = Field(180.0, gt=0)
    state_cache_mb: int = Field(512, ge=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- Prometheus metrics: the web port's /metrics when the web page is on, else this port (0: off) --
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @property
    def database_path(self) -> Path:
        return self.database or self.data_dir / "raven.db"

    @property
    def sampling(self) -> Sampling:
        """The configured sampling parameters (before a persona's overrides)."""
        return Sampling.model_validate({name: getattr(self, name) for name in Sampling.model_fields})


def _is_secret(variable: str) -> bool:
    return "TOKEN" in variable or "SECRET" in variable


def problems(section: type[Section], exc: ValidationError) -> list[str]:
    """One line per validation error of ``section``, naming the environment variable and showing the
    bad value, unless it is a token's or a secret's."""
    found = []
    for error in exc.errors():
        loc = error.get("loc", ())
        message = error["msg"].removeprefix("Value error, ")
        if not loc:  # a check across fields: its message names the variables
            found.append(message)
            continue
        name = section.variable(str(loc[0]))
        shown = "" if _is_secret(name) else f" (got {error.get('input')!r})"
        found.append(f"{name}: {message}{shown}")
    return found


def invalid_settings(found: list[str]) -> ConfigError:
    """The one error for every problem found (:func:`problems`)."""
    return ConfigError("invalid settings:\n  " + "\n  ".join(found))
