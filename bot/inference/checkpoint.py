"""Checkpoint files: tell the RWKV family from a file's keys, and write random-weight checkpoints.

Weights cannot be downloaded on our machines, so tests and the demo use checkpoints made here, with
exactly the tensor names and shapes the official ``rwkv`` loader reads. Stored in bf16, as real
checkpoints are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from bot.errors import ModelLoadError

Family = Literal["v4", "v5", "v6", "v7"]
SizeName = Literal["tiny", "0.1b"]
WORLD_VOCAB = 65536


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    vocab_size: int = WORLD_VOCAB
    head_size: int = 64
    decay_lora: int = 64
    aaa_lora: int = 64
    mv_lora: int = 32
    gate_lora: int = 128

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def ffn_dim(self) -> int:
        return 4 * self.n_embd


SIZES: dict[str, Shape] = {
    "tiny": Shape(n_layer=3, n_embd=128, decay_lora=16, aaa_lora=16, mv_lora=8, gate_lora=32),
    "0.1b": Shape(n_layer=12, n_embd=768),
}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors (memory-mapped), with errors that name the file."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist (expected an RWKV .pth checkpoint)")
    try:
        data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"model file {path} is not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(data, dict) or "emb.weight" not in data:
        raise ModelLoadError(
            f"model file {path} is not an RWKV checkpoint: expected a dict of tensors with 'emb.weight'"
        )
    return data


def detect_family(keys: set[str] | list[str]) -> Family:
    """RWKV-7 has ``r_k``; v6 has ``time_maa``; v5 has ``ln_x``; plain v4 has none of them."""
    names = set(keys)
    if "blocks.0.att.r_k" in names:
        return "v7"
    if any("time_maa" in k for k in names):
        return "v6"
    if any(".ln_x." in k for k in names):
        return "v5"
    if "blocks.0.att.time_decay" in names and "blocks.0.att.key.weight" in names:
        return "v4"
    raise ModelLoadError("unknown checkpoint layout: found none of the keys of RWKV-4/5/6/7")


def check_shapes(path: Path, sd: dict[str, torch.Tensor], family: Family) -> None:
    """Refuse a checkpoint whose main tensors do not fit together, naming the file and the tensor."""
    vocab, width = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    expected: dict[str, tuple[int, ...]] = {"head.weight": (vocab, width), "ln_out.weight": (width,)}
    ffn = sd.get("blocks.0.ffn.key.weight")
    hidden = int(ffn.shape[0]) if ffn is not None and ffn.dim() == 2 else 0
    for i in range(n_layer):
        att, mlp = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for name in ("receptance", "key", "value", "output"):
            expected[f"{att}{name}.weight"] = (width, width)
        expected[f"{mlp}key.weight"] = (hidden, width)
        expected[f"{mlp}value.weight"] = (width, hidden)
        expected[f"blocks.{i}.ln1.weight"] = (width,)
        expected[f"blocks.{i}.ln2.weight"] = (width,)
        if family != "v7":
            expected[f"{mlp}receptance.weight"] = (width, width)
    if family == "v7":
        r_k = sd.get("blocks.0.att.r_k")
        if r_k is None or r_k.dim() != 2 or r_k.shape[0] * r_k.shape[1] != width:
            raise ModelLoadError(f"model file {path}: blocks.0.att.r_k must be (heads, head_size) with "
                                 f"heads × head_size = {width}")
    for key, shape in expected.items():
        if key not in sd:
            raise ModelLoadError(f"model file {path} lacks tensor {key!r} (RWKV-{family[1:]}, {n_layer} layers)")
        if tuple(sd[key].shape) != shape:
            raise ModelLoadError(f"model file {path}: {key} has shape {tuple(sd[key].shape)}, expected {shape} "
                                 f"(RWKV-{family[1:]}, embedding width {width}, vocabulary {vocab})")


def describe(path: Path) -> tuple[Family, int, int, int]:
    """Family, layers, embedding width and vocabulary size of a checkpoint (shapes checked)."""
    sd = read_state_dict(path)
    family = detect_family(list(sd))
    if "_strategy" not in sd:  # pre-converted RWKV-4/5/6 files hold transposed, re-typed tensors
        check_shapes(path, sd, family)
    vocab, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return family, n_layer, int(n_embd), int(vocab)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _shared_weights(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Embedding, head and layer norms: the same names and shapes in every family."""
    C, V = shape.n_embd, shape.vocab_size
    sd: dict[str, torch.Tensor] = {
        "emb.weight": _normal(gen, (V, C), 1e-1),
        "blocks.0.ln0.weight": torch.ones(C),
        "blocks.0.ln0.bias": torch.zeros(C),
        "ln_out.weight": torch.ones(C),
        "ln_out.bias": torch.zeros(C),
        "head.weight": _normal(gen, (V, C), 2.0 / math.sqrt(C)),
    }
    for i in range(shape.n_layer):
        b = f"blocks.{i}."
        sd |= {
            b + "ln1.weight": torch.ones(C), b + "ln1.bias": torch.zeros(C),
            b + "ln2.weight": torch.ones(C), b + "ln2.bias": torch.zeros(C),
        }
    return sd


