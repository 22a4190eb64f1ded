"""Linear layers (decode matvec and tiled prefill) and embedding gathers."""

from __future__ import annotations

from numba import prange
from numba import types as nt

from ._base import _DOT_FLAGS, _F32, _IDS, _R1, _R2, _ROWS_PER_TASK, _TOKENS_PER_TILE, _W2, _helper, _i64, _kernel

# --------------------------------------------------------------------------------------------------- linear


@_helper()
def _dot(a, a0, b, b0, k):
    """`sum(a[a0:a0+k] * b[b0:b0+k])` over 1-D arrays, accumulated in float32."""
    acc = _F32(0.0)
    for i in range(k):
        acc += a[a0 + i] * b[b0 + i]
    return acc


@_helper()
def _linear_body(x, w, bias, out, col0):
    n, k = x.shape
    m = w.shape[0]
    if w.shape[1] != k or out.shape[0] != n or col0 < 0 or col0 + m > out.shape[1]:
        raise ValueError("linear: shapes do not match (x[n,k], w[m,k], out[n, >= col0+m])")
    if bias.shape[0] != 0 and bias.shape[0] != m:
        raise ValueError("linear: bias must have m elements or none")
    has_bias = bias.shape[0] != 0
    if n == 1:
        # Decode: memory-bound matvec. Each thread streams a contiguous range of weight rows once.
        xr = x[0]
        for j in prange(m):
            acc = _dot(xr, 0, w[j], 0, k)
            if has_bias:
                acc += bias[j]
            out[0, col0 + j] = acc
        return
    # Prefill: each task owns `_ROWS_PER_TASK` weight rows (kept in L1/L2) and sweeps all tokens over them in
    # tiles of 4 tokens x 2 rows, so a weight row is read from memory once and reused for every token.
    n_tasks = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        j0 = task * _ROWS_PER_TASK
        j1 = min(j0 + _ROWS_PER_TASK, m)
        t = 0
        while t + _TOKENS_PER_TILE <= n:
            x0 = x[t]
            x1 = x[t + 1]
            x2 = x[t + 2]
            x3 = x[t + 3]
            j = j0
            while j < j1:
                wa = w[j]
                wb = w[j + 1] if j + 1 < j1 else wa  # odd tail: recompute row j, store it once
                a0 = _F32(0.0)
                a1 = _F32(0.0)
                a2 = _F32(0.0)
                a3 = _F32(0.0)
                b0 = _F32(0.0)
                b1 = _F32(0.0)
                b2 = _F32(0.0)
                b3 = _F32(0.0)
                for i in range(k):
                    va = wa[i]
                    vb = wb[i]
                    a0 += x0[i] * va
                    a1 += x1[i] * va
                    a2 += x2[i] * va
                    a3 += x3[i] * va
                    b0 += x0[i] * vb
                    b1 += x1[i] * vb
                    b2 += x2[i] * vb
                    b3 += x3[i] * vb
                ba = bias[j] if has_bias else _F32(0.0)
                out[t, col0 + j] = a0 + ba
                out[t + 1, col0 + j] = a1 + ba
                out[t + 2, col0 + j] = a2 + ba
                out[t + 3, col0 + j] = a3 + ba
                if j + 1 < j1:
                    bb = bias[j + 1] if has_bias else _F32(0.0)
                    out[t, col0 + j + 1] = b0 + bb
                    out[t + 1, col0 + j + 1] = b1 + bb
                    out[t + 2, col0 + j + 1] = b2 + bb
                    out[t + 3, col0 + j + 1] = b3 + bb
                j += 2
            t += _TOKENS_PER_TILE
        while t < n:
            xr = x[t]
            for j in range(j0, j1):
                acc = _dot(xr, 0, w[j], 0, k)
                if has_bias:
                    acc += bias[j]
                out[t, col0 + j] = acc
            t += 1


@_kernel(nt.void(_R2, _R2, _R1, _W2), parallel=True, fastmath=_DOT_FLAGS)
def linear(x, w, bias, out):
    """`out[n, m] = x[n, k] @ w[m, k].T + bias[m]`; zero-length `bias` means none. `out` must not alias x."""
    _linear_body(x, w, bias, out, 0)


@_kernel(nt.void(_R2, _R2, _R1, _W2, _i64), parallel=True, fastmath=_DOT_FLAGS)
def linear_rows(x, w, bias, out, col0):
    """Like `linear` for one row-tile of a large weight: writes columns `col0 .. col0+m` of `out[n, m_total]`.

    Used for an LM head streamed in tiles of vocabulary rows. `out` is the whole C-contiguous `[n, m_total]`
    buffer (a column slice would not be contiguous); `w` is the tile `[m, k]`, `bias` its `[m]` slice or
    empty.
    """
    _linear_body(x, w, bias, out, col0)


# ------------------------------------------------------------------------------------------------ embedding


@_kernel(nt.void(_IDS, _R2, _W2))
def embedding_gather(ids, table, out):
    """`out[i] = table[ids[i]]`; an id outside `[0, V)` raises IndexError (negative ids do not wrap)."""
    n = ids.shape[0]
    vocab, d = table.shape
    if out.shape[0] != n or out.shape[1] != d:
        raise ValueError("embedding_gather: out must be [n, d]")
    for i in range(n):
        row = ids[i]
        if row < 0 or row >= vocab:
            raise IndexError("embedding_gather: token id out of range [0, V)")
        for j in range(d):
            out[i, j] = table[row, j]


@_kernel(nt.void(_IDS, _R2, _W2))
def embedding_add(ids, table, out):
    """`out[i] += table[ids[i]]` (learned position / token-type embeddings); ids checked like the gather."""
    n = ids.shape[0]
    vocab, d = table.shape
    if out.shape[0] != n or out.shape[1] != d:
        raise ValueError("embedding_add: out must be [n, d]")
    for i in range(n):
        row = ids[i]
        if row < 0 or row >= vocab:
            raise IndexError("embedding_add: id out of range [0, V)")
        for j in range(d):
            out[i, j] += table[row, j]
