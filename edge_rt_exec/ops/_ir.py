"""The LLVM IR toolbox of the hand-vectorized kernels (`_quant.py`, `_half.py`): numba intrinsics built lazily,
vector types, fused multiply-adds, loads and fixed-order horizontal sums. Only generic LLVM vector operations
(no x86 intrinsics): LLVM lowers them to AVX-512/AVX2 on x86-64 and NEON on aarch64.

An intrinsic here is a `_Lazy` object: numba asks it for its type (`_numba_type_`) when it types a kernel that
calls it, so llvmlite and numba are imported, and the IR builders run, only when a kernel is compiled; a kernel
loaded from numba's cache never builds them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.RLock()


class _Lazy:
    """A numba intrinsic (or numba-typed function) built on first use by numba's type inference."""

    def __init__(self, build: Callable[[], Any], name: str) -> None:
        self._build, self.__name__, self._real = build, name, None

    @property
    def _numba_type_(self) -> Any:
        with _LOCK:
            if self._real is None:
                self._real = self._build()
            from numba.core.registry import cpu_target

            ctx = cpu_target.typing_context
            ctx.refresh()  # pick up the templates the new intrinsic registered
            return ctx.resolve_value_type(self._real)

    def __call__(self, *args: Any) -> Any:
        raise TypeError(f"{self.__name__} is a numba intrinsic: call it from a kernel")

    def __repr__(self) -> str:
        return f"<lazy intrinsic {self.__name__}>"


# ---- the IR toolbox (built once, by the first intrinsic numba types) -----------------------------------------

