"""Numba kernels of the executor. `reference.py` holds the plain-numpy twin (the definition) of each one.

Contract shared by every kernel:

* Arrays are C-contiguous; floats are float32, token ids / positions / masks are int64. Each kernel has an
  explicit signature, so a wrong dtype, a non-contiguous view (e.g. a column slice) or a wrong rank raises
  `TypeError` at the call instead of compiling a slow variant. Inputs are typed read-only, so read-only
  mmap'd weights and writable arena views are both accepted.
* Results go into caller-owned `out` buffers (arena views); scratch buffers are passed in; nothing allocates.
  `out` may alias an input only where a docstring says so.
* Shapes are checked on entry (O(1)) and a mismatch raises ValueError: numba does no bounds checking, so a
  bad shape would otherwise corrupt memory.
* Signatures are compiled eagerly at import and cached on disk (`cache=True`), so the first import on a new
  machine takes a while and later ones load in about a second.

Threading: kernels release the GIL (`nogil=True`). Heavy kernels run `prange` loops on numba's thread pool
(size: `numba.set_num_threads`). Light kernels switch to a serial loop below `_PAR_MIN_WORK` elements, because
launching a parallel region costs a few microseconds under the omp/tbb threading layers and ~100 us under
`workqueue`. Do not call kernels from two Python threads at once: the workqueue layer is not thread-safe.

Numerics: dot products (linear, attention scores) are compiled with `fastmath={"reassoc", "contract"}` so LLVM
can vectorise the reduction and use FMA. torch's BLAS does not sum in sequential order either, so this costs
no fidelity and is what makes the decode matvec run at memory bandwidth. The other flags (no-NaN, no-inf,
approximate functions) stay off: masking uses -inf and exp/erf must stay exact. Element-wise maps compute in
float64 and round once, like the reference; norm statistics and softmax denominators accumulate in float64;
mean pooling sums in float32 like sentence-transformers.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange
from numba import types as nt

_F32 = np.float32

# Below this many elements of work a kernel runs serially (see the module docstring).
_PAR_MIN_WORK = 1 << 15
# Tokens per tile of the n > 1 linear kernel and weight rows per parallel task.
_TOKENS_PER_TILE = 4
_ROWS_PER_TASK = 16

_DOT_FLAGS = {"reassoc", "contract"}

_R1 = nt.Array(nt.float32, 1, "C", readonly=True)
_R2 = nt.Array(nt.float32, 2, "C", readonly=True)
_R3 = nt.Array(nt.float32, 3, "C", readonly=True)
_W2 = nt.Array(nt.float32, 2, "C")
_W3 = nt.Array(nt.float32, 3, "C")
_IDS = nt.Array(nt.int64, 1, "C", readonly=True)
_MASK = nt.Array(nt.int64, 2, "C", readonly=True)
_i64 = nt.int64
_f64 = nt.float64


def _kernel(signature, parallel: bool = False, fastmath=False):
    """The one decorator of every public kernel (eager, cached, GIL-free)."""
    return numba.njit(signature, cache=True, nogil=True, parallel=parallel, fastmath=fastmath)


def _helper():
    """Decorator of helpers: inlined into the calling kernel at numba-IR level, so the kernel's fastmath flags
    and `prange` loops apply to the helper's body too."""
    return numba.njit(inline="always", nogil=True)


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


# ---------------------------------------------------------------------------------------------------- norms


@_helper()
def _layernorm_row(x, weight, bias, eps, out):
    d = x.shape[0]
    s = 0.0
    for j in range(d):
        s += np.float64(x[j])
    mean = _F32(s / d)
    v = 0.0
    for j in range(d):
        c = np.float64(x[j]) - np.float64(mean)
        v += c * c
    rstd = _F32(1.0 / math.sqrt(v / d + eps))
    for j in range(d):  # reads x[j] before writing out[j]: safe when out aliases x
        out[j] = (x[j] - mean) * rstd * weight[j] + bias[j]


@_kernel(nt.void(_R2, _R1, _R1, _f64, _W2), parallel=True)
def layernorm(x, weight, bias, eps, out):
    """torch LayerNorm over rows of `x[n, d]` (biased variance). `out` may alias `x`."""
    n, d = x.shape
    if weight.shape[0] != d or bias.shape[0] != d or out.shape[0] != n or out.shape[1] != d:
        raise ValueError("layernorm: shapes do not match (x[n,d], weight[d], bias[d], out[n,d])")
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _layernorm_row(x[i], weight, bias, eps, out[i])
    else:
        for i in prange(n):
            _layernorm_row(x[i], weight, bias, eps, out[i])


