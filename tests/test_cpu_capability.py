"""The machine record: CPU kind, native bf16, usable cores, and the cpu bf16 guard at start-up.

Detection runs on injected /proc/cpuinfo texts and capabilities (the kinds we serve on), and for real
in subprocesses whose environment lowers this CPU (``ATEN_CPU_CAPABILITY=avx2``, as an AVX2 Zen 3
has it) or whose affinity is narrowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bot.inference.machine import _cgroup_cpus, bf16_warning, detect

ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
ZEN4 = ("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx2 fma avx512f avx512bw avx512_vnni "
        "avx512_bf16\n")
SPR = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: avx2 avx512f avx512bw "
       "avx512_bf16 amx_tile amx_bf16 amx_int8\n")


def test_zen3_has_no_native_bf16_and_the_guard_names_fp32() -> None:
    m = detect(cpuinfo=ZEN3, capability="AVX2", env={}, cores=2)
    assert m.cpu_model == "AMD EPYC 7B13 64-Core Processor" and m.capability == "AVX2"
    assert m.kind == "AVX2" and not m.native_bf16 and not m.capability_lowered
    assert "avx512f" not in m.flags and "avx2" in m.flags
    warning = bf16_warning(m)
    assert warning is not None and 'RAVEN_STRATEGY="cpu fp32"' in warning and "no native bf16" in warning


@pytest.mark.parametrize(("cpuinfo", "kind"), [(ZEN4, "AVX-512 + bf16"), (SPR, "AVX-512 + AMX")])
def test_native_bf16_kinds_need_no_warning(cpuinfo: str, kind: str) -> None:
    m = detect(cpuinfo=cpuinfo, capability="AVX512", env={}, cores=8)
    assert m.native_bf16 and m.kind == kind and bf16_warning(m) is None
    record = m.as_dict()
    assert json.loads(json.dumps(record)) == record and record["kind"] == kind


@pytest.mark.parametrize("how", [{"capability": "AVX2", "env": {}},
                                 {"capability": "AVX512", "env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}}])
def test_an_environment_that_lowers_the_cpu_turns_native_bf16_off(how: dict[str, object]) -> None:
    m = detect(cpuinfo=ZEN4, cores=2, **how)  # type: ignore[arg-type]
    assert not m.native_bf16 and m.capability_lowered and "lowered" in m.kind
    warning = bf16_warning(m)
    assert warning is not None and "environment limits" in warning


def test_onednn_isa_at_bf16_or_above_keeps_it() -> None:
    assert detect(cpuinfo=ZEN4, capability="AVX512", env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}).native_bf16
    assert not detect(cpuinfo=ZEN4, capability="AVX512", env={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}).native_bf16


def test_cgroup_quota_bounds_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpus(tmp_path) is None
    assert _cgroup_cpus(tmp_path / "missing") is None


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).parent.parent)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity API")
def test_usable_cores_follow_the_affinity_mask() -> None:
    done = _python("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
                   "from bot.inference.machine import usable_cores; print(usable_cores())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


LOAD_BF16 = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
from bot.inference.rwkv7_batched import BatchedRWKV7Backend
b = BatchedRWKV7Backend(Path(sys.argv[1]), dtype="bf16", max_slots=2)
print(b.machine.capability, b.machine.native_bf16, sorted(set(b.paths.matmul.values())))
"""


def test_cpu_bf16_on_an_avx2_cpu_warns_at_load(tiny_v7_path: Path) -> None:
    """A real load under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``: one warning naming
    cpu fp32; oneDNN refuses bf16 there, so every matmul takes F.linear."""
    done = subprocess.run([sys.executable, "-c", LOAD_BF16, str(tiny_v7_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["AVX2", "False", "['plain']"]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and 'RAVEN_STRATEGY="cpu fp32"' in warnings[0], done.stderr


LOWERING = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def test_cpu_bf16_where_native_loads_quietly(tiny_v7_path: Path) -> None:
    if not detect().native_bf16:
        pytest.skip("this CPU has no native bf16")
    assert torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    done = subprocess.run([sys.executable, "-c", LOAD_BF16, str(tiny_v7_path)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent,
                          env={k: v for k, v in os.environ.items() if k not in LOWERING})
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr and done.stdout.split()[1] == "True"