class _IR:
    """llvmlite helpers: vector types, constants, fma, loads and the fixed-order horizontal sums."""

    VW = 16  #: lanes of the block vectors: a block is two of them (low and high nibbles / halves)

    def __init__(self) -> None:
        from llvmlite import ir
        from numba.core import cgutils, types
        from numba.extending import intrinsic

        self.ir, self.cgutils, self.types, self.intrinsic = ir, cgutils, types, intrinsic
        self.f32, self.f16 = ir.FloatType(), ir.HalfType()
        self.i8, self.i16, self.i32, self.i64 = (ir.IntType(b) for b in (8, 16, 32, 64))
        self.vf = ir.VectorType(self.f32, self.VW)

    def vec(self, t: Any, n: int) -> Any:
        return self.ir.VectorType(t, n)

    def const(self, t: Any, v: Any) -> Any:
        if isinstance(t, self.ir.VectorType):
            return self.ir.Constant(t, [v] * t.count)
        return self.ir.Constant(t, v)

    def idx(self, v: int) -> Any:
        return self.ir.Constant(self.i64, v)

    def splat(self, b: Any, s: Any, n: int | None = None) -> Any:
        n = n or self.VW
        vt = self.vec(s.type, n)
        v = b.insert_element(self.ir.Constant(vt, self.ir.Undefined), s, self.ir.Constant(self.i32, 0))
        return b.shuffle_vector(v, self.ir.Constant(vt, self.ir.Undefined),
                                self.ir.Constant(self.vec(self.i32, n), [0] * n))

    def shuffle(self, b: Any, u: Any, v: Any, lanes: list[int]) -> Any:
        return b.shuffle_vector(u, v, self.ir.Constant(self.vec(self.i32, len(lanes)), lanes))

    def fma(self, b: Any, x: Any, y: Any, z: Any) -> Any:
        """`x * y + z` rounded once (llvm.fma: exact, and the same on every target)."""
        t = x.type
        name = f"llvm.fma.v{t.count}f32" if isinstance(t, self.ir.VectorType) else "llvm.fma.f32"
        fn = b.module.globals.get(name)
        if fn is None:
            fn = self.ir.Function(b.module, self.ir.FunctionType(t, [t, t, t]), name=name)
        return b.call(fn, [x, y, z])

    def ptr(self, b: Any, base: Any, byte_off: Any, t: Any) -> Any:
        """A `t*` at `base + byte_off` bytes."""
        p = b.gep(b.bitcast(base, self.i8.as_pointer()), [byte_off])
        return b.bitcast(p, t.as_pointer())

    def load(self, b: Any, base: Any, byte_off: Any, t: Any, align: int = 1) -> Any:
        return b.load(self.ptr(b, base, byte_off, t), align=align)

    def store(self, b: Any, v: Any, base: Any, byte_off: Any, align: int = 1) -> None:
        b.store(v, self.ptr(b, base, byte_off, v.type), align=align)

    def half(self, b: Any, base: Any, byte_off: Any) -> Any:
        """The fp16 at `base + byte_off` as float32 (`fpext`: F16C on x86, `fcvt` on aarch64)."""
        h = self.load(b, base, byte_off, self.i16)
        return b.fpext(b.bitcast(h, self.f16), self.f32)

    def half_splat(self, b: Any, base: Any, byte_off: Any, n: int | None = None) -> Any:
        """The fp16 at `base + byte_off` in every lane of a float32 vector (splat as halves, one widening)."""
        h = self.splat(b, self.load(b, base, byte_off, self.i16), n)
        return b.fpext(b.bitcast(h, self.vec(self.f16, h.type.count)), self.vec(self.f32, h.type.count))

    def halves(self, b: Any, base: Any, byte_off: Any, n: int) -> Any:
        v = self.load(b, base, byte_off, self.vec(self.i16, n))
        return b.fpext(b.bitcast(v, self.vec(self.f16, n)), self.vec(self.f32, n))

    def hsum(self, b: Any, v: Any) -> Any:
        """Sum of the lanes of `v` in a fixed tree order (halves added until one lane is left)."""
        n = v.type.count
        while n > 1:
            h = n // 2
            v = b.fadd(self.shuffle(b, v, v, list(range(h))), self.shuffle(b, v, v, list(range(h, n))))
            n = h
        return b.extract_element(v, self.ir.Constant(self.i32, 0))

    def transpose_sum(self, b: Any, vs: list) -> list:
        """Horizontal sums of many vectors at once: `vs` (each of L lanes, L a power of two) -> vectors whose
        lanes, in order, are `sum(vs[0]), sum(vs[1]), ...` (L sums per vector). Pairs of vectors are folded
        half onto half (one shuffle pair and one add per pair and level) instead of one tree per vector."""
        L = vs[0].type.count
        items = [(v, 1) for v in vs]  # (vector, sums it holds): each sum spread over L // sums lanes
        while len(items) > 1 and items[0][1] < L:
            nxt = []
            for a in range(0, len(items), 2):
                (u, g), (w, _) = items[a], items[a + 1]
                span = L // g  # lanes per sum
                lo = [q * span + e for q in range(g) for e in range(span // 2)]
                hi = [i + span // 2 for i in lo]
                nxt.append((b.fadd(self.shuffle(b, u, w, lo + [L + i for i in lo]),
                                   self.shuffle(b, u, w, hi + [L + i for i in hi])), 2 * g))
            items = nxt
        out = []
        for v, g in items:
            span = L // g
            while span > 1:  # finish sums still spread over several lanes (fewer vectors than lanes)
                lo = [q * span + e for q in range(g) for e in range(span // 2)]
                v = b.fadd(self.shuffle(b, v, v, lo), self.shuffle(b, v, v, [i + span // 2 for i in lo]))
                L, span = len(lo), span // 2
            out.append(v)
        return out

    def array(self, context: Any, b: Any, ty: Any, val: Any) -> Any:
        return context.make_array(ty)(context, b, val)

    def length(self, b: Any, a: Any) -> Any:
        return b.extract_value(a.shape, 0)


_TOOLS: list[_IR] = []


def ir_tools() -> _IR:
    """The shared `_IR` (numba and llvmlite are imported here, on first use)."""
    with _LOCK:
        if not _TOOLS:
            _TOOLS.append(_IR())
        return _TOOLS[0]


