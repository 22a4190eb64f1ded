"""Attention: `CausalAttention` (decoders: RoPE, the KV cache and causal GQA attention in one kernel call) and
`BidirAttention` (BERT encoders: every token of a sequence sees the sequence's unmasked tokens).

CausalAttention's queries and keys arrive un-rotated; the op rotates them in place (they are not read after
it), writes the new keys and values into the KV cache at the rows their positions name, and attends over
the cache. Positions of one call are consecutive (`positions[i] == positions[0] + i`, checked): position p
sees cache rows `0 .. p`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._half import as_f32, to_storage
from ._jit import DOT_FLAGS, F32, F64, I64, U16, arr, helper, kernel, prange, routine
from .reduce import softmax_line
from .registry import OpDef, Sample, ShapeError, Site, register

_F32 = np.float32


@helper
def _rope_rows(x, positions, inv_freq, n_heads, head_dim):
    """HF Llama "rotate_half" RoPE on `x[n, H*hd]` in place: pair `(j, j + hd/2)` of each head turns by
    `float32(positions[i]) * inv_freq[j]` (the angle rounded to float32 like HF, then exact cos/sin)."""
    half = head_dim // 2
    for i in range(x.shape[0]):
        pos = np.float32(positions[i])
        for j in range(half):
            angle = pos * inv_freq[j]
            c = np.float32(math.cos(np.float64(angle)))
            s = np.float32(math.sin(np.float64(angle)))
            for h in range(n_heads):
                a = h * head_dim + j
                x1 = x[i, a]
                x2 = x[i, a + half]
                x[i, a] = x1 * c - x2 * s
                x[i, a + half] = x2 * c + x1 * s


@helper
def _causal(q, k, v, k_cache, v_cache, positions, inv_freq, n_heads, n_kv_heads, head_dim, scale, scratch, out):
    n = q.shape[0]
    n_kv, t_max, hd = k_cache.shape
    if (hd != head_dim or n_kv != n_kv_heads or n_heads % n_kv_heads != 0 or v_cache.shape[0] != n_kv
            or v_cache.shape[1] != t_max or v_cache.shape[2] != hd or q.shape[1] != n_heads * hd
            or k.shape[0] != n or v.shape[0] != n or k.shape[1] != n_kv * hd or v.shape[1] != n_kv * hd
            or out.shape[0] != n or out.shape[1] != n_heads * hd or positions.shape[0] != n
            or (inv_freq.shape[0] != 0 and (inv_freq.shape[0] * 2 != hd))):
        raise ValueError("causal_attention: shapes do not match (q, out[n, H*hd], k, v[n, Hkv*hd], "
                         "caches[Hkv, T, hd], positions[n], inv_freq[hd/2])")
    if n == 0:
        return
    pos0 = positions[0]
    for i in range(n):
        if positions[i] != pos0 + i:
            raise ValueError("causal_attention: positions of one call must be consecutive")
    if pos0 < 0 or pos0 + n > t_max or scratch.shape[0] < n_heads or scratch.shape[1] < pos0 + n:
        raise IndexError("causal_attention: positions fall outside the KV cache or the scratch buffer")
    if inv_freq.shape[0] != 0:
        _rope_rows(q, positions, inv_freq, n_heads, hd)
        _rope_rows(k, positions, inv_freq, n_kv, hd)
    for h in range(n_kv):
        for i in range(n):
            kr = k_cache[h, pos0 + i]
            vr = v_cache[h, pos0 + i]
            for d in range(hd):
                kr[d] = to_storage(k[i, h * hd + d], kr)
                vr[d] = to_storage(v[i, h * hd + d], vr)
    group = n_heads // n_kv
    s = np.float32(scale)
    for h in prange(n_heads):
        q0 = h * hd
        for i in range(n):
            _attend(q[i, q0:q0 + hd], k_cache[h // group], v_cache[h // group], pos0 + i + 1, s, scratch[h],
                    out[i, q0:q0 + hd])


@routine(fastmath=DOT_FLAGS)
def _attend(qh, kc, vc, length, scale, scores, oh):
    """One query row of one head against cache rows `0 .. length-1`: `oh[hd] = softmax(qh . k * scale) @ v`
    (a routine: its reductions stay vectorised, see `_jit.routine`)."""
    hd = qh.shape[0]
    for t in range(length):
        kt = kc[t]
        acc = np.float32(0.0)
        for d in range(hd):
            acc += qh[d] * as_f32(kt[d])
        scores[t] = acc * scale
    softmax_line(scores, scores, 0, length, 1, False)
    for d in range(hd):
        oh[d] = 0.0
    for t in range(length):
        p = scores[t]
        vt = vc[t]
        for d in range(hd):
            oh[d] += p * as_f32(vt[d])


_CAUSAL_ARGS = (arr(F32, 2), arr(F32, 2), arr(F32, 2, ro=True))
_CAUSAL_REST = (arr(I64, 1, ro=True), arr(F32, 1, ro=True), I64, I64, I64, F64, arr(F32, 2), arr(F32, 2))


@kernel("void", *_CAUSAL_ARGS, arr(F32, 3), arr(F32, 3), *_CAUSAL_REST, parallel=True, fastmath=DOT_FLAGS)
def causal_attention(q, k, v, k_cache, v_cache, positions, inv_freq, n_heads, n_kv_heads, head_dim, scale,
                     scratch, out):
    """Decoder self-attention for `n` new tokens at consecutive `positions`.

    `q, out[n, H*hd]`, `k, v[n, Hkv*hd]`; caches `[Hkv, T_max, hd]`; `inv_freq[hd/2]` (empty: no RoPE);
    `scratch[>= H, T_max]`. Rotates q and k in place, writes k, v into cache rows `positions`, then query i
    attends over cache rows `0 .. positions[i]`. Query head h reads kv head `h // (H // Hkv)`. Parallel over
    heads. `out` must not alias q.
    """
    _causal(q, k, v, k_cache, v_cache, positions, inv_freq, n_heads, n_kv_heads, head_dim, scale, scratch, out)


@kernel("void", *_CAUSAL_ARGS, arr(U16, 3), arr(U16, 3), *_CAUSAL_REST, parallel=True, fastmath=DOT_FLAGS)
def causal_attention_f16(q, k, v, k_cache, v_cache, positions, inv_freq, n_heads, n_kv_heads, head_dim, scale,
                         scratch, out):
    """`causal_attention` with a float16 KV cache (stored as uint16): keys and values are rounded to half
    precision when written (nearest even) and widened when read; the rest is float32."""
    _causal(q, k, v, k_cache, v_cache, positions, inv_freq, n_heads, n_kv_heads, head_dim, scale, scratch, out)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """RoPE inverse frequencies `[head_dim // 2]` as HF `modeling_rope_utils` computes them (float32).

    `scaling` is the HF `rope_scaling` dict or None; `rope_type` (or legacy `type`) "default", "linear"
    (`factor`) or "llama3" (`factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    Anything else raises ValueError (the compiler refuses such a model first, with a UserError).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(_F32) / _F32(head_dim)  # [hd/2]
    # torch computes `theta ** exponents` in float64, rounds to float32, then takes the reciprocal in float32.
    # Matching that to the bit matters: at position 30000 one ulp of inv_freq moves the angle by ~1e-3 rad.
    inv_freq = _F32(1.0) / (float(theta) ** exponents.astype(np.float64)).astype(_F32)  # [hd/2]
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    if rope_type == "linear":
        return (inv_freq / _F32(scaling["factor"])).astype(_F32)
    if rope_type == "llama3":
        factor = _F32(scaling["factor"])
        low_freq_factor = _F32(scaling["low_freq_factor"])
        high_freq_factor = _F32(scaling["high_freq_factor"])
        old_context_len = _F32(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = (_F32(2 * math.pi) / inv_freq).astype(_F32)  # [hd/2]
        # Long wavelengths are slowed down by `factor`, short ones kept; the band between is interpolated.
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(_F32)
        band = high_freq_factor - low_freq_factor
        smooth = ((old_context_len / wavelen - low_freq_factor) / band).astype(_F32)
        smoothed = ((_F32(1) - smooth) * scaled / factor + smooth * scaled).astype(_F32)
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(_F32)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported; expected default, linear or llama3")


#: RoPE scaling types the executor runs (the compiler refuses the others).
ROPE_TYPES = ("default", "linear", "llama3")


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """HF Llama "rotate_half" RoPE: pair `(j, j + hd/2)` of every head turns by `positions * inv_freq[j]`."""
    n = x.shape[0]
    half = head_dim // 2
    angle = positions.astype(_F32)[:, None] * inv_freq[None, :]  # [n] x [hd/2] -> [n, hd/2]
    cos = np.cos(angle.astype(np.float64)).astype(_F32)[:, None, :]  # [n, 1, hd/2]
    sin = np.sin(angle.astype(np.float64)).astype(_F32)[:, None, :]  # [n, 1, hd/2]
    xh = x.reshape(n, n_heads, head_dim)  # [n, H*hd] -> [n, H, hd]
    x1, x2 = xh[..., :half], xh[..., half:]  # [n, H, hd/2] each
    out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [n, H, hd]
    return out.reshape(n, n_heads * head_dim).astype(_F32)  # [n, H, hd] -> [n, H*hd]


def _masked_softmax(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the last axis restricted to `allowed`; a row with nothing allowed becomes all zeros."""
    scores = np.where(allowed, scores, -np.inf)  # [..., t]
    row_max = scores.max(axis=-1, keepdims=True)  # [..., 1]
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(scores.astype(np.float64) - row_max)  # [..., t]
    denom = e.sum(axis=-1, keepdims=True)  # [..., 1]
    return (e / np.where(denom > 0, denom, 1.0)).astype(_F32)


def causal_attention_twin(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                          positions: np.ndarray, *, n_heads: int, n_kv_heads: int, head_dim: int, scale: float,
                          rope: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out, new k_cache, new v_cache): RoPE on q, k; k, v written at `positions`; causal GQA attention. A float16
    cache (stored as uint16) holds k and v rounded to half precision."""
    half = k_cache.dtype == np.uint16
    if half:
        k_cache, v_cache = k_cache.view(np.float16).astype(_F32), v_cache.view(np.float16).astype(_F32)
    n = q.shape[0]
    pos0 = int(positions[0])
    if rope:
        inv = rope_inv_freq(head_dim, rope["theta"], rope.get("scaling"))
        q = apply_rope(q, positions, inv, n_heads, head_dim)
        k = apply_rope(k, positions, inv, n_kv_heads, head_dim)
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    if half:
        k, v = k.astype(np.float16).astype(_F32), v.astype(np.float16).astype(_F32)
    k_cache[:, pos0:pos0 + n] = k.reshape(n, n_kv_heads, head_dim).transpose(1, 0, 2)  # [n, Hkv*hd] -> [Hkv, n, hd]
    v_cache[:, pos0:pos0 + n] = v.reshape(n, n_kv_heads, head_dim).transpose(1, 0, 2)
    t = pos0 + n
    group = n_heads // n_kv_heads
    qh = q.reshape(n, n_heads, head_dim).transpose(1, 0, 2)  # [n, H*hd] -> [H, n, hd]
    kk = np.repeat(k_cache[:, :t], group, axis=0)  # [Hkv, T_max, hd] -> [H, t, hd]
    vv = np.repeat(v_cache[:, :t], group, axis=0)  # [Hkv, T_max, hd] -> [H, t, hd]
    scores = (qh @ kk.transpose(0, 2, 1)) * _F32(scale)  # [H, n, hd] @ [H, hd, t] -> [H, n, t]
    allowed = np.arange(t)[None, :] <= (pos0 + np.arange(n))[:, None]  # [n, t]
    out = _masked_softmax(scores, allowed) @ vv  # [H, n, t] @ [H, t, hd] -> [H, n, hd]
    out = out.transpose(1, 0, 2).reshape(n, n_heads * head_dim).astype(_F32)
    if half:
        k_cache, v_cache = k_cache.astype(np.float16).view(np.uint16), v_cache.astype(np.float16).view(np.uint16)
    return out, k_cache, v_cache


def _causal_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    q, k, vv, kc, vc, pos = s[:6]
    H, Hkv, hd = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    if H % Hkv or q[-1] != H * hd or k[-1] != Hkv * hd or vv[-1] != Hkv * hd:
        raise ShapeError(f"CausalAttention: q {list(q)}, k {list(k)}, v {list(vv)} do not match {H} heads / "
                         f"{Hkv} kv heads of {hd}")
    if len(kc) != 3 or tuple(kc) != tuple(vc) or kc[0] != Hkv or kc[2] != hd:
        raise ShapeError(f"CausalAttention: KV caches {list(kc)}, {list(vc)} are not [{Hkv}, T, {hd}]")
    if len(q) != 2 or k[0] != q[0] or vv[0] != q[0] or tuple(pos) != (q[0],):
        raise ShapeError("CausalAttention: q, k, v and positions differ in rows")
    return [((q[0], H * hd), "float32")]


def _causal_scratch(shapes: list, a: dict) -> list[int]:
    return [a["n_heads"] * shapes[3][1]]  # [H, T_max] scores


def _causal_bind(s: Site) -> Callable:
    q, k, v, kc, vc, pos = s.ins[:6]
    a = s.attrs
    rope = a["rope"]
    inv = rope_inv_freq(a["head_dim"], rope["theta"], rope.get("scaling")) if rope else np.zeros(0, _F32)
    scratch = s.scratch[0][:a["n_heads"] * kc.shape[1]].reshape(a["n_heads"], kc.shape[1])
    fn = (causal_attention_f16 if kc.dtype == np.uint16 else causal_attention).load()
    out = s.outs[0]
    H, Hkv, hd, scale = a["n_heads"], a["n_kv_heads"], a["head_dim"], float(a["scale"])
    return lambda: fn(q, k, v, kc, vc, pos, inv, H, Hkv, hd, scale, scratch, out)


def _causal_flops(ins: list, outs: list, a: dict) -> int:
    n, t = ins[0][0], ins[3][1]
    return 4 * a["n_heads"] * a["head_dim"] * n * min(t, 256)  # scores + weighted sum at a typical context


def _causal_sample(rng: np.random.Generator) -> list[Sample]:
    out = []
    for n, pos0, rope in ((1, 5, {"theta": 10000.0, "scaling": None}), (6, 0, None), (3, 4, {"theta": 1e4,
                          "scaling": {"rope_type": "linear", "factor": 2.0}})):
        H, Hkv, hd, T = 4, 2, 8, 16
        kc = rng.standard_normal((Hkv, T, hd)).astype(_F32)
        vc = rng.standard_normal((Hkv, T, hd)).astype(_F32)
        if n == 3:  # a float16 cache
            kc, vc = kc.astype(np.float16).view(np.uint16), vc.astype(np.float16).view(np.uint16)
        ins = [rng.standard_normal((n, H * hd)).astype(_F32), rng.standard_normal((n, Hkv * hd)).astype(_F32),
               rng.standard_normal((n, Hkv * hd)).astype(_F32), kc, vc, np.arange(pos0, pos0 + n, dtype=np.int64)]
        out.append(Sample(ins, {"n_heads": H, "n_kv_heads": Hkv, "head_dim": hd, "scale": hd ** -0.5, "rope": rope}))
    return out


register(OpDef(
    name="CausalAttention", shape=_causal_rule,
    twin=lambda ins, a, n: list(causal_attention_twin(*ins[:6], **a))[:1], bind=_causal_bind,
    warm=lambda spec: (causal_attention_f16 if spec.in_dtypes[3] == "uint16" else causal_attention).load(),
    kernels=(causal_attention, causal_attention_f16), sample=_causal_sample,
    attrs={"n_heads": None, "n_kv_heads": None, "head_dim": None, "scale": None, "rope": None},
    required=("n_heads", "n_kv_heads", "head_dim", "scale"),
    scratch=_causal_scratch, flops=_causal_flops,
    doc="edge-rt: RoPE (optional) + KV-cache write + causal GQA attention; inputs q, k, v, k_cache, v_cache, "
        "positions",
    domain="edge-rt",
))


# ---- bidirectional (encoder) -----------------------------------------------------------------------------------

@kernel("void", arr(F32, 2, ro=True), arr(F32, 2, ro=True), arr(F32, 2, ro=True), arr(I64, 2, ro=True), I64, I64,
        F64, arr(F32, 2), arr(F32, 2), parallel=True, fastmath=DOT_FLAGS)
def bidir_attention(q, k, v, mask, n_heads, head_dim, scale, scratch, out):
    """BERT encoder attention over the `B` sequences of `S` rows in `q, k, v, out[B*S, H*hd]`.

    `mask[B, S]`: 1 = token, 0 = padding; padded keys are skipped, padded query rows still get a finite result
    (as in HF); a sequence with no token gives zeros. `scratch[>= B*H, >= S]`. Parallel over (sequence, head).
    """
    batch, seq = mask.shape
    width = n_heads * head_dim
    rows = batch * seq
    if (q.shape[0] != rows or k.shape[0] != rows or v.shape[0] != rows or out.shape[0] != rows
            or q.shape[1] != width or k.shape[1] != width or v.shape[1] != width or out.shape[1] != width):
        raise ValueError("bidir_attention: shapes do not match (q, k, v, out[B*S, H*hd], mask[B, S])")
    if scratch.shape[0] < batch * n_heads or scratch.shape[1] < seq:
        raise ValueError("bidir_attention: scratch must be at least [B*H, S]")
    s = np.float32(scale)
    for bh in prange(batch * n_heads):
        b = bh // n_heads
        c0 = (bh % n_heads) * head_dim
        _attend_sequence(q, k, v, mask[b], b * seq, c0, head_dim, s, scratch[bh], out)


@routine(fastmath=DOT_FLAGS)
def _attend_sequence(q, k, v, mask, r0, c0, hd, scale, sc, out):
    """Every query row of one sequence (rows r0 ..) and one head (columns c0 ..) over the sequence's unmasked
    keys (a routine: its reductions stay vectorised, see `_jit.routine`)."""
    seq = mask.shape[0]
    any_token = False
    for t in range(seq):
        if mask[t] != 0:
            any_token = True
    for i in range(seq):
        oi = out[r0 + i]
        for d in range(hd):
            oi[c0 + d] = 0.0
        if not any_token:
            continue
        qi = q[r0 + i]
        for t in range(seq):
            if mask[t] != 0:
                kt = k[r0 + t]
                acc = np.float32(0.0)
                for d in range(hd):
                    acc += qi[c0 + d] * kt[c0 + d]
                sc[t] = acc * scale
            else:
                sc[t] = -np.inf
        softmax_line(sc, sc, 0, seq, 1, False)
        for t in range(seq):
            if mask[t] != 0:
                p = sc[t]
                vt = v[r0 + t]
                for d in range(hd):
                    oi[c0 + d] += p * vt[c0 + d]


def bidir_attention_twin(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, *, n_heads: int,
                         head_dim: int, scale: float) -> np.ndarray:
    """Every query of a sequence attends to that sequence's tokens with mask 1 (a sequence with none: zeros)."""
    batch, seq = mask.shape

    def heads(a: np.ndarray) -> np.ndarray:
        return a.reshape(batch, seq, n_heads, head_dim).transpose(0, 2, 1, 3)  # [B*S, H*hd] -> [B, H, S, hd]

    scores = (heads(q) @ heads(k).transpose(0, 1, 3, 2)) * _F32(scale)  # [B, H, S, hd] @ [B, H, hd, S] -> [B, H, S, S]
    allowed = (mask != 0)[:, None, None, :]  # [B, S] -> [B, 1, 1, S]
    out = _masked_softmax(scores, allowed) @ heads(v)  # [B, H, S, S] @ [B, H, S, hd] -> [B, H, S, hd]
    return out.transpose(0, 2, 1, 3).reshape(batch * seq, n_heads * head_dim).astype(_F32)  # -> [B*S, H*hd]


def _bidir_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    q, k, vv, mask = s[:4]
    width = a["n_heads"] * a["head_dim"]
    if len(mask) != 2 or tuple(q) != (mask[0] * mask[1], width) or tuple(k) != tuple(q) or tuple(vv) != tuple(q):
        raise ShapeError(f"BidirAttention: q {list(q)}, k {list(k)}, v {list(vv)} are not [B*S, {width}] for mask "
                         f"{list(mask)}")
    return [(tuple(q), "float32")]


def _bidir_bind(s: Site) -> Callable:
    q, k, v, mask = s.ins[:4]
    a = s.attrs
    batch, seq = mask.shape
    scratch = s.scratch[0][:batch * a["n_heads"] * seq].reshape(batch * a["n_heads"], seq)
    fn, out, H, hd, scale = bidir_attention.load(), s.outs[0], a["n_heads"], a["head_dim"], float(a["scale"])
    return lambda: fn(q, k, v, mask, H, hd, scale, scratch, out)


def _bidir_sample(rng: np.random.Generator) -> list[Sample]:
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.int64)
    ins: list[Any] = [rng.standard_normal((12, 16)).astype(_F32) for _ in range(3)] + [mask]
    return [Sample(ins, {"n_heads": 2, "head_dim": 8, "scale": 8 ** -0.5})]


register(OpDef(
    name="BidirAttention", shape=_bidir_rule,
    twin=lambda ins, a, n: [bidir_attention_twin(*ins[:4], **a)], bind=_bidir_bind,
    warm=lambda spec: bidir_attention.load(), kernels=(bidir_attention,), sample=_bidir_sample,
    attrs={"n_heads": None, "head_dim": None, "scale": None}, required=("n_heads", "head_dim", "scale"),
    scratch=lambda shapes, a: [shapes[0][0] * a["n_heads"]],  # [B*H, S] <= [T*H] scores
    flops=lambda i, o, a: 4 * i[0][0] * i[0][1] * min(i[3][1], 128),
    doc="edge-rt: BERT encoder attention with a padding mask; inputs q, k, v [B*S, H*hd], mask [B, S]",
    domain="edge-rt",
))
