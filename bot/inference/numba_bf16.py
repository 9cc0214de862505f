"""bf16 in numba kernels: numba and numpy have no bf16, so the kernels take PyTorch's bf16 tensors
as their uint16 bit patterns (``bot.inference.wkv_fused.bf16_bits``) and convert element by element
here, as they read and write, instead of converting whole tensors to fp32 before each call and back
after it. For any other element type both functions are the plain conversion."""

from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["to_element", "to_f32"]


def _bitcast(to: Any, llvm_type: Any, source: Any) -> Any:
    """A numba intrinsic reinterpreting a scalar's bits as another type (LLVM's ``bitcast``: free,
    and it vectorises); numba has no such function of its own."""
    def typer(typingctx: Any, value: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], llvm_type)
        return to(source), codegen
    return intrinsic(typer)


_f32_from_bits: Any = _bitcast(types.float32, ir.FloatType(), types.uint32)
_bits_from_f32: Any = _bitcast(types.uint32, ir.IntType(32), types.float32)


def to_f32(value: Any) -> Any:
    """An input element as float32 (a uint16 element: the bits of a bf16)."""


@overload(to_f32, inline="always")
def _f32_impl(value: Any) -> Any:
    if value == types.uint16:
        def from_bf16(value: Any) -> Any:
            return _f32_from_bits(np.uint32(value) << np.uint32(16))
        return from_bf16

    def as_f32(value: Any) -> Any:
        return np.float32(value)
    return as_f32


def to_element(value: Any, like: Any) -> Any:
    """A float32 result in the output's element type (``like``: an element of it): bf16 bits rounded
    to nearest even, as PyTorch rounds, a NaN kept a NaN."""


@overload(to_element, inline="always")
def _out_impl(value: Any, like: Any) -> Any:
    if like == types.uint16:
        def to_bf16(value: Any, like: Any) -> Any:
            bits = _bits_from_f32(value)
            if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                return np.uint16(0x7FC0)
            return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return to_bf16

    def same(value: Any, like: Any) -> Any:
        return value
    return same
