"""Persona files: a small YAML front matter and the system prompt text.

```
---
name: SQL advisor
description: Reviews queries, schemas and indexes.
temperature: 0.8        # optional sampling overrides
user_role: User          # optional role names for the prompt
bot_role: Assistant
---
You are ...
```

A persona's name is its file name without ``.md``. Names are checked against a strict pattern
before any path is built, so ``../x`` can never reach the file system.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bot.errors import PersonaError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
BUILTIN_DIR = Path(__file__).resolve().parents[2] / "instructions"
SAMPLING_KEYS = {
    "temperature": float, "top_p": float, "top_k": int, "presence_penalty": float,
    "frequency_penalty": float, "penalty_decay": float, "max_reply_tokens": int,
}
# The same ranges as the settings they override (bot/settings.py).
SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 5.0), "top_p": (0.0, 1.0), "top_k": (0, 1_000_000),
    "presence_penalty": (0.0, 100.0), "frequency_penalty": (0.0, 100.0), "penalty_decay": (1e-6, 1.0),
    "max_reply_tokens": (1, 8192),
}
ROLE_KEYS = ("user_role", "bot_role", "system_role")


@dataclass(frozen=True)
class Persona:
    name: str
    display_name: str
    description: str
    prompt: str
    sampling: dict[str, float | int] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Changes whenever the prompt or roles change, so a state built on the old text is never reused."""
        digest = hashlib.sha256()
        digest.update(self.prompt.encode())
        digest.update(repr(sorted(self.roles.items())).encode())
        return digest.hexdigest()[:16]


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise PersonaError(
            f"{name[:40]!r} is not a valid persona name: use lowercase letters, digits, '-' or '_' "
            "(at most 32 characters)"
        )
    return name


def parse_persona(name: str, text: str, source: str = "") -> Persona:
    front: dict[str, Any] = {}
    body = text
    if text.startswith("---"):
        parts = text.split("\n---", 1)
        if len(parts) != 2:
            raise PersonaError(f"persona file {source or name}: front matter is not closed with '---'")
        try:
            loaded = yaml.safe_load(parts[0].removeprefix("---")) or {}
        except yaml.YAMLError as exc:
            raise PersonaError(f"persona file {source or name}: bad front matter: {exc}") from exc
        if not isinstance(loaded, dict):
            raise PersonaError(f"persona file {source or name}: front matter must be a mapping")
        front = loaded
        body = parts[1].lstrip("-").lstrip("\n")
    sampling: dict[str, float | int] = {}
    for key, kind in SAMPLING_KEYS.items():
        if key in front:
            value = front[key]
            try:
                if isinstance(value, bool):  # YAML reads `on`/`true` as booleans; float(True) is 1.0
                    raise TypeError(key)
                sampling[key] = kind(value)
            except (TypeError, ValueError) as exc:
                raise PersonaError(f"persona file {source or name}: {key} must be a number") from exc
            low, high = SAMPLING_RANGES[key]
            if not low <= sampling[key] <= high:
                raise PersonaError(f"persona file {source or name}: {key} must be between {low:g} and {high:g}")
    roles = {key: str(front[key]).strip() for key in ROLE_KEYS if front.get(key)}
    prompt = body.strip()
    if not prompt:
        raise PersonaError(f"persona file {source or name} has no prompt text")
    return Persona(
        name=name,
        display_name=str(front.get("name") or name),
        description=str(front.get("description") or ""),
        prompt=prompt,
        sampling=sampling,
        roles=roles,
    )


class PersonaLibrary:
    """The built-in ``instructions/`` plus an optional extra directory (which wins on name clashes)."""

    def __init__(self, extra_dir: Path | None = None, builtin_dir: Path = BUILTIN_DIR) -> None:
        self.dirs = [d for d in (extra_dir, builtin_dir) if d is not None]
        if extra_dir is not None and not extra_dir.is_dir():
            raise PersonaError(f"RAVEN_PERSONAS_DIR {extra_dir} is not a directory")
        self._cache: dict[str, tuple[float, Persona]] = {}

    def names(self) -> list[str]:
        found = {p.stem for d in self.dirs for p in d.glob("*.md") if NAME_PATTERN.fullmatch(p.stem)}
        return sorted(found)

    def all(self) -> list[Persona]:
        return [self.get(name) for name in self.names()]

    def load_all(self) -> dict[str, Persona | PersonaError]:
        """Every persona by name, through the cache; a malformed file maps to its error, so one
        broken file does not hide the others."""
        found: dict[str, Persona | PersonaError] = {}
        for name in self.names():
            try:
                found[name] = self.get(name)
            except PersonaError as exc:
                found[name] = exc
        return found

    def get(self, name: str) -> Persona:
        check_name(name)
        for directory in self.dirs:
            path = directory / f"{name}.md"
            if path.is_file():
                mtime = path.stat().st_mtime
                cached = self._cache.get(name)
                if cached and cached[0] == mtime:
                    return cached[1]
                persona = parse_persona(name, path.read_text(encoding="utf-8"), str(path))
                self._cache[name] = (mtime, persona)
                return persona
        raise PersonaError(f"unknown persona {name!r}; available: {', '.join(self.names())}")
