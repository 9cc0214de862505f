"""The start-up self-check every compiled kernel passes before the model uses it (the sampling
draw, the fused wkv, the fused LoRA chains): a kernel that fails to build, or computes something
else than PyTorch's ops on this machine, costs speed and one log line, never a wrong answer."""

from __future__ import annotations

import logging
from collections.abc import Callable


def kernel_agrees(log: logging.Logger, what: str, check: Callable[[], bool]) -> bool:
    """``check()``: whether the kernel named ``what`` agrees with PyTorch here. A disagreement is
    a warning, an error while building or running it (numba missing, an unsupported CPU) a note."""
    try:
        ok = check()
    except Exception as exc:
        log.info("%s unavailable (%s); using PyTorch's ops", what, exc)
        return False
    if not ok:
        log.warning("the %s disagrees with PyTorch's ops here; using PyTorch's", what)
    return ok
