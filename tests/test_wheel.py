"""Raven as a user installs it from a wheel, not from this checkout.

The wheel is built offline with the current venv's setuptools (``pip wheel --no-build-isolation
--no-index``) from a copy of the checkout, so no ``build/`` folder or stale build output is left
here or shipped. It is installed into a fresh venv in ``tmp_path`` that borrows this venv's
dependencies through a plain ``.pth`` line (a path line only: the ``.pth`` files inside this venv,
among them the editable install's finder that maps ``bot`` to the checkout, are not run). The
installed ``raven`` then runs from ``tmp_path`` with no ``PYTHONPATH`` and no ``RAVEN_*`` from the
developer's environment, so anything the wheel forgot (the personas, the web page) shows here.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Left out of the copy the wheel is built from: anywhere, and (for data/, build/, ...) at the top only.
ANYWHERE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*_cache", "*.egg-info")
TOP_ONLY = {".git", ".venv", "venv", "build", "dist", "data", "test-artifacts", ".whl", ".env"}


def copy_ignore(directory: str, names: list[str]) -> set[str]:
    ignored = set(ANYWHERE(directory, names))
    if Path(directory) == ROOT:
        ignored |= TOP_ONLY & set(names)
    return ignored
STATIC_FILES = {"adapters/static/app.js", "adapters/static/index.html", "adapters/static/login.html",
                "adapters/static/style.css"}
PERSONA_FILES = {"instructions/__init__.py", "instructions/default.md", "instructions/project.md",
                 "instructions/sql.md"}


def run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, stdin: str = "",
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=copy_ignore)
    out = base / "dist"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-q", "-w", out, source], cwd=base)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list(out.glob("raven-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel; the dependencies come from this venv's site-packages."""
    home = tmp_path_factory.mktemp("venv") / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", home], cwd=home.parent)
    assert made.returncode == 0, made.stderr
    python = home / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=home.parent)
    assert site.returncode == 0, site.stderr
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(site.stdout.strip()) / "_raven_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    # pip itself comes through the .pth line too; it installs into the new venv (its sys.prefix).
    installed = run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=home.parent,
                    env=clean_env())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return home


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("RAVEN_", "DISCORD_", "SLACK_", "PYTHON", "VIRTUAL_ENV", "PIP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def test_wheel_ships_the_personas_and_the_web_page(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert PERSONA_FILES <= names, sorted(names)
    assert STATIC_FILES <= names, sorted(names)
    assert {name.split("/")[0] for name in names if "/" in name and ".dist-info/" not in name} == {
        "adapters", "bench", "bot", "instructions"}  # no tests, no data, nothing from the venv


def test_installed_raven_runs_from_the_wheel(venv: Path, tmp_path: Path, tiny_v7_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    data = tmp_path / "data"
    env = clean_env(RAVEN_DATA_DIR=str(data), RAVEN_MODEL=str(tiny_v7_path), RAVEN_SEED="1",
                    RAVEN_MAX_REPLY_TOKENS="12")

    # Every package of ours, and the persona folder, comes from the new venv, not the checkout.
    probe = run([venv / "bin" / "python", "-c",
                 "import json, adapters.web, bot, bot.core.personas as p, instructions; print(json.dumps("
                 "[bot.__file__, instructions.__file__, str(p.BUILTIN_DIR), str(adapters.web.STATIC_DIR)]))"],
                cwd=work, env=env)
    assert probe.returncode == 0, probe.stderr
    paths = [Path(p).resolve() for p in json.loads(probe.stdout)]
    for path in paths:
        assert path.is_relative_to(venv.resolve()), (path, venv)
        assert not path.is_relative_to(ROOT), path
    builtin_dir, static_dir = paths[2], paths[3]
    assert sorted(p.name for p in builtin_dir.glob("*.md")) == ["default.md", "project.md", "sql.md"]
    assert {p.name for p in static_dir.iterdir()} >= {"app.js", "index.html", "login.html", "style.css"}

    raven = venv / "bin" / "raven"
    listed = run([raven, "personas"], cwd=work, env=env)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["default", "project", "sql"]

    chat = run([raven, "chat", "--thread", "w"], cwd=work, env=env, stdin="hello\n")
    assert chat.returncode == 0, chat.stderr
    reply = chat.stdout.strip()
    assert reply, chat.stderr
    db = data / "raven.db"
    conn = sqlite3.connect(db)
    try:
        log = conn.execute("SELECT role, text FROM messages WHERE thread_key = 'terminal:w' ORDER BY id").fetchall()
    finally:
        conn.close()
    assert [role for role, _ in log] == ["user", "assistant"], (chat.stdout, chat.stderr, log)
    assert log[0][1] == "hello"
    assert log[1][1].strip() and " ".join(log[1][1].split()) in " ".join(reply.split())  # what was printed
    assert not list(work.iterdir())  # nothing written to the working directory
