"""What CPU the engine runs on: model, vector capability, native bf16, and the cores it may use.

Why: the fast paths differ per CPU kind. Measured (issue "Portable speed"): the same commit that is
1.4-1.6× the ``rwkv`` package per stream on an AVX-512 Zen 4 was 0.77× on an AVX2 Zen 3, and
``cpu bf16`` there ran six times slower than ``cpu fp32`` at 64 threads, because without
``avx512_bf16``/``amx_bf16`` every bf16 matmul is emulated. So the engine, the benchmark and the
log say which kind this is, and the choices in ``bot.inference.paths`` start from it.

Everything is read, never assumed: ``/proc/cpuinfo`` for the model and flags, torch for the vector
capability its kernels dispatch to (``ATEN_CPU_CAPABILITY`` lowers it), ``ONEDNN_MAX_CPU_ISA`` for
what oneDNN may use, and the process's affinity and cgroup quota for the cores. Tests inject the
inputs (``detect(cpuinfo=..., capability=...)``).
"""

from __future__ import annotations

import logging
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
                     "amx_bf16", "amx_int8", "avx_ne_convert", "bf16", "sve", "asimd")
"""Flags (x86 ``flags``, Arm ``Features``) that decide a path; the rest of the line is not kept."""
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""Any of these means the CPU multiplies bf16 natively (x86 AVX-512 BF16 or AMX, Arm's BF16)."""
ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
               "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX",
               "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL")
"""oneDNN's ``ONEDNN_MAX_CPU_ISA`` values, weakest first; from AVX512_CORE_BF16 on it may use bf16."""
BF16_SLOWDOWN_NOTE = ("measured on an AVX2 AMD EPYC (Zen 3): cpu bf16 gave 23.5 tok/s in total at 64 "
                      "threads against 147 in cpu fp32")


@dataclass(frozen=True)
class Machine:
    """The facts about this CPU that choose a path (see the module docstring)."""

    cpu_model: str
    arch: str
    capability: str  # torch's: DEFAULT, AVX2, AVX512, ... (after ATEN_CPU_CAPABILITY)
    flags: tuple[str, ...]
    onednn_max_isa: str | None
    cores: int  # CPUs this process may run on: affinity, bounded by a cgroup CPU quota
    logical_cpus: int
    torch_threads: int  # torch's intra-op thread count when detected
    native_bf16: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "native_bf16", _native_bf16(self))

    @property
    def kind(self) -> str:
        """A short name of the CPU kind for tables: ``AVX-512 + bf16``, ``AVX2``, ``AVX-512 + AMX``."""
        flags = set(self.flags)
        if self.arch in ("aarch64", "arm64"):
            base = "Arm SVE" if "sve" in flags else "Arm NEON"
        elif self.capability.startswith("AVX512"):
            base = "AVX-512"
        elif self.capability.startswith("AVX2"):
            base = "AVX2"
        else:
            base = self.capability or "generic"
        extras = []
        if self.native_bf16:
            extras.append("AMX" if "amx_bf16" in flags and base == "AVX-512" else "bf16")
        emulated = self.capability_lowered
        return " + ".join([base, *extras]) + (" (lowered by the environment)" if emulated else "")

    @property
    def capability_lowered(self) -> bool:
        """The environment made torch or oneDNN use less than the CPU has (an emulation of a lesser
        kind, e.g. ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine)."""
        has512 = "avx512f" in self.flags
        isa_low = self.onednn_max_isa is not None and _isa_rank(self.onednn_max_isa) < _isa_rank("AVX512_CORE")
        return has512 and (not self.capability.startswith("AVX512") or isa_low)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags), "kind": self.kind, "native_bf16": self.native_bf16}


def _isa_rank(isa: str) -> int:
    name = isa.strip().upper()
    return ONEDNN_ISAS.index(name) if name in ONEDNN_ISAS else len(ONEDNN_ISAS)


def _native_bf16(m: Machine) -> bool:
    """bf16 is fast only where the CPU has the instructions *and* torch and oneDNN may use them."""
    if not BF16_FLAGS & set(m.flags):
        return False
    if m.arch in ("aarch64", "arm64"):
        return "bf16" in m.flags
    if not (m.capability.startswith("AVX512") or m.capability.startswith("AMX")):
        return False  # ATen's vector kernels run at AVX2 (or less): bf16 is converted, not native
    return m.onednn_max_isa is None or _isa_rank(m.onednn_max_isa) >= _isa_rank("AVX512_CORE_BF16")


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _parse_cpuinfo(text: str) -> tuple[str, tuple[str, ...]]:
    """(model name, flags of interest) from the first processor block of ``/proc/cpuinfo``."""
    model = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, tuple(f for f in FLAGS_OF_INTEREST if f in flags)


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``, v1 ``cfs_quota``), rounded up."""
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period or 100000)))
        return None
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPUs this process may actually run on: its affinity mask (``taskset``, container cpusets),
    bounded by a cgroup CPU quota. ``os.cpu_count()`` counts the host's CPUs, not ours."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, quota) if quota else cores)


def detect(cpuinfo: str | None = None, capability: str | None = None,
           env: Mapping[str, str] | None = None, cores: int | None = None) -> Machine:
    """This machine (or, for tests, one described by the arguments)."""
    env = os.environ if env is None else env
    model, flags = _parse_cpuinfo(_read_cpuinfo() if cpuinfo is None else cpuinfo)
    return Machine(
        cpu_model=model or platform.processor() or platform.machine(),
        arch=platform.machine().lower(),
        capability=(capability if capability is not None else torch.backends.cpu.get_cpu_capability()).upper(),
        flags=flags,
        onednn_max_isa=env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or None,
        cores=cores if cores is not None else usable_cores(),
        logical_cpus=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
    )


def bf16_warning(machine: Machine) -> str | None:
    """What to tell an operator who asked for ``cpu bf16`` on a CPU that emulates it; None if fine.

    The policy: warn and keep bf16 (the operator chose it, and one stream can still be faster: half
    the bytes to read), but say plainly that fp32 is the faster choice for a busy bot."""
    if machine.native_bf16:
        return None
    why = ("the environment limits torch/oneDNN below AVX-512 BF16" if machine.capability_lowered
           else "this CPU has no native bf16 (no avx512_bf16 / amx_bf16)")
    return (f"RAVEN_STRATEGY asks for cpu bf16, but {why} ({machine.cpu_model}, {machine.kind}): every "
            f"bf16 matmul is emulated. Use RAVEN_STRATEGY=\"cpu fp32\", the faster choice here "
            f"({BF16_SLOWDOWN_NOTE}).")
