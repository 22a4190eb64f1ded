"""IEEE half precision in kernels: numba has no float16 type, so the KV cache's halves are stored as uint16 and
converted with two LLVM instructions (`fpext` / `fptrunc`, round to nearest even: bit-identical to numpy's
`astype(float16)`; F16C on x86-64, `fcvt` on aarch64). Built lazily like the other intrinsics (`_quant._Lazy`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._ir import _Lazy, ir_tools
from ._jit import helper


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


f16_to_f32 = _Lazy(_build_f16_to_f32, "f16_to_f32")
f32_to_f16 = _Lazy(_build_f32_to_f16, "f32_to_f16")


# Element access of a cache row in its storage type: kernels take one pair as arguments, so one body serves
# float32 and float16 caches.

@helper
def get_f32(row, i):
    return row[i]


@helper
def put_f32(row, i, v):
    row[i] = v


@helper
def get_f16(row, i):
    return f16_to_f32(row[i])


@helper
def put_f16(row, i, v):
    row[i] = f32_to_f16(np.float32(v))
