"""State-tuned personas: a persona's ``state:`` file (``blocks.N.att.time_state``, as RWKV state tuning
saves it) is a thread's initial state. Checked against the ``rwkv`` package fed the same state, through
the real console script, the real loader on a generated checkpoint and a real SQLite store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bot.app.assembly import DEMO_MODEL_NAME, open_service
from bot.core.outcomes import Failed, Refused
from bot.core.personas import Persona, PersonaLibrary, parse_persona
from bot.core.prompt import PromptFormat
from bot.core.service import ChatService
from bot.errors import PersonaError
from bot.events import Event, ThreadKey
from bot.inference.rwkv_package import load_package_model
from bot.inference.state_codec import decode_state
from bot.inference.state_file import (
    StateLayout,
    read_state_file,
    to_state,
    write_random_state,
)
from tests.conftest import SettingsFactory

RAVEN = str(Path(sys.executable).parent / "raven")
TOLERANCE = 1e-4  # fp32 on the CPU
TINY = StateLayout("v7", 3, 2, 64)  # the generated tiny RWKV-7: 3 layers, 2 heads of 64
TUNED = """---
name: Tuned
description: A state-tuned persona.
state: tuned.pth
---
You are a helpful assistant.
"""
BARE = """---
name: Bare
state: states/bare.pth
---
"""


def raven(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    clean.update(env)
    return subprocess.run([RAVEN, *args], env=clean, cwd=cwd, capture_output=True, text=True, timeout=120)


async def _say(service: ChatService, key: ThreadKey, text: str) -> str:
    """What the user sees: the text shown, and a notice's words."""
    turn = service.reply(Event(key, "u1", "Ann", text))
    shown = await turn.text()
    outcome = await turn.outcome()
    if isinstance(outcome, Refused | Failed):
        shown += outcome.message
    return shown


@pytest.fixture(scope="module")
def reference(tiny_v7_path: Path) -> object:
    return load_package_model(tiny_v7_path, "cpu fp32")[1]


