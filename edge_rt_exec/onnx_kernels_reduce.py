"""Numba kernels of the ONNX ops, part two: matmul, norms, softmax and reductions (conventions in
`onnx_kernels.py`, which re-exports these)."""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from .onnx_kernels import _DOT, _inline, _jit

# ------------------------------------------------------------------------------------ matmul, norms, reductions

@_inline()
def _matmul_row(a, b, out, ia, ib, r, M, K, N):  # noqa: ANN001
    bi = r // M
    i = r % M
    ao = (ia[bi] * M + i) * K
    bo = ib[bi] * K * N
    oo = (bi * M + i) * N
    for j in range(N):
        out[oo + j] = 0
    for k in range(K):
        av = a[ao + k]
        bk = bo + k * N
        for j in range(N):
            out[oo + j] += av * b[bk + j]


@_jit(fastmath=_DOT)
def matmul(a, b, out, ia, ib, M, K, N):  # noqa: ANN001
    """Batched `out[i] = a[ia[i]] @ b[ib[i]]`: `a` flat `[*, M, K]`, `b` flat `[*, K, N]`, `out` `[len(ia), M, N]`."""
    for r in range(ia.size * M):
        _matmul_row(a, b, out, ia, ib, r, M, K, N)


@_jit(parallel=True, fastmath=_DOT)
def matmul_par(a, b, out, ia, ib, M, K, N):  # noqa: ANN001
    for r in prange(ia.size * M):
        _matmul_row(a, b, out, ia, ib, r, M, K, N)


@_inline()
def _softmax_line(x, out, base, n, stride, log):  # noqa: ANN001
    m = -np.inf
    for t in range(n):
        v = np.float64(x[base + t * stride])
        if v > m:
            m = v
    s = 0.0
    for t in range(n):
        s += math.exp(np.float64(x[base + t * stride]) - m)
    if log:
        ls = math.log(s)
        for t in range(n):
            out[base + t * stride] = np.float64(x[base + t * stride]) - m - ls
    else:
        for t in range(n):
            out[base + t * stride] = math.exp(np.float64(x[base + t * stride]) - m) / s


@_jit()
def softmax(x, out, outer, n, inner, log):  # noqa: ANN001
    """Softmax (or log-softmax) over the middle axis of `x` as `[outer, n, inner]`."""
    for t in range(outer * inner):
        _softmax_line(x, out, (t // inner) * n * inner + t % inner, n, inner, log)


@_jit(parallel=True)
def softmax_par(x, out, outer, n, inner, log):  # noqa: ANN001
    for t in prange(outer * inner):
        o = t // inner
        i = t % inner
        _softmax_line(x, out, o * n * inner + i, n, inner, log)


@_inline()
def _norm_row(x, scale, bias, out, mean_out, inv_out, r, d, eps, rms):  # noqa: ANN001
    base = r * d
    mean = 0.0
    if not rms:
        for t in range(d):
            mean += np.float64(x[base + t])
        mean /= d
    var = 0.0
    for t in range(d):
        v = np.float64(x[base + t]) - mean
        var += v * v
    inv = 1.0 / math.sqrt(var / d + eps)
    for t in range(d):
        y = (np.float64(x[base + t]) - mean) * inv * np.float64(scale[t])
        if bias.size > 0:
            y += np.float64(bias[t])
        out[base + t] = y
    if mean_out.size > 0:
        mean_out[r] = mean
        inv_out[r] = inv


@_jit()
def norm_rows(x, scale, bias, out, mean_out, inv_out, rows, d, eps, rms):  # noqa: ANN001
    """LayerNormalization (or RMSNormalization when `rms`) of each of `rows` rows of `d` elements; `scale`,
    `bias` hold `d` elements (bias may be empty); `mean_out` / `inv_out` get the statistics when non-empty."""
    for r in range(rows):
        _norm_row(x, scale, bias, out, mean_out, inv_out, r, d, eps, rms)


@_jit(parallel=True)
def norm_rows_par(x, scale, bias, out, mean_out, inv_out, rows, d, eps, rms):  # noqa: ANN001
    for r in prange(rows):
        _norm_row(x, scale, bias, out, mean_out, inv_out, r, d, eps, rms)


R_SUM, R_MEAN, R_MAX, R_MIN, R_L2, R_SUMSQ, R_PROD = range(7)


@_inline()
def _reduce_one(x, out, n, inner, code, t):  # noqa: ANN001
    base = (t // inner) * n * inner + t % inner
    acc = np.float64(x[base])
    if code == R_L2 or code == R_SUMSQ:
        acc = acc * acc
    for k in range(1, n):
        v = np.float64(x[base + k * inner])
        if code == R_MAX:
            if v > acc or v != v:
                acc = v
        elif code == R_MIN:
            if v < acc or v != v:
                acc = v
        elif code == R_L2 or code == R_SUMSQ:
            acc += v * v
        elif code == R_PROD:
            acc *= v
        else:
            acc += v
    if code == R_MEAN:
        acc /= n
    elif code == R_L2:
        acc = math.sqrt(acc)
    out[t] = acc


@_jit()
def reduce(x, out, outer, n, inner, code):  # noqa: ANN001
    """Reduce the middle axis of `x` as `[outer, n, inner]` (n >= 1) into `out` `[outer, inner]`."""
    for t in range(outer * inner):
        _reduce_one(x, out, n, inner, code, t)


@_jit(parallel=True)
def reduce_par(x, out, outer, n, inner, code):  # noqa: ANN001
    for t in prange(outer * inner):
        _reduce_one(x, out, n, inner, code, t)


@_jit()
def reduce_int(x, out, outer, n, inner, code):  # noqa: ANN001
    """`reduce` for integer sums and products, in int64 (wraps like numpy)."""
    for t in range(outer * inner):
        o = t // inner
        i = t % inner
        base = o * n * inner + i
        acc = np.int64(x[base])
        for k in range(1, n):
            v = np.int64(x[base + k * inner])
            if code == R_PROD:
                acc *= v
            else:
                acc += v
        out[t] = acc
