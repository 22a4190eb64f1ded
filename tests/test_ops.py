"""The transformer ops' twins checked against textbook formulas, torch and HF transformers, and properties of
their kernels the registry's random cases do not cover (in-place aliasing, prefill = token-by-token decode,
out-of-range ids, large offsets). Kernel-vs-twin agreement on random inputs is `test_registry.py`'s job.

Comparisons go through `assert_close`, which applies a per-op tolerance and on failure names the worst
element (index, both values, absolute error).
"""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest

from edge_rt_exec import ops
from edge_rt_exec.ops import attention as A
from edge_rt_exec.ops import norm as N
from edge_rt_exec.ops import reduce as RD
from edge_rt_exec.ops.elementwise import gelu, silu_mul_twin
from edge_rt_exec.ops.registry import Site, with_defaults

TOL: dict[str, tuple[float, float]] = {  # (rtol, atol): |got - want| <= atol + rtol |want|
    "norm": (1e-5, 1e-5),
    "gelu": (1e-6, 1e-7),
    "silu_mul": (1e-6, 1e-7),
    "softmax": (1e-5, 1e-8),
    "rope": (1e-6, 1e-6),
    "attention": (1e-4, 2e-6),  # scores, exp, weighted sum of up to a few hundred rows
    "mean_pool_l2": (1e-5, 1e-7),
    "vs_torch": (1e-5, 1e-5),  # twin vs torch / HF on the same float32 inputs
}


def assert_close(got: np.ndarray, want: np.ndarray, op: str, tol: tuple[float, float] | None = None) -> None:
    """Fail with the worst element (index, got, want, abs err) when any element is outside `TOL[op]`."""
    rtol, atol = TOL[op] if tol is None else tol
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{op}: shape {got.shape} != expected {want.shape}"
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = atol + rtol * np.abs(want.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err <= bound, 0.0, np.where(bound > 0, err / bound, np.inf))
    ratio = np.where(np.isnan(err), np.inf, ratio)
    if got.size and ratio.max() > 0:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        pytest.fail(f"{op}: {int((ratio > 0).sum())} of {got.size} elements out of tolerance (rtol {rtol}, atol "
                    f"{atol}); worst at {tuple(int(i) for i in idx)}: got {got[idx]!r}, want {want[idx]!r}, abs err "
                    f"{err[idx]:.3g} (bound {bound[idx]:.3g})")


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def run(op: str, ins: list, attrs: dict, outs: list | None = None, scratch: list | None = None) -> list:
    """Bind and call one op the way the engine does; `outs` may alias inputs."""
    d = ops.get(op)
    a = with_defaults(d, attrs)
    shapes = [None if x is None else tuple(x.shape) for x in ins]
    if outs is None:
        specs = d.shape(shapes, [None if x is None else x.dtype.name for x in ins], {}, a, 1)
        outs = [np.full(sh, np.nan, np.dtype(dt)) for sh, dt in specs]
    if scratch is None:
        scratch = [np.full(k, np.nan, np.float32) for k in (d.scratch(shapes, a) if d.scratch else [])]
    d.bind(Site(op, list(ins), outs, a, [None] * len(ins), shapes, {}, scratch))()
    return outs


# ---- norms -------------------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 1), (1, 576), (3, 7), (16, 384), (128, 320)]  # the last one takes the parallel path


@pytest.mark.parametrize("n,d", NORM_SHAPES)
def test_norms_in_place(n: int, d: int) -> None:
    rng = np.random.default_rng([n, d])
    x = randn(rng, n, d, scale=3.0) + np.float32(1.5)
    w, b = randn(rng, d), randn(rng, d)
    want = N.layer_norm(x, w, b, -1, 1e-12)[0]
    y = x.copy()
    run("LayerNormalization", [y, w, b], {"epsilon": 1e-12}, outs=[y])  # out aliases x
    assert_close(y, want, "norm")
    want = N.rms_norm(x, w, -1, 1e-5)
    y = x.copy()
    run("RMSNormalization", [y, w], {"epsilon": 1e-5}, outs=[y])
    assert_close(y, want, "norm")


def test_norm_twins_match_textbook_formulas() -> None:
    rng = np.random.default_rng(3)
    x, w, b = randn(rng, 5, 33), randn(rng, 33), randn(rng, 33)
    x64 = x.astype(np.float64)
    ln = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * w + b
    assert_close(N.layer_norm(x, w, b, -1, 1e-5)[0], ln, "norm")
    rms = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * w
    assert_close(N.rms_norm(x, w, -1, 1e-6), rms, "norm")


