"""A batched RWKV-7 ("x070") forward in plain PyTorch, behind the engine's ``Backend`` interface.

Why this exists: the ``rwkv`` package runs one sequence at a time, so N chat threads served by it
share ~26-36 tokens/s in total on a 2-core CPU. One decode step over B threads turns every weight
matmul into a B×C @ C×C product that reads each weight once for all B rows; that is where the
10-30× aggregate speed-up comes from. Prefill (reading a new message) runs its matmuls over all T
tokens at once and the wkv recurrence in closed form over chunks of tokens, instead of the package's
per-token loop.

The math follows the package's ``RWKV_x070`` (``rwkv/model.py``), which the tests use as the oracle.
Read top to bottom:

    x = emb[token]                                   (emb already passed through ln0)
    for each layer:
        x = x + time_mix(ln1(x))                     (the "attention": wkv recurrence)
        x = x + channel_mix(ln2(x))                  (the MLP: relu² with a token shift)
    logits = ln_out(x) @ head

**State per thread and layer** (the package's layout, so states move freely between backends):

* ``att_x_prev`` (C,): the ln1 output of the previous token (the token shift of time-mix), weight dtype;
* ``wkv`` (H, N, N), fp32: per head a matrix ``S[value_dim, key_dim]``, the model's memory;
* ``ffn_x_prev`` (C,): the ln2 output of the previous token (the token shift of channel-mix).

The pool keeps these stacked per layer with the slot as the second dimension, ``(n_layer, max_slots,
...)``, so the first B slots of one layer are one contiguous block: a decode step over slots
``0..B-1`` works on views, gathers nothing and writes the state back in place.

**The wkv recurrence** (per head, N = head size = 64, all vectors (N,), state S (N, N)):

    S_t = S_{t-1} · diag(w_t) + (S_{t-1} · (-kk_t)) ⊗ (kk_t·a_t) + v_t ⊗ k_t
    y_t = S_t · r_t

``w_t`` ∈ [exp(-e^-0.5), 1] is a per-channel decay, ``kk_t`` the unit-normalised key, ``a_t`` ∈ (0,1)
the "in-context learning rate": the middle term removes from the memory what it stored under key
``kk_t`` (a delta rule), the last adds the new ``v_t`` under ``k_t``. The package writes the middle term
as an N×N matrix product ``S @ ((-kk) ⊗ (kk·a))`` (O(N³) per head); it is a rank-1 update of a
matrix-vector product, so we do it in O(N²) in place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bot.errors import ModelLoadError, NonFiniteLogitsError
from bot.inference.backend import State
from bot.inference.checkpoint import detect_family, read_state_dict
from bot.inference.cuda_graphs import StepGraphs
from bot.inference.linear import Linear
from bot.inference.lora_fused import LoraWeights, lora_works
from bot.inference.lora_fused import chains as lora_chains
from bot.inference.machine import Machine, bf16_warning, detect
from bot.inference.paths import (
    DEFAULT_WKV_CHUNK,
    SMALL_STEP_ROWS,
    WKV_CHUNKS,
    Paths,
    TuneCache,
    by_capability,
    candidates,
    in_turns,
    least_regret,
    median_seconds,
    shape_key,
    tune_matmul,
    wkv_candidates,
)
from bot.inference.thread_watch import Change, ThreadWatch, thread_options, watched_step
from bot.inference.threads import run_in_fresh_thread
from bot.inference.wkv_fused import FUSED, TORCH, LayerConstants, wkv_layer, wkv_seq, wkv_step

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PREFILL_CHUNK = 256
"""Tokens per prefill call into the layers: bounds activation memory and keeps the engine responsive."""
WKV_CHUNK = DEFAULT_WKV_CHUNK
"""Tokens per closed-form wkv block in prefill (see ``_wkv_seq``) unless the tuner picks another of
``WKV_CHUNKS``: 32 keeps the cumulative decay inside a range where fp32 loses nothing that matters
(≥ 0.545^32 ≈ 4e-9) and the L×L products small."""
MIN_TUNE_PARAMS = 20_000_000
"""Below this many weights a model's steps take microseconds: measuring its paths says nothing."""
THREAD_ROUNDS = 5
"""Rounds of the thread-count measurement (each: every option at one row and at 16)."""
LOG_W_SCALE = -0.606531  # log w = -exp(-0.5) · sigmoid(·): the package's literal, kept for bit-faithfulness


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One block's weights, already in the shapes the forward uses (see ``_load_weights``)."""

    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    maa: torch.Tensor  # (6, C): token-shift mix for r, w, k, v, a, g
    w0: torch.Tensor
    w1: Linear
    w2: Linear
    a0: torch.Tensor
    a1: Linear
    a2: Linear
    v0: torch.Tensor | None  # layer 0 has no value residual
    v1: Linear | None
    v2: Linear | None
    g1: Linear
    g2: Linear
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor  # (H, N)
    receptance: Linear
    key: Linear
    value: Linear
    output: Linear
    ln_x: tuple[torch.Tensor, torch.Tensor]
    ffn_x_k: torch.Tensor
    ffn_key: Linear
    ffn_value: Linear


