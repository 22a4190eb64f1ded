"""The matrix products (`ops/linear.py`, `ops/matmul.py`, `ops/_quant.py`): every kernel agrees with its numpy twin.

Linear is run the way the engine runs it (`bind(site)()` on arena-like views, outputs pre-filled with a
sentinel) for every weight format, n in {1, 2, 3, 4, 5, 17, 76}, full weights and row tiles, last_row, with and
without bias, and k both a multiple of 16 and not. The worst |kernel - twin| / max(1, |twin|) per format is
printed. Tolerance: 3e-5 for every format — the weights the twin sees are the dequantized ones, bit for bit
what the kernels decode, so the only difference is float32 summation order (fma tiles vs numpy's BLAS). A tile
must write exactly its columns (the sentinel survives everywhere else) and every computed column must change.
Kernels called with mismatched shapes must raise ValueError (numba does no bounds checking).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_rt_exec import formats as F
from edge_rt_exec import ops
from edge_rt_exec.ops import _quant as Q
from edge_rt_exec.ops import linear as MM
from edge_rt_exec.ops import matmul as MMG
from edge_rt_exec.ops.registry import ShapeError, Site, WarmSpec, with_defaults

FORMATS = ["f32", "f16", "q8_0", "q4_0", "q4_1"]
SENTINEL = np.float32(7.0)
TOL = 3e-5
WORST: dict[str, float] = {}


def weight(fmt: str, w: np.ndarray) -> np.ndarray:
    """float32 `[m, k]` -> the format's kernel view (read-only, as the engine maps weights)."""
    f = F.get(fmt)
    v = f.view(np.ascontiguousarray(f.quantize(w)).reshape(-1).view(np.uint8), w.shape)
    v.setflags(write=False)
    return v


def dequant(fmt: str, v: np.ndarray, k: int) -> np.ndarray:
    return F.get(fmt).dequantize(v, (v.shape[0], k))


