"""The ``raven`` command line (typer)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from bot.app.settings import Settings, load_settings
from bot.errors import RavenError

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Raven: a team chat bot running an RWKV model on your own hardware.")
log = logging.getLogger("raven")

DEMO_BANNER = """\
┌──────────────────────────────────────────────────────────────────────────────┐
│ Raven is running the DEMO model: random weights, so its replies are noise.   │
│ Everything else (threads, personas, state, commands) works for real.         │
│                                                                              │
│ For real answers, download RWKV weights (a .pth file) and set RAVEN_MODEL:   │
│   RWKV-7 G1 "Goose" (World tokenizer, recommended), e.g. from the            │
│   BlinkDL/rwkv7-g1 repository on Hugging Face:                               │
│     0.1B  ~0.4 GB  cpu fp32 (~1 GB RAM) or any GPU                           │
│     0.4B  ~0.9 GB  cpu fp32 (~2 GB RAM); cuda fp16 ~1 GB VRAM                │
│     1.5B  ~3 GB    cuda fp16 ~3.5 GB VRAM (cpu works, slowly)                │
│     2.9B  ~6 GB    cuda fp16 ~6.5 GB VRAM                                    │
│     7.2B  ~15 GB   cuda fp16 ~15 GB VRAM; cuda bf16 on Ampere or newer       │
│   Then: RAVEN_MODEL=/path/to/model.pth RAVEN_STRATEGY="cuda fp16" make run   │
│ See README.md, "Using real weights".                                         │
└──────────────────────────────────────────────────────────────────────────────┘"""


SETTINGS_ERROR = 2
"""The exit status of every command for malformed settings (1: anything failing later)."""


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except RavenError as exc:
        typer.echo(f"raven: {exc}", err=True)
        raise typer.Exit(SETTINGS_ERROR) from None


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run_async(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]], *, graceful: bool = False) -> None:
    """Run ``main(stopping)`` until done or a signal. SIGTERM (systemd, docker) and Ctrl-C set
    ``stopping`` when ``graceful`` (``main`` then winds down in its own time) and cancel ``main``
    otherwise, or on a second signal; either way adapters and the engine shut down in order and
    replies in flight are stored."""
    async def runner() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def on_signal() -> None:
            if graceful and not stopping.is_set():
                log.info("stopping: finishing the replies in flight (a second signal stops at once)")
                stopping.set()
            else:
                task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await main(stopping)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(runner())


def _fail(exc: RavenError) -> typer.Exit:
    typer.echo(f"raven: {exc}", err=True)
    return typer.Exit(1)


async def _chat(settings: Settings, thread: str, persona: str | None) -> None:
    from adapters.terminal import TerminalChat
    from bot.app.assembly import open_service

    async with open_service(settings) as service:
        if service.is_demo_model:
            typer.echo(DEMO_BANNER, err=True)
        await TerminalChat(service, thread=thread, persona=persona).run()


async def _serve(settings: Settings, stopping: asyncio.Event, only: str | None = None) -> None:
    """Every configured adapter in one process, sharing one engine. On ``stopping``: no new messages
    are answered, the replies in flight finish and are delivered (``RAVEN_SHUTDOWN_GRACE_S``), and
    only then are the platform connections closed."""
    from bot.app.assembly import open_service
    from bot.app.metrics import Metrics

    async with open_service(settings) as service:
        if service.is_demo_model:
            typer.echo(DEMO_BANNER, err=True)
        metrics = Metrics(service).attach()  # /metrics on the web port, else on RAVEN_METRICS_PORT
        web_on = settings.web.enabled and only in (None, "web")
        if not web_on and settings.metrics_port:
            metrics.serve(settings.metrics_host, settings.metrics_port)
        tasks = []
        if settings.discord.enabled and only in (None, "discord"):
            from adapters.discord_bot import DiscordAdapter
            tasks.append(asyncio.create_task(DiscordAdapter(service, settings.discord).run(), name="discord"))
        if settings.slack.enabled and only in (None, "slack"):
            from adapters.slack_bot import SlackAdapter
            tasks.append(asyncio.create_task(SlackAdapter(service, settings.slack).run(), name="slack"))
        if web_on:
            from adapters.web import WebAdapter
            tasks.append(asyncio.create_task(WebAdapter(service, settings.web, metrics.exposition).run(), name="web"))
        log.info("serving: %s", ", ".join(t.get_name() for t in tasks))
        signalled = asyncio.create_task(stopping.wait(), name="stop signal")
        try:
            done, _ = await asyncio.wait([*tasks, signalled], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not signalled:
                    task.result()  # an adapter that ended: its error, or an unexpected stop
            await service.shutdown(settings.shutdown_grace_s)
            log.info("replies in flight are finished and delivered; closing the platform connections")
        finally:
            signalled.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            metrics.close()


@app.command()
def run() -> None:
    """Start the bot: the configured adapters, or the terminal chat when none is configured."""
    settings = _settings()
    _setup_logging(settings)
    try:
        if settings.discord.enabled or settings.slack.enabled or settings.web.enabled:
            _run_async(lambda stopping: _serve(settings, stopping), graceful=True)
        else:
            typer.echo("No DISCORD_TOKEN, SLACK_BOT_TOKEN or RAVEN_WEB_ENABLED set: opening the "
                       "terminal chat.", err=True)
            _run_async(lambda stopping: _chat(settings, "default", None))
    except RavenError as exc:
        raise _fail(exc) from None


@app.command()
def chat(
    thread: Annotated[str, typer.Option(help="Thread name; a later run with the same name resumes it.")] = "default",
    persona: Annotated[str | None, typer.Option(help="Persona for the thread (see `raven personas`).")] = None,
) -> None:
    """Chat in the terminal (one message per line when stdin is not a terminal)."""
    settings = _settings()
    _setup_logging(settings)
    try:
        _run_async(lambda stopping: _chat(settings, thread, persona))
    except RavenError as exc:
        raise _fail(exc) from None


@app.command()
def web(
    host: Annotated[str | None, typer.Option(help="Bind address (default RAVEN_WEB_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default RAVEN_WEB_PORT).")] = None,
) -> None:
    """Serve the web chat page and HTTP API."""
    web: dict[str, Any] = {"enabled": True}
    if host is not None:
        web["host"] = host
    if port is not None:
        web["port"] = port
    settings = _settings(web=web)
    _setup_logging(settings)

    try:
        _run_async(lambda stopping: _serve(settings, stopping, only="web"), graceful=True)
    except RavenError as exc:
        raise _fail(exc) from None


@app.command()
def personas() -> None:
    """List the personas."""
    from bot.core.personas import PersonaLibrary

    settings = _settings()
    try:
        for persona in PersonaLibrary(settings.personas_dir).all():
            typer.echo(f"{persona.name:12} {persona.display_name} — {persona.description}")
    except RavenError as exc:
        raise _fail(exc) from None


@app.command("make-model")
def make_model(
    out: Annotated[Path, typer.Argument(help="Where to write the .pth file.")],
    family: Annotated[str, typer.Option(help="v7 or v4")] = "v7",
    size: Annotated[str, typer.Option(help="tiny or 0.1b")] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
) -> None:
    """Write a random-weight checkpoint in the real RWKV format (for tests and demos)."""
    from bot.inference.checkpoint import make_checkpoint

    if family not in ("v7", "v4") or size not in ("tiny", "0.1b"):
        typer.echo("raven: --family must be v7 or v4 and --size tiny or 0.1b", err=True)
        raise typer.Exit(2)
    make_checkpoint(out, family, size, seed)  # type: ignore[arg-type]
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, RWKV-{family[1:]}, {size})")


@app.command("make-state")
def make_state(
    out: Annotated[Path, typer.Argument(help="Where to write the state .pth file.")],
    model: Annotated[Path | None, typer.Option(
        help="The checkpoint it is for (default: RAVEN_MODEL, else the demo model).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    scale: Annotated[float, typer.Option(help="Standard deviation of the random values.")] = 0.5,
) -> None:
    """Write a random RWKV state file (blocks.N.att.time_state, as state tuning saves it) that fits a
    checkpoint: for tests and demos of state-tuned personas (it holds no tuning)."""
    from bot.inference.state_file import StateLayout, write_random_state

    try:
        if model is None:
            from bot.app.assembly import choose_model

            model = choose_model(_settings()).path
        layout = StateLayout.of_checkpoint(model)
        write_random_state(out, layout, seed, scale)
    except RavenError as exc:
        raise _fail(exc) from None
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {layout.describe()}) for {model}")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="An RWKV-4/5/6 checkpoint.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the converted checkpoint.")],
    strategy: Annotated[str, typer.Option(help='e.g. "cuda fp16i8 *10 -> cpu fp32"')] = "cpu fp32",
) -> None:
    """Pre-convert an RWKV-4/5/6 checkpoint for a strategy, for faster loading."""
    from tqdm import tqdm

    from bot.inference.rwkv_package import convert_checkpoint

    failure: list[BaseException] = []

    def work() -> None:
        try:
            convert_checkpoint(src, dst, strategy)
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    with tqdm(desc=f"converting {src.name}", unit="s", bar_format="{desc}: {elapsed} elapsed") as bar:
        while worker.is_alive():
            worker.join(0.2)
            bar.update(0)
            bar.refresh()
    if failure:
        exc = failure[0]
        if isinstance(exc, RavenError):
            raise _fail(exc)
        raise exc
    typer.echo(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB) for strategy {strategy!r}")


@app.command()
def bench(
    size: Annotated[str, typer.Option(help="tiny or 0.1b")] = "0.1b",
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    threads: Annotated[str, typer.Option(help="Comma-separated thread counts for the aggregate figures.")] = "16,64",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quick: Annotated[bool, typer.Option(help="A short smoke run; noisy figures.")] = False,
    verbose: Annotated[bool, typer.Option(help="Say on stderr what is being measured.")] = False,
) -> None:
    """Measure the engine against the plain rwkv package (bench/benchmark.py says how)."""
    from bench.benchmark import format_table, run_benchmark

    try:
        counts = tuple(int(n) for n in threads.split(",") if n.strip())
    except ValueError:
        typer.echo(f"raven: --threads must be comma-separated numbers, not {threads!r}", err=True)
        raise typer.Exit(2) from None

    def progress(message: str) -> None:
        if verbose:
            typer.echo(f"... {message}", err=True)

    started = time.monotonic()
    try:
        result = run_benchmark(size=size, dtype=dtype, device=device, threads=counts, quick=quick,
                               progress=progress)
    except RavenError as exc:
        raise _fail(exc) from None
    if as_json:
        for note in result.get("notes", []):  # one clear line each, beside the JSON (e.g. bf16 emulated)
            typer.echo(f"raven bench: {note}", err=True)
        typer.echo(json.dumps(result))
    else:
        typer.echo(format_table(result))
        typer.echo(f"({time.monotonic() - started:.0f} s)")


@app.command()
def doctor(
    offline: Annotated[bool, typer.Option(help="Do not ask Discord and Slack whether the tokens work.")] = False,
) -> None:
    """Check this deployment (model, tokenizer, devices, database, personas, platform settings and
    whether Discord and Slack accept the tokens, ports) and say what to change; exit status 1 when
    something would fail."""
    from bot.app.doctor import run_checks, summary

    settings = _settings()
    findings = run_checks(settings, lambda finding: typer.echo(finding.line()), online=not offline)
    typer.echo(summary(findings))
    if any(finding.level == "fail" for finding in findings):
        raise typer.Exit(1)


@app.command("export")
def export_command(
    thread: Annotated[list[str] | None, typer.Option(
        help="A thread's key, platform:id (e.g. web:alice/42, slack:C1:1700000000.000100); repeat for more. "
             "Default: every thread.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv")] = "jsonl",
    output: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Write the conversations (one row per message) as JSON lines or CSV."""
    import io
    from typing import TextIO

    from bot.app.export import FORMATS, export
    from bot.events import ThreadKey
    from bot.storage import SQLiteStore

    if fmt not in FORMATS:
        typer.echo(f"raven: --format must be jsonl or csv, not {fmt!r}", err=True)
        raise typer.Exit(2)
    try:
        keys = [ThreadKey.parse(key) for key in thread or []]
    except ValueError as exc:
        typer.echo(f"raven: --thread: {exc} (a key is platform:id, e.g. web:alice/42)", err=True)
        raise typer.Exit(2) from None
    settings = _settings()
    database = settings.database_path
    if not database.is_file():
        raise _fail(RavenError(f"no database at {database} (RAVEN_DATABASE, RAVEN_DATA_DIR)"))

    async def write(out: TextIO) -> int:
        async with SQLiteStore(database) as store:
            return await export(store, out, fmt, keys)  # type: ignore[arg-type]

    try:
        if output is None:
            stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=True)
            try:
                rows = asyncio.run(write(stdout))
            finally:
                stdout.detach()
        else:  # written aside and moved into place: a failed export leaves no half file
            partial = output.with_name(output.name + ".partial")
            try:
                with partial.open("w", encoding="utf-8", newline="") as out:
                    rows = asyncio.run(write(out))
                partial.replace(output)
            finally:
                partial.unlink(missing_ok=True)
    except RavenError as exc:
        raise _fail(exc) from None
    typer.echo(f"exported {rows} messages" + (f" to {output}" if output else ""), err=True)


@app.command("import-persona")
def import_persona(
    file: Annotated[Path, typer.Argument(help="A WePrompt prompt file: user = …, bot = …, init_prompt = f'…'.")],
    name: Annotated[str | None, typer.Option(help="Persona name (default: from the file name).")] = None,
    output: Annotated[Path | None, typer.Option(
        help="Where to write the persona file (default: RAVEN_PERSONAS_DIR, else the built-in instructions/).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing persona file.")] = False,
) -> None:
    """Convert a WePrompt prompt file into a persona file; the file is parsed, never run."""
    from bot.core.personas import BUILTIN_DIR
    from bot.core.weprompt import convert, persona_name

    settings = _settings()
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(RavenError(f"cannot read {file}: {exc}")) from None
    try:
        imported = convert(source, name or persona_name(file.stem), str(file))
    except RavenError as exc:
        raise _fail(exc) from None
    target = output or (settings.personas_dir or BUILTIN_DIR) / f"{imported.name}.md"
    if target.exists() and not force:
        raise _fail(RavenError(f"{target} exists; pass --force to replace it, or --name for another persona"))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(imported.text, encoding="utf-8")
    for note in imported.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {target}: persona {imported.name!r} (/advisor {imported.name})")


def main() -> None:
    app()

