"""Raven's settings: the core's (``RAVEN_*``) with each adapter's section nested in it, read once from
the environment and ``.env``.

``settings.discord``, ``settings.slack`` and ``settings.web`` are the adapters' sections
(``adapters/settings.py``); everything else is :class:`~bot.settings.CoreSettings`. Read them with
:func:`load_settings`: it reads every section from the same ``.env`` file and reports every malformed
variable at once, by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import NoDecode

from adapters.settings import DiscordSettings, SlackSettings, WebSettings
from bot.settings import CoreSettings, Section, invalid_settings, problems

__all__ = ["SECTIONS", "Settings", "load_settings", "variables"]


S = TypeVar("S", bound=Section)


def _read(section: type[S]) -> Callable[[], S]:
    return lambda: section()  # Settings() alone reads each section from ".env"; load_settings passes its env_file


class Settings(CoreSettings):
    """Every setting. ``NoDecode``: no JSON is read from ``RAVEN_DISCORD`` (say) into a section; the
    sections read their own variables."""

    discord: Annotated[DiscordSettings, NoDecode] = Field(default_factory=_read(DiscordSettings))
    slack: Annotated[SlackSettings, NoDecode] = Field(default_factory=_read(SlackSettings))
    web: Annotated[WebSettings, NoDecode] = Field(default_factory=_read(WebSettings))


SECTIONS: dict[str, type[Section]] = {"discord": DiscordSettings, "slack": SlackSettings, "web": WebSettings}


def variables() -> list[str]:
    """Every environment variable Raven reads."""
    return Settings.variables() + [name for section in SECTIONS.values() for name in section.variables()]


def _unknown(where: type[Section], names: Any) -> None:
    unknown = sorted(set(names) - set(where.model_fields))
    if unknown:  # a typo in code or a test: never silently ignored (the environment's extras are)
        raise TypeError(f"{where.__name__} has no setting {', '.join(unknown)}")


def load_settings(env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
    """Read the settings from the environment and ``env_file`` (``None``: no file); ``overrides``
    win over both: core fields by name (``seed=1``), a section's fields as a mapping
    (``web={"port": 0}``). Raises :class:`~bot.errors.ConfigError` naming every malformed variable."""
    sections: dict[str, Any] = {}
    found: list[str] = []
    for name, section in SECTIONS.items():
        values = overrides.pop(name, None) or {}
        if isinstance(values, section):
            sections[name] = values
            continue
        if not isinstance(values, Mapping):
            raise TypeError(f"{name}= takes a mapping of {section.__name__} fields")
        _unknown(section, values)
        try:
            sections[name] = section(_env_file=env_file, **values)  # type: ignore[call-arg]
        except ValidationError as exc:
            found += problems(section, exc)
            sections[name] = section.model_construct()  # its defaults, so the core is still checked
    _unknown(Settings, overrides)
    try:
        settings = Settings(_env_file=env_file, **overrides, **sections)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise invalid_settings(problems(Settings, exc) + found) from None
    if found:
        raise invalid_settings(found)
    return settings
