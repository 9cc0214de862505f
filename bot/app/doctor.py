"""``raven doctor``: check a deployment before it runs, and say what to change.

Every check returns :class:`Finding` lines (ok, warn, fail). Nothing is changed: the database is
opened read-only, the demo model is not written, ports are bound and released at once. No secret's
value is ever part of a message: the token checks say what is wrong with a token's shape, never
what it is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sqlite3
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from bot.app.assembly import DEMO_MODEL_NAME
from bot.app.settings import Settings
from bot.core.personas import NAME_PATTERN, Persona, PersonaLibrary
from bot.errors import ModelLoadError, PersonaError
from bot.inference.checkpoint import check_shapes, detect_family, read_state_dict
from bot.inference.machine import Machine, bf16_warning, detect
from bot.inference.rwkv_package import validate_strategy
from bot.inference.tokenizer import WORLD, load_tokenizer
from bot.storage.migrations import SCHEMA_VERSION

Level = Literal["ok", "warn", "fail"]
GB = 1e9
# Text whose World-tokenizer ids reach high into the vocabulary (runs of spaces, code), so that a
# tokenizer that emits ids the model does not have is caught.
TOKENIZER_SAMPLE = "def answer(self):\n                return None  # 你好, Привет\n"
BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "fp16i8": 1, "fp32i8": 1, "bf16i8": 1}
DISCORD_TOKEN = re.compile(r"[A-Za-z0-9_-]{18,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}")
SLACK_TOKEN = re.compile(r"x(?:oxb|app)-[A-Za-z0-9]+(?:-[A-Za-z0-9]+){2,}")
SLACK_SIGNING_SECRET = re.compile(r"[0-9a-f]{32}")
ONLINE_TIMEOUT_S = 5.0
DISCORD_API = "https://discord.com/api/v10"
SLACK_REJECTS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        """One line (a multi-line error, e.g. YAML's, is folded), and the fix indented below it."""
        text = f"{self.level:<4}  {self.check:<9} {' '.join(self.message.split())}"
        return f"{text}\n{'':16}→ {self.fix}" if self.fix else text


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    family: str
    n_layer: int
    n_embd: int
    vocab: int
    params: int
    converted_for: str | None

    @property
    def state_bytes(self) -> int:
        """One thread's state: RWKV-5/6/7 keep a 64×64 fp32 matrix per head and layer plus two token
        shifts; RWKV-4 five fp32 vectors per layer."""
        if self.family == "v4":
            return self.n_layer * 5 * self.n_embd * 4
        return self.n_layer * (2 * self.n_embd * 4 + (self.n_embd // 64) * 64 * 64 * 4)


def _gb(n: float) -> str:
    if n < 0.1 * GB:
        return f"{n / 1e6:.1f} MB"
    return f"{n / GB:.2f} GB" if n < 10 * GB else f"{n / GB:.0f} GB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


# --- model and tokenizer ---------------------------------------------------------------------------


def inspect_model(path: Path) -> ModelInfo:
    """Family, shape and size of a checkpoint, its tensors' shapes checked (memory-mapped: cheap)."""
    sd = read_state_dict(path)
    family = detect_family(list(sd))
    converted = sd.get("_strategy")
    if converted is None:  # pre-converted RWKV-4/5/6 files hold transposed, re-typed tensors
        check_shapes(path, sd, family)
    vocab, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    params = sum(t.numel() for t in sd.values() if isinstance(t, torch.Tensor))
    return ModelInfo(path, family, n_layer, int(n_embd), int(vocab), int(params),
                     str(converted) if converted is not None else None)


def check_model(settings: Settings) -> tuple[Finding, ModelInfo | None]:
    path, demo = settings.model, False
    if path is None:
        path, demo = settings.data_dir / DEMO_MODEL_NAME, True
        if not path.is_file():
            return Finding("warn", "model", f"no RAVEN_MODEL: the demo model (random weights, replies are noise) "
                           f"will be written to {path} at the first start",
                           "set RAVEN_MODEL to an RWKV .pth checkpoint (README: Using real weights)"), None
    try:
        info = inspect_model(path)
    except ModelLoadError as exc:
        missing = not path.is_file()
        return Finding("fail", "model", str(exc), "set RAVEN_MODEL to an existing RWKV .pth file" if missing
                       else "the file is damaged or not a whole RWKV checkpoint: download it again"), None
    size = path.stat().st_size
    text = (f"RWKV-{info.family[1:]}, {info.n_layer} layers, width {info.n_embd}, vocabulary {info.vocab}, "
            f"{_count(info.params)} parameters, {_gb(size)}, state {info.state_bytes / 1e6:.1f} MB a thread")
    if info.converted_for:
        text += f", pre-converted for {info.converted_for!r}"
    if demo:
        return Finding("warn", "model", f"the demo model ({text}): random weights, replies are noise",
                       "set RAVEN_MODEL to an RWKV .pth checkpoint (README: Using real weights)"), info
    return Finding("ok", "model", f"{text}: {path}"), info


def check_tokenizer(settings: Settings, info: ModelInfo | None) -> Finding:
    try:
        tokenizer = load_tokenizer(settings.tokenizer)
    except ModelLoadError as exc:
        return Finding("fail", "tokenizer", str(exc),
                       f"set RAVEN_TOKENIZER to {WORLD} or the path of a 20B_tokenizer.json")
    if info is None:
        return Finding("ok", "tokenizer", f"{tokenizer.name} loads")
    highest = max(tokenizer.encode(TOKENIZER_SAMPLE))
    if highest >= info.vocab:
        return Finding("fail", "tokenizer", f"{tokenizer.name} produces token id {highest}, beyond the model's "
                       f"vocabulary of {info.vocab}: not this model's tokenizer",
                       "RWKV-4 Pile/Raven models (vocabulary 50277) need RAVEN_TOKENIZER=/path/to/20B_tokenizer.json")
    unknown = len(tokenizer.unknown_ids(info.vocab))
    if unknown > info.vocab // 10:
        return Finding("fail", "tokenizer", f"{tokenizer.name} cannot decode {unknown} of the model's {info.vocab} "
                       "token ids: not this model's tokenizer",
                       f"World/G models (vocabulary 65536) use RAVEN_TOKENIZER={WORLD}")
    return Finding("ok", "tokenizer", f"{tokenizer.name} matches the model's vocabulary of {info.vocab}")


# --- devices and strategy --------------------------------------------------------------------------


def available_ram() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_cpu(settings: Settings, machine: Machine) -> Finding:
    found = (f"{machine.cpu_model}, {machine.kind}, {machine.cores} usable cores, torch kernels "
             f"{machine.capability}")
    if machine.native_bf16:
        return Finding("ok", "cpu", f"{found}: cpu bf16 runs in hardware here (faster than cpu fp32; replies "
                       "differ slightly from fp32)")
    if machine.arch in ("x86_64", "amd64") and "avx2" not in machine.flags:
        return Finding("warn", "cpu", f"{found}: no AVX2, so CPU inference is slow here",
                       "run the model on a GPU (RAVEN_STRATEGY=\"cuda fp16\") or a CPU with AVX2")
    warning = bf16_warning(machine)
    if warning and settings.strategy.split()[:2] == ["cpu", "bf16"]:
        return Finding("warn", "cpu", warning, "set RAVEN_STRATEGY=\"cpu fp32\"")
    return Finding("ok", "cpu", f"{found}; cpu bf16 would be emulated here (no native bf16): use cpu fp32")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    free: int
    total: int
    bf16: bool


def gpus() -> list[Gpu]:
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        major, _ = torch.cuda.get_device_capability(index)
        found.append(Gpu(index, torch.cuda.get_device_name(index), int(free), int(total), major >= 8))
    return found


def check_gpu(found: list[Gpu]) -> Finding:
    if not found:
        why = "a CPU build of torch" if torch.version.cuda is None else "no GPU visible to torch"
        return Finding("ok", "gpu", f"no CUDA device (torch {torch.__version__}: {why})")
    return Finding("ok", "gpu", "; ".join(f"cuda:{g.index} {g.name}, {_gb(g.free)} free of {_gb(g.total)}, "
                                          f"bf16 {'yes' if g.bf16 else 'no'}" for g in found))


def memory_needed(settings: Settings, info: ModelInfo, dtype: str, device: str) -> int:
    """Weights in ``dtype`` plus every row of the batch, 10% over; on the CPU also the state cache."""
    need = info.params * BYTES_PER_PARAM[dtype] + (settings.max_batch + 1) * info.state_bytes
    if device == "cpu":
        need += settings.state_cache_mb * 1_000_000
    return int(need * 1.1)


def fitting_strategies(settings: Settings, info: ModelInfo, found: list[Gpu], machine: Machine) -> list[str]:
    """Strategies that would fit this model on this machine, the fastest kind first."""
    fits = []
    for gpu in found:
        device = "cuda" if gpu.index == 0 else f"cuda:{gpu.index}"
        for dtype in ("fp16", "bf16") if gpu.bf16 else ("fp16",):
            need = memory_needed(settings, info, dtype, "cuda")
            if need <= gpu.free:
                fits.append(f"{device} {dtype} (~{_gb(need)} of {_gb(gpu.free)} free)")
        if info.family != "v7" and not any(f.startswith(device + " ") for f in fits):
            need = memory_needed(settings, info, "fp16i8", "cuda")
            if need <= gpu.free:
                fits.append(f"{device} fp16i8 (~{_gb(need)} of {_gb(gpu.free)} free)")
    ram = available_ram()
    for dtype in ("bf16", "fp32") if machine.native_bf16 else ("fp32",):
        need = memory_needed(settings, info, dtype, "cpu")
        if ram is None or need <= ram:
            fits.append(f"cpu {dtype} (~{_gb(need)}" + (f" of {_gb(ram)} available)" if ram else ")"))
    return fits


def check_strategy(settings: Settings, info: ModelInfo | None, found: list[Gpu], machine: Machine) -> Finding:
    strategy = " ".join(settings.strategy.split())
    family = info.family if info else "v7"  # the demo model is RWKV-7
    cuda_devices = re.findall(r"\bcuda(?::(\d+))?", strategy)
    if cuda_devices and not found:
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no GPU"
        return Finding("fail", "strategy", f"RAVEN_STRATEGY {strategy!r} needs CUDA, but {why}",
                       "set RAVEN_STRATEGY=\"cpu fp32\", or install a CUDA build of torch into .venv on a GPU machine")
    try:
        validate_strategy(family, strategy)  # type: ignore[arg-type]
    except ModelLoadError as exc:
        return Finding("fail", "strategy", str(exc),
                       "RWKV-7 strategies: \"cpu fp32\", \"cpu bf16\", \"cuda fp16\", \"cuda bf16\" (\"cuda:1 fp16\")")
    for index in {int(i or 0) for i in cuda_devices}:
        if index >= len(found):
            last = f" to cuda:{len(found) - 1}" if len(found) > 1 else ""
            return Finding("fail", "strategy", f"RAVEN_STRATEGY {strategy!r} uses cuda:{index}, but there are only "
                           f"{len(found)} GPU(s)", f"use cuda:0{last}")
    device, dtype = strategy.split()[0], strategy.split()[1] if len(strategy.split()) > 1 else "fp32"
    if info is None:
        return Finding("ok", "strategy", f"{strategy} (memory is estimated once the model file exists)")
    fits = fitting_strategies(settings, info, found, machine)
    fit_text = "fits here: " + ", ".join(fits) if fits else "nothing fits this machine: use a smaller model"
    if "->" in strategy or "*" in strategy or dtype not in BYTES_PER_PARAM:
        return Finding("ok", "strategy", f"{strategy} (a split strategy: memory not estimated); {fit_text}")
    where = "cuda" if device.startswith("cuda") else "cpu"
    need = memory_needed(settings, info, dtype, where)
    if where == "cuda":
        gpu = found[int(device.partition(":")[2] or 0)]
        if dtype == "bf16" and not gpu.bf16:
            return Finding("warn", "strategy", f"{strategy}: {gpu.name} has no native bf16 (Ampere or newer has)",
                           "set RAVEN_STRATEGY=\"cuda fp16\"")
        free, what = gpu.free, f"free on {gpu.name}"
    else:
        ram = available_ram()
        if ram is None:
            return Finding("ok", "strategy", f"{strategy}: needs ~{_gb(need)}; {fit_text}")
        free, what = ram, "of memory available"
    if need > free:
        return Finding("fail", "strategy", f"{strategy} needs ~{_gb(need)}, {_gb(free)} {what}",
                       fit_text if fits else "use a smaller model, or lower RAVEN_MAX_BATCH / RAVEN_STATE_CACHE_MB")
    if where == "cpu" and dtype == "fp16":
        return Finding("warn", "strategy", f"{strategy}: fp16 is slow on a CPU", "set RAVEN_STRATEGY=\"cpu fp32\" "
                       "(or \"cpu bf16\" where the CPU has native bf16)")
    level: Level = "warn" if need > 0.9 * free else "ok"
    return Finding(level, "strategy", f"{strategy} needs ~{_gb(need)}, {_gb(free)} {what}; {fit_text}",
                   "lower RAVEN_MAX_BATCH or RAVEN_STATE_CACHE_MB, or pick a strategy that fits" if level == "warn"
                   else "")


# --- database and personas -------------------------------------------------------------------------


def _writable_dir(directory: Path) -> str | None:
    """None when a file can be created in ``directory``; otherwise why not."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def check_database(settings: Settings) -> Finding:
    path = settings.database_path
    fix = "set RAVEN_DATA_DIR (or RAVEN_DATABASE) to a directory this user can write"
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            return Finding("fail", "database", f"cannot create {path}: {parent} is not a directory", fix)
        problem = _writable_dir(parent)
        if problem:
            return Finding("fail", "database", f"cannot create {path}: {parent} is not writable ({problem})", fix)
        return Finding("ok", "database", f"{path} does not exist yet; it will be created (schema v{SCHEMA_VERSION})")
    if not path.is_file():
        return Finding("fail", "database", f"{path} is not a file", "set RAVEN_DATABASE to a file path")
    problem = _writable_dir(path.parent) or (None if os.access(path, os.W_OK) else "the file is read-only")
    if problem:  # WAL also writes -wal and -shm files beside the database
        return Finding("fail", "database", f"{path} is not writable ({problem})", fix)
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            journal = str(db.execute("PRAGMA journal_mode").fetchone()[0])
            counts = ""
            if 1 <= version <= SCHEMA_VERSION:  # tables this Raven knows
                threads = db.execute("SELECT count(*) FROM threads").fetchone()[0]
                messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
                counts = f", {threads} threads, {messages} messages"
    except sqlite3.DatabaseError as exc:
        return Finding("fail", "database", f"{path} cannot be read as an SQLite database ({exc})",
                       "point RAVEN_DATABASE at Raven's database, or move this file away")
    wal = path.with_name(path.name + "-wal")
    size = path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    text = f"{path}: {_gb(size)}, journal {journal}, schema v{version}{counts}"
    if version > SCHEMA_VERSION:
        return Finding("fail", "database", f"{text}: written by a newer Raven (this one knows v{SCHEMA_VERSION})",
                       "upgrade Raven, or set RAVEN_DATABASE to another file")
    if version < SCHEMA_VERSION:
        text += f" (migrated to v{SCHEMA_VERSION} at the next start)"
    if journal.lower() != "wal":
        text += " (Raven switches it to WAL when it opens it)"
    return Finding("ok", "database", text)


def check_personas(settings: Settings) -> list[Finding]:
    try:
        library = PersonaLibrary(settings.personas_dir)
    except PersonaError as exc:
        return [Finding("fail", "personas", str(exc), "set RAVEN_PERSONAS_DIR to a directory of persona *.md files")]
    findings = []
    loaded = library.load_all()
    for name, persona in loaded.items():
        if isinstance(persona, PersonaError):
            findings.append(Finding("fail", "personas", f"{name}: {persona}",
                                    "fix the file (YAML front matter between '---' lines, then the prompt)"))
    ignored = sorted(p.name for d in library.dirs for p in d.glob("*.md") if not NAME_PATTERN.fullmatch(p.stem))
    if ignored:
        findings.append(Finding("warn", "personas", f"ignored, not a persona name: {', '.join(ignored)}",
                                "rename to lowercase letters, digits, '-' or '_' (at most 32)"))
    good = [name for name, persona in loaded.items() if isinstance(persona, Persona)]
    if settings.default_persona not in loaded:
        findings.append(Finding("fail", "personas", f"RAVEN_DEFAULT_PERSONA {settings.default_persona!r} is not "
                                "a persona", f"set it to one of: {', '.join(good)}"))
    findings.insert(0, Finding("ok" if good else "fail", "personas", f"{len(good)} parse: {', '.join(good)}"))
    return findings


# --- platforms and ports ---------------------------------------------------------------------------


def token_problem(value: str, pattern: re.Pattern[str], kind: str) -> str | None:
    """What is wrong with a token's shape, in words that never quote it; None when it looks right."""
    if value != value.strip() or any(c in value for c in "\"' \t\r\n"):
        return f"has spaces, quotes or line breaks in it: copy the {kind} alone"
    if not pattern.fullmatch(value):
        return f"is not shaped like a {kind}"
    return None


def check_discord(settings: Settings) -> Finding:
    token = settings.discord.token
    if token is None:
        return Finding("ok", "discord", "not configured (DISCORD_TOKEN unset)")
    value = token.get_secret_value()
    if value.lower().startswith("bot "):
        problem: str | None = "starts with 'Bot ': set the token alone"
    else:
        problem = token_problem(value, DISCORD_TOKEN, "Discord bot token (three dot-separated parts)")
    if problem:
        return Finding("fail", "discord", f"DISCORD_TOKEN {problem}",
                       "copy the token again: Developer Portal → your application → Bot → Reset Token")
    scope = (f"slash commands in {len(settings.discord.command_guilds)} server(s)" if settings.discord.command_guilds
             else "global slash commands")
    return Finding("ok", "discord", f"DISCORD_TOKEN is set and well-formed; {scope}")


PLATFORMS = ("discord", "slack", "web", "terminal")
SNOWFLAKE = re.compile(r"\d{15,21}")


def check_limits(settings: Settings) -> Finding:
    """The limits, and who is exempt. A misspelt exemption starts fine and then limits an admin, so
    each list is checked for the shape of what it holds (a warning: Raven would still start)."""
    core, discord = settings, settings.discord
    problems = [f"RAVEN_ADMINS entry {entry!r} is not platform:user id" for entry in core.admins
                if entry.partition(":")[0] not in PLATFORMS or not entry.partition(":")[2]]
    for name, ids in (("DISCORD_ADMIN_ROLES", discord.admin_roles), ("DISCORD_ALLOWED_ROLES", discord.allowed_roles),
                      ("DISCORD_ALLOWED_CHANNELS", discord.allowed_channels),
                      ("DISCORD_ALLOWED_GUILDS", discord.allowed_guilds)):
        problems += [f"{name} has {value!r}, which is not a Discord ID"
                     for value in ids if not SNOWFLAKE.fullmatch(value)]
    if problems:
        return Finding("warn", "limits", "; ".join(problems),
                       "write platform:user id (e.g. discord:123456789012345678), and Discord IDs as numbers: "
                       "turn on Developer Mode, then right-click the role, channel or server → Copy ID")
    per = [f"{n} {unit}" for n, unit in ((core.rate_messages_per_minute, "messages/min"),
                                          (core.rate_tokens_per_day, "tokens/day")) if n]
    room = [f"{n} {unit}" for n, unit in ((core.rate_channel_messages_per_minute, "messages/min"),
                                           (core.rate_channel_tokens_per_day, "tokens/day")) if n]
    if not per and not room:
        return Finding("ok", "limits", "none set (RAVEN_RATE_*)")
    exempt = [f"{len(core.admins)} user(s)"] if core.admins else []
    exempt += [f"{len(discord.admin_roles)} Discord role(s)"] if discord.admin_roles else []
    exempt += ["Slack workspace admins"] if settings.slack.admins_exempt else []
    return Finding("ok", "limits", f"per user {', '.join(per) or 'none'}; per channel {', '.join(room) or 'none'}; "
                                   f"exempt: {', '.join(exempt) or 'nobody'}")


def check_slack(settings: Settings) -> list[Finding]:
    slack = settings.slack
    if slack.bot_token is None:
        extra = [name for name, value in (("SLACK_APP_TOKEN", slack.app_token),
                                          ("SLACK_SIGNING_SECRET", slack.signing_secret)) if value is not None]
        if extra:
            return [Finding("warn", "slack", f"{' and '.join(extra)} set but SLACK_BOT_TOKEN is not: Slack is off",
                            "set SLACK_BOT_TOKEN (xoxb-…) to start the Slack adapter")]
        return [Finding("ok", "slack", "not configured (SLACK_BOT_TOKEN unset)")]
    findings = []
    bot = slack.bot_token.get_secret_value()
    if bot.startswith("xapp-"):
        findings.append(Finding("fail", "slack", "SLACK_BOT_TOKEN holds an app-level token (xapp-…)",
                                "put it in SLACK_APP_TOKEN; SLACK_BOT_TOKEN is the Bot User OAuth Token (xoxb-…)"))
    elif bot.startswith("xoxp-"):
        findings.append(Finding("fail", "slack", "SLACK_BOT_TOKEN holds a user token (xoxp-…), not the bot's",
                                "use the Bot User OAuth Token (xoxb-…) from OAuth & Permissions"))
    elif problem := token_problem(bot, SLACK_TOKEN, "Slack bot token") or (
            None if bot.startswith("xoxb-") else "does not start with xoxb-"):
        findings.append(Finding("fail", "slack", f"SLACK_BOT_TOKEN {problem}",
                                "copy the Bot User OAuth Token (xoxb-…) again from OAuth & Permissions"))
    if slack.app_token is not None:
        app = slack.app_token.get_secret_value()
        problem = token_problem(app, SLACK_TOKEN, "Slack app-level token") or (
            None if app.startswith("xapp-") else "does not start with xapp-")
        if problem:
            findings.append(Finding("fail", "slack", f"SLACK_APP_TOKEN {problem}",
                                    "Basic Information → App-Level Tokens: a token with connections:write (xapp-…)"))
        mode = "Socket Mode"
    elif slack.signing_secret is not None:
        secret = slack.signing_secret.get_secret_value()
        if not SLACK_SIGNING_SECRET.fullmatch(secret):
            findings.append(Finding("warn", "slack", "SLACK_SIGNING_SECRET is not 32 hexadecimal characters",
                                    "copy it again: Basic Information → App Credentials → Signing Secret"))
        mode = f"HTTP mode on {slack.http_host}:{slack.http_port}{slack.http_path}"
    else:
        return [*findings, Finding("fail", "slack", "SLACK_BOT_TOKEN is set, but neither SLACK_APP_TOKEN "
                                   "(Socket Mode) nor SLACK_SIGNING_SECRET (HTTP mode) is",
                                   "set SLACK_APP_TOKEN (xapp-…) for Socket Mode, or SLACK_SIGNING_SECRET")]
    if not findings:
        findings.append(Finding("ok", "slack", f"tokens set and well-formed; {mode}"))
    return findings


# --- asking the platforms whether the tokens work ----------------------------------------------------


def _ask(url: str, headers: dict[str, str], post: bool = False) -> tuple[int, dict[str, object]]:
    """One HTTP request with a short timeout: the status and the JSON body ({} when there is none)."""
    request = urllib.request.Request(url, data=b"" if post else None, headers=headers,
                                     method="POST" if post else "GET")
    try:
        with urllib.request.urlopen(request, timeout=ONLINE_TIMEOUT_S) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {}
    return status, body if isinstance(body, dict) else {}


def _unreachable(check: str, url: str, exc: Exception) -> Finding:
    host = urllib.parse.urlsplit(url).netloc or url
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return Finding("warn", check, f"could not reach {host} to check the token ({reason})",
                   "run raven doctor where Raven runs, with its network; or pass --offline")


def check_discord_online(settings: Settings) -> Finding | None:
    """Discord's own answer to the token (GET /users/@me); None when there is no well-formed token."""
    token = settings.discord.token
    if token is None or check_discord(settings).level != "ok":
        return None
    url = (settings.discord.api_url or DISCORD_API).rstrip("/") + "/users/@me"
    try:
        status, body = _ask(url, {"Authorization": f"Bot {token.get_secret_value()}",
                                  "User-Agent": "DiscordBot (raven doctor, 0.1)"})
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _unreachable("discord", url, exc)
    if status == 200:
        return Finding("ok", "discord", f"Discord accepts the token: the bot is {body.get('username', '?')}")
    if status == 401:
        return Finding("fail", "discord", "Discord rejects DISCORD_TOKEN (401 Unauthorized)",
                       "reset the token: Developer Portal → your application → Bot → Reset Token")
    return Finding("warn", "discord", f"Discord answered {status} to the token check", "try again later")


def check_slack_online(settings: Settings) -> Finding | None:
    """Slack's own answer to the bot token (auth.test); None when there is no well-formed token."""
    slack = settings.slack
    if slack.bot_token is None or any(f.level == "fail" for f in check_slack(settings)):
        return None
    url = slack.api_url.rstrip("/") + "/auth.test"
    try:
        status, body = _ask(url, {"Authorization": f"Bearer {slack.bot_token.get_secret_value()}",
                                  "Content-Type": "application/x-www-form-urlencoded"}, post=True)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return _unreachable("slack", url, exc)
    if status == 200 and body.get("ok") is True:
        who, team = body.get("user", "?"), body.get("team", "?")
        return Finding("ok", "slack", f"Slack accepts the bot token: {who} in {team}")
    error = str(body.get("error") or status)
    if error in SLACK_REJECTS:
        return Finding("fail", "slack", f"Slack rejects SLACK_BOT_TOKEN ({error})",
                       "reinstall the app to the workspace and copy the Bot User OAuth Token (xoxb-…) again")
    return Finding("warn", "slack", f"Slack answered {error} to the token check", "try again later")


def check_web(settings: Settings) -> Finding:
    web = settings.web
    where = f"http://{web.host}:{web.port}/"
    state = "served by raven run" if web.enabled else "off in raven run (raven web serves it)"
    if web.token is not None and len(web.token.get_secret_value()) < 16:
        return Finding("warn", "web", f"{where}, {state}; RAVEN_WEB_TOKEN is short (under 16 characters)",
                       "use a long random token: openssl rand -hex 24")
    guard = "token required" if web.token is not None else "no token (localhost only)"
    return Finding("ok", "web", f"{where}, {state}; {guard}")


def port_problem(host: str, port: int) -> str | None:
    """None when ``host:port`` can be listened on now (bound and released at once), else why not."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host} does not resolve ({exc.strerror})"
    for family, kind, proto, _, address in addresses[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                probe.bind(address)
            except OSError as exc:
                reasons = {errno.EADDRINUSE: "in use by another program", errno.EACCES: "needs privileges",
                           errno.EADDRNOTAVAIL: "not an address of this machine"}
                return reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return None


def check_ports(settings: Settings) -> list[Finding]:
    wanted: list[tuple[str, str, int, bool]] = []
    if settings.web.port:
        wanted.append(("RAVEN_WEB_HOST:RAVEN_WEB_PORT", settings.web.host, settings.web.port, settings.web.enabled))
    if settings.slack.enabled and settings.slack.app_token is None:
        wanted.append(("SLACK_HTTP_HOST:SLACK_HTTP_PORT", settings.slack.http_host, settings.slack.http_port, True))
    findings = []
    for variables, host, port, needed in wanted:
        problem = port_problem(host, port)
        if problem is None:
            findings.append(Finding("ok", "ports", f"{host}:{port} is free ({variables})"))
        else:
            findings.append(Finding("fail" if needed else "warn", "ports",
                                    f"{host}:{port} {problem}" + ("" if needed else ": raven web would fail there"),
                                    f"stop what listens there, or change {variables}"))
    return findings


# --- all of it -------------------------------------------------------------------------------------


def run_checks(settings: Settings, report: Callable[[Finding], None], online: bool = True) -> list[Finding]:
    """Every check in order, each finding reported as soon as it is known; ``online``: also ask
    Discord and Slack whether the tokens work (a few seconds at most each)."""
    findings: list[Finding] = []

    def add(*found: Finding) -> None:
        for finding in found:
            findings.append(finding)
            report(finding)

    model, info = check_model(settings)
    add(model)
    add(check_tokenizer(settings, info))
    found, machine = gpus(), detect()
    add(check_gpu(found), check_strategy(settings, info, found, machine), check_cpu(settings, machine))
    add(check_database(settings))
    add(*check_personas(settings))
    add(check_discord(settings), *check_slack(settings), check_limits(settings))
    if online:
        add(*[found for found in (check_discord_online(settings), check_slack_online(settings)) if found])
    add(check_web(settings))
    add(*check_ports(settings))
    return findings


def summary(findings: list[Finding]) -> str:
    counts = {level: sum(f.level == level for f in findings) for level in ("ok", "warn", "fail")}
    verdict = "Raven would not start as configured" if counts["fail"] else "Raven can start"
    return f"{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failures: {verdict}"
