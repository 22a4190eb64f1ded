"""Plain-numpy twins of the numba kernels: the *definition* of every op the executor runs.

Each function here is pure (returns new arrays, never writes its inputs) and mirrors the kernel of the same
name in `kernels.py` with the kernel's `out` / `scratch` arguments dropped; `kv_write` returns the updated
caches and `rope` is the twin of `rope_inplace`. Tests compare every kernel with its twin; the engine's
validate mode runs both. Arrays are float32 in and out; token ids and positions are int64; masks are int64
(1 = token, 0 = padding). Numerics follow torch float32 as HF transformers computes each op.
"""

from __future__ import annotations

import math

import numpy as np

_F32 = np.float32


def linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """`x @ w.T + bias`; `w` is stored `[out, in]`; `bias` None or zero-length means no bias."""
    y = x @ w.T  # [n, k] @ [k, m] -> [n, m]
    if bias is not None and bias.shape[0] > 0:
        y = y + bias  # [n, m] + [m] -> [n, m]
    return y.astype(_F32, copy=False)


def embedding_gather(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Rows `table[ids]`; every id must lie in `[0, V)` (negative ids do not wrap)."""
    _check_ids(ids, table.shape[0])
    return table[ids].astype(_F32)  # [n] -> [n, d]


def embedding_add(ids: np.ndarray, table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`x + table[ids]`: learned position / token-type embeddings added to the token embeddings."""
    _check_ids(ids, table.shape[0])
    return (x + table[ids]).astype(_F32)  # [n, d] + [n, d] -> [n, d]


def _check_ids(ids: np.ndarray, vocab: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise IndexError(f"embedding id out of range [0, {vocab}): min {ids.min()}, max {ids.max()}")


def layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """torch.nn.LayerNorm over the last axis: biased variance, `(x - mean) * rsqrt(var + eps) * w + b`."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True).astype(_F32)  # [n, d] -> [n, 1]
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)  # [n, d] -> [n, 1]
    rstd = (1.0 / np.sqrt(var + eps)).astype(_F32)  # [n, 1]
    return ((x - mean) * rstd * weight + bias).astype(_F32)  # [n, d] -> [n, d]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """LlamaRMSNorm: `weight * (x * rsqrt(mean(x**2) + eps))`, in float32 like HF."""
    ms = (x.astype(np.float64) ** 2).mean(axis=-1, keepdims=True)  # [n, d] -> [n, 1]
    rstd = (1.0 / np.sqrt(ms.astype(_F32) + _F32(eps))).astype(_F32)  # [n, 1]
    return (weight * (x * rstd)).astype(_F32)  # [n, d] -> [n, d]


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`."""
    x64 = x.astype(np.float64)
    inner = math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)
    return (0.5 * x64 * (1.0 + np.tanh(inner))).astype(_F32)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact GELU (torch's default): `x * 0.5 * (1 + erf(x / sqrt(2)))`."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    x64 = x.astype(np.float64)
    return (x64 * 0.5 * (1.0 + erf(x64 / math.sqrt(2.0)))).astype(_F32)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Llama MLP gating: `silu(gate) * up`, `silu(g) = g * sigmoid(g)`."""
    g64 = gate.astype(np.float64)
    silu = (g64 / (1.0 + np.exp(-g64))).astype(_F32)
    return (silu * up).astype(_F32)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Residual add."""
    return (a + b).astype(_F32)


def softmax_rows(x: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # [..., m]
    return (e / e.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(_F32)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """RoPE inverse frequencies `[head_dim // 2]` as HF `modeling_rope_utils` computes them (float32).

    `scaling` is the HF `rope_scaling` dict or None. Supported `rope_type` (or legacy `type`): "default",
    "linear" (`factor`) and "llama3" (`factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`). Anything else raises ValueError; the compiler's validate pass is
    expected to reject such a model earlier with a UserError.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(_F32) / _F32(head_dim)  # [hd/2]
    # torch computes `theta ** exponents` in float64, rounds to float32, then takes the reciprocal in float32.
    # Matching that to the bit matters: at position 30000 one ulp of inv_freq moves the angle by ~1e-3 rad.
    inv_freq = _F32(1.0) / (float(theta) ** exponents.astype(np.float64)).astype(_F32)  # [hd/2]
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
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


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """HF Llama "rotate_half" RoPE: pair `(j, j + hd/2)` of every head turns by `positions * inv_freq[j]`.

    The angle is rounded to float32 before cos/sin, as HF computes `inv_freq @ position_ids` in float32.
    """
    n = x.shape[0]
    half = head_dim // 2
    angle = positions.astype(_F32)[:, None] * inv_freq[None, :]  # [n] x [hd/2] -> [n, hd/2]
    cos = np.cos(angle.astype(np.float64)).astype(_F32)[:, None, :]  # [n, 1, hd/2]
    sin = np.sin(angle.astype(np.float64)).astype(_F32)[:, None, :]  # [n, 1, hd/2]
    xh = x.reshape(n, n_heads, head_dim)  # [n, H*hd] -> [n, H, hd]
    x1, x2 = xh[..., :half], xh[..., half:]  # [n, H, hd/2] each
    out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [n, H, hd]
    return out.reshape(n, n_heads * head_dim).astype(_F32)  # [n, H, hd] -> [n, H*hd]


def kv_write(
    k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int
) -> tuple[np.ndarray, np.ndarray]:
    """Caches with rows `pos0 .. pos0+n-1` replaced by the new keys and values (copies; inputs untouched)."""
    n_kv_heads, t_max, head_dim = k_cache.shape
    n = k.shape[0]
    if pos0 < 0 or pos0 + n > t_max:
        raise IndexError(f"kv_write of {n} rows at position {pos0} overflows a cache of {t_max} positions")
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    k_new = k.reshape(n, n_kv_heads, head_dim).transpose(1, 0, 2)  # [n, Hkv*hd] -> [Hkv, n, hd]
    v_new = v.reshape(n, n_kv_heads, head_dim).transpose(1, 0, 2)  # [n, Hkv*hd] -> [Hkv, n, hd]
    k_cache[:, pos0 : pos0 + n] = k_new
    v_cache[:, pos0 : pos0 + n] = v_new
    return k_cache, v_cache


def _masked_softmax(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Softmax over the last axis restricted to `allowed`; a row with nothing allowed becomes all zeros."""
    scores = np.where(allowed, scores, -np.inf)  # [..., t]
    row_max = scores.max(axis=-1, keepdims=True)  # [..., 1]
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(scores - row_max)  # [..., t]
    denom = e.sum(axis=-1, keepdims=True, dtype=np.float64)  # [..., 1]
    return (e / np.where(denom > 0, denom, 1.0)).astype(_F32)


def attention_causal(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    pos0: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    scale: float,
) -> np.ndarray:
    """Causal GQA attention of `n` new queries at positions `pos0 ..` over cache positions `0 .. pos0+i`."""
    n = q.shape[0]
    t = pos0 + n
    group = n_heads // n_kv_heads
    qh = q.reshape(n, n_heads, head_dim).transpose(1, 0, 2)  # [n, H*hd] -> [H, n, hd]
    k = np.repeat(k_cache[:, :t], group, axis=0)  # [Hkv, T_max, hd] -> [H, t, hd]
    v = np.repeat(v_cache[:, :t], group, axis=0)  # [Hkv, T_max, hd] -> [H, t, hd]
    scores = (qh @ k.transpose(0, 2, 1)) * _F32(scale)  # [H, n, hd] @ [H, hd, t] -> [H, n, t]
    allowed = np.arange(t)[None, :] <= (pos0 + np.arange(n))[:, None]  # [n, t]
    out = _masked_softmax(scores, allowed) @ v  # [H, n, t] @ [H, t, hd] -> [H, n, hd]
    return out.transpose(1, 0, 2).reshape(n, n_heads * head_dim).astype(_F32)  # [H, n, hd] -> [n, H*hd]


def attention_bidir(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray,
    batch: int,
    seq: int,
    n_heads: int,
    head_dim: int,
    scale: float,
) -> np.ndarray:
    """BERT encoder attention: every query of a sequence attends to that sequence's tokens with mask 1.

    `mask` is int64 `[B, S]`, 1 = token, 0 = padding. Padded query rows attend like any other row (as in HF);
    a sequence with no token at all gives zeros.
    """

    def heads(a: np.ndarray) -> np.ndarray:
        return a.reshape(batch, seq, n_heads, head_dim).transpose(0, 2, 1, 3)  # [B*S, H*hd] -> [B, H, S, hd]

    kt = heads(k).transpose(0, 1, 3, 2)  # [B*S, H*hd] -> [B, H, hd, S]
    scores = (heads(q) @ kt) * _F32(scale)  # [B, H, S, hd] @ [B, H, hd, S] -> [B, H, S, S]
    allowed = (mask != 0)[:, None, None, :]  # [B, S] -> [B, 1, 1, S]
    out = _masked_softmax(scores, allowed) @ heads(v)  # [B, H, S, S] @ [B, H, S, hd] -> [B, H, S, hd]
    return out.transpose(0, 2, 1, 3).reshape(batch * seq, n_heads * head_dim).astype(_F32)  # -> [B*S, H*hd]


def mean_pool_l2(x: np.ndarray, mask: np.ndarray, batch: int, seq: int) -> np.ndarray:
    """sentence-transformers mean pooling over tokens with mask 1, then `x / max(||x||, 1e-12)`."""
    xs = x.reshape(batch, seq, -1).astype(np.float64)  # [B*S, d] -> [B, S, d]
    m = (mask != 0).astype(np.float64)[:, :, None]  # [B, S] -> [B, S, 1]
    pooled = (xs * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)  # [B, S, d] -> [B, d]
    pooled = pooled.astype(_F32).astype(np.float64)
    norm = np.sqrt((pooled**2).sum(axis=-1, keepdims=True))  # [B, d] -> [B, 1]
    return (pooled / np.maximum(norm, 1e-12)).astype(_F32)


def argmax(x: np.ndarray) -> int:
    """Index of the first maximum (greedy decoding)."""
    return int(np.argmax(x))
