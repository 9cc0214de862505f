"""Keep freed tensor memory in the process instead of handing it back to the OS after every step.

Why: glibc's malloc returns large freed blocks to the kernel (``munmap``, or trimming the heap top)
and maps them again on the next allocation, and every fresh page costs a page fault and a zeroing.
A model step allocates and frees the same few-MB activations over and over, so on our 2-core CPU a
512-token prefill ran at 660-1,500 tokens/s depending on what ran before it, and at ~2,000 once the
memory stays mapped (``bench``: same process, same weights). The cost is that the process keeps its
peak working set mapped, which a server that owns its model does anyway.

Applied once at start (``raven`` and the benchmark) through ``mallopt``; a no-op where the C library
is not glibc, and where the operator already set glibc's own ``MALLOC_*_`` variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS: dict[int, int] = {
    M_MMAP_THRESHOLD: 32 << 20,  # blocks up to 32 MB (glibc's maximum) come from the heap, reused
    M_TRIM_THRESHOLD: 1 << 30,  # keep up to 1 GB of free heap top instead of trimming it
    M_TOP_PAD: 64 << 20,  # grow the heap in 64 MB steps
}
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator(libc_name: str | None = None) -> bool:
    """Apply ``SETTINGS`` (idempotent); True when they are in effect. ``libc_name``: the C library
    to configure, found by name when None."""
    if any(name in os.environ for name in OPERATOR_VARIABLES):
        log.debug("malloc left as configured by the environment")
        return False
    try:
        libc = ctypes.CDLL(libc_name or ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    log.debug("malloc tuned for reuse of freed tensor memory: %s", ok)
    return ok
