"""ONNX `MatMul` and `Gemm`: products of activations (any numeric dtype, numpy broadcasting over batch dims).
A MatMul or Gemm with a constant weight becomes `Linear` (`linear.py`) in the compiler's fuse_linear pass.

One kernel pair, `matmul` / `matmul_par`, serves both: operands are read through element strides, so Gemm's
transposes and its broadcast C cost no copy.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ._jit import DOT_FLAGS, I64, helper, kernel, prange
from .registry import (
    PAR_MIN,
    OpDef,
    Sample,
    ShapeError,
    Site,
    WarmSpec,
    bcast_strides,
    broadcast,
    flat,
    numel,
    register,
)

# ---- ONNX MatMul and Gemm (activations x activations, any numeric dtype) --------------------------------------

@helper
def _mm_row(a, b, c, out, ia, ib, r, M, K, N, sam, sak, sbk, sbn, scm, scn, alpha, beta, has_c):
    """One output row of batch `r // M`: `out[r] = alpha * a[ia[bi]][i] @ b[ib[bi]] + beta * c[i]` with element
    strides for a (`sam`, `sak`: transA), b (`sbk`, `sbn`: transB) and c (0 along broadcast axes)."""
    bi = r // M
    i = r % M
    ao = ia[bi] * M * K + i * sam
    bo = ib[bi] * K * N
    oo = r * N
    for j in range(N):
        out[oo + j] = 0
    for kk in range(K):
        av = a[ao + kk * sak]
        bk = bo + kk * sbk
        for j in range(N):
            out[oo + j] += av * b[bk + j * sbn]
    if alpha != 1.0 or has_c:
        for j in range(N):
            v = alpha * out[oo + j]
            if has_c:
                v += beta * c[i * scm + j * scn]
            out[oo + j] = v


@helper
def _check_mm(a, b, c, out, ia, ib, M, K, N, sam, sak, sbk, sbn, scm, scn, has_c):
    nb = ia.shape[0]
    if ib.shape[0] != nb or out.shape[0] != nb * M * N or M < 0 or K < 0 or N < 0:
        raise ValueError("matmul: out must hold len(ia) x M x N elements")
    for q in range(nb):
        if ia[q] < 0 or (ia[q] + 1) * M * K > a.shape[0] or ib[q] < 0 or (ib[q] + 1) * K * N > b.shape[0]:
            raise ValueError("matmul: a batch index is outside its operand")
    if M * K > 0 and (M - 1) * sam + (K - 1) * sak >= M * K:
        raise ValueError("matmul: a's strides leave its matrix")
    if K * N > 0 and (K - 1) * sbk + (N - 1) * sbn >= K * N:
        raise ValueError("matmul: b's strides leave its matrix")
    if has_c and M * N > 0 and (M - 1) * scm + (N - 1) * scn >= c.shape[0]:
        raise ValueError("matmul: c's strides leave it")


@kernel(fastmath=DOT_FLAGS, error_model="numpy")
def matmul(a, b, c, out, ia, ib, M, K, N, sam, sak, sbk, sbn, scm, scn, alpha, beta, has_c):
    """Batched `out[q] = alpha * A(a[ia[q]]) @ B(b[ib[q]]) + beta * C`: `a` flat `[*, M, K]` read with element
    strides (sam, sak), `b` flat `[*, K, N]` with (sbk, sbn), `c` flat, broadcast by (scm, scn) when `has_c`,
    `out` flat `[len(ia), M, N]`. MatMul is alpha = 1 without c; Gemm's transA / transB are strides."""
    _check_mm(a, b, c, out, ia, ib, M, K, N, sam, sak, sbk, sbn, scm, scn, has_c)
    for r in range(ia.shape[0] * M):
        _mm_row(a, b, c, out, ia, ib, r, M, K, N, sam, sak, sbk, sbn, scm, scn, alpha, beta, has_c)


@kernel(parallel=True, fastmath=DOT_FLAGS, error_model="numpy")
def matmul_par(a, b, c, out, ia, ib, M, K, N, sam, sak, sbk, sbn, scm, scn, alpha, beta, has_c):
    _check_mm(a, b, c, out, ia, ib, M, K, N, sam, sak, sbk, sbn, scm, scn, has_c)
    for r in prange(ia.shape[0] * M):
        _mm_row(a, b, c, out, ia, ib, r, M, K, N, sam, sak, sbk, sbn, scm, scn, alpha, beta, has_c)


def matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """numpy matmul's output shape (1-D operands promoted and the added axis dropped; batch broadcast)."""
    if not a or not b:
        raise ShapeError("MatMul: scalar operands")
    a2 = (1,) + tuple(a) if len(a) == 1 else tuple(a)
    b2 = tuple(b) + (1,) if len(b) == 1 else tuple(b)
    if a2[-1] != b2[-2]:
        raise ShapeError(f"MatMul: inner dims differ ({list(a)} @ {list(b)})")
    out = broadcast(a2[:-2], b2[:-2]) + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _gemm_dims(A: tuple, B: tuple, a: dict) -> tuple[int, int, int]:
    if len(A) != 2 or len(B) != 2:
        raise ShapeError("Gemm: A and B must be 2-D")
    m, k = (A[1], A[0]) if a["transA"] else A
    k2, n = (B[1], B[0]) if a["transB"] else B
    if k != k2:
        raise ShapeError(f"Gemm: inner dims {k} and {k2} differ")
    return int(m), int(k), int(n)


def _matmul_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    if d[0] != d[1]:
        raise ShapeError(f"MatMul: operands are {d[0]} and {d[1]}")
    return [(matmul_shape(s[0], s[1]), d[0])]


def _gemm_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    m, _, nn = _gemm_dims(s[0], s[1], a)
    if len(s) > 2 and s[2] is not None and broadcast((m, nn), s[2]) != (m, nn):
        raise ShapeError(f"Gemm: C {list(s[2])} does not broadcast to {[m, nn]}")
    return [((m, nn), d[0])]


