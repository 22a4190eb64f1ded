"""RoPE, the KV cache, causal and bidirectional attention, mean pooling."""

from __future__ import annotations

import math

import numpy as np
from numba import prange
from numba import types as nt

from ._base import _DOT_FLAGS, _F32, _IDS, _MASK, _R1, _R2, _R3, _W2, _W3, _f64, _i64, _kernel
from .elementwise import _softmax_inplace
from .linear import _dot

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
