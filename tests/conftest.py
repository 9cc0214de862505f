"""Shared fixtures: generated checkpoints (real format, real loader) and a running chat service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.app.assembly import open_service
from bot.app.settings import Settings, load_settings
from bot.core.service import ChatService
from bot.inference.checkpoint import make_checkpoint

SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_v7_path(models_dir: Path) -> Path:
    return make_checkpoint(models_dir / "tiny-v7.pth", "v7", "tiny", seed=7)


@pytest.fixture(scope="session")
def tiny_v4_path(models_dir: Path) -> Path:
    return make_checkpoint(models_dir / "tiny-v4.pth", "v4", "tiny", seed=4)


@pytest.fixture
def settings_factory(tiny_v7_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SettingsFactory:
    """Settings for a test: the tiny model, a fresh data directory, short seeded replies, and no
    influence from the developer's environment or ``.env``. Core fields by name, an adapter's
    section as a mapping: ``settings_factory(seed=2, web={"port": 0})``."""
    import os

    for name in list(os.environ):
        if name.startswith(("RAVEN_", "DISCORD_", "SLACK_")):
            monkeypatch.delenv(name)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model": tiny_v7_path, "data_dir": tmp_path / "data", "seed": 1,
            "max_reply_tokens": 40, "max_batch": 8, "backend": "auto",
        }
        values.update(overrides)
        return load_settings(env_file=None, **values)

    return make


@pytest.fixture
async def service(settings_factory: SettingsFactory) -> AsyncIterator[ChatService]:
    async with open_service(settings_factory()) as running:
        yield running