@_helper()
def _rmsnorm_row(x, weight, eps, out):
    d = x.shape[0]
    s = 0.0
    for j in range(d):
        s += np.float64(x[j]) * np.float64(x[j])
    # HF: variance in float32, then rsqrt(variance + eps) in float32.
    rstd = _F32(1.0 / math.sqrt(np.float64(_F32(s / d) + _F32(eps))))
    for j in range(d):  # safe when out aliases x
        out[j] = weight[j] * (x[j] * rstd)


@_kernel(nt.void(_R2, _R1, _f64, _W2), parallel=True)
def rmsnorm(x, weight, eps, out):
    """Llama RMSNorm over rows of `x[n, d]`: `weight * (x * rsqrt(mean(x^2) + eps))`. `out` may alias `x`."""
    n, d = x.shape
    if weight.shape[0] != d or out.shape[0] != n or out.shape[1] != d:
        raise ValueError("rmsnorm: shapes do not match (x[n,d], weight[d], out[n,d])")
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _rmsnorm_row(x[i], weight, eps, out[i])
    else:
        for i in prange(n):
            _rmsnorm_row(x[i], weight, eps, out[i])


# ------------------------------------------------------------------------------------------- element-wise


@_helper()
def _check_same_shape(a, out):
    if a.shape[0] != out.shape[0] or a.shape[1] != out.shape[1]:
        raise ValueError("element-wise kernel: inputs and out must have the same [n, d] shape")


@_helper()
def _gelu_tanh_row(x, out):
    c = math.sqrt(2.0 / math.pi)
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        out[j] = 0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v * v * v)))


@_kernel(nt.void(_R2, _W2), parallel=True)
def gelu_tanh(x, out):
    """GPT-2 GELU (tanh approximation), element-wise over `[n, d]`. `out` may alias `x`."""
    _check_same_shape(x, out)
    n, d = x.shape
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _gelu_tanh_row(x[i], out[i])
    else:
        for i in prange(n):
            _gelu_tanh_row(x[i], out[i])


@_helper()
def _gelu_erf_row(x, out):
    c = 1.0 / math.sqrt(2.0)
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        out[j] = v * 0.5 * (1.0 + math.erf(v * c))


@_kernel(nt.void(_R2, _W2), parallel=True)
def gelu_erf(x, out):
    """Exact GELU `x * 0.5 * (1 + erf(x / sqrt 2))` (torch's default), element-wise. `out` may alias `x`."""
    _check_same_shape(x, out)
    n, d = x.shape
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _gelu_erf_row(x[i], out[i])
    else:
        for i in prange(n):
            _gelu_erf_row(x[i], out[i])


@_helper()
def _silu_mul_row(gate, up, out):
    for j in range(gate.shape[0]):
        g = np.float64(gate[j])
        out[j] = _F32(g / (1.0 + math.exp(-g))) * up[j]


@_kernel(nt.void(_R2, _R2, _W2), parallel=True)
def silu_mul(gate, up, out):
    """Llama MLP gating `silu(gate) * up`, element-wise. `out` may alias `gate` or `up`."""
    _check_same_shape(gate, out)
    _check_same_shape(up, out)
    n, d = gate.shape
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _silu_mul_row(gate[i], up[i], out[i])
    else:
        for i in prange(n):
            _silu_mul_row(gate[i], up[i], out[i])


@_kernel(nt.void(_R2, _R2, _W2), parallel=True)
def add(a, b, out):
    """`out = a + b`, element-wise over `[n, d]`. `out` may alias `a` or `b` (residual add in place)."""
    _check_same_shape(a, out)
    _check_same_shape(b, out)
    n, d = a.shape
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            for j in range(d):
                out[i, j] = a[i, j] + b[i, j]
    else:
        for i in prange(n):
            for j in range(d):
                out[i, j] = a[i, j] + b[i, j]


# -------------------------------------------------------------------------------------------------- softmax


@_helper()
def _softmax_inplace(s, length):
    """Stable softmax of `s[:length]` in place; returns False (and leaves zeros) if `length` is 0."""
    if length == 0:
        return False
    mx = s[0]
    for t in range(1, length):
        mx = max(mx, s[t])
    denom = 0.0
    for t in range(length):
        e = math.exp(s[t] - mx)
        s[t] = e
        denom += e
    inv = 1.0 / denom
    for t in range(length):
        s[t] = s[t] * inv
    return True


@_helper()
def _softmax_row(x, out):
    m = x.shape[0]
    mx = x[0]
    for j in range(1, m):
        mx = max(mx, x[j])
    denom = 0.0
    for j in range(m):  # reads x[j] before writing out[j]: safe when out aliases x
        e = math.exp(x[j] - mx)
        out[j] = e
        denom += e
    inv = 1.0 / denom
    for j in range(m):
        out[j] = out[j] * inv


