"""Layering rules, checked on the source with ``ast``.

The arrows point one way: ``adapters → bot.core → bot.inference / bot.storage``, with the shared
vocabulary (``bot.errors``, ``bot.events``, ``bot.settings``) usable from every layer. ``bot.app`` is the
composition root, the only place that knows every layer and the adapters; it imports the adapters lazily
(inside the command that starts them), so ``raven chat`` never loads a chat platform's SDK. The one
exception is the adapters' settings sections (``adapters.settings``), which every command reads at
start-up: they import no SDK, and the composition root may import them eagerly. The benchmark
(``bench``) measures the layers from outside and is not part of the runtime.

Also: no module under ``bot/`` but the composition root imports a chat platform SDK or a web framework,
and nothing calls ``print`` (ruff's T20 enforces it too).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORM_MODULES = {"discord", "slack_bolt", "slack_sdk", "fastapi", "starlette", "uvicorn", "sse_starlette",
                    "aiohttp"}
SHARED = {"bot.errors", "bot.events", "bot.settings"}

# layer -> the layers (by module prefix) it may import from our own code
ALLOWED: dict[str, set[str]] = {
    "bot": set(),  # the package itself: its __init__ imports nothing
    "bot.errors": set(),
    "bot.events": set(),
    "bot.settings": {"bot.errors"},
    "bot.inference": SHARED | {"bot.inference"},
    "bot.storage": SHARED | {"bot.storage"},
    "bot.core": SHARED | {"bot.core", "bot.inference", "bot.storage"},
    "adapters": SHARED | {"bot.core", "adapters"},
    "bench": SHARED | {"bot.inference", "bot.core", "bot.storage", "bot.app", "bench"},
    "bot.app": SHARED | {"bot.app", "bot.core", "bot.inference", "bot.storage", "adapters", "bench"},
}
OURS = ("bot", "adapters", "bench", "instructions")
ADAPTER_SETTINGS = "adapters.settings"
"""The adapters' settings sections: no platform SDK, so the composition root may import them eagerly."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The longest layer prefix of ``module`` (``bot.core.service`` → ``bot.core``)."""
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    assert matches, f"{module} belongs to no layer: add it to ALLOWED"
    return max(matches, key=len)


def sources() -> list[Path]:
    files = sorted(p for top in ("bot", "adapters", "bench") for p in (ROOT / top).rglob("*.py"))
    assert len(files) > 30, files
    return files


def imports(tree: ast.AST, module: str) -> list[tuple[str, ast.AST]]:
    """Every imported module with its node (``import a.b``, ``from a.b import c``, ``from . import x``,
    ``importlib.import_module("a.b")`` and ``__import__("a")`` with a literal name)."""
    package = module.rsplit(".", 1)[0] if "." in module else module
    found: list[tuple[str, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.append((target, node))
            # ``from bot import core`` imports bot.core
            found += [(f"{target}.{alias.name}", node) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node))
    return found


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


def own_target(name: str) -> str | None:
    """The layer an imported name of ours belongs to, or None for a third-party module. Names such as
    ``bot`` or ``bot.core.service.ChatService`` resolve to their layer."""
    if name.split(".")[0] not in OURS or name == "bot":
        return None
    if name.split(".")[0] == "instructions":
        return "instructions"
    try:
        return layer_of(name)
    except AssertionError:
        return name


def test_every_arrow_points_the_allowed_way() -> None:
    offenders = []
    for path in sources():
        module = module_name(path)
        layer = layer_of(module)
        for name, node in imports(parse(path), module):
            target = own_target(name)
            if target is not None and target not in ALLOWED[layer]:
                offenders.append(f"{where(path, node)}: {layer} imports {name}")
    assert offenders == []


def test_the_checker_sees_a_backwards_arrow() -> None:
    """The rule above must be able to fail: a storage module importing the core is caught."""
    tree = ast.parse("from bot.core.service import ChatService\nfrom ..core import prompt\n")
    names = [name for name, _ in imports(tree, "bot.storage.sqlite")]
    assert {own_target(name) for name in names} == {"bot.core"}
    assert "bot.core" not in ALLOWED[layer_of("bot.storage.sqlite")]


def test_only_the_composition_root_and_adapters_touch_platform_sdks() -> None:
    offenders = [f"{where(path, node)} imports {name}"
                 for path in sources() if layer_of(module_name(path)) not in ("adapters", "bot.app")
                 for name, node in imports(parse(path), module_name(path)) if name.split(".")[0] in PLATFORM_MODULES]
    assert offenders == []


def test_the_composition_root_imports_adapters_only_inside_functions() -> None:
    for path in sorted((ROOT / "bot" / "app").rglob("*.py")):
        tree = parse(path)
        lazy: set[int] = set()
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                lazy |= {id(node) for name, node in imports(func, module_name(path))
                         if name.split(".")[0] in PLATFORM_MODULES | {"adapters"}}
        eager = [where(path, node) for name, node in imports(tree, module_name(path))
                 if name.split(".")[0] in PLATFORM_MODULES | {"adapters"} and id(node) not in lazy
                 and not (name == ADAPTER_SETTINGS or name.startswith(ADAPTER_SETTINGS + "."))]
        assert eager == [], path


def test_shared_adapter_helpers_import_no_platform_sdk() -> None:
    for helper in ("streaming.py", "text_split.py", "terminal.py", "settings.py"):
        path = ROOT / "adapters" / helper
        names = {name.split(".")[0] for name, _ in imports(parse(path), module_name(path))}
        assert not names & PLATFORM_MODULES, helper


def test_no_print_calls() -> None:
    offenders = [
        where(path, node)
        for path in sources()
        for node in ast.walk(parse(path))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "pprint")
    ]
    assert offenders == []


def test_importing_the_command_line_loads_no_platform_sdk() -> None:
    """No SDK and no adapter but the settings sections (and so their package)."""
    modules = "bot.app.cli, bot.app.assembly, bot.core.service"
    allowed = ["adapters", ADAPTER_SETTINGS]
    code = (f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{sorted(PLATFORM_MODULES | {'adapters'})!r} and m not in {allowed!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_core_does_not_import_torch() -> None:
    """The chat core works on the engine's opaque states; tensors stay in the inference layer."""
    offenders = [f"{where(path, node)} imports {name}"
                 for path in sorted((ROOT / "bot" / "core").rglob("*.py"))
                 for name, node in imports(parse(path), module_name(path)) if name.split(".")[0] in ("torch", "numpy")]
    assert offenders == []
