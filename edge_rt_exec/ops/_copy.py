"""The strided copy shared by the movement, broadcast and reduction ops (a base module both import).

`copy_strided` moves `dst[doff + i . dstr] = src[soff + i . sstr]` over every index `i` of a shape, with element
strides (0 repeats, negative walks backwards); the dims contiguous in both are merged first (`collapse`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._jit import I64, arr, helper, kernel, prange
from .registry import PAR_MIN, ShapeError, bcast_strides, collapse, flat, numel, strides_of

_CHUNK = 1 << 13  #: elements per parallel task
_I64_1 = arr(I64, 1)


def _kdt(dtype: str | None) -> str:
    """The dtype a kernel sees for a tensor dtype (bool as uint8)."""
    return "uint8" if dtype == "bool" else str(dtype)


@helper
def offsets2(o, shape, s1, s2):
    """Offsets into two strided operands of row `o` over dims `shape[:-1]`."""
    p = 0
    q = 0
    r = o
    for d in range(shape.size - 2, -1, -1):
        k = r % shape[d]
        r //= shape[d]
        p += k * s1[d]
        q += k * s2[d]
    return p, q


@helper
def _copy_rows(src, soff, sstr, dst, doff, dstr, shape, o0, o1, lo, hi):
    nd = shape.size
    ls = sstr[nd - 1]
    ld = dstr[nd - 1]
    for o in range(o0, o1):
        p, q = offsets2(o, shape, sstr, dstr)
        p += soff + lo * ls
        q += doff + lo * ld
        if ls == 1 and ld == 1:
            for j in range(hi - lo):
                dst[q + j] = src[p + j]
        else:
            for j in range(hi - lo):
                dst[q + j * ld] = src[p + j * ls]


@kernel()
def copy_strided(src, soff, sstr, dst, doff, dstr, shape):
    """`dst[doff + i . dstr] = src[soff + i . sstr]` for every index `i` of `shape` (element strides). The caller
    derives strides from shapes it checked; the extents are checked here too."""
    nd = shape.size
    inner = shape[nd - 1]
    if inner == 0:
        return
    rows = 1
    for d in range(nd - 1):
        rows *= shape[d]
    _copy_rows(src, soff, sstr, dst, doff, dstr, shape, 0, rows, 0, inner)


@kernel(parallel=True)
def copy_strided_par(src, soff, sstr, dst, doff, dstr, shape):
    nd = shape.size
    inner = shape[nd - 1]
    if inner == 0:
        return
    rows = 1
    for d in range(nd - 1):
        rows *= shape[d]
    per_row = (inner + _CHUNK - 1) // _CHUNK
    for t in prange(rows * per_row):
        o = t // per_row
        lo = (t % per_row) * _CHUNK
        _copy_rows(src, soff, sstr, dst, doff, dstr, shape, o, o + 1, lo, min(inner, lo + _CHUNK))


def _extent(off: int, strides: list[int], shape: tuple[int, ...]) -> tuple[int, int]:
    """The lowest and highest element a strided walk over `shape` touches."""
    lo = hi = off
    for s, d in zip(strides, shape):
        if s > 0:
            hi += s * (d - 1)
        else:
            lo += s * (d - 1)
    return lo, hi


def bind_copy(src: np.ndarray, soff: int, sstr: list[int], dst: np.ndarray, doff: int, dstr: list[int],
              shape: tuple[int, ...]) -> Callable:
    """A bound strided copy; both extents are checked against the arrays here, once (numba checks no bounds)."""
    if numel(shape) == 0:
        return lambda: None
    for a, off, st in ((src, soff, sstr), (dst, doff, dstr)):
        lo, hi = _extent(off, st, shape)
        if lo < 0 or hi >= a.size:
            raise ShapeError(f"strided copy of {list(shape)} reaches elements [{lo}, {hi}] of a {a.size}-element "
                             "array")
    sh, a_, b_ = collapse(shape, sstr, dstr)
    fn = (copy_strided_par if numel(shape) >= PAR_MIN else copy_strided).load()
    sf, df = flat(src), flat(dst)
    soff, doff = int(soff), int(doff)
    return lambda: fn(sf, soff, a_, df, doff, b_, sh)


def bind_copy_broadcast(x: np.ndarray, out: np.ndarray) -> Callable:
    """`out[...] = x` broadcast (Expand, the one-operand variadic ops)."""
    return bind_copy(x, 0, bcast_strides(x.shape, out.shape), out, 0, strides_of(out.shape), out.shape)


def warm_copy(dtype: str | None, readonly: bool, big: bool, out_dtype: str | None = None) -> None:
    """Load the strided copy for one source dtype (read-only for a mapped weight)."""
    src = arr(_kdt(dtype), 1, ro=readonly)
    dst = arr(_kdt(out_dtype or dtype), 1)
    for k in (copy_strided, copy_strided_par) if big else (copy_strided,):
        k.warm(src, I64, _I64_1, dst, I64, _I64_1, _I64_1)