def _keep(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(like.dtype, copy=False)


def _matmul_twin(ins: list, a: dict, n: int) -> list:
    return [_keep(np.matmul(ins[0], ins[1]), ins[0])]


def _gemm_twin(ins: list, a: dict, n: int) -> list:
    A = ins[0].T if a["transA"] else ins[0]
    B = ins[1].T if a["transB"] else ins[1]
    y = a["alpha"] * (A @ B)  # [m, k] @ [k, n] -> [m, n]
    if len(ins) > 2 and ins[2] is not None:
        y = y + a["beta"] * ins[2]
    return [_keep(y, ins[0])]


_I64 = np.int64


def _batch_index(shape: tuple[int, ...], batch: tuple[int, ...]) -> np.ndarray:
    """For each matrix of the broadcast batch, the index of the operand's matrix it reads."""
    own = np.arange(numel(shape), dtype=_I64).reshape(shape)
    idx = np.array(np.broadcast_to(own, batch), dtype=_I64).reshape(-1)  # a copy: writable until frozen here
    idx.setflags(write=False)  # always read-only, so the kernels see one array type (what `warm` loads)
    return idx


def _mm_call(a: np.ndarray, b: np.ndarray, c: np.ndarray | None, out: np.ndarray, ia: np.ndarray, ib: np.ndarray,
             dims: tuple[int, ...], alpha: float, beta: float) -> Callable[[], Any]:
    """Bind the kernel (parallel when some buffer is big, as `warm` decides)."""
    M, K, N = dims[:3]
    big = max(a.size, b.size, out.size, 0 if c is None else c.size) >= PAR_MIN
    fn = (matmul_par if big and ia.size * M > 1 else matmul).load()
    cf = flat(c) if c is not None else np.zeros(0, out.dtype)
    args = (flat(a), flat(b), cf, flat(out), ia, ib) + tuple(int(v) for v in dims) + (float(alpha), float(beta),
                                                                                          c is not None)
    return partial(fn, *args)


def _bind_matmul(s: Site) -> Callable[[], Any]:
    a, b, out = s.ins[0], s.ins[1], s.outs[0]
    a2 = a.reshape((1,) + a.shape) if a.ndim == 1 else a
    b2 = b.reshape(b.shape + (1,)) if b.ndim == 1 else b
    M, K = a2.shape[-2:]
    N = b2.shape[-1]
    batch = broadcast(a2.shape[:-2], b2.shape[:-2])
    ia, ib = _batch_index(a2.shape[:-2], batch), _batch_index(b2.shape[:-2], batch)
    return _mm_call(a2, b2, None, out, ia, ib, (M, K, N, K, 1, N, 1, 0, 0), 1.0, 0.0)


def _bind_gemm(s: Site) -> Callable[[], Any]:
    A, B, out = s.ins[0], s.ins[1], s.outs[0]
    C = s.ins[2] if len(s.ins) > 2 else None
    M, K, N = _gemm_dims(A.shape, B.shape, s.attrs)
    sam, sak = (1, M) if s.attrs["transA"] else (K, 1)
    sbk, sbn = (1, K) if s.attrs["transB"] else (N, 1)
    scm = scn = 0
    if C is not None:
        scm, scn = bcast_strides(C.shape, (M, N))
        if C.dtype != out.dtype:
            raise ShapeError(f"Gemm: C is {C.dtype}, A is {out.dtype}")
    one = _batch_index((), ())
    return _mm_call(A, B, C, out, one, one, (M, K, N, sam, sak, sbk, sbn, scm, scn), s.attrs["alpha"],
                    s.attrs["beta"])


def _warm_mm(spec: WarmSpec) -> None:
    from ._jit import arr as A

    dt = spec.in_dtypes[0]
    c_ro = len(spec.readonly) > 2 and spec.in_dtypes[2] is not None and spec.readonly[2]
    ins = [A(dt, 1, ro=spec.readonly[0]), A(dt, 1, ro=spec.readonly[1]), A(dt, 1, ro=c_ro), A(dt, 1)]
    idx = [A(I64, 1, ro=True), A(I64, 1, ro=True)]
    for k in (matmul, matmul_par) if spec.big else (matmul,):
        k.warm(*ins, *idx, *[I64] * 9, "float64", "float64", "bool")


def _mm_tol(dtype: str) -> float:
    """float32 sums of up to 96 products with cancellation differ from numpy's BLAS (another summation order,
    chosen per CPU: 1.2e-5 / 3.1e-5 measured on Zen 5) by more than 1e-5 relative; a wrong kernel is off by O(1)."""
    return 1e-4 if dtype == "float32" else 1e-5


def _mm_sample(rng: np.random.Generator) -> list[Sample]:
    cases = []
    for sa, sb, dt in (((3, 4), (4, 5), "float32"), ((2, 1, 3, 8), (5, 8, 6), "float32"), ((7,), (7, 3), "float64"),
                       ((4, 6), (6,), "int64"), ((2, 64, 96), (96, 80), "float32"), ((3, 5), (5, 2), "int32")):
        x = rng.standard_normal(sa) * 3
        y = rng.standard_normal(sb) * 3
        cases.append(Sample([x.astype(dt), y.astype(dt)], {}, tol=_mm_tol(dt)))
    return cases


def _gemm_sample(rng: np.random.Generator) -> list[Sample]:
    cases = []
    for (m, k, n), ta, tb, cshape, alpha, beta, dt in (
            ((3, 4, 5), 0, 0, None, 1.0, 1.0, "float32"), ((6, 5, 4), 1, 0, (4,), 0.5, 2.0, "float32"),
            ((4, 7, 3), 0, 1, (4, 1), 1.0, -1.0, "float64"), ((5, 3, 6), 1, 1, (5, 6), 2.0, 0.25, "float32"),
            ((64, 96, 80), 0, 1, (80,), 1.0, 1.0, "float32"), ((3, 4, 2), 0, 0, (1,), 1.0, 3.0, "int64")):
        A = rng.standard_normal((k, m) if ta else (m, k)) * 2
        B = rng.standard_normal((n, k) if tb else (k, n)) * 2
        ins = [A.astype(dt), B.astype(dt)] + ([] if cshape is None else [(rng.standard_normal(cshape) * 2).astype(dt)])
        cases.append(Sample(ins, {"transA": ta, "transB": tb, "alpha": alpha, "beta": beta}, tol=_mm_tol(dt)))
    return cases


register(OpDef(
    name="MatMul", shape=_matmul_rule, twin=_matmul_twin, bind=_bind_matmul, warm=_warm_mm,
    kernels=(matmul, matmul_par), sample=_mm_sample,
    flops=lambda i, o, a: 2 * numel(o[0]) * int((i[0] or (1,))[-1]),
    doc="ONNX MatMul: numpy matmul semantics (1-D operands, broadcast batch axes), any numeric dtype",
))
register(OpDef(
    name="Gemm", shape=_gemm_rule, twin=_gemm_twin, bind=_bind_gemm, warm=_warm_mm,
    kernels=(matmul, matmul_par), sample=_gemm_sample,
    attrs={"transA": 0, "transB": 0, "alpha": 1.0, "beta": 1.0},
    flops=lambda i, o, a: 2 * numel(o[0]) * int(i[0][0] if a.get("transA") else i[0][-1]),
    doc="ONNX Gemm: alpha * A' @ B' + beta * C (transposes read by stride, C broadcast); one kernel with MatMul",
))