@_kernel(nt.void(_R2, _W2), parallel=True)
def softmax_rows(x, out):
    """Numerically stable softmax over each row of `x[n, m]` (m >= 1). `out` may alias `x`."""
    _check_same_shape(x, out)
    n, m = x.shape
    if m == 0:
        return
    if n * m < _PAR_MIN_WORK:
        for i in range(n):
            _softmax_row(x[i], out[i])
    else:
        for i in prange(n):
            _softmax_row(x[i], out[i])


# ----------------------------------------------------------------------------------------------------- rope


@_kernel(nt.void(_W2, _IDS, _R1, _i64, _i64))
def rope_inplace(x, positions, inv_freq, n_heads, head_dim):
    """HF Llama "rotate_half" RoPE on `x[n, H*hd]` in place: pair `(j, j + hd/2)` of each head is rotated by
    `float32(positions[i]) * inv_freq[j]` (angle rounded to float32 like HF, then exact cos/sin)."""
    n = x.shape[0]
    half = head_dim // 2
    if head_dim % 2 != 0 or x.shape[1] != n_heads * head_dim or positions.shape[0] != n or inv_freq.shape[0] != half:
        raise ValueError("rope_inplace: shapes do not match (x[n, H*hd], positions[n], inv_freq[hd/2])")
    for i in range(n):
        pos = _F32(positions[i])
        for j in range(half):
            angle = pos * inv_freq[j]
            c = _F32(math.cos(np.float64(angle)))
            s = _F32(math.sin(np.float64(angle)))
            for h in range(n_heads):
                a = h * head_dim + j
                x1 = x[i, a]
                x2 = x[i, a + half]
                x[i, a] = x1 * c - x2 * s
                x[i, a + half] = x2 * c + x1 * s


# ----------------------------------------------------------------------------------------------- attention


@_kernel(nt.void(_R2, _R2, _W3, _W3, _i64))
def kv_write(k, v, k_cache, v_cache, pos0):
    """Write `k, v[n, Hkv*hd]` into rows `pos0 .. pos0+n-1` of `k_cache, v_cache[Hkv, T_max, hd]`."""
    n = k.shape[0]
    n_kv_heads, t_max, head_dim = k_cache.shape
    if (
        v.shape[0] != n
        or k.shape[1] != n_kv_heads * head_dim
        or v.shape[1] != n_kv_heads * head_dim
        or v_cache.shape[0] != n_kv_heads
        or v_cache.shape[1] != t_max
        or v_cache.shape[2] != head_dim
    ):
        raise ValueError("kv_write: shapes do not match (k, v[n, Hkv*hd], caches[Hkv, T_max, hd])")
    if pos0 < 0 or pos0 + n > t_max:
        raise IndexError("kv_write: positions pos0 .. pos0+n-1 fall outside the KV cache")
    for h in range(n_kv_heads):
        for i in range(n):
            for d in range(head_dim):
                k_cache[h, pos0 + i, d] = k[i, h * head_dim + d]
                v_cache[h, pos0 + i, d] = v[i, h * head_dim + d]


