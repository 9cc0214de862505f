"""Load a checkpoint through the official ``rwkv`` package.

The package picks its model family at import time (``RWKV_V7_ON``) and keeps the RWKV-7 dtype and
device in module globals, so one import serves one family and one dtype. We load the package's
model module under a private name per (family, device, dtype), which lets one process hold an
RWKV-7 and an RWKV-4 model side by side (tests, the benchmark's reference) without touching the
package's own ``rwkv.model``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bot.errors import ModelLoadError
from bot.inference.checkpoint import Family, check_shapes, detect_family, read_state_dict

log = logging.getLogger(__name__)
_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()

V7_STRATEGY_DTYPES = ("fp32", "fp16", "bf16")


def _package_file() -> Path:
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the 'rwkv' package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model.py"


@contextlib.contextmanager
def _quiet() -> Any:
    """The package prints banners to stdout; send them to our log instead of the user's terminal."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        if line.strip():
            log.debug("rwkv: %s", line.strip())


def package_module(family: Family, instance: str = "") -> ModuleType:
    """The package's model module, imported afresh for one family (and one dtype for RWKV-7)."""
    name = f"_raven_rwkv_{family}_{instance}".replace(" ", "_").replace(":", "_")
    with _lock:
        if name in _modules:
            return _modules[name]
        saved = os.environ.get("RWKV_V7_ON")
        os.environ["RWKV_V7_ON"] = "1" if family == "v7" else "0"
        # The loaders read these two again at load time, so they stay set. CUDA_ON=1 would compile
        # kernels at import, which needs a CUDA toolchain; our batched path covers CUDA instead.
        os.environ["RWKV_JIT_ON"] = "1"
        os.environ["RWKV_CUDA_ON"] = "0"
        try:
            spec = importlib.util.spec_from_file_location(name, _package_file())
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            with _quiet():
                spec.loader.exec_module(module)
        finally:
            if saved is None:
                os.environ.pop("RWKV_V7_ON", None)
            else:
                os.environ["RWKV_V7_ON"] = saved
        _modules[name] = module
        return module


def validate_strategy(family: Family, strategy: str) -> None:
    if family == "v7":
        parts = strategy.split()
        if len(parts) != 2 or not (parts[0] == "cpu" or parts[0].startswith("cuda")):
            raise ModelLoadError(
                f"RWKV-7 strategy must be '<cpu|cuda> <fp32|fp16|bf16>', got {strategy!r}"
            )
        if parts[1] not in V7_STRATEGY_DTYPES:
            raise ModelLoadError(f"RWKV-7 supports fp32, fp16 or bf16, not {parts[1]!r}")
    if "cuda" in strategy and not torch.cuda.is_available():
        raise ModelLoadError(f"strategy {strategy!r} needs CUDA, but no CUDA device is available")


def load_package_model(path: Path, strategy: str) -> tuple[Family, Any]:
    """Load ``path`` with the package's own loader; returns the family and the model object."""
    sd = read_state_dict(path)
    family = detect_family(list(sd))
    if "_strategy" not in sd:  # a pre-converted file has transposed, re-typed tensors
        check_shapes(path, sd, family)
    del sd
    validate_strategy(family, strategy)
    module = package_module(family, strategy if family == "v7" else "")
    try:
        with _quiet():
            if family == "v7":
                # The RWKV-7 loader appends ".pth" itself.
                model = module.RWKV_x070(str(path.with_suffix("")), strategy)
            else:
                model = module.RWKV(str(path), strategy, verbose=False)
            # One token through the model proves that every tensor fits before we serve anyone.
            logits, _ = model.forward([0], None)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model file {path} could not be loaded as RWKV-{family[1:]}: {exc}") from exc
    if not torch.isfinite(logits.float()).all():
        raise ModelLoadError(f"model file {path} gives NaN or infinite logits with strategy {strategy!r}")
    return family, model


def convert_checkpoint(src: Path, dst: Path, strategy: str) -> None:
    """Pre-convert an RWKV-4/5/6 checkpoint for ``strategy`` (the package's own conversion)."""
    sd = read_state_dict(src)
    family = detect_family(list(sd))
    del sd
    if family == "v7":
        raise ModelLoadError("RWKV-7 checkpoints need no conversion: the package loads them directly")
    module = package_module(family)
    try:
        with _quiet():
            module.RWKV(str(src), strategy, verbose=False, convert_and_save_and_exit=str(dst))
    except SystemExit:  # the package exits after saving
        pass
    if not dst.is_file():
        raise ModelLoadError(f"conversion of {src} did not produce {dst}")
