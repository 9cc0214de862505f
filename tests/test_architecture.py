"""Layering rules, checked on the source with ``ast``:

* the core (``bot/``) never imports a chat platform SDK or a web framework;
* ``adapters`` may import ``bot``, never the other way round — except ``bot/cli.py``, the composition
  root, which picks the adapters to start and so imports them, but only lazily inside its command
  functions (importing ``bot.cli`` must not pull in discord, slack or fastapi);
* nothing in ``bot/`` or ``adapters/`` calls ``print`` (ruff's T20 enforces it too): output goes
  through logging, or explicitly through the terminal adapter's stream / typer.echo.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOT = ROOT / "bot"
ADAPTERS = ROOT / "adapters"
PLATFORM_MODULES = {"discord", "slack_bolt", "slack_sdk", "fastapi", "starlette", "uvicorn", "sse_starlette",
                    "aiohttp"}
COMPOSITION_ROOT = BOT / "cli.py"


def sources(directory: Path) -> list[Path]:
    files = sorted(directory.rglob("*.py"))
    assert files, f"no Python files under {directory}"
    return files


def imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """Every imported top-level module name with its node (``import a.b``, ``from a.b import c``,
    ``importlib.import_module("a.b")`` and ``__import__("a")`` with a literal name)."""
    found: list[tuple[str, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value.split(".")[0], node))
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


def test_core_never_imports_platform_sdks_or_web_frameworks() -> None:
    offenders = [f"{where(path, node)} imports {name}"
                 for path in sources(BOT) for name, node in imports(parse(path)) if name in PLATFORM_MODULES]
    assert offenders == []


def test_core_never_imports_adapters_except_the_composition_root_lazily() -> None:
    offenders = [f"{where(path, node)} imports adapters"
                 for path in sources(BOT) if path != COMPOSITION_ROOT
                 for name, node in imports(parse(path)) if name == "adapters"]
    assert offenders == []

    # bot/cli.py: adapters only inside function bodies, never at module level (not even under if/try).
    tree = parse(COMPOSITION_ROOT)
    lazy: set[int] = set()
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy |= {id(node) for name, node in imports(func) if name == "adapters"}
    everywhere = [node for name, node in imports(tree) if name == "adapters"]
    eager = [where(COMPOSITION_ROOT, node) for node in everywhere if id(node) not in lazy]
    assert eager == []
    assert len(lazy) >= 2  # it does start adapters (terminal chat, web ...): the check looks at real imports


def test_adapters_depend_on_the_core_not_on_each_other_s_sdks_at_import() -> None:
    """The adapters import ``bot``; the lightweight shared helpers import no platform SDK at all."""
    used = {name for path in sources(ADAPTERS) for name, _ in imports(parse(path))}
    assert "bot" in used
    for helper in ("streaming.py", "text_split.py", "terminal.py"):
        names = {name for name, _ in imports(parse(ADAPTERS / helper))}
        assert not names & PLATFORM_MODULES, helper


def test_no_print_calls() -> None:
    offenders = [
        where(path, node)
        for directory in (BOT, ADAPTERS) for path in sources(directory)
        for node in ast.walk(parse(path))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "pprint")
    ]
    assert offenders == []


def test_importing_the_core_loads_no_platform_sdk() -> None:
    modules = "bot.cli, bot.app, bot.service"
    watched = sorted(PLATFORM_MODULES | {"adapters"})
    code = f"import sys, {modules}; print(sorted(m for m in {watched!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
