"""Numba kernels of the ONNX ops. `onnx_reference.py` holds the numpy twin (the definition) of each op.

Unlike `kernels.py` (fixed float32 signatures for the transformer ops) these kernels take any of the numeric
dtypes ONNX graphs carry, so they are compiled lazily per dtype combination and cached on disk
(`cache=True`). Conventions:

* Arrays are flat (1-D) or C-contiguous views into the arena; shapes and strides (in elements) are passed as
  int64 arrays, so one kernel serves every rank. The engine collapses dims first, so most calls are rank 1-3.
* bool tensors are passed as their uint8 view: the kernels never see numpy's bool type.
* `error_model="numpy"`: a float division by zero gives inf/nan as in numpy, not an exception.
* Each op family has a serial kernel and a `_par` twin that runs `prange` over chunks; the engine calls the
  twin above `PAR_MIN` elements (a parallel region costs microseconds to launch).
* Element-wise maps compute in float64 and round once; reductions, norms and softmax accumulate in float64.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

PAR_MIN = 1 << 15  #: below this many elements a kernel runs serially
_CHUNK = 1 << 13  #: elements per parallel task
_DOT = {"reassoc", "contract"}


def _jit(parallel: bool = False, fastmath=False):  # noqa: ANN001, ANN202
    return numba.njit(cache=True, nogil=True, parallel=parallel, fastmath=fastmath, error_model="numpy")


def _inline():  # noqa: ANN202
    return numba.njit(inline="always", nogil=True, error_model="numpy")


# ---------------------------------------------------------------------------------------------- unary maps

U_SQRT, U_RECIP, U_NEG, U_EXP, U_ERF, U_TANH, U_SIGMOID, U_RELU, U_GELU_ERF, U_GELU_TANH = range(10)
U_COS, U_SIN, U_LOG, U_ABS, U_FLOOR, U_CEIL, U_SOFTPLUS, U_CLIP, U_COPY, U_ISNAN, U_ISINF, U_NOT = range(10, 22)
U_CAST_BOOL = 22

_S2PI = math.sqrt(2.0 / math.pi)
_R2 = 1.0 / math.sqrt(2.0)


@_inline()
def _unary_span(x, out, code, p0, p1, lo, hi):  # noqa: ANN001, C901
    if code == U_COPY:
        for i in range(lo, hi):
            out[i] = x[i]
    elif code == U_NEG:
        for i in range(lo, hi):
            out[i] = -x[i]
    elif code == U_ABS:
        for i in range(lo, hi):
            out[i] = abs(x[i])
    elif code == U_RELU:
        for i in range(lo, hi):
            v = x[i]
            out[i] = v if v > 0 else v - v
    elif code == U_CLIP:
        for i in range(lo, hi):
            v = np.float64(x[i])
            if v < p0:
                v = p0
            if v > p1:
                v = p1
            out[i] = v
    elif code == U_NOT:
        for i in range(lo, hi):
            out[i] = 1 if x[i] == 0 else 0
    elif code == U_CAST_BOOL:
        for i in range(lo, hi):
            out[i] = 1 if x[i] != 0 else 0
    elif code == U_ISNAN:
        for i in range(lo, hi):
            out[i] = 1 if np.isnan(np.float64(x[i])) else 0
    elif code == U_ISINF:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = 1 if (v == np.inf and p0 != 0) or (v == -np.inf and p1 != 0) else 0
    elif code == U_SQRT:
        for i in range(lo, hi):
            out[i] = math.sqrt(np.float64(x[i]))
    elif code == U_RECIP:
        for i in range(lo, hi):
            out[i] = 1.0 / np.float64(x[i])
    elif code == U_EXP:
        for i in range(lo, hi):
            out[i] = math.exp(np.float64(x[i]))
    elif code == U_ERF:
        for i in range(lo, hi):
            out[i] = math.erf(np.float64(x[i]))
    elif code == U_TANH:
        for i in range(lo, hi):
            out[i] = math.tanh(np.float64(x[i]))
    elif code == U_SIGMOID:
        for i in range(lo, hi):
            out[i] = 1.0 / (1.0 + math.exp(-np.float64(x[i])))
    elif code == U_GELU_ERF:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = 0.5 * v * (1.0 + math.erf(v * _R2))
    elif code == U_GELU_TANH:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = 0.5 * v * (1.0 + math.tanh(_S2PI * (v + 0.044715 * v * v * v)))
    elif code == U_COS:
        for i in range(lo, hi):
            out[i] = math.cos(np.float64(x[i]))
    elif code == U_SIN:
        for i in range(lo, hi):
            out[i] = math.sin(np.float64(x[i]))
    elif code == U_LOG:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = math.log(v) if v > 0 else (-np.inf if v == 0 else np.nan)
    elif code == U_FLOOR:
        for i in range(lo, hi):
            out[i] = math.floor(np.float64(x[i]))
    elif code == U_CEIL:
        for i in range(lo, hi):
            out[i] = math.ceil(np.float64(x[i]))
    elif code == U_SOFTPLUS:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v))


@_jit()
def unary(x, out, code, p0, p1):  # noqa: ANN001
    """`out = f(x)` element-wise over flat arrays; `p0`, `p1`: Clip bounds / IsInf flags."""
    _unary_span(x, out, code, p0, p1, 0, x.size)


@_jit(parallel=True)
def unary_par(x, out, code, p0, p1):  # noqa: ANN001
    n = x.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        _unary_span(x, out, code, p0, p1, c * _CHUNK, min(n, (c + 1) * _CHUNK))


# ----------------------------------------------------------------------------------- broadcast binary maps

B_ADD, B_SUB, B_MUL, B_DIV, B_DIV_INT, B_POW_F, B_POW_I, B_MAX, B_MIN = range(9)
B_EQ, B_LT, B_LE, B_GT, B_GE, B_AND, B_OR, B_XOR, B_MOD_INT, B_MOD_F, B_FMOD = range(9, 20)


@_inline()
def _binary_span(code, a, ao, sa, b, bo, sb, out, oo, n):  # noqa: ANN001, C901
    if code == B_ADD:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] + b[bo + j * sb]
    elif code == B_MUL:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] * b[bo + j * sb]
    elif code == B_SUB:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] - b[bo + j * sb]
    elif code == B_DIV:
        for j in range(n):
            out[oo + j] = np.float64(a[ao + j * sa]) / np.float64(b[bo + j * sb])
    elif code == B_DIV_INT:
        for j in range(n):
            x = a[ao + j * sa]
            y = b[bo + j * sb]
            if y == 0:
                out[oo + j] = 0
            else:
                q = x // y
                if (x % y != 0) and ((x < 0) != (y < 0)):
                    q += 1
                out[oo + j] = q
    elif code == B_POW_F:
        for j in range(n):
            out[oo + j] = math.pow(np.float64(a[ao + j * sa]), np.float64(b[bo + j * sb]))
    elif code == B_POW_I:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] ** b[bo + j * sb]
    elif code == B_MAX:
        for j in range(n):
            x = a[ao + j * sa]
            y = b[bo + j * sb]
            out[oo + j] = x if (x > y or x != x) else y
    elif code == B_MIN:
        for j in range(n):
            x = a[ao + j * sa]
            y = b[bo + j * sb]
            out[oo + j] = x if (x < y or x != x) else y
    elif code == B_EQ:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] == b[bo + j * sb]
    elif code == B_LT:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] < b[bo + j * sb]
    elif code == B_LE:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] <= b[bo + j * sb]
    elif code == B_GT:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] > b[bo + j * sb]
    elif code == B_GE:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] >= b[bo + j * sb]
    elif code == B_AND:
        for j in range(n):
            out[oo + j] = (a[ao + j * sa] != 0) and (b[bo + j * sb] != 0)
    elif code == B_OR:
        for j in range(n):
            out[oo + j] = (a[ao + j * sa] != 0) or (b[bo + j * sb] != 0)
    elif code == B_XOR:
        for j in range(n):
            out[oo + j] = (a[ao + j * sa] != 0) != (b[bo + j * sb] != 0)
    elif code == B_MOD_INT:
        for j in range(n):
            y = b[bo + j * sb]
            out[oo + j] = a[ao + j * sa] % y if y != 0 else 0
    elif code == B_MOD_F:
        for j in range(n):
            out[oo + j] = np.remainder(np.float64(a[ao + j * sa]), np.float64(b[bo + j * sb]))
    elif code == B_FMOD:
        for j in range(n):
            out[oo + j] = np.fmod(np.float64(a[ao + j * sa]), np.float64(b[bo + j * sb]))


@_inline()
def _offsets2(o, shape, s1, s2):  # noqa: ANN001
    """Offsets into two strided inputs of row `o` over dims `shape[:-1]`."""
    p = 0
    q = 0
    r = o
    for d in range(shape.size - 2, -1, -1):
        k = r % shape[d]
        r //= shape[d]
        p += k * s1[d]
        q += k * s2[d]
    return p, q


@_jit()
def binary(a, b, out, shape, sa, sb, code):  # noqa: ANN001
    """`out = a (op) b` with broadcasting: `out` is contiguous of `shape`; `sa`, `sb` are the inputs'
    element strides over that shape (0 where broadcast)."""
    nd = shape.size
    inner = shape[nd - 1]
    if inner == 0:
        return
    last_a = sa[nd - 1]
    last_b = sb[nd - 1]
    for o in range(out.size // inner):
        ao, bo = _offsets2(o, shape, sa, sb)
        _binary_span(code, a, ao, last_a, b, bo, last_b, out, o * inner, inner)


@_jit(parallel=True)
def binary_par(a, b, out, shape, sa, sb, code):  # noqa: ANN001
    nd = shape.size
    inner = shape[nd - 1]
    if inner == 0:
        return
    last_a = sa[nd - 1]
    last_b = sb[nd - 1]
    per_row = (inner + _CHUNK - 1) // _CHUNK
    for t in prange((out.size // inner) * per_row):
        o = t // per_row
        lo = (t % per_row) * _CHUNK
        hi = min(inner, lo + _CHUNK)
        ao, bo = _offsets2(o, shape, sa, sb)
        _binary_span(code, a, ao + lo * last_a, last_a, b, bo + lo * last_b, last_b, out, o * inner + lo, hi - lo)


@_inline()
def _offsets3(o, shape, s1, s2, s3):  # noqa: ANN001
    p = 0
    q = 0
    u = 0
    r = o
    for d in range(shape.size - 2, -1, -1):
        k = r % shape[d]
        r //= shape[d]
        p += k * s1[d]
        q += k * s2[d]
        u += k * s3[d]
    return p, q, u


@_inline()
def _where_rows(c, x, y, out, shape, sc, sx, sy, o, lo, hi):  # noqa: ANN001
    nd = shape.size
    inner = shape[nd - 1]
    lc, lx, ly = sc[nd - 1], sx[nd - 1], sy[nd - 1]
    co, xo, yo = _offsets3(o, shape, sc, sx, sy)
    base = o * inner
    for j in range(lo, hi):
        out[base + j] = x[xo + j * lx] if c[co + j * lc] != 0 else y[yo + j * ly]


@_jit()
def where(c, x, y, out, shape, sc, sx, sy):  # noqa: ANN001
    """`out = c ? x : y` with broadcasting (`c` as uint8)."""
    inner = shape[shape.size - 1]
    if inner == 0:
        return
    for o in range(out.size // inner):
        _where_rows(c, x, y, out, shape, sc, sx, sy, o, 0, inner)


@_jit(parallel=True)
def where_par(c, x, y, out, shape, sc, sx, sy):  # noqa: ANN001
    inner = shape[shape.size - 1]
    if inner == 0:
        return
    per_row = (inner + _CHUNK - 1) // _CHUNK
    for t in prange((out.size // inner) * per_row):
        o = t // per_row
        lo = (t % per_row) * _CHUNK
        _where_rows(c, x, y, out, shape, sc, sx, sy, o, lo, min(inner, lo + _CHUNK))


# ------------------------------------------------------------------------------------------- data movement

@_inline()
def _copy_rows(src, soff, sstr, dst, doff, dstr, shape, o0, o1, lo, hi):  # noqa: ANN001
    nd = shape.size
    ls = sstr[nd - 1]
    ld = dstr[nd - 1]
    for o in range(o0, o1):
        p, q = _offsets2(o, shape, sstr, dstr)
        p += soff + lo * ls
        q += doff + lo * ld
        if ls == 1 and ld == 1:
            for j in range(hi - lo):
                dst[q + j] = src[p + j]
        else:
            for j in range(hi - lo):
                dst[q + j * ld] = src[p + j * ls]


@_jit()
def copy_strided(src, soff, sstr, dst, doff, dstr, shape):  # noqa: ANN001
    """`dst[doff + i . dstr] = src[soff + i . sstr]` for every index `i` of `shape` (element strides; a 0 stride
    repeats, a negative one walks backwards). Transpose, Slice, Expand, Concat, Split and copies use it."""
    nd = shape.size
    inner = shape[nd - 1]
    if inner == 0:
        return
    rows = 1
    for d in range(nd - 1):
        rows *= shape[d]
    _copy_rows(src, soff, sstr, dst, doff, dstr, shape, 0, rows, 0, inner)


@_jit(parallel=True)
def copy_strided_par(src, soff, sstr, dst, doff, dstr, shape):  # noqa: ANN001
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


@_inline()
def _gather_span(x, idx, out, n, inner, t0, t1):  # noqa: ANN001
    m = idx.size
    for t in range(t0, t1):
        o = t // m
        k = idx[t % m]
        if k < 0:
            k += n
        src = (o * n + k) * inner
        dst = t * inner
        for i in range(inner):
            out[dst + i] = x[src + i]


@_jit()
def gather(x, idx, out, outer, n, inner):  # noqa: ANN001
    """`x` as `[outer, n, inner]`, `idx` flat `[m]` (checked by the caller; negatives wrap) ->
    `out` `[outer, m, inner]`."""
    _gather_span(x, idx, out, n, inner, 0, outer * idx.size)


@_jit(parallel=True)
def gather_par(x, idx, out, outer, n, inner):  # noqa: ANN001
    rows = outer * idx.size
    per = max(1, _CHUNK // max(inner, 1))
    for c in prange((rows + per - 1) // per):
        _gather_span(x, idx, out, n, inner, c * per, min(rows, (c + 1) * per))


@_jit()
def gathernd(data, dstr, dims, idx, out, nb, ni, k, bstride, inner):  # noqa: ANN001
    """`data` flat; index tuples `idx` `[nb, ni, k]` address dims `dims[:k]` (strides `dstr`) of batch `b`
    (stride `bstride`); each copies `inner` elements to `out` `[nb, ni, inner]`."""
    for b in range(nb):
        for j in range(ni):
            off = b * bstride
            for t in range(k):
                v = idx[(b * ni + j) * k + t]
                if v < 0:
                    v += dims[t]
                off += v * dstr[t]
            dst = (b * ni + j) * inner
            for i in range(inner):
                out[dst + i] = data[off + i]


@_jit()
def trilu(x, out, batch, rows, cols, upper, k):  # noqa: ANN001
    """Keep the upper (`j - i >= k`) or lower (`j - i <= k`) triangle of each `[rows, cols]` matrix."""
    for b in range(batch):
        for i in range(rows):
            base = (b * rows + i) * cols
            for j in range(cols):
                keep = (j - i >= k) if upper else (j - i <= k)
                out[base + j] = x[base + j] if keep else x[base + j] - x[base + j]


@_jit()
def arange(out, start, delta):  # noqa: ANN001
    for i in range(out.size):
        out[i] = start + i * delta


@_jit()
def cast(x, out):  # noqa: ANN001
    """Element-wise type conversion (C semantics: float -> int truncates)."""
    for i in range(x.size):
        out[i] = x[i]


@_jit()
def cumsum(x, out, outer, n, inner, exclusive, reverse):  # noqa: ANN001
    for o in range(outer):
        for i in range(inner):
            acc = x[0] - x[0]
            for t in range(n):
                j = n - 1 - t if reverse else t
                p = (o * n + j) * inner + i
                v = x[p]
                if exclusive:
                    out[p] = acc
                    acc += v
                else:
                    acc += v
                    out[p] = acc


# Matmul, norms, softmax and reductions live in onnx_kernels_reduce.py (split for size); one namespace for callers.
from .onnx_kernels_reduce import (  # noqa: E402, F401
    R_L2,
    R_MAX,
    R_MEAN,
    R_MIN,
    R_PROD,
    R_SUM,
    R_SUMSQ,
    matmul,
    matmul_par,
    norm_rows,
    norm_rows_par,
    reduce,
    reduce_int,
    reduce_par,
    softmax,
    softmax_par,
)