def _expected_shapes(sd: dict[str, torch.Tensor], n_layer: int, C: int, V: int) -> dict[str, tuple[int, ...]]:
    """Every key the forward reads and its shape in the official checkpoint format."""
    def lora(name: str) -> int:
        t = sd.get(f"blocks.0.att.{name}")
        return int(t.shape[-1]) if t is not None and t.dim() == 2 else -1

    H, N = (tuple(sd["blocks.0.att.r_k"].shape) if "blocks.0.att.r_k" in sd else (C // 64, 64))
    dw, da, dv, dg = lora("w1"), lora("a1"), lora("v1"), lora("g1")
    if dv < 0 and n_layer > 1:
        t = sd.get("blocks.1.att.v1")
        dv = int(t.shape[-1]) if t is not None and t.dim() == 2 else -1
    vec = (1, 1, C)
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C), "head.weight": (V, C),
        "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,), "ln_out.bias": (C,),
    }
    for i in range(n_layer):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for n in ("ln1", "ln2"):
            shapes[f"{b}{n}.weight"] = (C,)
            shapes[f"{b}{n}.bias"] = (C,)
        for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            shapes[a + n] = vec
        shapes |= {
            a + "w1": (C, dw), a + "w2": (dw, C), a + "a1": (C, da), a + "a2": (da, C),
            a + "g1": (C, dg), a + "g2": (dg, C), a + "r_k": (int(H), int(N)),
            a + "receptance.weight": (C, C), a + "key.weight": (C, C),
            a + "value.weight": (C, C), a + "output.weight": (C, C),
            a + "ln_x.weight": (C,), a + "ln_x.bias": (C,),
            f + "x_k": vec, f + "key.weight": (4 * C, C), f + "value.weight": (C, 4 * C),
        }
        if i > 0:
            shapes |= {a + "v0": vec, a + "v1": (C, dv), a + "v2": (dv, C)}
    return shapes


