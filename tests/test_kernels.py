"""Numba kernels vs their numpy twins (`edge_rt_exec.reference`), plus independent checks of the twins.

Every comparison goes through `assert_close`, which applies the per-op tolerance in `TOL` and on failure names
the worst element (index, both values, absolute error). Inputs are seeded. Checks against torch / HF
transformers run only where those dev packages are installed.
"""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_rt_exec import kernels as K
from edge_rt_exec import reference as R

# (rtol, atol) per op: |got - want| <= atol + rtol * |want| element-wise. Inputs are O(1) (standard normal),
# so atol is in units of the outputs' scale. Observed worst errors are 3-10x below these bounds.
TOL: dict[str, tuple[float, float]] = {
    "linear": (1e-5, 1e-4),  # float32 dot products of length <= ~1600, different summation order
    "embedding": (0.0, 0.0),  # copies / a single float32 add: bit-exact
    "layernorm": (1e-5, 1e-5),
    "rmsnorm": (1e-5, 1e-5),
    "gelu_tanh": (1e-6, 1e-7),  # float64 inside, one rounding: within an ulp
    "gelu_erf": (1e-6, 1e-7),
    "silu_mul": (1e-6, 1e-7),
    "add": (0.0, 0.0),
    "softmax": (1e-5, 1e-8),
    "rope": (1e-6, 1e-6),
    "kv_write": (0.0, 0.0),
    "attention": (1e-4, 2e-6),  # scores, exp, weighted sum of up to a few hundred rows
    "mean_pool_l2": (1e-5, 1e-7),
    "vs_torch": (1e-5, 1e-5),  # reference twin vs torch / HF on the same float32 inputs
}


def assert_close(got: np.ndarray, want: np.ndarray, op: str, tol: tuple[float, float] | None = None) -> None:
    """Fail with the worst element (index, got, want, abs err) when any element is outside `TOL[op]`."""
    rtol, atol = TOL[op] if tol is None else tol
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{op}: shape {got.shape} != expected {want.shape}"
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = atol + rtol * np.abs(want.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err <= bound, 0.0, np.where(bound > 0, err / bound, np.inf))
    ratio = np.where(np.isnan(err), np.inf, ratio)
    if got.size and ratio.max() > 0:
        idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        n_bad = int((ratio > 0).sum())
        pytest.fail(
            f"{op}: {n_bad} of {got.size} elements out of tolerance (rtol {rtol}, atol {atol}); worst at "
            f"index {tuple(int(i) for i in idx)}: got {got[idx]!r}, want {want[idx]!r}, "
            f"abs err {err[idx]:.3g} (bound {bound[idx]:.3g})"
        )


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view, like a weight mmap'd from the weights file."""
    v = a.view()
    v.flags.writeable = False
    return v


NO_BIAS = np.zeros(0, np.float32)

# ------------------------------------------------------------------------------------------------ linear

LINEAR_SHAPES = [  # (n, k, m)
    (1, 1, 1),
    (1, 7, 5),
    (1, 576, 1536),
    (1, 1536, 577),
    (2, 33, 17),
    (3, 64, 3),
    (4, 64, 16),
    (5, 17, 33),  # one 4-token tile + one leftover token; odd row count
    (9, 100, 37),
    (64, 96, 50),
]


