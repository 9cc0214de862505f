"""numba's process-wide settings for Raven's kernels (``wkv_kernels``, ``nucleus_kernel``), imported
by each before it compiles anything: the threading layer must be chosen before the first parallel
launch, and both kernels are launched from the engine's worker thread and the benchmark's."""

import logging
import os

import numba

log = logging.getLogger(__name__)
SAFE_LAYERS = ("threadsafe", "safe", "omp", "tbb")
"""numba's threading layers that take two threads launching kernels at once (``workqueue`` aborts
the process; ``forksafe`` may pick it); ``safe``/``threadsafe`` let numba choose tbb or omp."""
FASTMATH = {"reassoc", "contract"}
"""Vectorised sums and fused multiply-adds; nothing about NaN or infinity."""


def threading_layer() -> str:
    """The operator's ``NUMBA_THREADING_LAYER`` where it is one of ``SAFE_LAYERS``, else
    ``threadsafe`` (numba's own default, ``default``, may choose ``workqueue``)."""
    wanted = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
    if wanted in SAFE_LAYERS:
        return wanted
    if wanted and wanted != "default":
        log.warning("NUMBA_THREADING_LAYER=%s is not safe for the engine's threads; using threadsafe", wanted)
    return "threadsafe"


def use_threads(wanted: int) -> None:
    """Run the next kernel on ``wanted`` of numba's threads (at least one, at most its pool)."""
    numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


numba.config.THREADING_LAYER = threading_layer()  # type: ignore[attr-defined]