@pytest.fixture
def personas_dir(tmp_path: Path, tiny_v7_path: Path) -> Path:
    folder = tmp_path / "personas"
    (folder / "states").mkdir(parents=True)
    result = raven("make-state", str(folder / "tuned.pth"), "--model", str(tiny_v7_path), "--seed", "3",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    write_random_state(folder / "states" / "bare.pth", TINY, seed=4)
    (folder / "tuned.md").write_text(TUNED, encoding="utf-8")
    (folder / "bare.md").write_text(BARE, encoding="utf-8")
    return folder


def package_state(path: Path) -> list[torch.Tensor]:
    """The oracle's state, built straight from the file in the package's RWKV-7 layout: per layer
    att_x_prev (C), the wkv matrix (H, N, N) — the file's time_state as it is — and ffn_x_prev (C)."""
    data = torch.load(path, weights_only=True)
    state: list[torch.Tensor] = []
    for i in range(len(data)):
        wkv = data[f"blocks.{i}.att.time_state"].float()
        state += [torch.zeros(128), wkv.clone(), torch.zeros(128)]
    return state


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- raven make-state ---------------------------------------------------------------------------------

def test_make_state_on_the_demo_model_writes_a_file_the_package_reads(tmp_path: Path, reference: object) -> None:
    """Without --model it sizes the file for the configured model: here the generated demo checkpoint."""
    out = tmp_path / "demo-state.pth"
    result = raven("make-state", str(out), "--seed", "1", cwd=tmp_path, RAVEN_DATA_DIR=str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert "3 layers of 2×64×64" in result.stdout
    data = torch.load(out, weights_only=True)  # plain tensors: loadable without running code
    assert sorted(data) == [f"blocks.{i}.att.time_state" for i in range(3)]
    assert all(t.shape == (2, 64, 64) and t.std() > 0.1 for t in data.values())

    package = load_package_model(tmp_path / "data" / DEMO_MODEL_NAME, "cpu fp32")[1]
    from_state, _ = package.forward([11, 22, 33], package_state(out))
    from_zero, _ = package.forward([11, 22, 33], None)
    assert torch.isfinite(from_state).all()
    assert _diff(from_state, from_zero) > 1e-3  # the state changes what the model says


def test_make_state_refuses_a_model_without_a_wkv_state(tmp_path: Path, tiny_v4_path: Path) -> None:
    result = raven("make-state", str(tmp_path / "x.pth"), "--model", str(tiny_v4_path), cwd=tmp_path)
    assert result.returncode == 1
    assert "not supported for RWKV-4" in result.stderr
    assert not (tmp_path / "x.pth").exists()


# --- the first reply starts from the state file ---------------------------------------------------------

@pytest.mark.parametrize("backend", ["batched", "package"])
async def test_first_reply_starts_from_the_state_file(
    backend: str, settings_factory: SettingsFactory, personas_dir: Path, reference: object
) -> None:
    async with open_service(settings_factory(personas_dir=personas_dir, backend=backend)) as service:
        results = {}
        for name in ("tuned", "bare"):
            persona = service.persona(name)
            fmt = PromptFormat(service.engine.tokenizer, service.family, persona)
            user_turn = fmt.user_turn_tokens("Hello, who are you?")
            start = await service.engine.prefill(await service.states.prefix(fmt), user_turn)
            key = ThreadKey("test", f"state-{name}-{backend}")
            await _say(service, key, f"/advisor {name} Hello, who are you?")
            stored = await service.store.load_state(key)
            messages = await service.thread_messages(key)
            template, vocab = service.engine.backend.zero_state(), service.engine.backend.vocab_size
            assert stored is not None
            system = fmt.system_tokens() if name == "tuned" else []  # no prompt: the state alone
            results[name] = (persona, system, user_turn, start, decode_state(stored.blob, template, vocab),
                             messages)

    for name, (persona, system, user_turn, start, saved, messages) in results.items():
        assert persona.state is not None
        file_state = package_state(persona.state.path)
        expected, _ = reference.forward(system + user_turn, [t.clone() for t in file_state])  # type: ignore[attr-defined]
        from_zero, _ = reference.forward(system + user_turn, None)  # type: ignore[attr-defined]
        assert _diff(start.logits, expected) <= TOLERANCE, (name, _diff(start.logits, expected))
        assert _diff(expected, from_zero) > 1e-3  # the state file changed the first logits

        reply = next(m for m in messages if m.role == "assistant")
        assert reply.tokens
        after, after_state = reference.forward(  # type: ignore[attr-defined]
            system + user_turn + reply.tokens, [t.clone() for t in file_state])
        assert saved.token_count == len(system + user_turn + reply.tokens)
        assert _diff(saved.logits, after) <= TOLERANCE
        assert max(_diff(a, b) for a, b in zip(saved.state, after_state, strict=True)) <= TOLERANCE


async def test_a_rebuild_from_the_log_starts_from_the_state_file(
    settings_factory: SettingsFactory, personas_dir: Path
) -> None:
    """Short turns, so that the initial state has not faded yet when the rebuild is compared (the
    random demo weights forget fast)."""
    key = ThreadKey("test", "state-rebuild")
    settings = settings_factory(personas_dir=personas_dir, default_persona="bare", max_reply_tokens=3)
    async with open_service(settings) as service:
        await _say(service, key, "Hi.")
        await _say(service, key, "More.")
        live = await service.store.load_state(key)
        thread = await service.thread(key)
        assert live is not None and thread is not None
        bare = service.persona("bare")
        rebuilt = await service.states.rebuild(thread, PromptFormat(service.engine.tokenizer, service.family, bare))
        template, vocab = service.engine.backend.zero_state(), service.engine.backend.vocab_size
        stateless = Persona("bare", "Bare", "", "")  # the same persona without its state file
        plain = await service.states.rebuild(
            thread, PromptFormat(service.engine.tokenizer, service.family, stateless))
    saved = decode_state(live.blob, template, vocab)
    assert rebuilt.token_count == saved.token_count
    assert _diff(rebuilt.logits, saved.logits) <= TOLERANCE
    assert max(_diff(a, b) for a, b in zip(rebuilt.state, saved.state, strict=True)) <= TOLERANCE
    assert _diff(plain.logits, saved.logits) > 1e-3  # the same log from a zero state ends elsewhere


async def test_a_changed_state_file_rebuilds_the_thread(settings_factory: SettingsFactory, personas_dir: Path) -> None:
    key = ThreadKey("test", "state-changed")
    async with open_service(settings_factory(personas_dir=personas_dir, default_persona="tuned")) as service:
        await _say(service, key, "Hello there.")
        before = service.persona("tuned").fingerprint
        await _say(service, key, "Again.")
        assert service.last_turn(key).resumed_from == "memory"  # type: ignore[union-attr]
        path = personas_dir / "tuned.pth"
        write_random_state(path, TINY, seed=99)
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
        await _say(service, key, "And now?")
        assert service.persona("tuned").fingerprint != before
        assert service.last_turn(key).resumed_from == "rebuild"  # type: ignore[union-attr]


# --- files that do not fit, and paths that lead elsewhere ---------------------------------------------

def test_the_fingerprint_covers_the_state_files_content(tmp_path: Path) -> None:
    write_random_state(tmp_path / "s.pth", TINY, seed=1)
    text = "---\nstate: s.pth\n---\nHello."
    first = parse_persona("p", text, str(tmp_path / "p.md"), tmp_path)
    again = parse_persona("p", text, str(tmp_path / "p.md"), tmp_path)
    write_random_state(tmp_path / "s.pth", TINY, seed=2)
    changed = parse_persona("p", text, str(tmp_path / "p.md"), tmp_path)
    plain = parse_persona("p", "Hello.")
    assert first.fingerprint == again.fingerprint
    assert len({first.fingerprint, changed.fingerprint, plain.fingerprint}) == 3


@pytest.mark.parametrize(("value", "complaint"), [
    ("../outside.pth", "inside the personas directory"),
    ("states/../../outside.pth", "inside the personas directory"),
    ("{outside}", "inside the personas directory"),
    ("link.pth", "leads outside the personas directory"),
    ("missing.pth", "does not exist"),
    ("notes.txt", "must be a .pth file"),
    ("[1, 2]", "must be a file name"),
])
def test_state_paths_stay_inside_the_personas_directory(tmp_path: Path, value: str, complaint: str) -> None:
    folder = tmp_path / "personas"
    folder.mkdir()
    outside = write_random_state(tmp_path / "outside.pth", TINY)  # a valid file, just not the persona's
    (folder / "link.pth").symlink_to(outside)
    (folder / "notes.txt").write_text("x")
    source = folder / "p.md"
    with pytest.raises(PersonaError) as caught:
        parse_persona("p", f"---\nstate: {value.format(outside=outside)}\n---\nHi.", str(source), folder)
    assert complaint in str(caught.value) and str(source) in str(caught.value)


def _bad_file(path: Path, content: object) -> Path:
    torch.save(content, path)
    return path


@pytest.mark.parametrize(("content", "complaint"), [
    ({f"blocks.{i}.att.time_state": torch.zeros(2, 64, 64) for i in range(2)}, "has 2 layers; the model has 3"),
    ({f"blocks.{i}.att.time_state": torch.zeros(4, 32, 32) for i in range(3)},
     "shape (4, 32, 32); the model needs (2, 64, 64)"),
    ({f"blocks.{i}.att.time_state": torch.zeros(2, 64, 32) for i in range(3)},
     "expected the same (heads, head_size, head_size)"),
    ({"blocks.0.att.time_state": torch.zeros(2, 64, 64), "blocks.2.att.time_state": torch.zeros(2, 64, 64)},
     "lacks blocks.1.att.time_state"),
    ({"emb.weight": torch.zeros(3)}, "expected only blocks.N.att.time_state"),
    ([torch.zeros(3)], "must hold a dict"),
    ({"blocks.0.att.time_state": torch.full((2, 64, 64), float("nan"))}, "NaN"),
])
def test_a_state_file_that_does_not_fit_names_the_file(tmp_path: Path, content: object, complaint: str) -> None:
    path = _bad_file(tmp_path / "bad.pth", content)
    with pytest.raises(PersonaError) as caught:
        read_state_file(path).check(TINY)
    assert complaint in str(caught.value) and str(path) in str(caught.value)


async def test_broken_state_personas_are_reported_and_the_others_keep_working(
    settings_factory: SettingsFactory, personas_dir: Path
) -> None:
    few_layers = StateLayout("v7", 2, 2, 64)
    other_heads = StateLayout("v7", 3, 4, 32)
    write_random_state(personas_dir / "few.pth", few_layers)
    write_random_state(personas_dir / "heads.pth", other_heads)
    broken = {"layers": "few.pth", "shape": "heads.pth", "missing": "gone.pth", "escape": "../tuned.pth",
              "absolute": str(personas_dir / "tuned.pth")}
    for name, value in broken.items():
        (personas_dir / f"{name}.md").write_text(f"---\nstate: {value}\n---\nHi.", encoding="utf-8")
    key = ThreadKey("test", "state-broken")
    async with open_service(settings_factory(personas_dir=personas_dir)) as service:
        working = {p.name for p in service.personas()}
        errors = {}
        for name in broken:
            with pytest.raises(PersonaError) as caught:
                service.persona(name)
            errors[name] = str(caught.value)
        refused = await _say(service, key, "/advisor layers hello")
        answered = await _say(service, ThreadKey("test", "state-ok"), "/advisor tuned hello")
    assert {"tuned", "bare", "default", "sql"} <= working and not working & set(broken)
    for name, message in errors.items():
        assert str(personas_dir / f"{name}.md") in message, message
    assert "few.pth has 2 layers; the model has 3" in errors["layers"]
    assert "heads.pth: time_state has shape (4, 32, 32)" in errors["shape"]
    assert "gone.pth does not exist" in errors["missing"]
    assert "no absolute path, no '..'" in errors["escape"] and "no absolute path" in errors["absolute"]
    assert "few.pth has 2 layers" in refused
    assert "Now talking with **Tuned**" in answered and len(answered) > len("Now talking with **Tuned**")


async def test_an_rwkv4_model_reports_state_personas_as_unsupported(
    settings_factory: SettingsFactory, personas_dir: Path, tiny_v4_path: Path
) -> None:
    async with open_service(settings_factory(model=tiny_v4_path, personas_dir=personas_dir)) as service:
        with pytest.raises(PersonaError, match="not supported for RWKV-4"):
            service.persona("tuned")
        assert "default" in {p.name for p in service.personas()}


def test_library_rechecks_a_cached_persona_when_the_model_is_known(tmp_path: Path) -> None:
    """Personas read before the model loaded (the default one, at start-up) are checked once it has."""
    write_random_state(tmp_path / "s.pth", StateLayout("v7", 2, 2, 64))
    (tmp_path / "p.md").write_text("---\nstate: s.pth\n---\nHi.", encoding="utf-8")
    library = PersonaLibrary(tmp_path)
    assert library.get("p").state is not None
    library.state_layout = TINY
    with pytest.raises(PersonaError, match="has 2 layers; the model has 3"):
        library.get("p")


def test_rwkv6_files_are_transposed_into_the_package_layout() -> None:
    """The package's RWKV-5/6 loader reads time_state.transpose(1, 2); RWKV-7 files are used as they are."""
    layer = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    from bot.inference.state_file import StateFile

    file = StateFile(Path("s.pth"), "x", (layer, layer + 1))
    template = [torch.zeros(8, dtype=torch.bfloat16), torch.zeros(2, 4, 4), torch.zeros(8, dtype=torch.bfloat16)] * 2
    v6, v7 = to_state(file, template, "v6"), to_state(file, template, "v7")
    assert torch.equal(v6[1], layer.transpose(1, 2)) and torch.equal(v6[4], (layer + 1).transpose(1, 2))
    assert torch.equal(v7[1], layer) and torch.equal(v7[4], layer + 1)
    assert v6[0].dtype == torch.bfloat16 and not v6[0].any() and not v6[2].any()
