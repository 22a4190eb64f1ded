"""IEEE half precision in kernels: numba has no float16 type, so the KV cache's halves are stored as uint16 and
converted with two LLVM instructions (`fpext` / `fptrunc`, round to nearest even: bit-identical to numpy's
`astype(float16)`; F16C on x86-64, `fcvt` on aarch64). Built lazily like the other intrinsics (`_quant._Lazy`).
"""

from __future__ import annotations

from typing import Any

from ._ir import _Lazy, ir_tools


def _build_f16_to_f32() -> Any:
    T = ir_tools()

    @T.intrinsic
    def f16_to_f32(typingctx: Any, h: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], T.f16), T.f32)
        return T.types.float32(T.types.uint16), codegen
    return f16_to_f32


def _build_f32_to_f16() -> Any:
    T = ir_tools()

    @T.intrinsic
    def f32_to_f16(typingctx: Any, x: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(builder.fptrunc(args[0], T.f16), T.i16)
        return T.types.uint16(T.types.float32), codegen
    return f32_to_f16


def _build_as_f32() -> Any:
    T = ir_tools()

    @T.intrinsic
    def as_f32(typingctx: Any, x: Any) -> Any:
        """A cache element as float32: a float16 (uint16 storage) widened, a float32 as it is."""
        if x == T.types.uint16:
            def widen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                return builder.fpext(builder.bitcast(args[0], T.f16), T.f32)
            return T.types.float32(x), widen
        if x == T.types.float32:
            return T.types.float32(x), lambda context, builder, signature, args: args[0]
        return None
    return as_f32


def _build_to_storage() -> Any:
    T = ir_tools()

    @T.intrinsic
    def to_storage(typingctx: Any, v: Any, row: Any) -> Any:
        """`v` (float32) in the element type of array `row`: rounded to float16 (uint16 storage), or as it is."""
        if not isinstance(row, T.types.Array) or v != T.types.float32:
            return None
        if row.dtype == T.types.uint16:
            def narrow(context: Any, builder: Any, signature: Any, args: Any) -> Any:
                return builder.bitcast(builder.fptrunc(args[0], T.f16), T.i16)
            return T.types.uint16(v, row), narrow
        if row.dtype == T.types.float32:
            return T.types.float32(v, row), lambda context, builder, signature, args: args[0]
        return None
    return to_storage


#: `as_f32(x)` / `to_storage(v, row)`: element conversions resolved by type when a kernel compiles (no branch and
#: no call at run time), so one kernel body serves float32 and float16 KV caches.
as_f32 = _Lazy(_build_as_f32, "as_f32")
to_storage = _Lazy(_build_to_storage, "to_storage")