@pytest.mark.parametrize("n,k,m", LINEAR_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_reference(n: int, k: int, m: int, with_bias: bool) -> None:
    rng = np.random.default_rng([n, k, m, with_bias])
    x, w = randn(rng, n, k), readonly(randn(rng, m, k))
    bias = readonly(randn(rng, m)) if with_bias else NO_BIAS
    out = np.full((n, m), np.nan, np.float32)
    K.linear(x, w, bias, out)
    assert_close(out, R.linear(x, w, bias), "linear")


def test_linear_reference_is_matmul_plus_bias() -> None:
    rng = np.random.default_rng(1)
    x, w, b = randn(rng, 3, 10), randn(rng, 4, 10), randn(rng, 4)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want = np.array([[x64[i] @ w64[j] + b[j] for j in range(4)] for i in range(3)])
    assert_close(R.linear(x, w, b), want, "linear")
    assert_close(R.linear(x, w, None), R.linear(x, w, NO_BIAS), "linear")


def test_linear_batched_rows_match_single_token_matvec() -> None:
    rng = np.random.default_rng(2)
    x, w, b = randn(rng, 11, 64), randn(rng, 45, 64), randn(rng, 45)
    batched = np.empty((11, 45), np.float32)
    K.linear(x, w, b, batched)
    single = np.empty((1, 45), np.float32)
    for i in range(11):
        K.linear(x[i : i + 1], w, b, single)
        assert_close(batched[i], single[0], "linear")


@pytest.mark.parametrize("n", [1, 6])
def test_linear_rows_writes_only_its_columns(n: int) -> None:
    rng = np.random.default_rng(n)
    k, m_total, tile = 40, 23, 10
    x, w, b = randn(rng, n, k), randn(rng, m_total, k), randn(rng, m_total)
    out = np.full((n, m_total), -7.0, np.float32)
    K.linear_rows(x, w[10:20], b[10:20], out, 10)
    assert_close(out[:, 10:20], R.linear(x, w[10:20], b[10:20]), "linear")
    assert (out[:, :10] == -7.0).all() and (out[:, 20:] == -7.0).all()
    for col0 in range(0, m_total, tile):  # the LM-head use: all tiles together give the full product
        K.linear_rows(x, w[col0 : col0 + tile], NO_BIAS, out, col0)
    assert_close(out, R.linear(x, w), "linear")


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 13),
    k=st.integers(1, 70),
    m=st.integers(1, 40),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_random_shapes(n: int, k: int, m: int, with_bias: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, w = randn(rng, n, k), randn(rng, m, k)
    bias = randn(rng, m) if with_bias else NO_BIAS
    out = np.empty((n, m), np.float32)
    K.linear(x, w, bias, out)
    assert_close(out, R.linear(x, w, bias), "linear")


def test_linear_rejects_bad_shapes_and_layouts() -> None:
    x, w, out = np.ones((2, 8), np.float32), np.ones((3, 8), np.float32), np.empty((2, 3), np.float32)
    with pytest.raises(ValueError):
        K.linear(x, np.ones((3, 9), np.float32), NO_BIAS, out)
    with pytest.raises(ValueError):
        K.linear(x, w, np.ones(2, np.float32), out)
    with pytest.raises(ValueError):
        K.linear_rows(x, w, NO_BIAS, out, 1)
    with pytest.raises(TypeError):  # a column slice is not C-contiguous
        K.linear(x, w, NO_BIAS, np.empty((2, 6), np.float32)[:, :3])
    with pytest.raises(TypeError):
        K.linear(x.astype(np.float64), w, NO_BIAS, out)


# --------------------------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("n", [1, 5, 64])
def test_embedding_gather_and_add(n: int) -> None:
    rng = np.random.default_rng(n)
    table, pos_table = readonly(randn(rng, 50, 12)), readonly(randn(rng, 70, 12))
    ids = rng.integers(0, 50, n).astype(np.int64)
    positions = np.arange(3, 3 + n, dtype=np.int64)
    out = np.empty((n, 12), np.float32)
    K.embedding_gather(ids, table, out)
    assert_close(out, R.embedding_gather(ids, table), "embedding")
    want = R.embedding_add(positions, pos_table, out)
    K.embedding_add(positions, pos_table, out)
    assert_close(out, want, "embedding")
    assert_close(out, table[ids] + pos_table[positions], "embedding")


@pytest.mark.parametrize("bad", [-1, 50])
def test_embedding_rejects_out_of_range_ids(bad: int) -> None:
    table, out = np.ones((50, 4), np.float32), np.empty((2, 4), np.float32)
    ids = np.array([0, bad], np.int64)
    for kernel in (K.embedding_gather, K.embedding_add):
        with pytest.raises(IndexError):
            kernel(ids, table, out)
    with pytest.raises(IndexError):
        R.embedding_gather(ids, table)


# ------------------------------------------------------------------------------------------------- norms

NORM_SHAPES = [(1, 1), (1, 576), (3, 7), (16, 384), (128, 320)]  # the last one takes the parallel path


@pytest.mark.parametrize("n,d", NORM_SHAPES)
def test_layernorm(n: int, d: int) -> None:
    rng = np.random.default_rng([n, d])
    x = randn(rng, n, d, scale=3.0) + np.float32(1.5)
    w, b = readonly(randn(rng, d)), readonly(randn(rng, d))
    want = R.layernorm(x, w, b, 1e-12)
    out = np.empty_like(x)
    K.layernorm(x, w, b, 1e-12, out)
    assert_close(out, want, "layernorm")
    K.layernorm(x, w, b, 1e-12, x)  # out aliases x
    assert_close(x, want, "layernorm")


@pytest.mark.parametrize("n,d", NORM_SHAPES)
def test_rmsnorm(n: int, d: int) -> None:
    rng = np.random.default_rng([n, d, 1])
    x, w = randn(rng, n, d, scale=2.0), readonly(randn(rng, d))
    want = R.rmsnorm(x, w, 1e-5)
    out = np.empty_like(x)
    K.rmsnorm(x, w, 1e-5, out)
    assert_close(out, want, "rmsnorm")
    K.rmsnorm(x, w, 1e-5, x)
    assert_close(x, want, "rmsnorm")


def test_norm_references_match_textbook_formulas() -> None:
    rng = np.random.default_rng(3)
    x, w, b = randn(rng, 5, 33), randn(rng, 33), randn(rng, 33)
    x64 = x.astype(np.float64)
    ln = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * w + b
    assert_close(R.layernorm(x, w, b, 1e-5), ln, "layernorm")
    rms = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * w
    assert_close(R.rmsnorm(x, w, 1e-6), rms, "rmsnorm")


# ------------------------------------------------------------------------------------------ element-wise

ELEMENTWISE_SHAPES = [(1, 1), (1, 1536), (3, 37), (64, 1536)]  # the last one takes the parallel path


@pytest.mark.parametrize("n,d", ELEMENTWISE_SHAPES)
@pytest.mark.parametrize("op", ["gelu_tanh", "gelu_erf"])
def test_gelu(op: str, n: int, d: int) -> None:
    rng = np.random.default_rng([n, d])
    x = randn(rng, n, d, scale=4.0)
    want = getattr(R, op)(x)
    out = np.empty_like(x)
    getattr(K, op)(x, out)
    assert_close(out, want, op)
    getattr(K, op)(x, x)
    assert_close(x, want, op)


@pytest.mark.parametrize("n,d", ELEMENTWISE_SHAPES)
def test_silu_mul(n: int, d: int) -> None:
    rng = np.random.default_rng([n, d])
    gate, up = randn(rng, n, d, scale=5.0), randn(rng, n, d)
    want = R.silu_mul(gate, up)
    out = np.empty_like(gate)
    K.silu_mul(gate, up, out)
    assert_close(out, want, "silu_mul")
    for alias in ("gate", "up"):
        g, u = gate.copy(), up.copy()
        K.silu_mul(g, u, g if alias == "gate" else u)
        assert_close(g if alias == "gate" else u, want, "silu_mul")


@pytest.mark.parametrize("n,d", ELEMENTWISE_SHAPES)
def test_add(n: int, d: int) -> None:
    rng = np.random.default_rng([n, d])
    a, b = randn(rng, n, d), randn(rng, n, d)
    want = R.add(a, b)
    out = np.empty_like(a)
    K.add(a, b, out)
    assert_close(out, want, "add")
    K.add(a, b, a)  # residual add in place
    assert_close(a, want, "add")


def test_elementwise_references_match_definitions() -> None:
    # Exact GELU at known points: x * Phi(x), Phi(1) = 0.8413447460685429.
    x = np.array([[-3.0, -1.0, 0.0, 1.0, 2.5]], np.float32)
    phi = np.array([0.5 * math.erfc(-float(v) / math.sqrt(2.0)) for v in x[0]])
    assert_close(R.gelu_erf(x)[0], x[0] * phi, "gelu_erf")
    assert abs(float(R.gelu_erf(np.array([[1.0]], np.float32))[0, 0]) - 0.8413447460685429) < 1e-7
    # The tanh form approximates the exact one to within 5e-4 on O(1) inputs.
    grid = np.linspace(-6, 6, 1001, dtype=np.float32)[None, :]
    assert np.abs(R.gelu_tanh(grid) - R.gelu_erf(grid)).max() < 5e-4
    # silu(g) = g * sigmoid(g).
    g = np.array([[-20.0, -1.0, 0.0, 0.5, 30.0]], np.float32)
    sig = np.array([1.0 / (1.0 + math.exp(-float(v))) for v in g[0]])
    assert_close(R.silu_mul(g, np.ones_like(g))[0], g[0] * sig, "silu_mul")


# ----------------------------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("n,m", [(1, 1), (1, 49152), (4, 9), (64, 1000)])
def test_softmax_rows(n: int, m: int) -> None:
    rng = np.random.default_rng([n, m])
    x = randn(rng, n, m, scale=8.0) + np.float32(100.0)  # large offset: needs the max subtraction
    want = R.softmax_rows(x)
    out = np.empty_like(x)
    K.softmax_rows(x, out)
    assert_close(out, want, "softmax")
    K.softmax_rows(x, x)
    assert_close(x, want, "softmax")


def test_softmax_reference_properties() -> None:
    rng = np.random.default_rng(4)
    x = randn(rng, 3, 17, scale=10.0)
    p = R.softmax_rows(x)
    assert_close(p.sum(-1), np.ones(3), "softmax")
    assert_close(R.softmax_rows(x - np.float32(50.0)), p, "softmax")
    assert (np.argmax(p, -1) == np.argmax(x, -1)).all()


# -------------------------------------------------------------------------------------------------- rope


@pytest.mark.parametrize("n,n_heads,head_dim,pos0", [(1, 1, 2, 0), (1, 9, 64, 4000), (7, 3, 8, 5), (33, 4, 64, 100)])
def test_rope_inplace(n: int, n_heads: int, head_dim: int, pos0: int) -> None:
    rng = np.random.default_rng([n, n_heads, head_dim])
    x = randn(rng, n, n_heads * head_dim)
    positions = np.arange(pos0, pos0 + n, dtype=np.int64)
    inv_freq = readonly(R.rope_inv_freq(head_dim, 10000.0))
    want = R.rope(x, positions, inv_freq, n_heads, head_dim)
    K.rope_inplace(x, positions, inv_freq, n_heads, head_dim)
    assert_close(x, want, "rope")


def test_rope_reference_is_complex_rotation() -> None:
    rng = np.random.default_rng(5)
    n, n_heads, head_dim = 4, 2, 8
    half = head_dim // 2
    x = randn(rng, n, n_heads * head_dim)
    positions = np.array([0, 1, 17, 300], np.int64)
    inv_freq = R.rope_inv_freq(head_dim, 10000.0)
    got = R.rope(x, positions, inv_freq, n_heads, head_dim).reshape(n, n_heads, head_dim)
    xh = x.reshape(n, n_heads, head_dim)
    for i in range(n):
        for h in range(n_heads):
            for j in range(half):
                angle = float(np.float32(positions[i]) * inv_freq[j])
                z = complex(xh[i, h, j], xh[i, h, j + half]) * cmath.exp(1j * angle)
                assert abs(got[i, h, j] - z.real) < 1e-5 and abs(got[i, h, j + half] - z.imag) < 1e-5


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_rope_inv_freq_formulas() -> None:
    hd, theta = 64, 500000.0
    default = np.array([theta ** (-(2 * j) / hd) for j in range(hd // 2)])
    assert_close(R.rope_inv_freq(hd, theta), default, "rope")
    assert_close(R.rope_inv_freq(hd, theta, {"rope_type": "default"}), default, "rope")
    assert_close(R.rope_inv_freq(hd, theta, {"type": "linear", "factor": 4.0}), default / 4.0, "rope")
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
                s["high_freq_factor"] - s["low_freq_factor"]
            )
            want.append((1 - smooth) * freq / s["factor"] + smooth * freq)
    got = R.rope_inv_freq(hd, theta, s)
    assert_close(got, np.array(want), "rope")
    assert got.dtype == np.float32 and (got < default.astype(np.float32) * 1.0001).all()
    with pytest.raises(ValueError, match="not supported"):
        R.rope_inv_freq(hd, theta, {"rope_type": "yarn", "factor": 2.0})


# ----------------------------------------------------------------------------------------------- kv cache


def test_kv_write() -> None:
    rng = np.random.default_rng(6)
    n_kv, t_max, hd, n, pos0 = 3, 10, 4, 4, 5
    k, v = randn(rng, n, n_kv * hd), randn(rng, n, n_kv * hd)
    k_cache, v_cache = randn(rng, n_kv, t_max, hd), randn(rng, n_kv, t_max, hd)
    want_k, want_v = R.kv_write(k, v, k_cache, v_cache, pos0)
    K.kv_write(k, v, k_cache, v_cache, pos0)
    assert_close(k_cache, want_k, "kv_write")
    assert_close(v_cache, want_v, "kv_write")
    assert_close(k_cache[1, pos0 + 2], k[2, hd : 2 * hd], "kv_write")
    with pytest.raises(IndexError):
        K.kv_write(k, v, k_cache, v_cache, t_max - n + 1)


# ---------------------------------------------------------------------------------------------- attention

# (n, pos0, n_heads, n_kv_heads, head_dim): GQA ratios 1, 3 and 4; prefill, decode, chunked prefill.
CAUSAL_CASES = [
    (1, 0, 1, 1, 4),
    (1, 37, 9, 3, 64),  # SmolLM2-135M decode
    (6, 0, 3, 3, 8),
    (5, 11, 8, 2, 16),
    (17, 0, 9, 3, 64),
    (64, 3, 4, 1, 32),
]


def _causal_inputs(rng: np.random.Generator, n: int, pos0: int, n_heads: int, n_kv_heads: int, head_dim: int):
    t_max = pos0 + n + 3
    q = randn(rng, n, n_heads * head_dim)
    k_cache = randn(rng, n_kv_heads, t_max, head_dim)
    v_cache = randn(rng, n_kv_heads, t_max, head_dim)
    return q, k_cache, v_cache


@pytest.mark.parametrize("n,pos0,n_heads,n_kv_heads,head_dim", CAUSAL_CASES)
def test_attention_causal(n: int, pos0: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    rng = np.random.default_rng([n, pos0, n_heads, n_kv_heads, head_dim])
    q, k_cache, v_cache = _causal_inputs(rng, n, pos0, n_heads, n_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    t_max = k_cache.shape[1]
    scratch = np.full((n_heads, t_max), np.nan, np.float32)
    out = np.full((n, n_heads * head_dim), np.nan, np.float32)
    K.attention_causal(
        q, readonly(k_cache), readonly(v_cache), pos0, n_heads, n_kv_heads, head_dim, scale, scratch, out
    )
    want = R.attention_causal(q, k_cache, v_cache, pos0, n_heads, n_kv_heads, head_dim, scale)
    assert_close(out, want, "attention")


def _naive_attention_row(qv: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """Softmax(q . k * scale) @ V for one query row, in float64, one key at a time."""
    scores = [float(np.dot(qv.astype(np.float64), kk.astype(np.float64))) * scale for kk in keys]
    mx = max(scores)
    e = [math.exp(s - mx) for s in scores]
    return sum(ei / sum(e) * vv.astype(np.float64) for ei, vv in zip(e, values, strict=True))


def test_attention_causal_reference_is_naive_masked_softmax() -> None:
    rng = np.random.default_rng(7)
    n, pos0, n_heads, n_kv_heads, hd = 4, 3, 6, 2, 8
    q, k_cache, v_cache = _causal_inputs(rng, n, pos0, n_heads, n_kv_heads, hd)
    got = R.attention_causal(q, k_cache, v_cache, pos0, n_heads, n_kv_heads, hd, 0.3)
    for i in range(n):
        for h in range(n_heads):
            kvh = h // (n_heads // n_kv_heads)
            length = pos0 + i + 1
            c = slice(h * hd, (h + 1) * hd)
            want = _naive_attention_row(q[i, c], k_cache[kvh, :length], v_cache[kvh, :length], 0.3)
            assert_close(got[i, c], want, "attention")


def test_attention_causal_prefill_equals_token_by_token_decode() -> None:
    rng = np.random.default_rng(8)
    n, n_heads, n_kv_heads, hd = 9, 4, 2, 16
    q, k, v = randn(rng, n, n_heads * hd), randn(rng, n, n_kv_heads * hd), randn(rng, n, n_kv_heads * hd)
    k_cache, v_cache = np.zeros((n_kv_heads, 16, hd), np.float32), np.zeros((n_kv_heads, 16, hd), np.float32)
    scratch = np.empty((n_heads, 16), np.float32)
    prefill = np.empty((n, n_heads * hd), np.float32)
    K.kv_write(k, v, k_cache, v_cache, 0)
    K.attention_causal(q, k_cache, v_cache, 0, n_heads, n_kv_heads, hd, 0.25, scratch, prefill)
    k_cache[:], v_cache[:] = 0.0, 0.0
    step = np.empty((1, n_heads * hd), np.float32)
    for i in range(n):
        K.kv_write(k[i : i + 1], v[i : i + 1], k_cache, v_cache, i)
        K.attention_causal(q[i : i + 1], k_cache, v_cache, i, n_heads, n_kv_heads, hd, 0.25, scratch, step)
        assert_close(step[0], prefill[i], "attention")


def test_attention_causal_rejects_overflowing_positions() -> None:
    q, cache = np.ones((2, 8), np.float32), np.ones((1, 4, 8), np.float32)
    scratch, out = np.empty((1, 4), np.float32), np.empty((2, 8), np.float32)
    with pytest.raises(ValueError):
        K.attention_causal(q, cache, cache, 3, 1, 1, 8, 1.0, scratch, out)
    with pytest.raises(ValueError):  # scratch shorter than pos0 + n
        K.attention_causal(q, cache, cache, 1, 1, 1, 8, 1.0, np.empty((1, 2), np.float32), out)


# (lengths of the sequences in the batch, seq, n_heads, head_dim)
BIDIR_CASES = [
    ([1], 1, 1, 4),
    ([5], 5, 2, 8),
    ([7, 3, 1], 7, 3, 16),
    ([12, 12, 4, 9], 12, 12, 32),  # MiniLM-like head count
    ([6, 0], 6, 2, 8),  # a sequence with no token at all
]


def _bidir_inputs(rng: np.random.Generator, lengths: list[int], seq: int, n_heads: int, head_dim: int):
    batch = len(lengths)
    q, k, v = (randn(rng, batch * seq, n_heads * head_dim) for _ in range(3))
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return q, k, v, mask


@pytest.mark.parametrize("lengths,seq,n_heads,head_dim", BIDIR_CASES)
def test_attention_bidir(lengths: list[int], seq: int, n_heads: int, head_dim: int) -> None:
    rng = np.random.default_rng([len(lengths), seq, n_heads, head_dim])
    q, k, v, mask = _bidir_inputs(rng, lengths, seq, n_heads, head_dim)
    batch, scale = len(lengths), 1.0 / math.sqrt(head_dim)
    scratch = np.full((batch * n_heads, seq), np.nan, np.float32)
    out = np.full_like(q, np.nan)
    K.attention_bidir(q, k, v, mask, batch, seq, n_heads, head_dim, scale, scratch, out)
    assert np.isfinite(out).all()
    assert_close(out, R.attention_bidir(q, k, v, mask, batch, seq, n_heads, head_dim, scale), "attention")


def test_attention_bidir_reference_is_naive_masked_softmax() -> None:
    rng = np.random.default_rng(9)
    lengths, seq, n_heads, hd = [4, 2], 4, 2, 8
    q, k, v, mask = _bidir_inputs(rng, lengths, seq, n_heads, hd)
    got = R.attention_bidir(q, k, v, mask, 2, seq, n_heads, hd, 0.5)
    for b, length in enumerate(lengths):
        for i in range(seq):  # padded query rows too: they attend to the sequence's real tokens
            row = b * seq + i
            for h in range(n_heads):
                c = slice(h * hd, (h + 1) * hd)
                keys = k[b * seq : b * seq + length, c]
                values = v[b * seq : b * seq + length, c]
                assert_close(got[row, c], _naive_attention_row(q[row, c], keys, values, 0.5), "attention")


# -------------------------------------------------------------------------------------------- pooling, argmax


@pytest.mark.parametrize("lengths,seq,d", [([1], 1, 1), ([3], 5, 384), ([7, 2, 5], 7, 16), ([4, 0], 4, 8)])
def test_mean_pool_l2(lengths: list[int], seq: int, d: int) -> None:
    rng = np.random.default_rng([len(lengths), seq, d])
    batch = len(lengths)
    x = randn(rng, batch * seq, d)
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    out = np.full((batch, d), np.nan, np.float32)
    K.mean_pool_l2(x, mask, batch, seq, out)
    want = R.mean_pool_l2(x, mask, batch, seq)
    assert_close(out, want, "mean_pool_l2")
    for b, length in enumerate(lengths):  # independent check: mean of the real rows, unit length
        if length == 0:
            assert (want[b] == 0).all()
            continue
        mean = x[b * seq : b * seq + length].astype(np.float64).mean(0)
        assert_close(want[b], mean / np.linalg.norm(mean), "mean_pool_l2")


def test_argmax() -> None:
    rng = np.random.default_rng(10)
    for m in (1, 2, 49152):
        x = randn(rng, m)
        assert K.argmax(readonly(x)) == R.argmax(x)
    tie = np.array([1.0, 3.0, -2.0, 3.0], np.float32)
    assert K.argmax(tie) == R.argmax(tie) == 1


# ------------------------------------------------------------------------------ reference twins vs torch / HF


@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


def test_reference_matches_torch_ops(torch_mod) -> None:
    torch, F = torch_mod, torch_mod.nn.functional
    rng = np.random.default_rng(11)
    x, w, b = randn(rng, 6, 96, scale=3.0), randn(rng, 96), randn(rng, 96)
    tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
    assert_close(R.layernorm(x, w, b, 1e-12), F.layer_norm(tx, (96,), tw, tb, 1e-12).numpy(), "vs_torch")
    assert_close(R.gelu_erf(x), F.gelu(tx).numpy(), "vs_torch")
    assert_close(R.gelu_tanh(x), F.gelu(tx, approximate="tanh").numpy(), "vs_torch")
    up = randn(rng, 6, 96)
    assert_close(R.silu_mul(x, up), (F.silu(tx) * torch.from_numpy(up)).numpy(), "vs_torch")
    assert_close(R.softmax_rows(x), torch.softmax(tx, -1).numpy(), "vs_torch")
    wm, bm = randn(rng, 40, 96), randn(rng, 40)
    want = F.linear(tx, torch.from_numpy(wm), torch.from_numpy(bm)).numpy()
    assert_close(R.linear(x, wm, bm), want, "linear")


def test_reference_matches_torch_attention(torch_mod) -> None:
    torch, F = torch_mod, torch_mod.nn.functional
    rng = np.random.default_rng(12)
    n, pos0, n_heads, n_kv_heads, hd = 5, 7, 6, 2, 16
    q, k_cache, v_cache = _causal_inputs(rng, n, pos0, n_heads, n_kv_heads, hd)
    t = pos0 + n
    tq = torch.from_numpy(q).view(n, n_heads, hd).transpose(0, 1)[None]  # [1, H, n, hd]
    tk = torch.from_numpy(k_cache[:, :t]).repeat_interleave(n_heads // n_kv_heads, 0)[None]  # [1, H, t, hd]
    tv = torch.from_numpy(v_cache[:, :t]).repeat_interleave(n_heads // n_kv_heads, 0)[None]
    allowed = torch.arange(t)[None, :] <= (pos0 + torch.arange(n))[:, None]
    want = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=allowed, scale=0.25)  # [1, H, n, hd]
    want = want[0].transpose(0, 1).reshape(n, -1)
    got = R.attention_causal(q, k_cache, v_cache, pos0, n_heads, n_kv_heads, hd, 0.25)
    assert_close(got, want.numpy(), "attention")


def test_reference_matches_hf_llama_rope_and_rmsnorm(torch_mod) -> None:
    torch = torch_mod
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as hf_llama

    n_heads, hd, theta = 3, 64, 500000.0
    rng = np.random.default_rng(13)
    for scaling in (None, {"rope_type": "linear", "factor": 4.0}, LLAMA3_SCALING):
        cfg = LlamaConfig(
            hidden_size=n_heads * hd,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads,
            head_dim=hd,
            rope_theta=theta,
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=131072,
        )
        rotary = hf_llama.LlamaRotaryEmbedding(cfg)
        inv_freq = R.rope_inv_freq(hd, theta, scaling)
        assert_close(inv_freq, rotary.inv_freq.numpy(), "rope", (0.0, 0.0))  # bit-exact: see rope_inv_freq
        positions = np.array([0, 1, 2, 1000, 8191, 30000], np.int64)
        x = randn(rng, len(positions), n_heads * hd)
        tx = torch.from_numpy(x).view(1, len(positions), n_heads, hd).transpose(1, 2)  # [1, H, n, hd]
        cos, sin = rotary(tx, torch.from_numpy(positions)[None])
        want, _ = hf_llama.apply_rotary_pos_emb(tx, tx, cos, sin)
        want = want.transpose(1, 2).reshape(len(positions), -1).numpy()
        assert_close(R.rope(x, positions, inv_freq, n_heads, hd), want, "rope", (1e-5, 1e-5))

    x, w = randn(rng, 4, 576, scale=2.0), randn(rng, 576)
    norm = hf_llama.LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
        want = norm(torch.from_numpy(x)).numpy()
    assert_close(R.rmsnorm(x, w, 1e-5), want, "vs_torch")
