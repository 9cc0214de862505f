"""WePrompt prompt files (``instructions/SQLAdvisor.py`` in the seed) turned into persona files.

Such a file is a few assignments::

    user = "User"
    bot = "SQLAdvisor"
    interface = ":"
    init_prompt = f'''You are {bot} ... {user}{interface} ...'''

It is read with :mod:`ast` and never executed: only assignments of string literals, f-strings and
``+`` of them to plain names are understood, an f-string may name only strings assigned above it, and
anything else (a call, an import, an attribute, a format spec) is refused with its line number.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import yaml

from bot.core.personas import check_name, parse_persona
from bot.errors import PersonaError

MAX_SOURCE_BYTES = 1_000_000
REQUIRED = ("user", "bot", "init_prompt")


@dataclass(frozen=True)
class Imported:
    name: str
    text: str  # the persona file: YAML front matter and the prompt
    notes: list[str]  # what the operator should know (e.g. an interface other than ':')


class _Refused(PersonaError):
    pass


def persona_name(stem: str) -> str:
    """A persona name from a file name: ``SQLAdvisor`` → ``sqladvisor``, ``Project Advisor`` → ``project-advisor``."""
    return re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-_")[:32] or "imported"


def _string(node: ast.expr, known: dict[str, str], where: str) -> str:
    """The value of a string expression built only from literals and names already known."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _string(node.left, known, where) + _string(node.right, known, where)
    if isinstance(node, ast.Name):
        if node.id not in known:
            raise _Refused(f"{where}, line {node.lineno}: {node.id!r} is not a string assigned above it")
        return known[node.id]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for part in node.values:
            if isinstance(part, ast.FormattedValue):
                if part.format_spec is not None or part.conversion not in (-1, ord("s")):
                    raise _Refused(f"{where}, line {part.lineno}: only plain {{name}} fields are understood")
                parts.append(_string(part.value, known, where))
            else:
                parts.append(_string(part, known, where))
        return "".join(parts)
    raise _Refused(f"{where}, line {node.lineno}: {type(node).__name__} is not a string literal or a name "
                   "(the file is read, never run: only string assignments are understood)")


def read_assignments(source: str, where: str) -> dict[str, str]:
    """Every ``name = <string>`` of the file, in order; anything else is refused."""
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise _Refused(f"{where} is larger than {MAX_SOURCE_BYTES // 1000} kB: not a prompt file")
    try:
        tree = ast.parse(source, filename=where)
    except SyntaxError as exc:
        raise _Refused(f"{where} is not valid Python (line {exc.lineno}: {exc.msg})") from None
    known: dict[str, str] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
                and isinstance(statement.value.value, str):
            continue  # a docstring
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name):
            known[statement.targets[0].id] = _string(statement.value, known, where)
            continue
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
            known[statement.target.id] = _string(statement.value, known, where)
            continue
        raise _Refused(f"{where}, line {statement.lineno}: {type(statement).__name__} is not an assignment of a "
                       "string to a name (the file is read, never run)")
    return known


def _role(value: str, variable: str, where: str) -> str:
    role = value.strip()
    if not role or "\n" in role or len(role) > 64:
        raise _Refused(f"{where}: {variable} must be a one-line name (at most 64 characters), got {value[:40]!r}")
    return role


def convert(source: str, name: str, where: str) -> Imported:
    """The persona file for the WePrompt file ``source`` (named ``where`` in errors), as persona ``name``."""
    check_name(name)
    values = read_assignments(source, where)
    missing = [variable for variable in REQUIRED if variable not in values]
    if missing:
        raise _Refused(f"{where} is not a WePrompt prompt file: it assigns no {', '.join(missing)} "
                       "(expected user = \"…\", bot = \"…\", interface = \"…\", init_prompt = f'''…''')")
    user, bot = _role(values["user"], "user", where), _role(values["bot"], "bot", where)
    prompt = values["init_prompt"].strip()
    if not prompt:
        raise _Refused(f"{where}: init_prompt is empty")
    notes = []
    interface = values.get("interface", ":")
    if interface.strip() != ":":
        notes.append(f"interface is {interface!r}: Raven writes turns as '{user}: …' and '{bot}: …', so "
                     "examples in the prompt written with it will not look like the conversation")
    front = {"name": bot, "description": f"Imported from the WePrompt file {where.rsplit('/', 1)[-1]}",
             "user_role": user, "bot_role": bot}
    text = f"---\n{yaml.safe_dump(front, allow_unicode=True, sort_keys=False)}---\n{prompt}\n"
    parse_persona(name, text, where)  # what Raven will read back: it must parse
    return Imported(name, text, notes)