def _validate(path: Path, sd: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """Check every key and shape up front, so a bad file fails at load with a message that says why."""
    family = detect_family(list(sd))
    if family != "v7":
        raise ModelLoadError(
            f"model file {path} is an RWKV-{family[1:]} checkpoint; the batched backend runs RWKV-7 only "
            "(use the package backend for older families)"
        )
    if sd["emb.weight"].dim() != 2:
        raise ModelLoadError(f"model file {path}: 'emb.weight' should be (vocab, n_embd), "
                             f"got {tuple(sd['emb.weight'].shape)}")
    V, C = (int(s) for s in sd["emb.weight"].shape)
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    expected = _expected_shapes(sd, n_layer, C, V)
    missing = [k for k in expected if k not in sd]
    if missing:
        shown = ", ".join(f"{k} {expected[k]}" for k in missing[:8])
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ModelLoadError(
            f"model file {path} is missing {len(missing)} RWKV-7 tensor(s): {shown}{more}; "
            f"expected {n_layer} layers of n_embd {C}, vocab {V}"
        )
    for key, shape in expected.items():
        got = tuple(sd[key].shape)
        if tuple(s for s in got if s != 1) != tuple(s for s in shape if s != 1):
            raise ModelLoadError(
                f"model file {path}: tensor {key!r} has shape {got}, expected {shape} "
                f"(n_layer {n_layer}, n_embd {C}, vocab {V})"
            )
    if C % 64:
        raise ModelLoadError(f"model file {path}: n_embd {C} is not a multiple of the head size 64")
    return n_layer, C, V


# --------------------------------------------------------------------------------------------------
# The wkv recurrence
# --------------------------------------------------------------------------------------------------


def _wkv_step(S: torch.Tensor, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kk: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """One token for B sequences at once; S (B·H, N, N) fp32 is updated in place.

    Inputs are (B·H, N) fp32. Both matrix-vector products read the *old* state, in one bmm:
    ``sa = S·(-kk)`` (what the delta rule removes) and ``S·(w⊙r)``, because
    ``y = S_new·r = S·(w⊙r) + sa·((kk⊙a)·r) + v·(k·r)``. Then ``S ← S⊙w`` and one rank-2 update
    ``+ sa ⊗ (kk⊙a) + v ⊗ k``: three passes over S, O(N²) per head, instead of an N×N product.
    """
    w = log_w.exp()
    kka = kk * a
    # (2, N) @ S^T rather than S @ (N, 2): the same product, ~4× faster in PyTorch's CPU bmm.
    both = torch.bmm(torch.stack((-kk, w * r), dim=1), S.mT)  # (BH, 2, N): rows sa, S·(w⊙r)
    sa = both[:, 0]
    y = both[:, 1] + sa * (kka * r).sum(-1, keepdim=True) + v * (k * r).sum(-1, keepdim=True)
    S.mul_(w.unsqueeze(1))  # decay along the key dimension
    S.baddbmm_(torch.stack((sa, v), dim=-1), torch.stack((kka, k), dim=1))  # + sa ⊗ (kk·a) + v ⊗ k
    return y


def _wkv_seq(S: torch.Tensor, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kk: torch.Tensor, a: torch.Tensor, chunk: int = WKV_CHUNK) -> torch.Tensor:
    """T tokens of B sequences in closed form per chunk; S (B·H, N, N) fp32 is updated in place.

    Inputs are (B, T, H, N), token-major as the projections produce them; returns y (B, T, H, N) fp32.
    Within a chunk of L tokens write ``W_t = w_1⊙…⊙w_t`` (the cumulative decay), ``α = -kk``,
    ``β = kk⊙a`` and ``sa_t = S_{t-1}·α_t``. Unrolling the recurrence from the chunk's first state S_0:

        S_t = S_0·diag(W_t) + Σ_{s≤t} (sa_s ⊗ β_s + v_s ⊗ k_s)·diag(W_t / W_s)

    so each ``sa_t`` is linear in S_0 and in the earlier ``sa_s``:

        sa = S_0·(α⊙W_{t-1}) + tril₋₁[(α⊙W_{t-1})·(β/W)ᵀ]·sa + tril₋₁[(α⊙W_{t-1})·(k/W)ᵀ]·v
           = P·S_0ᵀ + Q             (P, Q: one unit-lower-triangular L×L solve)

    and then the chunk's last state and its outputs follow from S_0 and ``sa``:

        S_L = S_0·diag(W_L) + saᵀ·(β⊙W_L/W) + vᵀ·(k⊙W_L/W)
        y   = (r⊙W)·S_0ᵀ + tril[(r⊙W)·(β/W)ᵀ]·sa + tril[(r⊙W)·(k/W)ᵀ]·v

    P, Q and the L×L matrices depend only on the chunk's own tokens, so they are computed for all
    chunks at once (batched matmuls over chunks × heads). What stays sequential is three small
    products per chunk (its ``sa``, then the next S_0); ``y`` then comes from every chunk's S_0 in
    one batched product. The ratios W_t/W_s stay inside fp32's range because w ≥ exp(-e^-0.5) ≈
    0.545 and L ≤ 64 (0.545⁶⁴ ≈ 1e-17).
    """
    B, T, H, N = r.shape
    X = B * H
    L = min(chunk, T)
    n = -(-T // L)
    pad = n * L - T

    def blocks(t: torch.Tensor) -> torch.Tensor:
        """(B, T, H, N) → (n·B·H, L, N) fp32, chunk-major. Padding has w = 1, k = v = kk = 0: no-ops."""
        if pad:
            t = F.pad(t, (0, 0, 0, 0, 0, pad))
        out = torch.empty(n, B, H, L, N, dtype=torch.float32, device=t.device)
        out.copy_(t.view(B, n, L, H, N).permute(1, 0, 3, 2, 4))
        return out.view(n * X, L, N)

    r, log_w, k, v, kk, a = (blocks(t) for t in (r, log_w, k, v, kk, a))
    cum = log_w.cumsum(dim=1)  # log W_t
    decay_to_t = cum.exp()  # W_t
    alpha = -kk * (cum - log_w).exp()  # α⊙W_{t-1}
    beta = kk * a
    r_dec = r * decay_to_t
    to_end = (cum[:, -1:] - cum).exp()  # W_L / W_s ≤ 1
    # All four L×L interaction matrices in one product: [α⊙W_{t-1}; r⊙W] · [β/W; k/W]ᵀ.
    inv = (-cum).exp()  # 1 / W_s
    grid = torch.cat((alpha, r_dec), dim=1) @ torch.cat((beta * inv, k * inv), dim=1).mT  # (n·X, 2L, 2L)
    m_ab, m_ak = grid[:, :L, :L].tril(-1), grid[:, :L, L:].tril(-1)  # s < t
    m_rb, m_rk = grid[:, L:, :L].tril(), grid[:, L:, L:].tril()  # s ≤ t: y_t reads S_t, after token t
    # [P | Q] = (I - m_ab)⁻¹ [α⊙W_{t-1} | m_ak·v], solved from the right on the transposes: the same
    # answer, ~2× faster in PyTorch's CPU kernels for these small batched systems.
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    solved = torch.linalg.solve_triangular((eye - m_ab).mT, torch.cat((alpha, m_ak @ v), dim=-1).mT,
                                           upper=True, left=False, unitriangular=True).mT
    P, Q = solved[..., :N].contiguous(), solved[..., N:].contiguous()
    end_beta = beta * to_end
    own = v.mT @ (k * to_end)  # (n·X, N, N): what a chunk's own v ⊗ k leave in its last state
    w_end = decay_to_t[:, -1:]  # (n·X, 1, N): the whole chunk's decay

    states = torch.empty(n + 1, X, N, N, dtype=S.dtype, device=S.device)  # S_0 of every chunk, + final
    states[0] = S
    sa = torch.empty(n, X, L, N, dtype=S.dtype, device=S.device)
    for c in range(n):
        rows = slice(c * X, (c + 1) * X)
        torch.baddbmm(Q[rows], P[rows], states[c].mT, out=sa[c])
        torch.baddbmm(own[rows], sa[c].mT, end_beta[rows], out=states[c + 1])
        states[c + 1].addcmul_(states[c], w_end[rows])
    S.copy_(states[n])
    y = torch.baddbmm(m_rk @ v, m_rb, sa.view(n * X, L, N))
    y = y.baddbmm_(r_dec, states[:n].view(n * X, N, N).mT)  # (n·X, L, N)
    return y.view(n, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, n * L, H, N)[:, :T]


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


class BatchedRWKV7Backend:
    """RWKV-7 over a pool of state slots; decode steps B slots together, prefill one slot's tokens.

    A drop-in alternative to ``PackageBackend`` for RWKV-7 checkpoints (same state layout, logits
    within 1e-4 in fp32). Weights: fp32, bf16 or fp16; the wkv state is always fp32.

    Call it from one thread (the engine's worker). On CPU, mind GNU OpenMP: every thread that has
    run a parallel torch op keeps its own team of worker threads, and once a process holds more of
    them than CPUs, all teams stop spinning between parallel regions. Measured on 2 cores: one
    ``torch.zeros(65536)`` on the event loop's thread made prefill in the worker 2.3× slower. So
    other long-lived threads should run ``torch.set_num_threads(1); torch.get_num_threads()``
    before their first op (the second call pins it: PyTorch sets a thread's count lazily, at its
    first parallel op, from the process-wide value that the worker's own ``set_num_threads``
    changes). The loader runs in a short-lived thread for the same reason.
    """

    family: str = "v7"
    _lora: list[LoraWeights] | None
    """The fused LoRA chains' own weights, per layer (bf16 on the CPU, where they run faster)."""

    def __init__(self, path: Path, device: str = "cpu", dtype: str = "fp32", max_slots: int = 64,
                 tune_cache: Path | None = None, always_tune: bool = False, torch_threads: int = 0,
                 cuda_graphs: bool = True) -> None:
        """``tune_cache``: measure the fast paths at load and keep the choices in this JSON file (see
        ``bot.inference.paths``); None chooses them by capability, without measuring. A model under
        ``MIN_TUNE_PARAMS`` (a test or demo model) is measured only with ``always_tune``.
        ``torch_threads``: the count the engine will run with (``RAVEN_TORCH_THREADS``); 0: chosen
        here (all usable cores, or one if that measures faster). ``cuda_graphs``: on CUDA, replay
        each batch size's decode step as a CUDA graph (``bot.inference.cuda_graphs``)."""
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested, but no CUDA device is available")
        if max_slots < 1:
            raise ValueError("max_slots must be at least 1")
        self.path = Path(path)
        self.device = dev
        self.dtype = dtype
        self.torch_dtype = DTYPES[dtype]
        self.max_slots = max_slots
        self._tune_cache = TuneCache(tune_cache) if tune_cache is not None else None
        self._always_tune = always_tune
        self._torch_threads = max(0, torch_threads)
        self.graphs = StepGraphs(self._step_logits, dev) if cuda_graphs and dev.type == "cuda" else None
        self.machine: Machine = detect()
        self.bf16_warning = bf16_warning(self.machine) if dev.type == "cpu" and dtype == "bf16" else None
        if self.bf16_warning:
            log.warning("%s", self.bf16_warning)
        sd = read_state_dict(self.path)
        self.n_layer, self.n_embd, self.vocab_size = _validate(self.path, sd)
        self.n_head, self.head_size = (int(s) for s in sd["blocks.0.att.r_k"].shape)
        # The loader's large parallel ops would give the calling thread (often a pooled executor
        # thread that lives on) an OpenMP team of its own: they run in a thread that ends.
        # sd is memory-mapped; it is dropped on return. The kernels are timed with the thread count
        # the steps will run with, not the caller's (the benchmark's event-loop thread is at one:
        # inherited, it chose the kernels on one thread for a bot that runs on two).
        run_in_fresh_thread(lambda: self._load(sd), name="rwkv7-load",
                            torch_threads=self._torch_threads or self.machine.cores)

    # ---- loading -----------------------------------------------------------------------------

    def _load(self, sd: dict[str, torch.Tensor]) -> None:
        """Paths chosen, weights into their forward shapes, the empty state pool, threads measured."""
        params = sum(t.numel() for t in sd.values())
        self.thread_watch: ThreadWatch | None = None  # none while the load itself runs steps
        self.tune_cache = self._tune_cache if self._always_tune or params >= MIN_TUNE_PARAMS else None
        self.paths = self._choose_paths(sd)
        self._load_weights(sd)
        L, S, C, H, N = self.n_layer, self.max_slots, self.n_embd, self.n_head, self.head_size
        self.att_x = torch.zeros(L, S, C, dtype=self.torch_dtype, device=self.device)
        self.wkv = torch.zeros(L, S * H, N, N, dtype=torch.float32, device=self.device)  # slot-major heads
        self.ffn_x = torch.zeros(L, S, C, dtype=self.torch_dtype, device=self.device)
        if self._torch_threads:
            self.paths.threads, self.paths.threads_source = self._torch_threads, "RAVEN_TORCH_THREADS"
        elif self.tune_cache is not None and self.device.type == "cpu":
            self._tune_threads()
        self._choose_small_lora()
        if self.device.type == "cpu" and self.paths.threads_source == "measured at load":
            # Measured at load; the neighbours that decided it come and go (bot.inference.thread_watch).
            small = self.paths.small_step_threads or self.paths.threads
            self.thread_watch = ThreadWatch(thread_options(self.machine.cores), (small, self.paths.threads))
            self.paths.threads_source = f"measured at load, re-checked every {self.thread_watch.every_s:g} s"
        log.info("RWKV-7 %s on %s (%s, %s): %s%s", self.dtype, self.device, self.machine.cpu_model,
                 self.machine.kind, self.paths.summary(), "; CUDA graphs on" if self.graphs else "")

    # ---- choosing the paths (see bot.inference.paths) -------------------------------------------

    def _matrices(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One checkpoint matrix per distinct (out, in) shape the forward multiplies by, in its
        forward dtype and layout (LoRA factors are stored (in, out))."""
        found: dict[str, torch.Tensor] = {}
        names = [("head.weight", False)] + [
            (f"blocks.{i}.{name}", name.split(".")[1] in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"))
            for i in range(min(2, self.n_layer))
            for name in ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
                         "ffn.key.weight", "ffn.value.weight", "att.w1", "att.w2", "att.a1", "att.a2",
                         "att.v1", "att.v2", "att.g1", "att.g2")]
        for name, transpose in names:
            if name not in sd:
                continue
            t = sd[name].squeeze()
            shape = tuple(reversed(t.shape)) if transpose else tuple(t.shape)
            key = shape_key(shape)
            if key not in found:
                w = t.to(device=self.device, dtype=self.torch_dtype)
                found[key] = (w.t() if transpose else w).contiguous()
        return found

    def _choose_paths(self, sd: dict[str, torch.Tensor]) -> Paths:
        matrices = self._matrices(sd)
        shapes = [tuple(int(s) for s in m.shape) for m in matrices.values()]
        paths = by_capability(shapes, self.device, self.torch_dtype, self.machine.cores)
        if self.tune_cache is None or self.device.type != "cpu":
            return paths
        kernels = candidates(self.device, self.torch_dtype)
        wkv = wkv_candidates(self.device)
        key = TuneCache.key(self.machine, self.device, self.torch_dtype,
                            (self.n_layer, self.n_embd, self.vocab_size), torch.get_num_threads(), kernels, wkv)
        cached = self.tune_cache.get(key)
        if cached is not None and set(cached["matmul"]) == set(paths.matmul) and cached["wkv"] in wkv:
            paths.matmul, paths.wkv_chunk = dict(cached["matmul"]), int(cached["wkv_chunk"])
            paths.wkv, paths.source = str(cached["wkv"]), "cached"
            return paths
        started = time.perf_counter()
        paths.matmul, paths.timings["matmul_ms"] = tune_matmul(matrices, kernels)
        (paths.wkv, paths.wkv_chunk), paths.timings["wkv_ms"] = self._tune_wkv(wkv)
        paths.source, paths.tune_seconds = "measured", time.perf_counter() - started
        self.tune_cache.put(key, paths.matmul, paths.wkv_chunk, paths.wkv)
        return paths

    def _tune_wkv(self, kernels: Sequence[str]) -> tuple[tuple[str, int], dict[str, list[float]]]:
        """The wkv formulation (fused, or PyTorch's closed form at each block length) that runs a
        ``PREFILL_CHUNK``-token prefill and 16- and 64-row decode steps with the least regret here."""
        H, N, T = self.n_head, self.head_size, PREFILL_CHUNK
        g = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=g).to(self.device)

        def inputs(B: int, T: int) -> list[torch.Tensor]:
            r, k, v = (rand(B, T, H, N) - 0.5 for _ in range(3))
            kk = F.normalize(rand(B, T, H, N) - 0.5, dim=-1)
            return [r, LOG_W_SCALE * rand(B, T, H, N), k, v, kk, rand(B, T, H, N)]

        prompt = inputs(1, T)
        rows = {B: [t.view(B * H, N) for t in inputs(B, 1)] for B in (16, 64)}
        states = {B: torch.zeros(B * H, N, N, device=self.device) for B in (1, 16, 64)}

        def median(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
            return median_seconds(partial(fn, *args, **kwargs), repeats=3, warmup=1)

        def steps(step: Callable[..., torch.Tensor]) -> list[float]:
            return [median(step, states[B], *rows[B]) for B in rows]

        times: dict[str, list[float]] = {}
        if FUSED in kernels:
            times[FUSED] = [median(wkv_seq, states[1], *prompt), *steps(wkv_step)]
        torch_steps = steps(_wkv_step)  # one step formulation for every block length
        for c in sorted(WKV_CHUNKS, key=lambda c: c != DEFAULT_WKV_CHUNK):  # the default wins ties
            times[str(c)] = [median(_wkv_seq, states[1], *prompt, chunk=c), *torch_steps]
        best = least_regret(times)
        report = {name: [round(t * 1e3, 3) for t in ts] for name, ts in times.items()}
        return ((FUSED, DEFAULT_WKV_CHUNK) if best == FUSED else (TORCH, int(best))), report

    def _tune_threads(self) -> None:
        """All usable cores, or one thread, whichever runs real decode steps faster right now, for
        one stream and for a batch separately (``Paths.threads_for``): with other processes busy on
        the same cores, one OpenMP thread beat two by 2.5× for a whole chat. Measured at every
        load, not cached: it depends on the neighbours.
        The options take turns (``bot.inference.paths.in_turns``); the thread watch
        (``bot.inference.thread_watch``) checks the choice again while the bot runs."""
        options = thread_options(self.machine.cores)
        if len(options) == 1:
            self.paths.threads_source = "the only core"
            return
        before = torch.get_num_threads()
        batches = (1, min(16, self.max_slots))
        try:
            measured = in_turns(options, torch.set_num_threads,
                                [partial(self.decode, [1] * b) for b in batches], THREAD_ROUNDS)
        finally:
            torch.set_num_threads(before)
        for t in (self.att_x, self.wkv, self.ffn_x):
            t.zero_()
        times = {str(n): ts for n, ts in measured.items()}
        # Each batch size its own count: one least regret over both let a batch's gain from two
        # threads outvote one stream's loss from them, or the reverse.
        self.paths.small_step_threads = int(least_regret({n: t[:1] for n, t in times.items()}))
        self.paths.threads = int(least_regret({n: t[1:] for n, t in times.items()}))
        self.paths.threads_source = "measured at load"
        self.paths.timings["threads_ms"] = {n: [round(x * 1e3, 3) for x in t] for n, t in times.items()}

    def _choose_small_lora(self) -> None:
        """Keep the fused LoRA chains (``bot.inference.lora_fused``) for small bf16 steps where they
        work and, when paths are measured, where a real one-row step runs faster with them (rounds
        in turn, as for the threads); otherwise drop their weights."""
        if self._lora is None:
            return
        if self.tune_cache is None:
            self.paths.small_lora = True
            return
        measured = in_turns((False, True), partial(setattr, self.paths, "small_lora"), [partial(self.decode, [1])],
                            THREAD_ROUNDS)
        for t in (self.att_x, self.wkv, self.ffn_x):
            t.zero_()
        times = {str(option): ts for option, ts in measured.items()}
        self.paths.small_lora = least_regret(times) == "True"  # PyTorch's ops win ties
        self.paths.timings["small_lora_ms"] = {k: round(v[0] * 1e3, 3) for k, v in times.items()}
        if not self.paths.small_lora:
            self._lora = None

    def _t(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A checkpoint tensor on our device and in our dtype, squeezed of the format's 1×1 dims."""
        return t.to(device=self.device, dtype=dtype or self.torch_dtype).squeeze().contiguous()

    def _lin(self, t: torch.Tensor, transpose: bool = False) -> Linear:
        """Checkpoint matrices are (out, in) except the LoRA factors, which are stored (in, out)."""
        w = t.to(device=self.device, dtype=self.torch_dtype)
        w = (w.t() if transpose else w).contiguous()
        return Linear(w, self.paths.kernel(w.shape))

    def _load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        C = self.n_embd
        f32 = torch.float32
        # ln0 is folded into the embedding once, as the package does.
        emb = sd["emb.weight"].to(device=self.device, dtype=f32)
        emb = F.layer_norm(emb, (C,), self._t(sd["blocks.0.ln0.weight"], f32), self._t(sd["blocks.0.ln0.bias"], f32))
        self.emb = emb.to(self.torch_dtype)
        self.ln_out = (self._t(sd["ln_out.weight"]), self._t(sd["ln_out.bias"]))
        self.head = self._lin(sd["head.weight"])
        self.layers: list[_Layer] = []
        self._fused_constants: dict[int, LayerConstants] = {}
        self._lora = None
        if (self.device.type == "cpu" and self.torch_dtype == torch.bfloat16 and self.paths.wkv == FUSED
                and lora_works()):
            self._lora = [LoraWeights.of(
                {n: sd.get(f"blocks.{i}.att.{n}") for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")},
                self._t(sd[f"blocks.{i}.att.w0"], f32), self._t(sd[f"blocks.{i}.att.a0"]),
                self._t(sd[f"blocks.{i}.att.v0"]) if i else None) for i in range(self.n_layer)]
        for i in range(self.n_layer):
            a, f, b = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blocks.{i}."
            self.layers.append(_Layer(
                ln1=(self._t(sd[b + "ln1.weight"]), self._t(sd[b + "ln1.bias"])),
                ln2=(self._t(sd[b + "ln2.weight"]), self._t(sd[b + "ln2.bias"])),
                maa=torch.stack([self._t(sd[a + n]) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]),
                w0=self._t(sd[a + "w0"], f32),
                w1=self._lin(sd[a + "w1"], True), w2=self._lin(sd[a + "w2"], True),
                a0=self._t(sd[a + "a0"]),
                a1=self._lin(sd[a + "a1"], True), a2=self._lin(sd[a + "a2"], True),
                v0=self._t(sd[a + "v0"]) if i else None,
                v1=self._lin(sd[a + "v1"], True) if i else None,
                v2=self._lin(sd[a + "v2"], True) if i else None,
                g1=self._lin(sd[a + "g1"], True), g2=self._lin(sd[a + "g2"], True),
                k_k=self._t(sd[a + "k_k"]), k_a=self._t(sd[a + "k_a"]),
                r_k=self._t(sd[a + "r_k"]).view(self.n_head, self.head_size),
                receptance=self._lin(sd[a + "receptance.weight"]), key=self._lin(sd[a + "key.weight"]),
                value=self._lin(sd[a + "value.weight"]), output=self._lin(sd[a + "output.weight"]),
                ln_x=(self._t(sd[a + "ln_x.weight"], f32), self._t(sd[a + "ln_x.bias"], f32)),
                ffn_x_k=self._t(sd[f + "x_k"]),
                ffn_key=self._lin(sd[f + "key.weight"]), ffn_value=self._lin(sd[f + "value.weight"]),
            ))

    # ---- the forward ---------------------------------------------------------------------------

    @staticmethod
    def _shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Token shift: row t sees row t-1; row 0 sees the state's previous token. x (S, T, C)."""
        if x.shape[1] == 1:
            return prev.unsqueeze(1)
        return torch.cat((prev.unsqueeze(1), x[:, :-1]), dim=1)

    def _time_mix(self, i: int, x: torch.Tensor, slots: slice, v_first: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half of block i for sequences ``slots``; x (S, T, C) is ln1's output."""
        p = self.layers[i]
        S_, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev = self._shift(x, self.att_x[i, slots])
        # The six token-shift interpolations x + (prev - x)·μ at once, in one op: (6, S, T, C).
        mixes = torch.lerp(x, prev, p.maa.view(6, 1, 1, C))
        xr, xw, xk, xv, xa, xg = mixes.unbind(0)
        self.att_x[i, slots] = x[:, -1]

        r = p.receptance(xr)
        k = p.key(xk)
        v = p.value(xv)
        if self._lora is not None and self.paths.small_lora and T == 1 and S_ < SMALL_STEP_ROWS:
            # The four LoRA chains in one kernel call (bot.inference.lora_fused); then as below.
            log_w_, a_, gate_, g_ = lora_chains(mixes.view(6, S_, C), self._lora[i])
            y = self._wkv_fused(i, slots, r, log_w_.view(S_, T, C), k, v, a_.view(S_, T, C),
                                g_.view(S_, T, C), v_first, gate_.view(S_, T, C) if v_first is not None
                                and gate_ is not None else None)
            return p.output(y.to(x.dtype)), v if v_first is None else v_first
        # Decay, learning rate, value residual and output gate are low-rank (LoRA) functions of x.
        log_w = LOG_W_SCALE * torch.sigmoid(p.w0 + p.w2(torch.tanh(p.w1(xw))).float())
        a = torch.sigmoid(p.a0 + p.a2(p.a1(xa)))
        g = p.g2(torch.sigmoid(p.g1(xg)))

        v_gate = None
        if v_first is not None:  # past layer 0 the first layer's values are mixed in by this gate
            assert p.v0 is not None and p.v1 is not None and p.v2 is not None
            v_gate = torch.sigmoid(p.v0 + p.v2(p.v1(xv)))
        if self.paths.wkv == FUSED:  # everything from here to the output projection in one kernel
            y = self._wkv_fused(i, slots, r, log_w, k, v, a, g, v_first, v_gate)
            return p.output(y.to(x.dtype)), v if v_first is None else v_first

        kk = F.normalize((k * p.k_k).view(S_, T, H, N), dim=-1, p=2.0).view(S_, T, C)
        k = k * (1 + (a - 1) * p.k_a)
        if v_first is None or v_gate is None:  # layer 0: its values are mixed into every later layer's
            v_first = v
        else:
            v = v + (v_first - v) * v_gate
        y = self._wkv(i, slots, r, log_w, k, v, kk, a)  # (S, T, C) fp32
        y = F.group_norm(y.view(S_ * T, C), H, p.ln_x[0], p.ln_x[1], eps=64e-5).view(S_, T, C)
        y = y.to(x.dtype)
        # The "bonus": the current token's own value, weighted by r·(k⊙r_k) per head.
        bonus = (r * k).view(S_, T, H, N).mul(p.r_k).sum(-1, keepdim=True) * v.view(S_, T, H, N)
        y = y + bonus.view(S_, T, C)
        return p.output(y * g), v_first

    def _wkv(self, i: int, slots: slice, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, kk: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """PyTorch's recurrence for layer i on the states in ``slots``; inputs (S, T, C), output fp32."""
        S_, T, C = r.shape
        H, N = self.n_head, self.head_size
        state = self.wkv[i, slots.start * H:slots.stop * H]  # (S·H, N, N), a view into the pool
        if T == 1:
            return _wkv_step(state, *(t.float().view(S_ * H, N) for t in (r, log_w, k, v, kk, a))).view(S_, T, C)
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(S_, T, H, N)

        y = _wkv_seq(state, heads(r), heads(log_w), heads(k), heads(v), heads(kk), heads(a),
                     chunk=self.paths.wkv_chunk)
        # contiguous: a padded last chunk leaves a strided view, which group_norm's .view cannot take
        return y.reshape(S_, T, C).contiguous()

    def _wkv_fused(self, i: int, slots: slice, r: torch.Tensor, log_w: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, a: torch.Tensor, g: torch.Tensor, v_first: torch.Tensor | None,
                   v_gate: torch.Tensor | None) -> torch.Tensor:
        """The fused kernel for layer i (``bot.inference.wkv_fused.wkv_layer``) from the raw key and
        value: inputs (S, T, C), output (S, T, C) fp32, ready for the gate's output projection."""
        S_, T, C = r.shape
        H, N = self.n_head, self.head_size
        if i not in self._fused_constants:
            p = self.layers[i]
            self._fused_constants[i] = LayerConstants.of(p.k_k, p.k_a, p.r_k, *p.ln_x)
        state = self.wkv[i, slots.start * H:slots.stop * H]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(S_, T, H, N)

        mixed = (heads(v_first), heads(v_gate)) if v_first is not None and v_gate is not None else (None, None)
        y = wkv_layer(state, heads(r), heads(log_w), heads(k), heads(v), heads(a), heads(g),
                      self._fused_constants[i], *mixed)
        return y.view(S_, T, C)

    def _channel_mix(self, i: int, x: torch.Tensor, slots: slice) -> torch.Tensor:
        """The MLP half of block i: relu(shifted x @ K)² @ V. x (S, T, C) is ln2's output."""
        p = self.layers[i]
        prev = self._shift(x, self.ffn_x[i, slots])
        xk = torch.lerp(x, prev, p.ffn_x_k)
        self.ffn_x[i, slots] = x[:, -1]
        return p.ffn_value(torch.relu(p.ffn_key(xk)).square_())

    def _forward(self, tokens: torch.Tensor, slots: slice) -> torch.Tensor:
        """tokens (S, T) for the S sequences in ``slots``; returns the last token's fp32 logits (S, V)."""
        return self._checked(self._logits(tokens, slots), slots)

    def _step_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode step of slots 0..B-1 without a host synchronisation: what a CUDA graph captures."""
        return self._logits(ids.view(-1, 1), slice(0, int(ids.shape[0])))

    def _logits(self, tokens: torch.Tensor, slots: slice) -> torch.Tensor:
        C = self.n_embd
        x = self.emb[tokens]  # (S, T, C)
        v_first: torch.Tensor | None = None
        for i, p in enumerate(self.layers):
            att, v_first = self._time_mix(i, F.layer_norm(x, (C,), *p.ln1), slots, v_first)
            x = x + att
            x = x + self._channel_mix(i, F.layer_norm(x, (C,), *p.ln2), slots)
        x = F.layer_norm(x[:, -1], (C,), *self.ln_out)
        return self.head(x).float()

    def _checked(self, logits: torch.Tensor, slots: slice) -> torch.Tensor:
        if self.torch_dtype == torch.float16 and not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogitsError(
                f"fp16 overflow: the model produced NaN/inf logits on {self.device}; the states of "
                f"slots {slots.start}..{slots.stop - 1} are now invalid. Use dtype bf16 or fp32."
            )
        return logits

    # ---- the Backend protocol ------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.max_slots - 1}")

    def zero_state(self) -> State:
        C, H, N = self.n_embd, self.n_head, self.head_size
        state: State = []
        for _ in range(self.n_layer):
            state += [torch.zeros(C, dtype=self.torch_dtype), torch.zeros(H, N, N),
                      torch.zeros(C, dtype=self.torch_dtype)]
        return state

    def load_slot(self, slot: int, state: State) -> None:
        self._check_slot(slot)
        if len(state) != 3 * self.n_layer:
            raise ValueError(f"state has {len(state)} tensors, expected {3 * self.n_layer} (3 per layer)")
        H = self.n_head
        with torch.no_grad():
            for i in range(self.n_layer):
                self.att_x[i, slot].copy_(state[3 * i].reshape(self.n_embd))
                self.wkv[i, slot * H:(slot + 1) * H].copy_(state[3 * i + 1])
                self.ffn_x[i, slot].copy_(state[3 * i + 2].reshape(self.n_embd))

    def read_slot(self, slot: int) -> State:
        self._check_slot(slot)
        H = self.n_head
        state: State = []
        for i in range(self.n_layer):
            state += [self.att_x[i, slot].to("cpu", copy=True),
                      self.wkv[i, slot * H:(slot + 1) * H].to("cpu", copy=True),
                      self.ffn_x[i, slot].to("cpu", copy=True)]
        return state

    def move_slot(self, src: int, dst: int) -> None:
        self._check_slot(src)
        self._check_slot(dst)
        if src == dst:
            return
        H = self.n_head
        with torch.no_grad():
            self.att_x[:, dst] = self.att_x[:, src]
            self.wkv[:, dst * H:(dst + 1) * H] = self.wkv[:, src * H:(src + 1) * H]
            self.ffn_x[:, dst] = self.ffn_x[:, src]

    def prefill(self, slot: int, tokens: Sequence[int]) -> torch.Tensor:
        self._check_slot(slot)
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self._use_threads(len(tokens))
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        logits: torch.Tensor | None = None
        with torch.no_grad():
            for s in range(0, len(ids), PREFILL_CHUNK):
                logits = self._forward(ids[s:s + PREFILL_CHUNK].view(1, -1), slice(slot, slot + 1))
        assert logits is not None
        return logits[0].cpu()

    def prefill_rows(self, first_slot: int, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Equal-length token lists into slots ``first_slot ..``, as one (S, T) forward: several
        threads' new messages cost one pass over the weights instead of one each."""
        S = len(rows)
        self._check_slot(first_slot)
        self._check_slot(first_slot + S - 1)
        if not S or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError("prefill_rows needs one or more token lists of one non-zero length")
        self._use_threads(S * len(rows[0]))
        ids = torch.tensor([list(r) for r in rows], dtype=torch.long, device=self.device)
        logits: torch.Tensor | None = None
        with torch.no_grad():
            for s in range(0, ids.shape[1], PREFILL_CHUNK):
                logits = self._forward(ids[:, s:s + PREFILL_CHUNK], slice(first_slot, first_slot + S))
        assert logits is not None
        return logits.cpu()

    def _own_counts(self) -> tuple[int, ...]:
        """The thread counts this backend sets; a count someone else set on the calling thread
        (none of them) is left alone."""
        if self.thread_watch is not None:
            return self.thread_watch.options
        return (self.paths.small_step_threads, self.paths.threads)

    def _use_threads(self, rows: int) -> None:
        """Switch to the thread count chosen for this size of step (``Paths.threads_for``)."""
        if self.device.type != "cpu":
            return
        current = torch.get_num_threads()
        wanted = self.paths.threads_for(rows)
        if current != wanted and current in self._own_counts():
            torch.set_num_threads(wanted)

    def _watched_decode(self, watch: ThreadWatch, ids: torch.Tensor) -> torch.Tensor:
        """A CPU decode step on the count the thread watch says, timed for it."""
        B = int(ids.shape[0])
        with torch.no_grad():
            logits, change = watched_step(watch, B, lambda: self._forward(ids.view(B, 1), slice(0, B)))
        if change is not None:
            self._follow(change, watch)
        return logits

    def _follow(self, change: Change, watch: ThreadWatch) -> None:
        """Steps and prefills take the watch's new counts from here on."""
        self.paths.small_step_threads, self.paths.threads = watch.current
        self.paths.threads_source = f"changed while running, re-checked every {watch.every_s:g} s"
        self.paths.timings.setdefault("thread_changes", []).append(
            {"steps": change.kind, "from": change.before, "to": change.after, "ratio": round(change.ratio, 3)})

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        B = len(tokens)
        if not 0 < B <= self.max_slots:
            raise ValueError(f"decode takes 1..{self.max_slots} tokens (one per slot), got {B}")
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        watch = self.thread_watch
        if watch is not None and torch.get_num_threads() in watch.options:
            return self._watched_decode(watch, ids)
        self._use_threads(B)
        with torch.no_grad():
            # On the device: the engine samples there and copies back only the chosen ids.
            replayed = self.graphs.run(ids) if self.graphs is not None else None
            if replayed is not None:
                return self._checked(replayed, slice(0, B))
            return self._forward(ids.view(B, 1), slice(0, B))

