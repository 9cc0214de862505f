"""RWKV state files (state tuning): a persona's initial state, read, checked and put into the engine's layout.

State tuning trains only the initial wkv state of every layer and saves it as a ``.pth`` holding
``blocks.{i}.att.time_state`` per layer, shape ``(heads, head_size, head_size)``. RWKV-7 files are in
the ``rwkv`` package's own state layout; RWKV-5/6 files are transposed against it (the package's
RWKV-5/6 loader applies ``.transpose(1, 2)`` to a ``time_state`` merged into a checkpoint, and so do
we). The token-shift parts of the state start at zero, as after a fresh start. RWKV-4 has no such
state: its files are refused.

Reading is file work and :func:`to_state` is tensor work: both belong off the event loop (the persona
library reads in a worker thread; the conversion runs in the engine's worker).
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bot.errors import PersonaError
from bot.inference.backend import Backend, ModelState, State
from bot.inference.checkpoint import detect_family, read_state_dict

KEY = re.compile(r"^blocks\.(\d+)\.att\.time_state$")
STATE_FAMILIES = ("v5", "v6", "v7")
TRANSPOSED = ("v5", "v6")
"""Families whose files hold the transpose of the package's wkv state."""


@dataclass(frozen=True)
class StateLayout:
    """What a state file must match: the model's family, layers and wkv shape."""

    family: str
    n_layer: int
    n_head: int
    head_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_head, self.head_size, self.head_size)

    def describe(self) -> str:
        return (f"RWKV-{self.family[1:]}, {self.n_layer} layers of "
                f"{self.n_head}×{self.head_size}×{self.head_size}")

    @classmethod
    def of_backend(cls, backend: Backend) -> StateLayout:
        """The loaded model's layout, read from its zero state (RWKV-4: no wkv matrices, heads 0)."""
        template = backend.zero_state()
        if backend.family not in STATE_FAMILIES:
            return cls(backend.family, backend.n_layer, 0, 0)
        heads, size, _ = template[1].shape
        return cls(backend.family, backend.n_layer, int(heads), int(size))

    @classmethod
    def of_checkpoint(cls, path: Path) -> StateLayout:
        """A checkpoint's layout from its tensors, without loading the model (``raven make-state``)."""
        sd = read_state_dict(path)
        family = detect_family(list(sd))
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        if family == "v7":
            heads, size = sd["blocks.0.att.r_k"].shape
            return cls(family, n_layer, int(heads), int(size))
        first = sd.get("blocks.0.att.time_faaaa", sd.get("blocks.0.att.time_first"))
        if family not in STATE_FAMILIES or first is None:
            return cls(family, n_layer, 0, 0)
        heads = int(first.shape[0])
        return cls(family, n_layer, heads, int(sd["emb.weight"].shape[1]) // heads)


@dataclass(frozen=True)
class StateFile:
    """A state file's tensors, one per layer, as the file holds them (fp32), with its content's hash."""

    path: Path
    digest: str
    layers: tuple[torch.Tensor, ...]
    #: the file's (mtime_ns, size) before it was read: a cached copy is current while they match
    stamp: tuple[int, int] = (0, 0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.layers[0].shape)

    def check(self, layout: StateLayout) -> None:
        """Refuse a file that does not fit the loaded model, naming the file and what differs."""
        if layout.family not in STATE_FAMILIES:
            raise PersonaError(f"state file {self.path}: state files are not supported for RWKV-{layout.family[1:]} "
                               "models (RWKV-5, 6 and 7 only)")
        if len(self.layers) != layout.n_layer:
            raise PersonaError(f"state file {self.path} has {len(self.layers)} layers; the model has "
                               f"{layout.n_layer} ({layout.describe()})")
        if self.shape != layout.shape:
            raise PersonaError(f"state file {self.path}: time_state has shape {self.shape}; the model needs "
                               f"{layout.shape} ({layout.describe()})")


def read_state_file(path: Path) -> StateFile:
    """Read and check a state file on its own (every error names it); the model check is
    :meth:`StateFile.check`. Loaded with ``weights_only``: a state file can never run code."""
    try:
        info = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PersonaError(f"state file {path} does not exist") from None
    except OSError as exc:
        raise PersonaError(f"state file {path} cannot be read: {exc}") from None
    try:
        data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PersonaError(f"state file {path} is not a readable PyTorch file: {exc}") from None
    if not isinstance(data, dict):
        raise PersonaError(f"state file {path} must hold a dict of blocks.N.att.time_state tensors")
    found: dict[int, torch.Tensor] = {}
    for key, tensor in data.items():
        match = KEY.match(str(key))
        if match is None:
            raise PersonaError(f"state file {path} holds {str(key)[:60]!r}; expected only blocks.N.att.time_state")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise PersonaError(f"state file {path}: {key} is not a floating-point tensor")
        found[int(match.group(1))] = tensor
    if not found:
        raise PersonaError(f"state file {path} holds no blocks.N.att.time_state tensors")
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise PersonaError(f"state file {path} lacks blocks.{missing[0]}.att.time_state")
    layers = tuple(found[i].float().contiguous() for i in range(len(found)))
    first = layers[0].shape
    for i, tensor in enumerate(layers):
        if tensor.dim() != 3 or tensor.shape[1] != tensor.shape[2] or tensor.shape != first:
            raise PersonaError(f"state file {path}: blocks.{i}.att.time_state has shape {tuple(tensor.shape)}; "
                               "expected the same (heads, head_size, head_size) in every layer")
        if not torch.isfinite(tensor).all():
            raise PersonaError(f"state file {path}: blocks.{i}.att.time_state holds NaN or infinity")
    return StateFile(path, hashlib.sha256(raw).hexdigest()[:16], layers, (info.st_mtime_ns, info.st_size))


def to_state(file: StateFile, template: State, family: str) -> State:
    """The file as a state in the package's layout: ``template`` (the model's zero state) with each
    layer's wkv matrix replaced (transposed for RWKV-5/6), in the template's dtypes."""
    state = [t.clone() for t in template]
    for i, tensor in enumerate(file.layers):
        wkv = tensor.transpose(1, 2) if family in TRANSPOSED else tensor
        state[3 * i + 1] = wkv.to(template[3 * i + 1].dtype).contiguous()
    return state


def initial_model_state(file: StateFile, backend: Backend) -> ModelState:
    """The model before any token, started from the file (checked against ``backend`` first). The
    logits are zeros: nothing has been read yet, and a turn always reads tokens before sampling."""
    file.check(StateLayout.of_backend(backend))
    state = to_state(file, backend.zero_state(), backend.family)
    return ModelState(state, torch.zeros(backend.vocab_size), 0)


def write_random_state(out: Path, layout: StateLayout, seed: int = 0, scale: float = 0.5) -> Path:
    """A random state file in the real format, for tests and demos (no tuning behind it)."""
    if layout.family not in STATE_FAMILIES:
        raise PersonaError(f"state files are not supported for RWKV-{layout.family[1:]} models (RWKV-5, 6 and 7 only)")
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"blocks.{i}.att.time_state": torch.randn(layout.shape, generator=generator) * scale
               for i in range(layout.n_layer)}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, out)
    return out