def _v7_weights(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    C, H, N = shape.n_embd, shape.n_head, shape.head_size
    lin = 1.0 / math.sqrt(C)
    sd = _shared_weights(shape, gen)
    for i in range(shape.n_layer):
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for mix in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + mix] = _uniform(gen, (1, 1, C), 0.0, 1.0)
        sd |= {
            a + "w0": _uniform(gen, (1, 1, C), -2.0, 1.0),
            a + "w1": _normal(gen, (C, shape.decay_lora), lin),
            a + "w2": _normal(gen, (shape.decay_lora, C), 0.1),
            a + "a0": _normal(gen, (1, 1, C), 0.5),
            a + "a1": _normal(gen, (C, shape.aaa_lora), lin),
            a + "a2": _normal(gen, (shape.aaa_lora, C), 0.1),
            a + "v0": _uniform(gen, (1, 1, C), 0.5, 1.0),
            a + "v1": _normal(gen, (C, shape.mv_lora), lin),
            a + "v2": _normal(gen, (shape.mv_lora, C), 0.1),
            a + "g1": _normal(gen, (C, shape.gate_lora), lin),
            a + "g2": _normal(gen, (shape.gate_lora, C), 0.1),
            a + "k_k": _uniform(gen, (1, 1, C), 0.7, 1.0),
            a + "k_a": _uniform(gen, (1, 1, C), 0.8, 1.2),
            a + "r_k": _normal(gen, (H, N), 0.1),
            a + "receptance.weight": _normal(gen, (C, C), lin),
            a + "key.weight": _normal(gen, (C, C), lin),
            a + "value.weight": _normal(gen, (C, C), lin),
            a + "output.weight": _normal(gen, (C, C), 0.5 * lin),
            a + "ln_x.weight": torch.ones(C),
            a + "ln_x.bias": torch.zeros(C),
            f + "x_k": _uniform(gen, (1, 1, C), 0.0, 1.0),
            f + "key.weight": _normal(gen, (shape.ffn_dim, C), lin),
            f + "value.weight": _normal(gen, (C, shape.ffn_dim), 0.5 / math.sqrt(shape.ffn_dim)),
        }
    return sd


def _v4_weights(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    C, F = shape.n_embd, shape.ffn_dim
    lin = 1.0 / math.sqrt(C)
    sd = _shared_weights(shape, gen)
    for i in range(shape.n_layer):
        a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        sd |= {
            a + "time_decay": _uniform(gen, (C,), -3.0, 1.0),
            a + "time_first": _uniform(gen, (C,), -1.0, 1.0),
            a + "time_mix_k": _uniform(gen, (1, 1, C), 0.0, 1.0),
            a + "time_mix_v": _uniform(gen, (1, 1, C), 0.0, 1.0),
            a + "time_mix_r": _uniform(gen, (1, 1, C), 0.0, 1.0),
            a + "key.weight": _normal(gen, (C, C), lin),
            a + "value.weight": _normal(gen, (C, C), lin),
            a + "receptance.weight": _normal(gen, (C, C), lin),
            a + "output.weight": _normal(gen, (C, C), 0.5 * lin),
            f + "time_mix_k": _uniform(gen, (1, 1, C), 0.0, 1.0),
            f + "time_mix_r": _uniform(gen, (1, 1, C), 0.0, 1.0),
            f + "key.weight": _normal(gen, (F, C), lin),
            f + "receptance.weight": _normal(gen, (C, C), lin),
            f + "value.weight": _normal(gen, (C, F), 0.5 / math.sqrt(F)),
        }
    return sd


def make_checkpoint(
    out: Path, family: Literal["v4", "v7"] = "v7", size: SizeName = "tiny", seed: int = 0
) -> Path:
    """Write a random-weight checkpoint in the real format; returns the path written."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    gen = torch.Generator().manual_seed(seed)
    builders = {"v7": _v7_weights, "v4": _v4_weights}
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; choose v7 or v4")
    weights = builders[family](SIZES[size], gen)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    torch.save({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, tmp)
    tmp.replace(out)
    return out