# ---- element-wise ------------------------------------------------------------------------------------------

def test_elementwise_twins_match_definitions() -> None:
    # Exact GELU at known points: x * Phi(x), Phi(1) = 0.8413447460685429.
    x = np.array([[-3.0, -1.0, 0.0, 1.0, 2.5]], np.float32)
    phi = np.array([0.5 * math.erfc(-float(v) / math.sqrt(2.0)) for v in x[0]])
    assert_close(gelu(x)[0], x[0] * phi, "gelu")
    assert abs(float(gelu(np.array([[1.0]], np.float32))[0, 0]) - 0.8413447460685429) < 1e-7
    # The tanh form approximates the exact one to within 5e-4 on O(1) inputs.
    grid = np.linspace(-6, 6, 1001, dtype=np.float32)[None, :]
    assert np.abs(gelu(grid, "tanh") - gelu(grid)).max() < 5e-4
    # silu(g) = g * sigmoid(g).
    g = np.array([[-20.0, -1.0, 0.0, 0.5, 30.0]], np.float32)
    sig = np.array([1.0 / (1.0 + math.exp(-float(v))) for v in g[0]])
    assert_close(silu_mul_twin(g, np.ones_like(g))[0], g[0] * sig, "silu_mul")


@pytest.mark.parametrize("alias", ["gate", "up"])
def test_silu_mul_in_place(alias: str) -> None:
    rng = np.random.default_rng(2)
    gate, up = randn(rng, 64, 1536, scale=5.0), randn(rng, 64, 1536)
    want = silu_mul_twin(gate, up)
    g, u = gate.copy(), up.copy()
    run("SiluMul", [g, u], {}, outs=[g if alias == "gate" else u])
    assert_close(g if alias == "gate" else u, want, "silu_mul")


# ---- softmax -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(1, 1), (1, 49152), (4, 9), (64, 1000)])
def test_softmax_large_offset_in_place(n: int, m: int) -> None:
    rng = np.random.default_rng([n, m])
    x = randn(rng, n, m, scale=8.0) + np.float32(100.0)  # large offset: needs the max subtraction
    want = ops.run_twin("Softmax", [x], {})[0]
    run("Softmax", [x], {}, outs=[x])
    assert_close(x, want, "softmax")
    assert_close(want.sum(-1), np.ones(n), "softmax")
    assert_close(ops.run_twin("Softmax", [x - np.float32(50.0)], {})[0], ops.run_twin("Softmax", [x], {})[0],
                 "softmax")


# ---- rope --------------------------------------------------------------------------------------------------

