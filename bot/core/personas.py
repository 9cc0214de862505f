"""Persona files: a small YAML front matter and the system prompt text.

```
---
name: SQL advisor
description: Reviews queries, schemas and indexes.
temperature: 0.8        # optional sampling overrides (the RAVEN_* settings' names and ranges)
user_role: User          # optional role names for the prompt
bot_role: Assistant
state: sql-tuned.pth     # optional RWKV state file (state tuning), next to this file
---
You are ...
```

A ``state:`` file is the thread's initial state (the prompt, which may then be empty, is read on
top of it). Its path is relative to the persona's own directory and must stay inside it: absolute
paths and ``..`` are refused, and so is a symlink leading out.

A persona's name is its file name without ``.md``. Names are checked against a strict pattern
before any path is built, so ``../x`` can never reach the file system.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from frontmatter.default_handlers import YAMLHandler
from pydantic import ValidationError

from bot.errors import PersonaError
from bot.inference.state_file import StateFile, StateLayout, read_state_file
from bot.settings import Sampling

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# python-frontmatter's YAML handler: a `---` line opens and closes the front matter, and it loads
# with yaml's SafeLoader (CSafeLoader when libyaml is there), the same as yaml.safe_load.
FRONT_MATTER = YAMLHandler()


def builtin_dir() -> Path:
    """The built-in personas: the ``instructions`` package's folder, found through
    ``importlib.resources`` so that it works for a wheel install (site-packages/instructions), an
    editable install (setuptools maps the package to the checkout) and a source checkout on
    ``sys.path``. An old editable install that predates the package falls back to the checkout
    folder next to ``bot/``."""
    try:
        root = importlib.resources.files("instructions")
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path) and (root / "default.md").is_file():
        return root
    return Path(__file__).resolve().parents[2] / "instructions"


BUILTIN_DIR = builtin_dir()
ROLE_KEYS = ("user_role", "bot_role", "system_role")
RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


@dataclass(frozen=True)
class Persona:
    name: str
    display_name: str
    description: str
    prompt: str
    sampling: dict[str, float | int] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    #: the initial state from the front matter's ``state:`` file (None: a fresh state)
    state: StateFile | None = field(default=None, compare=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """Changes whenever the prompt, the roles or the state file's content change, so a state
        built on the old text (or the old initial state) is never reused."""
        digest = hashlib.sha256()
        digest.update(self.prompt.encode())
        digest.update(repr(sorted(self.roles.items())).encode())
        if self.state is not None:
            digest.update(f"state:{self.state.digest}".encode())
        return digest.hexdigest()[:16]


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise PersonaError(
            f"{name[:40]!r} is not a valid persona name: use lowercase letters, digits, '-' or '_' "
            "(at most 32 characters)"
        )
    return name


def split_front_matter(text: str, where: str) -> tuple[dict[str, Any], str]:
    """The front matter mapping and the body. The handler's methods are called one by one because
    ``frontmatter.loads`` is lenient where a persona file must not be: it returns the whole file as
    content when the closing ``---`` is missing, and drops front matter that is not a mapping."""
    if not FRONT_MATTER.detect(text):  # no opening `---` line: the whole file is the prompt
        return {}, text
    try:
        raw, body = FRONT_MATTER.split(text)
    except ValueError:  # only the opening `---`
        raise PersonaError(f"persona file {where}: front matter is not closed with '---'") from None
    try:
        loaded = FRONT_MATTER.load(raw)
    except yaml.YAMLError as exc:
        raise PersonaError(f"persona file {where}: bad front matter: {exc}") from exc
    if loaded is None:  # empty front matter
        loaded = {}
    if not isinstance(loaded, dict):
        raise PersonaError(f"persona file {where}: front matter must be a mapping")
    return loaded, body


def _sampling(front: dict[str, Any], where: str) -> dict[str, float | int]:
    """The front matter's sampling overrides, validated by the same model as the settings they
    override (:class:`~bot.settings.Sampling`), so their ranges are the settings' ranges."""
    given = {key: front[key] for key in Sampling.model_fields if key in front}
    try:
        checked = Sampling.model_validate(given)
    except ValidationError as exc:
        complaints = []
        for error in exc.errors():
            key = str(error["loc"][0]) if error.get("loc") else "?"
            if error["type"] in RANGE_ERRORS:
                complaints.append(f"{key} must be {Sampling.range_text(key)}")
            elif error["type"] == "int_from_float":
                complaints.append(f"{key} must be a whole number")
            else:  # not a number at all, a boolean, infinite
                complaints.append(f"{key} must be a number")
        raise PersonaError(f"persona file {where}: {'; '.join(complaints)}") from None
    return {key: getattr(checked, key) for key in given}


