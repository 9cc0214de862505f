"""``y = x @ W.T`` through one of the matmul kernels PyTorch offers, chosen per weight shape.

Kernels (named as ``bot.inference.paths`` records them):

* ``plain``: ``F.linear`` — MKL's sgemm/gemv on CPU, cuBLAS on CUDA;
* ``transposed``: the ``rwkv`` package's own layout, the weight stored (in, out) and ``x @ W`` — on the
  CPU a different BLAS routine (MKL's gemv/gemm on the other operand order) from ``plain``'s;
* ``onednn:<B>``: oneDNN's ``mkldnn._linear_pointwise`` on a weight reordered once ("prepacked")
  into oneDNN's blocked layout for batches of about ``B`` rows.

Why more than one: which is fastest depends on the CPU. On the AVX-512 Zen 4 machines we measured,
oneDNN prepacked ran fp32 matmuls at ~2× MKL (≈500 vs ≈215 GFLOP/s for 256×768 @ 768×3072 on 2
cores, 45 vs 28 GB/s for the 768×65536 head at one row) and +20-35% on decode with the prepacking;
on an AVX2 Zen 3 the same choice left one stream at 0.77× the package (which uses MKL). Where the
CPU lacks AVX-512 BW/VL/DQ and AVX-NE-CONVERT, oneDNN refuses bf16 weights altogether. The
package's layout is offered so that no shape can run slower than the reference does on a CPU where
its BLAS call is the fast one: on the Zen 5 it ran the one-row head at 25-27 GB/s against
``F.linear``'s 16, though oneDNN's 39-41 still won there.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PLAIN = "plain"
TRANSPOSED = "transposed"


def onednn(hint: int) -> str:
    return f"onednn:{hint}"


class Linear:
    """One weight (out, in) in the layout its kernel wants, called like ``F.linear(x, W)``."""

    def __init__(self, weight: torch.Tensor, kernel: str = PLAIN) -> None:
        self.out_features, self.in_features = weight.shape
        self.kernel = kernel
        self.use_mkldnn = kernel.startswith("onednn:")
        self.transposed = kernel == TRANSPOSED
        self.weight = weight
        if self.use_mkldnn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, int(kernel.split(":")[1]))
        elif self.transposed:
            self.weight = weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return torch.matmul(x, self.weight)
        if not self.use_mkldnn:
            return F.linear(x, self.weight)
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, None,
                                               "none", [], "")
        return y.view(*lead, self.out_features)


def mkldnn_works(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's linear is a private op: offer it only where it exists and gives the right answer
    (on an AVX2 CPU the bf16 reorder raises; under ``ONEDNN_MAX_CPU_ISA=AVX2`` too)."""
    if device.type != "cpu" or dtype == torch.float16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 16).to(dtype)
        x = torch.randn(3, 16).to(dtype)
        got = Linear(w, onednn(16))(x).float()
        return bool(torch.allclose(got, F.linear(x.float(), w.float()), atol=5e-2, rtol=5e-2))
    except Exception as exc:  # an op missing in this torch build, or an ISA it refuses: fall back quietly
        log.debug("oneDNN linear unavailable for %s (%s); using F.linear", dtype, exc)
        return False