@_kernel(
    nt.void(_R2, _R3, _R3, _i64, _i64, _i64, _i64, _f64, _W2, _W2),
    parallel=True,
    fastmath=_DOT_FLAGS,
)
def attention_causal(q, k_cache, v_cache, pos0, n_heads, n_kv_heads, head_dim, scale, scratch, out):
    """Causal GQA attention; query row i sits at position `pos0 + i` and sees cache positions `0 .. pos0+i`.

    `q, out[n, H*hd]`; caches `[Hkv, T_max, hd]` already hold positions `0 .. pos0+n-1` (call `kv_write`
    first); `scratch[>= H, >= pos0+n]`. Query head h reads kv head `h // (H // Hkv)`. Parallel over heads.
    `out` must not alias `q`.
    """
    n = q.shape[0]
    n_kv, t_max, hd = k_cache.shape
    if (
        hd != head_dim
        or n_kv != n_kv_heads
        or n_heads % n_kv_heads != 0
        or v_cache.shape[0] != n_kv
        or v_cache.shape[1] != t_max
        or v_cache.shape[2] != hd
        or q.shape[1] != n_heads * head_dim
        or out.shape[0] != n
        or out.shape[1] != n_heads * head_dim
    ):
        raise ValueError("attention_causal: shapes do not match (q, out[n, H*hd], caches[Hkv, T_max, hd])")
    if pos0 < 0 or pos0 + n > t_max or scratch.shape[0] < n_heads or scratch.shape[1] < pos0 + n:
        raise ValueError("attention_causal: pos0 + n exceeds the KV cache or the scratch [H, T] buffer")
    group = n_heads // n_kv_heads
    s = _F32(scale)
    for h in prange(n_heads):
        kc = k_cache[h // group]
        vc = v_cache[h // group]
        sc = scratch[h]
        q0 = h * head_dim
        for i in range(n):
            length = pos0 + i + 1
            qi = q[i]
            for t in range(length):
                sc[t] = _dot(qi, q0, kc[t], 0, head_dim) * s
            _softmax_inplace(sc, length)
            oi = out[i]
            for d in range(head_dim):
                oi[q0 + d] = 0.0
            for t in range(length):
                p = sc[t]
                vt = vc[t]
                for d in range(head_dim):
                    oi[q0 + d] += p * vt[d]


@_kernel(
    nt.void(_R2, _R2, _R2, _MASK, _i64, _i64, _i64, _i64, _f64, _W2, _W2),
    parallel=True,
    fastmath=_DOT_FLAGS,
)
def attention_bidir(q, k, v, mask, batch, seq, n_heads, head_dim, scale, scratch, out):
    """BERT encoder attention over `batch` sequences of `seq` rows each: `q, k, v, out[B*S, H*hd]`.

    `mask` is int64 `[B, S]`, 1 = token, 0 = padding: padded keys are skipped; padded query rows still get a
    finite result (as in HF); a sequence with no token gives zeros. `scratch[>= B*H, >= S]`. Parallel over
    (sequence, head). `out` must not alias `q`, `k` or `v`.
    """
    width = n_heads * head_dim
    rows = batch * seq
    if (
        q.shape[0] != rows
        or k.shape[0] != rows
        or v.shape[0] != rows
        or out.shape[0] != rows
        or q.shape[1] != width
        or k.shape[1] != width
        or v.shape[1] != width
        or out.shape[1] != width
        or mask.shape[0] != batch
        or mask.shape[1] != seq
    ):
        raise ValueError("attention_bidir: shapes do not match (q, k, v, out[B*S, H*hd], mask[B, S])")
    if scratch.shape[0] < batch * n_heads or scratch.shape[1] < seq:
        raise ValueError("attention_bidir: scratch must be at least [B*H, S]")
    s = _F32(scale)
    for bh in prange(batch * n_heads):
        b = bh // n_heads
        c0 = (bh % n_heads) * head_dim
        sc = scratch[bh]
        r0 = b * seq
        for i in range(seq):
            qi = q[r0 + i]
            mx = _F32(-np.inf)
            for t in range(seq):
                if mask[b, t] != 0:
                    val = _dot(qi, c0, k[r0 + t], c0, head_dim) * s
                    sc[t] = val
                    mx = max(mx, val)
            oi = out[r0 + i]
            for d in range(head_dim):
                oi[c0 + d] = 0.0
            if mx == -np.inf:  # no token in this sequence
                continue
            denom = 0.0
            for t in range(seq):
                if mask[b, t] != 0:
                    e = math.exp(sc[t] - mx)
                    sc[t] = e
                    denom += e
            inv = 1.0 / denom
            for t in range(seq):
                if mask[b, t] != 0:
                    p = _F32(sc[t] * inv)
                    vt = v[r0 + t]
                    for d in range(head_dim):
                        oi[c0 + d] += p * vt[c0 + d]


# ------------------------------------------------------------------------------------------ pooling, argmax


@_kernel(nt.void(_R2, _MASK, _i64, _i64, _W2))
def mean_pool_l2(x, mask, batch, seq, out):
    """sentence-transformers mean pooling of `x[B*S, d]` over tokens with mask 1, then `v / max(|v|, 1e-12)`.

    `mask` is int64 `[B, S]`; `out[B, d]`.
    """
    d = x.shape[1]
    if x.shape[0] != batch * seq or mask.shape[0] != batch or mask.shape[1] != seq:
        raise ValueError("mean_pool_l2: shapes do not match (x[B*S, d], mask[B, S])")
    if out.shape[0] != batch or out.shape[1] != d:
        raise ValueError("mean_pool_l2: out must be [B, d]")
    for b in range(batch):
        ob = out[b]
        count = 0
        for j in range(d):
            ob[j] = 0.0
        for t in range(seq):
            if mask[b, t] != 0:
                count += 1
                xt = x[b * seq + t]
                for j in range(d):
                    ob[j] += xt[j]
        inv_count = 1.0 / max(np.float64(count), 1e-9)
        sq = 0.0
        for j in range(d):
            ob[j] = ob[j] * inv_count
            sq += np.float64(ob[j]) * np.float64(ob[j])
        inv_norm = 1.0 / max(math.sqrt(sq), 1e-12)
        for j in range(d):
            ob[j] = ob[j] * inv_norm


@_kernel(nt.int64(_R1))
def argmax(x):
    """Index of the first maximum of `x[m]` (m >= 1); NaNs are never chosen."""
    if x.shape[0] == 0:
        raise ValueError("argmax: empty array")
    best = 0
    best_val = x[0]
    for j in range(1, x.shape[0]):
        if x[j] > best_val:
            best_val = x[j]
            best = j
    return best