def state_path(directory: Path, value: object, where: str) -> Path:
    """The front matter's ``state:`` value as a file inside ``directory`` (the persona's own), or an
    error: no absolute path, no ``..``, no symlink out of the directory, and a ``.pth`` name."""
    if not isinstance(value, str) or not value.strip():
        raise PersonaError(f"persona file {where}: state must be a file name (a .pth next to the persona)")
    relative = Path(value.strip())
    if relative.is_absolute() or value.strip().startswith(("/", "\\")) or ".." in relative.parts:
        raise PersonaError(f"persona file {where}: state file {value[:80]!r} must be a path inside the personas "
                           "directory (no absolute path, no '..')")
    if relative.suffix != ".pth":
        raise PersonaError(f"persona file {where}: state file {value[:80]!r} must be a .pth file")
    root = directory.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise PersonaError(f"persona file {where}: state file {value[:80]!r} leads outside the personas directory")
    return path


def _state(front: dict[str, Any], where: str, directory: Path | None,
           layout: StateLayout | None) -> StateFile | None:
    if front.get("state") is None:
        return None
    if directory is None:
        raise PersonaError(f"persona file {where}: a state file needs the persona's directory")
    try:
        state = read_state_file(state_path(directory, front["state"], where))
        if layout is not None:
            state.check(layout)
    except PersonaError as exc:
        message = str(exc)  # the persona file first, then the state file, whichever check failed
        prefix = "" if message.startswith("persona file") else f"persona file {where}: "
        raise PersonaError(prefix + message) from None
    return state


def parse_persona(name: str, text: str, source: str = "", directory: Path | None = None,
                  layout: StateLayout | None = None) -> Persona:
    """A persona from its file's text. ``directory``: where a ``state:`` file is looked up;
    ``layout``: the loaded model's, which that file must fit (None: checked when the state is used)."""
    where = source or name
    front, body = split_front_matter(text, where)
    sampling = _sampling(front, where)
    roles = {key: str(front[key]).strip() for key in ROLE_KEYS if front.get(key)}
    prompt = body.strip()
    state = _state(front, where, directory, layout)
    if not prompt and state is None:
        raise PersonaError(f"persona file {where} has no prompt text")
    return Persona(
        name=name,
        display_name=str(front.get("name") or name),
        description=str(front.get("description") or ""),
        prompt=prompt,
        sampling=sampling,
        roles=roles,
        state=state,
    )


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


class PersonaLibrary:
    """The built-in ``instructions/`` plus an optional extra directory (which wins on name clashes)."""

    def __init__(self, extra_dir: Path | None = None, builtin_dir: Path = BUILTIN_DIR,
                 state_layout: StateLayout | None = None) -> None:
        self.dirs = [d for d in (extra_dir, builtin_dir) if d is not None]
        if extra_dir is not None and not extra_dir.is_dir():
            raise PersonaError(f"RAVEN_PERSONAS_DIR {extra_dir} is not a directory")
        #: the loaded model's state layout: a persona whose state file does not fit it is broken
        self.state_layout = state_layout
        self._cache: dict[str, tuple[float, StateLayout | None, Persona]] = {}

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
                # a cached persona is reused while its file, its state file and the model are the same
                if (cached and cached[0] == mtime and cached[1] == self.state_layout
                        and (cached[2].state is None or _stat(cached[2].state.path) == cached[2].state.stamp)):
                    return cached[2]
                layout = self.state_layout
                persona = parse_persona(name, path.read_text(encoding="utf-8"), str(path), directory, layout)
                self._cache[name] = (mtime, layout, persona)
                return persona
        raise PersonaError(f"unknown persona {name!r}; available: {', '.join(self.names())}")