def test_rope_twin_is_complex_rotation() -> None:
    rng = np.random.default_rng(5)
    n, n_heads, head_dim = 4, 2, 8
    half = head_dim // 2
    x = randn(rng, n, n_heads * head_dim)
    positions = np.array([0, 1, 17, 300], np.int64)
    inv_freq = A.rope_inv_freq(head_dim, 10000.0)
    got = A.apply_rope(x, positions, inv_freq, n_heads, head_dim).reshape(n, n_heads, head_dim)
    xh = x.reshape(n, n_heads, head_dim)
    for i in range(n):
        for h in range(n_heads):
            for j in range(half):
                angle = float(np.float32(positions[i]) * inv_freq[j])
                z = complex(xh[i, h, j], xh[i, h, j + half]) * cmath.exp(1j * angle)
                assert abs(got[i, h, j] - z.real) < 1e-5 and abs(got[i, h, j + half] - z.imag) < 1e-5


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def test_rope_inv_freq_formulas() -> None:
    hd, theta = 64, 500000.0
    default = np.array([theta ** (-(2 * j) / hd) for j in range(hd // 2)])
    assert_close(A.rope_inv_freq(hd, theta), default, "rope")
    assert_close(A.rope_inv_freq(hd, theta, {"rope_type": "default"}), default, "rope")
    assert_close(A.rope_inv_freq(hd, theta, {"type": "linear", "factor": 4.0}), default / 4.0, "rope")
    # llama3, written the way Meta's reference `apply_scaling` loops over the frequencies.
    s = LLAMA3_SCALING
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    want = []
    for freq in default:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            want.append(freq)
        elif wavelen > low_wavelen:
            want.append(freq / s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            want.append((1 - smooth) * freq / s["factor"] + smooth * freq)
    got = A.rope_inv_freq(hd, theta, s)
    assert_close(got, np.array(want), "rope")
    assert got.dtype == np.float32 and (got < default.astype(np.float32) * 1.0001).all()
    with pytest.raises(ValueError, match="not supported"):
        A.rope_inv_freq(hd, theta, {"rope_type": "yarn", "factor": 2.0})


# ---- causal attention --------------------------------------------------------------------------------------

# (n, pos0, n_heads, n_kv_heads, head_dim): GQA ratios 1, 3 and 4; prefill, decode, chunked prefill.
CAUSAL_CASES = [(1, 0, 1, 1, 4), (1, 37, 9, 3, 64), (6, 0, 3, 3, 8), (5, 11, 8, 2, 16), (17, 0, 9, 3, 64),
                (64, 3, 4, 1, 32)]


def _attrs(n_heads: int, n_kv: int, hd: int, scale: float, rope: dict | None = None) -> dict:
    return {"n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": hd, "scale": scale, "rope": rope}


@pytest.mark.parametrize("n,pos0,n_heads,n_kv_heads,head_dim", CAUSAL_CASES)
@pytest.mark.parametrize("rope", [None, {"theta": 10000.0, "scaling": LLAMA3_SCALING}])
def test_causal_attention(n: int, pos0: int, n_heads: int, n_kv_heads: int, head_dim: int, rope: dict | None) -> None:
    rng = np.random.default_rng([n, pos0, n_heads, n_kv_heads, head_dim])
    t_max = pos0 + n + 3
    q, k, v = randn(rng, n, n_heads * head_dim), randn(rng, n, n_kv_heads * head_dim), randn(rng, n,
                                                                                              n_kv_heads * head_dim)
    kc, vc = randn(rng, n_kv_heads, t_max, head_dim), randn(rng, n_kv_heads, t_max, head_dim)
    positions = np.arange(pos0, pos0 + n, dtype=np.int64)
    a = _attrs(n_heads, n_kv_heads, head_dim, 1.0 / math.sqrt(head_dim), rope)
    want, want_k, want_v = A.causal_attention_twin(q, k, v, kc, vc, positions, **a)
    kc2, vc2 = kc.copy(), vc.copy()
    (out,) = run("CausalAttention", [q.copy(), k.copy(), v, kc2, vc2, positions], a)
    assert_close(out, want, "attention")
    assert_close(kc2, want_k, "rope")
    assert_close(vc2, want_v, "rope", (0.0, 0.0))


def _naive_attention_row(qv: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """Softmax(q . k * scale) @ V for one query row, in float64, one key at a time."""
    scores = [float(np.dot(qv.astype(np.float64), kk.astype(np.float64))) * scale for kk in keys]
    mx = max(scores)
    e = [math.exp(s - mx) for s in scores]
    return sum(ei / sum(e) * vv.astype(np.float64) for ei, vv in zip(e, values, strict=True))


def test_causal_twin_is_naive_masked_softmax() -> None:
    rng = np.random.default_rng(7)
    n, pos0, n_heads, n_kv, hd = 4, 3, 6, 2, 8
    t_max = pos0 + n + 2
    q, k, v = randn(rng, n, n_heads * hd), randn(rng, n, n_kv * hd), randn(rng, n, n_kv * hd)
    kc, vc = randn(rng, n_kv, t_max, hd), randn(rng, n_kv, t_max, hd)
    got, kc2, vc2 = A.causal_attention_twin(q, k, v, kc, vc, np.arange(pos0, pos0 + n), **_attrs(n_heads, n_kv, hd,
                                                                                                   0.3))
    for i in range(n):
        for h in range(n_heads):
            kvh = h // (n_heads // n_kv)
            length = pos0 + i + 1
            c = slice(h * hd, (h + 1) * hd)
            want = _naive_attention_row(q[i, c], kc2[kvh, :length], vc2[kvh, :length], 0.3)
            assert_close(got[i, c], want, "attention")


def test_causal_prefill_equals_token_by_token_decode() -> None:
    rng = np.random.default_rng(8)
    n, n_heads, n_kv, hd = 9, 4, 2, 16
    q, k, v = randn(rng, n, n_heads * hd), randn(rng, n, n_kv * hd), randn(rng, n, n_kv * hd)
    a = _attrs(n_heads, n_kv, hd, 0.25, {"theta": 10000.0, "scaling": None})
    kc, vc = np.zeros((n_kv, 16, hd), np.float32), np.zeros((n_kv, 16, hd), np.float32)
    (prefill,) = run("CausalAttention", [q.copy(), k.copy(), v, kc, vc, np.arange(n, dtype=np.int64)], a)
    kc[:], vc[:] = 0.0, 0.0
    for i in range(n):
        (step,) = run("CausalAttention", [q[i:i + 1].copy(), k[i:i + 1].copy(), v[i:i + 1], kc, vc,
                                          np.array([i], np.int64)], a)
        assert_close(step[0], prefill[i], "attention")


def test_causal_attention_rejects_bad_positions() -> None:
    a = _attrs(1, 1, 8, 1.0)
    q, cache = np.ones((2, 8), np.float32), np.ones((1, 4, 8), np.float32)
    with pytest.raises(IndexError):  # positions 3, 4 overflow a 4-row cache
        run("CausalAttention", [q.copy(), q.copy(), q, cache, cache, np.array([3, 4])], a)
    with pytest.raises(ValueError):  # not consecutive
        run("CausalAttention", [q.copy(), q.copy(), q, cache, cache, np.array([0, 2])], a)


# ---- bidirectional attention and pooling -------------------------------------------------------------------

BIDIR_CASES = [([1], 1, 1, 4), ([5], 5, 2, 8), ([7, 3, 1], 7, 3, 16), ([12, 12, 4, 9], 12, 12, 32), ([6, 0], 6, 2, 8)]


def _bidir_inputs(rng: np.random.Generator, lengths: list[int], seq: int, n_heads: int, head_dim: int):
    batch = len(lengths)
    q, k, v = (randn(rng, batch * seq, n_heads * head_dim) for _ in range(3))
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return q, k, v, mask


@pytest.mark.parametrize("lengths,seq,n_heads,head_dim", BIDIR_CASES)
def test_bidir_attention(lengths: list[int], seq: int, n_heads: int, head_dim: int) -> None:
    rng = np.random.default_rng([len(lengths), seq, n_heads, head_dim])
    q, k, v, mask = _bidir_inputs(rng, lengths, seq, n_heads, head_dim)
    a = {"n_heads": n_heads, "head_dim": head_dim, "scale": 1.0 / math.sqrt(head_dim)}
    (out,) = run("BidirAttention", [q, k, v, mask], a)
    assert np.isfinite(out).all()
    assert_close(out, A.bidir_attention_twin(q, k, v, mask, **a), "attention")


def test_bidir_twin_is_naive_masked_softmax() -> None:
    rng = np.random.default_rng(9)
    lengths, seq, n_heads, hd = [4, 2], 4, 2, 8
    q, k, v, mask = _bidir_inputs(rng, lengths, seq, n_heads, hd)
    got = A.bidir_attention_twin(q, k, v, mask, n_heads=n_heads, head_dim=hd, scale=0.5)
    for b, length in enumerate(lengths):
        for i in range(seq):  # padded query rows too: they attend to the sequence's real tokens
            row = b * seq + i
            for h in range(n_heads):
                c = slice(h * hd, (h + 1) * hd)
                keys, values = k[b * seq:b * seq + length, c], v[b * seq:b * seq + length, c]
                assert_close(got[row, c], _naive_attention_row(q[row, c], keys, values, 0.5), "attention")


@pytest.mark.parametrize("lengths,seq,d", [([1], 1, 1), ([3], 5, 384), ([7, 2, 5], 7, 16), ([4, 0], 4, 8)])
def test_mean_pool_l2(lengths: list[int], seq: int, d: int) -> None:
    rng = np.random.default_rng([len(lengths), seq, d])
    x = randn(rng, len(lengths) * seq, d)
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    (out,) = run("MeanPoolL2", [x, mask], {})
    want = RD.mean_pool_l2_twin(x, mask)
    assert_close(out, want, "mean_pool_l2")
    for b, length in enumerate(lengths):  # independent check: mean of the real rows, unit length
        if length == 0:
            assert (want[b] == 0).all()
            continue
        mean = x[b * seq:b * seq + length].astype(np.float64).mean(0)
        assert_close(want[b], mean / np.linalg.norm(mean), "mean_pool_l2")


@pytest.mark.parametrize("bad", [-51, 50])
def test_gather_rejects_out_of_range_ids(bad: int) -> None:
    table = np.ones((50, 4), np.float32)
    with pytest.raises(IndexError):
        run("Gather", [table, np.array([0, bad], np.int64)], {})
    with pytest.raises(IndexError):
        ops.run_twin("Gather", [table, np.array([0, bad], np.int64)], {})


# ---- twins vs torch / HF -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


def test_twins_match_torch_ops(torch_mod) -> None:
    torch, F = torch_mod, torch_mod.nn.functional
    rng = np.random.default_rng(11)
    x, w, b = randn(rng, 6, 96, scale=3.0), randn(rng, 96), randn(rng, 96)
    tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
    assert_close(N.layer_norm(x, w, b, -1, 1e-12)[0], F.layer_norm(tx, (96,), tw, tb, 1e-12).numpy(), "vs_torch")
    assert_close(gelu(x), F.gelu(tx).numpy(), "vs_torch")
    assert_close(gelu(x, "tanh"), F.gelu(tx, approximate="tanh").numpy(), "vs_torch")
    up = randn(rng, 6, 96)
    assert_close(silu_mul_twin(x, up), (F.silu(tx) * torch.from_numpy(up)).numpy(), "vs_torch")
    assert_close(ops.run_twin("Softmax", [x], {})[0], torch.softmax(tx, -1).numpy(), "vs_torch")


def test_causal_twin_matches_torch_attention(torch_mod) -> None:
    torch, F = torch_mod, torch_mod.nn.functional
    rng = np.random.default_rng(12)
    n, pos0, n_heads, n_kv, hd = 5, 7, 6, 2, 16
    t = pos0 + n
    q, k, v = randn(rng, n, n_heads * hd), randn(rng, n, n_kv * hd), randn(rng, n, n_kv * hd)
    kc, vc = randn(rng, n_kv, t + 2, hd), randn(rng, n_kv, t + 2, hd)
    got, kc2, vc2 = A.causal_attention_twin(q, k, v, kc, vc, np.arange(pos0, t), **_attrs(n_heads, n_kv, hd, 0.25))
    tq = torch.from_numpy(q).view(n, n_heads, hd).transpose(0, 1)[None]  # [1, H, n, hd]
    tk = torch.from_numpy(kc2[:, :t]).repeat_interleave(n_heads // n_kv, 0)[None]  # [1, H, t, hd]
    tv = torch.from_numpy(vc2[:, :t]).repeat_interleave(n_heads // n_kv, 0)[None]
    allowed = torch.arange(t)[None, :] <= (pos0 + torch.arange(n))[:, None]
    want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=allowed, scale=0.25)  # [1, H, n, hd]
    assert_close(got, want[0].transpose(0, 1).reshape(n, -1).numpy(), "attention")


def test_twins_match_hf_llama_rope_and_rmsnorm(torch_mod) -> None:
    torch = torch_mod
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as hf_llama

    n_heads, hd, theta = 3, 64, 500000.0
    rng = np.random.default_rng(13)
    for scaling in (None, {"rope_type": "linear", "factor": 4.0}, LLAMA3_SCALING):
        cfg = LlamaConfig(hidden_size=n_heads * hd, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                          head_dim=hd, rope_theta=theta, rope_scaling=dict(scaling) if scaling else None,
                          max_position_embeddings=131072)
        rotary = hf_llama.LlamaRotaryEmbedding(cfg)
        inv_freq = A.rope_inv_freq(hd, theta, scaling)
        assert_close(inv_freq, rotary.inv_freq.numpy(), "rope", (0.0, 0.0))  # bit-exact: see rope_inv_freq
        positions = np.array([0, 1, 2, 1000, 8191, 30000], np.int64)
        x = randn(rng, len(positions), n_heads * hd)
        tx = torch.from_numpy(x).view(1, len(positions), n_heads, hd).transpose(1, 2)  # [1, H, n, hd]
        cos, sin = rotary(tx, torch.from_numpy(positions)[None])
        want, _ = hf_llama.apply_rotary_pos_emb(tx, tx, cos, sin)
        want = want.transpose(1, 2).reshape(len(positions), -1).numpy()
        assert_close(A.apply_rope(x, positions, inv_freq, n_heads, hd), want, "rope", (1e-5, 1e-5))
    x, w = randn(rng, 4, 576, scale=2.0), randn(rng, 576)
    norm = hf_llama.LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
        want = norm(torch.from_numpy(x)).numpy()
    assert_close(N.rms_norm(x, w, -1, 1e-5), want, "vs_torch")
