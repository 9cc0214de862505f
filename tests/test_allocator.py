"""The malloc tuning that keeps freed tensor memory mapped (bot/inference/allocator.py)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from bot.inference.allocator import tune_allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A model step's pattern: a working set of several MB-sized tensors, allocated and freed each step,
# in a thread of its own (as the engine's worker). Prints the page faults of the later steps.
WORKLOAD = textwrap.dedent("""
    import resource, sys, threading
    import torch
    from bot.inference.allocator import tune_allocator
    if sys.argv[1] == "tuned":
        assert tune_allocator()
    def steps():
        for i in range(8):
            if i == 2:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            live = [torch.ones(4_000_000) for _ in range(10)]  # 10 × 16 MB at once
            del live
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    worker = threading.Thread(target=steps)
    worker.start()
    worker.join()
""")


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True,
                          timeout=120)
    return int(done.stdout.strip())


@glibc_only
def test_tuning_applies_on_glibc() -> None:
    assert tune_allocator() is True
    assert tune_allocator() is True  # idempotent


@glibc_only
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    default, tuned = _page_faults("default"), _page_faults("tuned")
    # 6 steps × 160 MB is ~235,000 fresh pages if every step maps its memory anew.
    assert tuned * 3 < default, (tuned, default)


def test_no_glibc_means_nothing_to_tune() -> None:
    assert tune_allocator("no-such-libc.so") is False


def test_the_operators_own_malloc_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert tune_allocator() is False
