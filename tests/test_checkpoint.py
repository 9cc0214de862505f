"""Checkpoints: the generated tiny RWKV-7 and RWKV-4 files through the real ``rwkv`` loader, family
detection, clear errors for every kind of bad file, and the ``make-model`` and ``convert`` commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bot.errors import ModelLoadError
from bot.inference.checkpoint import SIZES, WORLD_VOCAB, describe, detect_family, make_checkpoint, read_state_dict
from bot.inference.rwkv_package import convert_checkpoint, load_package_model

RAVEN = str(Path(sys.executable).parent / "raven")
PROMPT = [510, 3158, 33, 4811, 11, 49, 3319, 1010]  # any in-vocabulary ids


def forward(family: str, model: object, tokens: list[int]) -> torch.Tensor:
    state = model.generate_zero_state() if family == "v7" else None  # type: ignore[attr-defined]
    logits, _ = model.forward(tokens, state)  # type: ignore[attr-defined]
    return logits.float()


def raven(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAVEN_", "DISCORD_", "SLACK_"))}
    return subprocess.run([RAVEN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


# --- the generated checkpoints through the real loader ----------------------------------------------

@pytest.mark.parametrize(("fixture", "family"), [("tiny_v7_path", "v7"), ("tiny_v4_path", "v4")])
def test_tiny_checkpoint_loads_and_gives_finite_logits(request: pytest.FixtureRequest, fixture: str,
                                                       family: str) -> None:
    path: Path = request.getfixturevalue(fixture)
    loaded_family, model = load_package_model(path, "cpu fp32")
    assert loaded_family == family
    logits = forward(family, model, PROMPT)
    assert logits.shape == (WORLD_VOCAB,)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0  # not a constant row: the weights were really read
    # Deterministic: the same tokens give the same logits.
    assert torch.equal(forward(family, model, PROMPT), logits)


@pytest.mark.parametrize(("fixture", "family"), [("tiny_v7_path", "v7"), ("tiny_v4_path", "v4")])
def test_describe(request: pytest.FixtureRequest, fixture: str, family: str) -> None:
    path: Path = request.getfixturevalue(fixture)
    tiny = SIZES["tiny"]
    assert describe(path) == (family, tiny.n_layer, tiny.n_embd, WORLD_VOCAB) == (family, 3, 128, 65536)
    sd = read_state_dict(path)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())  # stored as real checkpoints are


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, tiny_v4_path: Path) -> None:
    again = make_checkpoint(tmp_path / "again.pth", "v4", "tiny", seed=4)
    other = make_checkpoint(tmp_path / "other.pth", "v4", "tiny", seed=5)
    a, b, c = read_state_dict(tiny_v4_path), read_state_dict(again), read_state_dict(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["emb.weight"], c["emb.weight"])


# --- family detection ----------------------------------------------------------------------------

COMMON = {"emb.weight", "head.weight", "ln_out.weight", "blocks.0.ln1.weight", "blocks.0.att.key.weight"}


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (COMMON | {"blocks.0.att.time_decay", "blocks.0.att.time_first", "blocks.0.att.time_mix_k"}, "v4"),
        (COMMON | {"blocks.0.att.time_decay", "blocks.0.att.ln_x.weight", "blocks.0.att.time_faaaa"}, "v5"),
        (COMMON | {"blocks.0.att.time_maa_x", "blocks.0.att.time_decay", "blocks.0.att.ln_x.weight"}, "v6"),
        (COMMON | {"blocks.0.att.r_k", "blocks.0.att.ln_x.weight", "blocks.0.att.w0"}, "v7"),
    ],
)
def test_detect_family(keys: set[str], family: str) -> None:
    assert detect_family(keys) == family
    assert detect_family(sorted(keys)) == family


@pytest.mark.parametrize("keys", [set(), COMMON, {"emb.weight", "blocks.0.att.time_decay"}, {"model.layers.0.q"}])
def test_unknown_layout_is_refused(keys: set[str]) -> None:
    with pytest.raises(ModelLoadError, match="unknown checkpoint layout"):
        detect_family(keys)


def test_real_files_are_detected(tiny_v7_path: Path, tiny_v4_path: Path) -> None:
    assert detect_family(read_state_dict(tiny_v7_path).keys()) == "v7"  # type: ignore[arg-type]
    assert detect_family(list(read_state_dict(tiny_v4_path))) == "v4"


# --- bad files -----------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.pth"
    for call in (lambda: describe(missing), lambda: load_package_model(missing, "cpu fp32"),
                 lambda: read_state_dict(missing)):
        with pytest.raises(ModelLoadError, match="does not exist") as info:
            call()
        assert str(missing) in str(info.value)


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint") as info:
        load_package_model(junk, "cpu fp32")
    assert str(junk) in str(info.value)


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": Payload()}, evil)
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        describe(evil)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [{"head.weight": torch.zeros(2, 2)}, [torch.zeros(2)], {}])
def test_torch_file_without_emb_weight_is_refused(tmp_path: Path, content: object) -> None:
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(ModelLoadError, match="not an RWKV checkpoint") as info:
        load_package_model(path, "cpu fp32")
    assert str(path) in str(info.value) and "emb.weight" in str(info.value)


@pytest.mark.parametrize(
    ("fixture", "tensor", "shape"),
    [("tiny_v7_path", "head.weight", (WORLD_VOCAB, 100)),  # width 100, not 128
     ("tiny_v4_path", "blocks.1.att.key.weight", (128, 64)),
     ("tiny_v7_path", "blocks.2.ffn.value.weight", None)],  # missing
)
def test_malformed_tensors_are_refused_at_load(request: pytest.FixtureRequest, tmp_path: Path, fixture: str,
                                               tensor: str, shape: tuple[int, ...] | None) -> None:
    """A checkpoint whose tensors do not fit together must fail at load with the file named, not load
    fine and fail later, on the first message, inside TorchScript."""
    sd = {k: v.clone() for k, v in read_state_dict(request.getfixturevalue(fixture)).items()}
    if shape is None:
        del sd[tensor]
    else:
        sd[tensor] = torch.zeros(shape, dtype=torch.bfloat16)
    broken = tmp_path / "broken.pth"
    torch.save(sd, broken)
    for load in (lambda: load_package_model(broken, "cpu fp32"), lambda: describe(broken)):
        with pytest.raises(ModelLoadError) as info:
            load()
        assert str(broken) in str(info.value) and tensor in str(info.value)


def test_v7_strategy_is_checked(tiny_v7_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="fp32, fp16 or bf16"):
        load_package_model(tiny_v7_path, "cpu fp16i8")
    with pytest.raises(ModelLoadError, match="RWKV-7 strategy"):
        load_package_model(tiny_v7_path, "cuda fp16 -> cpu fp32")


# --- commands ------------------------------------------------------------------------------------

def test_make_model_command_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "made" / "tiny-v4.pth"
    result = raven("make-model", "--family", "v4", "--size", "tiny", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "RWKV-4" in result.stdout
    assert describe(out) == ("v4", 3, 128, WORLD_VOCAB)
    assert not list(out.parent.glob("*.partial"))
    family, model = load_package_model(out, "cpu fp32")
    assert family == "v4" and torch.isfinite(forward(family, model, PROMPT)).all()


def test_convert_v4_gives_the_same_logits(tmp_path: Path, tiny_v4_path: Path) -> None:
    out = tmp_path / "converted.pth"
    result = raven("convert", str(tiny_v4_path), str(out), "--strategy", "cpu fp32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and f"wrote {out}" in result.stdout and "'cpu fp32'" in result.stdout
    converted = torch.load(out, map_location="cpu", weights_only=True)
    assert converted["_strategy"] == "cpu fp32" and converted["emb.weight"].dtype == torch.float32

    family, original = load_package_model(tiny_v4_path, "cpu fp32")
    family_c, model_c = load_package_model(out, "cpu fp32")
    assert family == family_c == "v4"
    for tokens in (PROMPT, [0], list(range(100, 140))):
        expected, got = forward(family, original, tokens), forward(family, model_c, tokens)
        assert torch.isfinite(got).all()
        assert (expected - got).abs().max().item() <= 1e-5


def test_convert_refuses_v7_clearly(tmp_path: Path, tiny_v7_path: Path) -> None:
    out = tmp_path / "v7-converted.pth"
    with pytest.raises(ModelLoadError, match="RWKV-7 checkpoints need no conversion"):
        convert_checkpoint(tiny_v7_path, out, "cpu fp32")
    result = raven("convert", str(tiny_v7_path), str(out), cwd=tmp_path)
    assert result.returncode != 0
    assert "RWKV-7 checkpoints need no conversion" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_convert_missing_source_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        convert_checkpoint(tmp_path / "absent.pth", tmp_path / "out.pth", "cpu fp32")
    assert str(tmp_path / "absent.pth") in str(info.value)
