"""``raven import-persona``: a WePrompt prompt file becomes a persona file Raven reads, through the
real console script; files of another shape, and hostile ones, are refused without running a line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.core.personas import PersonaLibrary, parse_persona
from bot.core.weprompt import convert
from bot.errors import PersonaError

RAVEN = str(Path(sys.executable).parent / "raven")

# Shaped like the seed's instructions/SQLAdvisor.py: role names, an interface, and an f-string prompt
# with line continuations and an example exchange.
SQL_ADVISOR = '''\
# WePrompt: SQL advisor
interface = ":"
user = "Developer"
bot = "SQLAdvisor"

init_prompt = f\'\'\'
The following is a conversation between {user} and {bot}, an expert database engineer. \\
{bot} reviews SQL queries, schemas and indexes, and explains query plans. \\
{bot} names the SQL dialect when the answer depends on it.

{user}{interface} Why is SELECT * FROM orders WHERE customer_id = 42 slow?

{bot}{interface} Without an index on orders(customer_id) the database scans the whole table. \\
Create one: CREATE INDEX orders_customer ON orders (customer_id);
\'\'\'
'''

EXPECTED_PROMPT = (
    "The following is a conversation between Developer and SQLAdvisor, an expert database engineer. "
    "SQLAdvisor reviews SQL queries, schemas and indexes, and explains query plans. "
    "SQLAdvisor names the SQL dialect when the answer depends on it.\n\n"
    "Developer: Why is SELECT * FROM orders WHERE customer_id = 42 slow?\n\n"
    "SQLAdvisor: Without an index on orders(customer_id) the database scans the whole table. "
    "Create one: CREATE INDEX orders_customer ON orders (customer_id);"
)


def raven(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    clean.update(env)
    return subprocess.run([RAVEN, *args], env=clean, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_a_weprompt_file_becomes_a_persona_raven_lists(tmp_path: Path) -> None:
    source = tmp_path / "SQLAdvisor.py"
    source.write_text(SQL_ADVISOR, encoding="utf-8")
    personas = tmp_path / "personas"
    personas.mkdir()
    result = raven("import-persona", str(source), cwd=tmp_path, RAVEN_PERSONAS_DIR=str(personas))
    assert result.returncode == 0, result.stderr
    written = personas / "sqladvisor.md"
    assert result.stdout.strip() == f"wrote {written}: persona 'sqladvisor' (/advisor sqladvisor)"
    persona = PersonaLibrary(personas).get("sqladvisor")
    assert persona.prompt == EXPECTED_PROMPT
    assert persona.roles == {"user_role": "Developer", "bot_role": "SQLAdvisor"}
    assert persona.display_name == "SQLAdvisor"
    assert persona.description == "Imported from the WePrompt file SQLAdvisor.py"
    listed = raven("personas", cwd=tmp_path, RAVEN_PERSONAS_DIR=str(personas))
    assert "sqladvisor   SQLAdvisor — Imported from the WePrompt file SQLAdvisor.py" in listed.stdout.splitlines()
    # once there, it is not overwritten unless asked
    again = raven("import-persona", str(source), cwd=tmp_path, RAVEN_PERSONAS_DIR=str(personas))
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
    forced = raven("import-persona", str(source), "--name", "sql-review", "--output", str(tmp_path / "x.md"),
                   cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert parse_persona("sql-review", (tmp_path / "x.md").read_text(encoding="utf-8")).prompt == EXPECTED_PROMPT


def test_names_strings_and_concatenation_are_understood() -> None:
    source = ('user = "Q"\nbot = "A"\nintro: str = f"{bot} answers " + "briefly."\n'
              'init_prompt = f"""{intro}\n\n{user}: hi"""\n')
    imported = convert(source, "qa", "qa.py")
    persona = parse_persona("qa", imported.text)
    assert persona.prompt == "A answers briefly.\n\nQ: hi"
    assert imported.notes == []  # no interface: Raven's ':' is assumed
    other = convert('user = "Bob"\nbot = "Alice"\ninterface = "："\ninit_prompt = f"{user}{interface} hi"\n',
                    "x", "x.py")
    assert other.notes and "'：'" in other.notes[0]


HOSTILE = [
    ("import os\nuser = 'a'\nbot = 'b'\ninit_prompt = 'x'\n", "line 1: Import is not an assignment"),
    ("user = 'a'\nbot = 'b'\ninit_prompt = open('{marker}', 'w').write('ran')\n", "line 3: Call is not a string"),
    ("user = 'a'\nbot = 'b'\ninit_prompt = f\"{{open('{marker}', 'w').write('ran')}}\"\n", "line 3: Call is not"),
    ("user = __import__('os').system('touch {marker}')\nbot = 'b'\ninit_prompt = 'x'\n", "line 1: Call is not"),
    ("user = 'a'\nbot = 'b'\ninit_prompt = f'{{user.__class__}}'\n", "line 3: Attribute is not"),
    ("user = 'a'\nbot = 'b'\ninit_prompt = f'{{user:>{{bot}}}}'\n", "only plain {name} fields"),
    ("user = 'a'\nbot = 'b'\ninit_prompt = f'{{secret}}'\n", "'secret' is not a string assigned above it"),
    ("def f():\n    open('{marker}', 'w')\nuser = 'a'\n", "line 1: FunctionDef is not an assignment"),
    ("user = 'a'\nbot = 'b'\n", "not a WePrompt prompt file: it assigns no init_prompt"),
    ("user = 'a'\nbot = 'b'\ninit_prompt = 42\n", "Constant is not a string literal"),
    ("user = 'line\\nbreak'\nbot = 'b'\ninit_prompt = 'x'\n", "user must be a one-line name"),
    ("user = 'a' bot = 'b'\n", "is not valid Python (line 1"),
]


@pytest.mark.parametrize(("source", "error"), HOSTILE)
def test_other_shapes_and_hostile_files_are_refused_without_running(tmp_path: Path, source: str, error: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "Evil.py"
    path.write_text(source.format(marker=marker), encoding="utf-8")
    with pytest.raises(PersonaError) as refused:
        convert(path.read_text(encoding="utf-8"), "evil", str(path))
    assert error in str(refused.value)
    result = raven("import-persona", str(path), "--output", str(tmp_path / "evil.md"), cwd=tmp_path)
    assert result.returncode == 1 and error in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "evil.md").exists()
