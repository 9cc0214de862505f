"""Persona files: the built-in set, front matter parsing, name checks that come before any path is
built, the extra directory (RAVEN_PERSONAS_DIR), the mtime cache and the prompt fingerprint."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import pytest

from bot.app.settings import load_settings
from bot.core.personas import BUILTIN_DIR, PersonaLibrary, builtin_dir, parse_persona
from bot.errors import PersonaError

VALID = "---\nname: Extra\ndescription: An extra persona.\n---\nYou are an extra persona.\n"


@pytest.fixture
def extra(tmp_path: Path) -> Path:
    directory = tmp_path / "personas"
    directory.mkdir()
    return directory


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- built-ins -----------------------------------------------------------------------------------

def test_builtin_personas_load_with_names_and_descriptions() -> None:
    library = PersonaLibrary()
    assert library.names() == ["default", "project", "sql"]
    by_name = {p.name: p for p in library.all()}
    assert by_name["default"].display_name == "General assistant"
    assert by_name["default"].description == "A helpful, concise assistant for everyday questions."
    assert by_name["default"].sampling == {}
    assert by_name["sql"].display_name == "SQL advisor"
    assert by_name["sql"].description.startswith("Reviews queries, schemas and indexes")
    assert by_name["sql"].sampling == {"temperature": 0.8, "top_p": 0.3}
    assert by_name["project"].display_name == "Project advisor"
    assert by_name["project"].sampling == {"temperature": 1.0, "top_p": 0.4}
    for persona in by_name.values():
        assert persona.prompt.startswith("You are Raven")
        assert "---" not in persona.prompt.splitlines()[0]
        assert not persona.prompt.startswith("name:")
    assert "```sql" in by_name["sql"].prompt  # a fence in the prompt text survives front matter parsing


# --- front matter --------------------------------------------------------------------------------

def test_front_matter_sampling_overrides_and_roles_are_typed() -> None:
    text = (
        "---\nname: Typed\ndescription: d\ntemperature: 1\ntop_p: '0.25'\ntop_k: 40\n"
        "presence_penalty: 0.1\nfrequency_penalty: 0\npenalty_decay: 0.99\nmax_reply_tokens: 123\n"
        "user_role: 7\nbot_role: '  Robot  '\nsystem_role: Rules\nunrelated: ignored\n---\nPrompt.\n"
    )
    persona = parse_persona("typed", text)
    assert persona.sampling == {"temperature": 1.0, "top_p": 0.25, "top_k": 40, "presence_penalty": 0.1,
                                "frequency_penalty": 0.0, "penalty_decay": 0.99, "max_reply_tokens": 123}
    kinds = {key: type(value) for key, value in persona.sampling.items()}
    assert kinds == {"temperature": float, "top_p": float, "top_k": int, "presence_penalty": float,
                     "frequency_penalty": float, "penalty_decay": float, "max_reply_tokens": int}
    assert persona.roles == {"user_role": "7", "bot_role": "Robot", "system_role": "Rules"}
    assert (persona.display_name, persona.description, persona.prompt) == ("Typed", "d", "Prompt.")


def test_no_front_matter_means_prompt_only() -> None:
    persona = parse_persona("plain", "\n  Just a prompt.\n\n")
    assert (persona.display_name, persona.description, persona.prompt) == ("plain", "", "Just a prompt.")
    assert persona.sampling == {} and persona.roles == {}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("---\nname: [unclosed\n---\nPrompt.\n", "bad front matter"),
        ("---\nname: x\nPrompt with no closing fence.\n", "not closed"),
        ("---\n- a list\n- not a mapping\n---\nPrompt.\n", "must be a mapping"),
        ("---\nname: x\n---\n   \n\n", "no prompt text"),
        ("", "no prompt text"),
        ("---\ntemperature: hot\n---\nPrompt.\n", "temperature must be a number"),
        ("---\ntop_k: [1, 2]\n---\nPrompt.\n", "top_k must be a number"),
        ("---\nmax_reply_tokens: {a: 1}\n---\nPrompt.\n", "max_reply_tokens must be a number"),
        ("---\ntop_p:\n---\nPrompt.\n", "top_p must be a number"),
        # python-frontmatter alone would take these as prompt text or drop the front matter
        ("---\n", "not closed"),
        ("---", "not closed"),
        ("---\nname: x\n--- not a fence\nPrompt.\n", "not closed"),
        ("---\njust a string\n---\nPrompt.\n", "must be a mapping"),
        ("---\n[a, b]\n---\nPrompt.\n", "must be a mapping"),
        # the YAML is loaded safely: no Python objects
        ("---\nname: !!python/object/apply:os.system ['true']\n---\nPrompt.\n", "bad front matter"),
    ],
)
def test_malformed_persona_file_names_the_file(extra: Path, text: str, complaint: str) -> None:
    path = write(extra / "broken.md", text)
    with pytest.raises(PersonaError) as info:
        PersonaLibrary(extra).get("broken")
    assert str(path) in str(info.value)
    assert complaint in str(info.value)


def test_front_matter_edges() -> None:
    # Empty front matter is allowed; a later `---` line (a Markdown rule) stays in the prompt.
    persona = parse_persona("e", "---\n---\nFirst part.\n\n---\n\nSecond part.\n")
    assert (persona.display_name, persona.prompt) == ("e", "First part.\n\n---\n\nSecond part.")
    # Only YAML front matter: a prompt that opens with JSON or TOML delimiters is prompt text.
    for text in ("{\n\"a\": 1\n}\nPrompt.", "+++\na = 1\n+++\nPrompt."):
        assert parse_persona("j", text).prompt == text
    # Without an opening `---` line a later one is just text.
    assert parse_persona("n", "Prompt.\n---\nname: x\n---\n").prompt == "Prompt.\n---\nname: x\n---"


@pytest.mark.parametrize("value", ["true", "on"])
def test_yaml_boolean_is_not_a_number(value: str) -> None:
    """YAML 1.1 reads ``on``/``yes``/``true`` as booleans; ``temperature: on`` must not become 1.0."""
    with pytest.raises(PersonaError, match="temperature must be a number"):
        parse_persona("b", f"---\ntemperature: {value}\n---\nPrompt.\n", "b.md")


# --- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "A", "a/b", "", "a" * 33, "/etc/passwd", "x.md", "..", "-x", "a b"])
def test_invalid_names_are_refused_before_any_file_access(
    extra: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A perfectly valid persona file that "../x" would reach from the extra directory.
    write(tmp_path / "x.md", "---\nname: Escaped\n---\nYou should never see this.\n")
    library = PersonaLibrary(extra)

    def no_fs(*_: object, **__: object) -> None:
        raise AssertionError(f"persona name {name!r} reached the file system")

    for attr in ("is_file", "exists", "stat", "read_text", "open"):
        monkeypatch.setattr(Path, attr, no_fs)
    with pytest.raises(PersonaError, match="not a valid persona name"):
        library.get(name)


def test_name_boundaries(extra: Path) -> None:
    write(extra / ("a" * 32 + ".md"), VALID)
    write(extra / "0-x_y.md", VALID)
    library = PersonaLibrary(extra)
    assert library.get("a" * 32).display_name == "Extra"
    assert library.get("0-x_y").name == "0-x_y"
    # Files whose stem is not a valid name are never offered.
    write(extra / "Upper.md", VALID)
    write(extra / "has space.md", VALID)
    assert library.names() == sorted(["0-x_y", "a" * 32, "default", "project", "sql"])


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(PersonaError) as info:
        PersonaLibrary().get("nosuch")
    assert "unknown persona 'nosuch'" in str(info.value)
    assert "default, project, sql" in str(info.value)


# --- the extra directory -------------------------------------------------------------------------

def test_extra_dir_adds_and_overrides(extra: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(extra / "extra.md", VALID)
    write(extra / "sql.md", "---\nname: House SQL\n---\nOur own SQL rules.\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAVEN_PERSONAS_DIR", str(extra))
    settings = load_settings(env_file=None)
    assert settings.personas_dir == extra
    library = PersonaLibrary(settings.personas_dir)
    assert library.names() == ["default", "extra", "project", "sql"]
    assert library.get("extra").description == "An extra persona."
    assert (library.get("sql").display_name, library.get("sql").prompt) == ("House SQL", "Our own SQL rules.")
    assert library.get("default").display_name == "General assistant"  # built-ins still there
    # The built-in is untouched for a library without the extra directory.
    assert PersonaLibrary().get("sql").display_name == "SQL advisor"


def test_extra_dir_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(PersonaError, match="RAVEN_PERSONAS_DIR"):
        PersonaLibrary(tmp_path / "missing")


# --- cache and fingerprint -----------------------------------------------------------------------

def test_edits_are_picked_up_by_mtime(extra: Path) -> None:
    path = write(extra / "live.md", "---\nname: Live\n---\nFirst prompt.\n")
    library = PersonaLibrary(extra)
    first = library.get("live")
    assert first.prompt == "First prompt."
    assert library.get("live") is first  # unchanged file: served from the cache

    stamp = path.stat().st_mtime
    write(path, "---\nname: Live 2\ntemperature: 0.5\n---\nSecond prompt.\n")
    os.utime(path, (stamp + 10, stamp + 10))  # a visibly newer mtime, whatever the clock granularity
    second = library.get("live")
    assert (second.display_name, second.prompt, second.sampling) == ("Live 2", "Second prompt.", {"temperature": 0.5})
    assert second.fingerprint != first.fingerprint


def test_fingerprint_follows_prompt_and_roles_only() -> None:
    base = parse_persona("p", "---\nname: A\n---\nPrompt one.\n")
    assert len(base.fingerprint) == 16
    assert parse_persona("p", "---\nname: A\n---\nPrompt one.\n").fingerprint == base.fingerprint
    assert parse_persona("p", "---\nname: A\n---\nPrompt two.\n").fingerprint != base.fingerprint
    assert parse_persona("p", "---\nname: A\nuser_role: Bob\n---\nPrompt one.\n").fingerprint != base.fingerprint
    # Display text and sampling do not change what the model reads.
    same = parse_persona("p", "---\nname: B\ndescription: other\ntemperature: 2\n---\nPrompt one.\n")
    assert same.fingerprint == base.fingerprint


def test_builtin_dir_is_the_repository_instructions() -> None:
    assert sorted(p.name for p in BUILTIN_DIR.glob("*.md")) == ["default.md", "project.md", "sql.md"]
    # Found as the `instructions` package (package data in a wheel; tests/test_wheel.py installs one).
    assert BUILTIN_DIR == Path(str(importlib.resources.files("instructions")))
    assert BUILTIN_DIR == Path(__file__).resolve().parent.parent / "instructions"


def test_builtin_dir_falls_back_to_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """An editable install made before ``instructions`` was a package cannot import it."""

    def missing(name: str) -> None:
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    assert builtin_dir() == BUILTIN_DIR


@pytest.mark.parametrize("line", ["top_p: 7", "max_reply_tokens: 0", "temperature: -1", "penalty_decay: 2"])
def test_sampling_overrides_out_of_range_are_refused(line: str) -> None:
    with pytest.raises(PersonaError, match="must be between"):
        parse_persona("p", f"---\n{line}\n---\nprompt\n", "p.md")