def run_linear(x: np.ndarray, wv: np.ndarray, fmt: str, k: int, bias: np.ndarray | None, attrs: dict[str, Any],
               scratch_slots: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the output buffer after the bound call, the twin's result)."""
    d = ops.get("Linear")
    a = with_defaults(d, attrs)
    shapes = [x.shape, (wv.shape[0], k), None if bias is None else bias.shape]
    (oshape, odt), = d.shape(shapes, ["float32", "float32", None if bias is None else "float32"], {}, a, 1)
    out = np.full(oshape, SENTINEL, np.dtype(odt))
    scratch = [np.full(c, np.nan, np.float32) for c in d.scratch(shapes, a)]
    if scratch_slots is not None and scratch:
        scratch = [scratch[0][:scratch_slots * MM.PANEL * k]]  # a plan that gave fewer slots
    d.warm(WarmSpec(["float32", F.get(fmt).view_dtype, None if bias is None else "float32"], ["float32"],
                    [False, True, False], [None, fmt, None], a, True))
    call = d.bind(Site("Linear", [x, wv, bias], [out], a, [None, fmt, None], shapes, {}, scratch))
    call()
    want = ops.run_twin("Linear", [x, dequant(fmt, wv, k), bias], attrs)[0]
    return out, want


def check_linear(fmt: str, out: np.ndarray, want: np.ndarray, attrs: dict[str, Any]) -> None:
    rows = attrs.get("rows")
    got = out if rows is None else out[..., rows[0]:rows[1]]
    assert got.shape == want.shape, (got.shape, want.shape)
    if rows is not None:  # the tile leaves every other column alone
        rest = np.concatenate([out[..., :rows[0]], out[..., rows[1]:]], axis=-1)
        assert np.all(rest == SENTINEL), f"{fmt}: a tile wrote outside its columns"
    assert not np.any(got == SENTINEL), f"{fmt}: some output element was never written"
    err = np.abs(got.astype(np.float64) - want) / np.maximum(1.0, np.abs(want))
    i = np.unravel_index(int(err.argmax()), err.shape)
    WORST[fmt] = max(WORST.get(fmt, 0.0), float(err[i]))
    assert err[i] <= TOL, f"{fmt} {attrs}: worst at {i}: kernel {got[i]!r}, twin {want[i]!r}, rel err {err[i]:.3g}"


def cases(fmt: str) -> list[tuple[int, int, int, dict, bool]]:
    """(n, k, M, attrs, bias) covering n, k, tiles, last_row and bias; odd M exercises the edge tiles."""
    ks = [32, 96, 160] + ([40, 200] if F.get(fmt).block == 1 else [])
    out = []
    for j, n in enumerate((1, 2, 3, 4, 5, 17, 76)):
        for t, k in enumerate(ks):
            M = (21, 37, 64)[(j + t) % 3]
            attrs: dict[str, Any] = {"out_features": M}
            if (j + t) % 3 == 1:
                attrs["rows"] = [3, M - 2]
            elif n in (5, 76) and t % 2 == 0:
                attrs["last_row"] = 1
            out.append((n, k, M, attrs, (j + t) % 2 == 0))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_agrees_with_twin(fmt: str) -> None:
    rng = np.random.default_rng(hash(fmt) % 2**32)
    count = 0
    for n, k, M, attrs, has_bias in cases(fmt):
        r0, r1 = attrs.get("rows", (0, M))
        w = (rng.standard_normal((M, k)) * 0.3).astype(np.float32)
        x = rng.standard_normal((1, n, k) if n == 17 else (n, k)).astype(np.float32)
        bias = rng.standard_normal(r1 - r0).astype(np.float32) if has_bias else None
        out, want = run_linear(x, weight(fmt, w[r0:r1]), fmt, k, bias, attrs)
        check_linear(fmt, out, want, attrs)
        count += 1
    assert count >= 21
    print(f"Linear {fmt}: worst |kernel - twin| / max(1, |twin|) = {WORST[fmt]:.2e} over {count} cases")


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_smollm2_shapes(fmt: str) -> None:
    """A real projection size (k = 1536: long sums) and the twin checked against float64 too."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((100, 1536)) * 0.02).astype(np.float32)
    wv = weight(fmt, w)
    for n in (1, 9):
        x = rng.standard_normal((n, 1536)).astype(np.float32)
        out, want = run_linear(x, wv, fmt, 1536, None, {"out_features": 100})
        check_linear(fmt, out, want, {})
        exact = x.astype(np.float64) @ dequant(fmt, wv, 1536).astype(np.float64).T
        assert np.abs(out - exact).max() <= 1e-5 * max(1.0, np.abs(exact).max())


@pytest.mark.parametrize("fmt", ["f16", "q4_1"])
def test_prefill_is_the_same_for_any_scratch_slots(fmt: str) -> None:
    """However many panel slots (workers) the scratch holds, every output is bit-identical: a row's result
    never depends on which worker or thread computed it (the engine's partitioning test relies on this)."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((70, 64)).astype(np.float32)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    outs = []
    for slots in (1, 3, MM.SLOTS):
        out, want = run_linear(x, weight(fmt, w), fmt, 64, None, {"out_features": 70}, scratch_slots=slots)
        check_linear(fmt, out, want, {})
        outs.append(out)
    assert all(np.array_equal(o.view(np.uint32), outs[0].view(np.uint32)) for o in outs)
    with pytest.raises(ShapeError, match="scratch"):
        run_linear(x, weight(fmt, w), fmt, 64, None, {"out_features": 70}, scratch_slots=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiles_are_bit_identical_to_the_whole(fmt: str) -> None:
    """Row tiles of a weight give exactly (bit for bit) the columns the untiled op gives, decode and prefill:
    partitioning a plan never changes its tokens."""
    rng = np.random.default_rng(11)
    M, k = 100, 96
    w = (rng.standard_normal((M, k)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(M).astype(np.float32)
    for n in (1, 7):
        x = rng.standard_normal((n, k)).astype(np.float32)
        whole, _ = run_linear(x, weight(fmt, w), fmt, k, bias, {"out_features": M})
        for r0, r1 in ((0, 16), (16, 53), (53, 100)):
            attrs = {"out_features": M, "rows": [r0, r1]}
            part, _ = run_linear(x, weight(fmt, w[r0:r1]), fmt, k, bias[r0:r1], attrs)
            assert np.array_equal(part[:, r0:r1].view(np.uint32), whole[:, r0:r1].view(np.uint32)), (n, r0, r1)


def test_linear_shape_rule() -> None:
    d = ops.get("Linear")

    def infer(x: tuple, w: tuple, bias: tuple | None = None, **attrs: Any) -> list:
        return d.shape([x, w, bias], ["float32", "float32", None], {}, with_defaults(d, attrs), 1)

    assert infer((2, 5, 64), (48, 64), out_features=48) == [((2, 5, 48), "float32")]
    assert infer((7, 64), (48, 64), out_features=48, last_row=1) == [((1, 48), "float32")]
    assert infer((7, 64), (10, 64), (10,), out_features=48, rows=[30, 40]) == [((7, 48), "float32")]
    for bad in (dict(x=(7, 63), w=(48, 64), out_features=48), dict(x=(7, 64), w=(48, 64), out_features=40),
                dict(x=(7, 64), w=(10, 64), out_features=48, rows=[30, 41]),
                dict(x=(7, 64), w=(10, 64), out_features=48, rows=[40, 50]),
                dict(x=(7, 64), w=(48, 64), bias=(47,), out_features=48)):
        with pytest.raises(ShapeError):
            infer(**bad)
    with pytest.raises(ShapeError):
        d.shape([(2, 64), (48, 64), None], ["float64", "float32", None], {}, with_defaults(d, {"out_features": 48}), 1)


KERNEL_W = {"f32": np.zeros((8, 64), np.float32), "f16": np.zeros((8, 64), np.uint16),
            "q8_0": np.zeros((8, 68), np.uint8), "q4_0": np.zeros((8, 36), np.uint8),
            "q4_1": np.zeros((8, 40), np.uint8)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernels_refuse_mismatched_shapes(fmt: str) -> None:
    w = KERNEL_W[fmt]  # 8 rows of k = 64 weights
    f32 = np.float32
    vec, mat = MM.VEC[fmt], MM.MAT[fmt]
    vec(np.ones(64, f32), w, np.zeros(0, f32), np.zeros(8, f32), 0)  # the good call works
    for x, b, o, c in ((np.ones(63, f32), np.zeros(0, f32), np.zeros(8, f32), 0),  # k does not match the rows
                       (np.ones(64, f32), np.zeros(7, f32), np.zeros(8, f32), 0),  # bias
                       (np.ones(64, f32), np.zeros(0, f32), np.zeros(7, f32), 0),  # out too short
                       (np.ones(64, f32), np.zeros(0, f32), np.zeros(12, f32), 5),  # col0 + m past the end
                       (np.ones(64, f32), np.zeros(0, f32), np.zeros(8, f32), -1)):
        with pytest.raises(ValueError):
            vec(x, w, b, o, c)
    s = np.zeros((2, MM.PANEL, 64), f32)
    mat(np.ones((3, 64), f32), w, np.zeros(0, f32), np.zeros((3, 8), f32), 0, s)
    for x, o, c, sc in ((np.ones((3, 64), f32), np.zeros((2, 8), f32), 0, s),  # out rows != n
                        (np.ones((3, 60), f32), np.zeros((3, 8), f32), 0, s),
                        (np.ones((3, 64), f32), np.zeros((3, 10), f32), 3, s),
                        (np.ones((3, 64), f32), np.zeros((3, 8), f32), 0, np.zeros((2, MM.PANEL, 32), f32)),
                        (np.ones((3, 64), f32), np.zeros((3, 8), f32), 0, np.zeros((2, 3, 64), f32))) + (
                       () if fmt == "f32" else ((np.ones((3, 64), f32), np.zeros((3, 8), f32), 0,
                                                np.zeros((0, MM.PANEL, 64), f32)),)):  # no slot to decode into
        with pytest.raises(ValueError):
            mat(x, w, np.zeros(0, f32), o, c, sc)


# ---- the gather kernels (embedding tables kept in their format) ----------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_rows_is_the_twin_bit_for_bit(fmt: str) -> None:
    rng = np.random.default_rng(8)
    V, d = 40, 160
    table = weight(fmt, (rng.standard_normal((V, d)) * 0.1).astype(np.float32))
    ref = dequant(fmt, table, d)
    ids = np.array([3, 0, 39, -1, 17, -40], np.int64)  # negative ids count from the end (ONNX Gather)
    out = np.full((6, d), SENTINEL, np.float32)
    Q.DEQUANT_ROWS[fmt](table, ids, out)
    assert np.array_equal(out.view(np.uint32), ref[ids].view(np.uint32))
    for bad in ([40], [-41], [0, 2**40]):
        with pytest.raises(IndexError):
            Q.DEQUANT_ROWS[fmt](table, np.array(bad, np.int64), np.zeros((len(bad), d), np.float32))
    with pytest.raises(ValueError):
        Q.DEQUANT_ROWS[fmt](table, ids, np.zeros((5, d), np.float32))
    with pytest.raises(ValueError):
        Q.DEQUANT_ROWS[fmt](table, ids, np.zeros((6, d - 32), np.float32))
    # one raw row, at an odd address (rows are read from the file into any buffer)
    row = np.ascontiguousarray(table[17]).reshape(-1).view(np.uint8)
    raw = np.concatenate([np.zeros(1, np.uint8), row])[1:]
    one = np.full(d, SENTINEL, np.float32)
    Q.DEQUANT_ROW_BYTES[fmt](raw, one)
    assert np.array_equal(one.view(np.uint32), ref[17].view(np.uint32))
    with pytest.raises(ValueError):
        Q.DEQUANT_ROW_BYTES[fmt](raw[:-1], one)


def test_lazy_intrinsics_refuse_python_calls() -> None:
    with pytest.raises(TypeError):
        Q.dot_q4_0(np.zeros(18, np.uint8), np.zeros(32, np.float32))


# ---- ONNX MatMul and Gemm ------------------------------------------------------------------------------------

def run_op(name: str, ins: list, attrs: dict) -> tuple[np.ndarray, np.ndarray]:
    d = ops.get(name)
    a = with_defaults(d, attrs)
    shapes = [None if x is None else x.shape for x in ins]
    dtypes = [None if x is None else x.dtype.name for x in ins]
    (sh, dt), = d.shape(shapes, dtypes, {}, a, 1)
    out = np.full(sh, 7, np.dtype(dt))
    big = max(x.size for x in ins + [out] if x is not None) >= ops.registry.PAR_MIN
    d.warm(WarmSpec(dtypes, [dt], [False] * len(ins), [None] * len(ins), a, big))
    d.bind(Site(name, ins, [out], a, [None] * len(ins), shapes, {}, []))()
    return out, ops.run_twin(name, ins, attrs)[0]


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
def test_matmul_broadcasting(dtype: str) -> None:
    rng = np.random.default_rng(9)
    for sa, sb in (((3, 4), (4, 5)), ((2, 1, 3, 8), (5, 8, 6)), ((7,), (7, 3)), ((4, 6), (6,)), ((6,), (6,)),
                   ((2, 64, 96), (96, 80)), ((1, 0, 3), (3, 2))):
        a = (rng.standard_normal(sa) * 4).astype(dtype)
        b = (rng.standard_normal(sb) * 4).astype(dtype)
        got, want = run_op("MatMul", [a, b], {})
        assert got.shape == want.shape == np.matmul(a, b).shape and got.dtype == a.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"{sa} @ {sb} {dtype}")


def test_gemm_transposes_alpha_beta_c() -> None:
    rng = np.random.default_rng(10)
    for (m, k, n), ta, tb, cshape, alpha, beta, dt in (
            ((3, 4, 5), 0, 0, None, 1.0, 1.0, "float32"), ((6, 5, 4), 1, 0, (4,), 0.5, 2.0, "float32"),
            ((4, 7, 3), 0, 1, (4, 1), 1.0, -1.0, "float64"), ((5, 3, 6), 1, 1, (5, 6), 2.0, 0.25, "float32"),
            ((64, 96, 80), 0, 1, (80,), 1.0, 1.0, "float32"), ((3, 4, 2), 0, 0, (1,), 1.0, 3.0, "int64")):
        A = (rng.standard_normal((k, m) if ta else (m, k)) * 3).astype(dt)
        B = (rng.standard_normal((n, k) if tb else (k, n)) * 3).astype(dt)
        ins = [A, B] + ([] if cshape is None else [(rng.standard_normal(cshape) * 3).astype(dt)])
        attrs = {"transA": ta, "transB": tb, "alpha": alpha, "beta": beta}
        got, want = run_op("Gemm", ins, attrs)
        ref = alpha * ((A.T if ta else A).astype(np.float64) @ (B.T if tb else B)) + (
            0 if cshape is None else beta * ins[2])
        assert got.shape == (m, n) and got.dtype == A.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=str(attrs))
        if dt != "int64":
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)


def test_matmul_shape_errors_and_bad_kernel_calls() -> None:
    d = ops.get("MatMul")
    for sa, sb in (((3, 4), (5, 6)), ((2, 3, 4), (3, 4, 5)), ((), (3,))):
        with pytest.raises(ShapeError):
            d.shape([sa, sb], ["float32", "float32"], {}, {}, 1)
    g = ops.get("Gemm")
    with pytest.raises(ShapeError):
        g.shape([(3, 4), (5, 6)], ["float32"] * 2, {}, with_defaults(g, {"transB": 0}), 1)
    with pytest.raises(ShapeError):
        g.shape([(3, 4), (4, 6), (4, 6)], ["float32"] * 3, {}, with_defaults(g, {}), 1)
    f = np.float32
    a, b, c = np.ones(12, f), np.ones(20, f), np.zeros(0, f)
    one = np.zeros(1, np.int64)
    one.setflags(write=False)
    good = (3, 4, 5, 4, 1, 5, 1, 0, 0)
    MMG.matmul(a, b, c, np.zeros(15, f), one, one, *good, 1.0, 0.0, False)
    bad_ia = np.ones(1, np.int64)
    bad_ia.setflags(write=False)
    for out, ia, dims in ((np.zeros(14, f), one, good), (np.zeros(15, f), bad_ia, good),
                          (np.zeros(15, f), one, (3, 4, 5, 5, 1, 5, 1, 0, 0))):
        with pytest.raises(ValueError):
            MMG.matmul(a, b, c, out, ia, one, *dims, 1.0, 0.0, False)


def test_registry_entries() -> None:
    lin = ops.get("Linear")
    assert lin.domain == "edge-rt" and lin.required == ("out_features",) and lin.row_tiled == (1, 2)
    assert set(lin.kernels) == set(MM.VEC.values()) | set(MM.MAT.values()) | set(MM.A8.KERNELS)  # + act_quant=q8_0
    assert {"MatMul", "Gemm"} <= set(ops.REGISTRY)
    assert ops.get("MatMul").kernels == ops.get("Gemm").kernels  # one kernel for the math of both
    assert lin.flops([(76, 576), (1536, 576)], [(76, 1536)], {}) == 2 * 76 * 1536 * 576
    assert lin.flops([(76, 576), (100, 576)], [(76, 49152)], {"rows": [0, 100]}) == 2 * 76 * 100 * 576
