"""ONNX op handlers: arena views in, numba kernels (`onnx_kernels.py`) called, arena views out.

Each handler takes the op's input arrays (views with the run's actual shapes; None for an absent optional
input), its output arrays (already shaped by `onnx_shapes.infer`) and the attributes. Nothing large is
allocated: only the small int64 shape/stride arrays the kernels take (and a temporary on the rare paths noted
below). bool arrays reach the kernels as their uint8 view.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import kernels as TK
from . import onnx_kernels as K
from . import onnx_shapes as S

Arr = np.ndarray
_EMPTY = np.zeros(0, np.float32)
_I64 = np.int64


def flat(a: Arr) -> Arr:
    """The flat (uint8 for bool) view the kernels take."""
    f = a.reshape(-1)
    return f.view(np.uint8) if f.dtype == np.bool_ else f


def strides_of(shape: tuple[int, ...]) -> list[int]:
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= int(d)
    return st[::-1]


def bcast_strides(shape: tuple[int, ...], out: tuple[int, ...]) -> list[int]:
    """Element strides of a contiguous `shape` broadcast to `out` (0 along broadcast dims)."""
    st = strides_of(shape)
    pad = len(out) - len(shape)
    return [0] * pad + [0 if shape[i] == 1 and out[pad + i] != 1 else st[i] for i in range(len(shape))]


def collapse(shape: tuple[int, ...], *strides: list[int]) -> tuple[Arr, ...]:
    """Drop size-1 dims and merge neighbours that are contiguous in every operand; int64 arrays (rank >= 1)."""
    dims: list[int] = []
    sts: list[list[int]] = [[] for _ in strides]
    for i, d in enumerate(shape):
        if d == 1:
            continue
        if dims and all(s[-1] == strides[k][i] * d for k, s in enumerate(sts)):
            dims[-1] *= d
            for k, s in enumerate(sts):
                s[-1] = strides[k][i]
            continue
        dims.append(int(d))
        for k, s in enumerate(sts):
            s.append(strides[k][i])
    if not dims:
        dims = [1]
        sts = [[1] for _ in strides]
    return (np.array(dims, _I64),) + tuple(np.array(s, _I64) for s in sts)


def _big(n: int) -> bool:
    return n >= K.PAR_MIN


def copy_nd(src: Arr, soff: int, sstr: list[int], dst: Arr, doff: int, dstr: list[int],
            shape: tuple[int, ...]) -> None:
    if S.numel(shape) == 0:
        return
    sh, a, b = collapse(shape, sstr, dstr)
    fn = K.copy_strided_par if _big(S.numel(shape)) else K.copy_strided
    fn(flat(src), soff, a, flat(dst), doff, b, sh)


# ---- element-wise -------------------------------------------------------------------------------------------

UNARY_CODES = {"Sqrt": K.U_SQRT, "Reciprocal": K.U_RECIP, "Neg": K.U_NEG, "Exp": K.U_EXP, "Erf": K.U_ERF,
               "Tanh": K.U_TANH, "Sigmoid": K.U_SIGMOID, "Relu": K.U_RELU, "Cos": K.U_COS, "Sin": K.U_SIN,
               "Log": K.U_LOG, "Abs": K.U_ABS, "Floor": K.U_FLOOR, "Ceil": K.U_CEIL, "Softplus": K.U_SOFTPLUS,
               "Identity": K.U_COPY, "Reshape": K.U_COPY, "Flatten": K.U_COPY, "Squeeze": K.U_COPY,
               "Unsqueeze": K.U_COPY, "Not": K.U_NOT, "IsNaN": K.U_ISNAN}


def unary_code(x: Arr, out: Arr, code: int, p0: float = 0.0, p1: float = 0.0) -> None:
    fn = K.unary_par if _big(out.size) else K.unary
    fn(flat(x), flat(out), code, float(p0), float(p1))


def h_unary(op: str) -> Callable:
    code = UNARY_CODES[op]

    def h(ins: list, outs: list, a: dict) -> None:
        unary_code(ins[0], outs[0], code)
    return h


def h_gelu(ins: list, outs: list, a: dict) -> None:
    unary_code(ins[0], outs[0], K.U_GELU_TANH if a.get("approximate", "none") == "tanh" else K.U_GELU_ERF)


def h_isinf(ins: list, outs: list, a: dict) -> None:
    unary_code(ins[0], outs[0], K.U_ISINF, a.get("detect_positive", 1), a.get("detect_negative", 1))


def h_clip(ins: list, outs: list, a: dict) -> None:
    lo = float(ins[1].reshape(-1)[0]) if len(ins) > 1 and ins[1] is not None else -np.inf
    hi = float(ins[2].reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None else np.inf
    unary_code(ins[0], outs[0], K.U_CLIP, lo, hi)


def h_cast(ins: list, outs: list, a: dict) -> None:
    out = outs[0]
    if out.dtype == np.bool_:
        unary_code(ins[0], out, K.U_CAST_BOOL)
    else:
        K.cast(flat(ins[0]), flat(out))


def binary_into(a: Arr, b: Arr, out: Arr, code: int) -> None:
    shape = out.shape
    sh, sa, sb = collapse(shape, bcast_strides(a.shape, shape), bcast_strides(b.shape, shape))
    fn = K.binary_par if _big(out.size) else K.binary
    fn(flat(a), flat(b), flat(out), sh, sa, sb, code)


_BINARY = {"Add": K.B_ADD, "Sub": K.B_SUB, "Mul": K.B_MUL, "Equal": K.B_EQ, "Less": K.B_LT, "LessOrEqual": K.B_LE,
           "Greater": K.B_GT, "GreaterOrEqual": K.B_GE, "And": K.B_AND, "Or": K.B_OR, "Xor": K.B_XOR,
           "Max": K.B_MAX, "Min": K.B_MIN, "Sum": K.B_ADD, "Mean": K.B_ADD}


def _is_int(a: Arr) -> bool:
    return a.dtype.kind in "iub"


def h_binary(op: str) -> Callable:
    def h(ins: list, outs: list, a: dict) -> None:
        x, y = ins[0], ins[1]
        if op == "Div":
            code = K.B_DIV_INT if _is_int(x) else K.B_DIV
        elif op == "Pow":
            code = K.B_POW_I if _is_int(x) and _is_int(y) else K.B_POW_F
        elif op == "Mod":
            code = K.B_FMOD if a.get("fmod", 0) else (K.B_MOD_INT if _is_int(x) else K.B_MOD_F)
        else:
            code = _BINARY[op]
        if y.dtype != x.dtype and op not in ("Pow",):
            y = y.astype(x.dtype)  # only scalars differ in practice (checked at compile time)
        binary_into(x, y, outs[0], code)
    return h


def h_variadic(op: str) -> Callable:
    code = _BINARY[op]

    def h(ins: list, outs: list, a: dict) -> None:
        xs = [x for x in ins if x is not None]
        out = outs[0]
        if len(xs) == 1:
            copy_nd(xs[0], 0, bcast_strides(xs[0].shape, out.shape), out, 0, strides_of(out.shape), out.shape)
        else:
            binary_into(xs[0], xs[1], out, code)
            for x in xs[2:]:
                binary_into(out, x, out, code)
        if op == "Mean":
            binary_into(out, np.array(len(xs), out.dtype), out, K.B_DIV)
    return h


def h_where(ins: list, outs: list, a: dict) -> None:
    c, x, y = ins
    out = outs[0]
    shape = out.shape
    sh, sc, sx, sy = collapse(shape, bcast_strides(c.shape, shape), bcast_strides(x.shape, shape),
                              bcast_strides(y.shape, shape))
    fn = K.where_par if _big(out.size) else K.where
    fn(flat(c), flat(x), flat(y), flat(out), sh, sc, sx, sy)


# ---- linear algebra -----------------------------------------------------------------------------------------

def matmul_into(a: Arr, b: Arr, out: Arr) -> None:
    a2 = a.reshape((1,) + a.shape) if a.ndim == 1 else a
    b2 = b.reshape(b.shape + (1,)) if b.ndim == 1 else b
    M, Kd = a2.shape[-2:]
    N = b2.shape[-1]
    batch = S.broadcast(a2.shape[:-2], b2.shape[:-2])
    nb = S.numel(batch)
    ia = np.array(np.broadcast_to(np.arange(S.numel(a2.shape[:-2]), dtype=_I64).reshape(a2.shape[:-2]), batch),
                  _I64).reshape(-1)
    ib = np.array(np.broadcast_to(np.arange(S.numel(b2.shape[:-2]), dtype=_I64).reshape(b2.shape[:-2]), batch),
                  _I64).reshape(-1)
    fn = K.matmul_par if _big(nb * M * N * max(Kd, 1) // 8) else K.matmul
    fn(flat(a2), flat(b2), flat(out), ia, ib, M, Kd, N)


def h_matmul(ins: list, outs: list, a: dict) -> None:
    matmul_into(ins[0], ins[1], outs[0])


def h_linear(ins: list, outs: list, a: dict) -> None:
    """The MatMul(+Add) fusion on the transformer linear kernel; `rows` (a tile of the output features)."""
    x, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 and ins[2] is not None else _EMPTY
    kin = a["in_features"]
    n = x.size // kin
    x2 = x.reshape(n, kin)
    out2 = outs[0].reshape(n, a["out_features"])
    rows = a.get("rows")
    if rows is not None and (rows[0] != 0 or rows[1] != a["out_features"]):
        TK.linear_rows(x2, w, bias, out2, rows[0])
    else:
        TK.linear(x2, w, bias, out2)


def h_gemm(ins: list, outs: list, a: dict) -> None:
    A = ins[0].T if a.get("transA", 0) else ins[0]
    B = ins[1].T if a.get("transB", 0) else ins[1]
    out = outs[0]
    # Transposed operands are rare outside exporters' Linear layers (fused into `linear`): copy them.
    matmul_into(np.ascontiguousarray(A), np.ascontiguousarray(B), out)
    alpha = a.get("alpha", 1.0)
    if alpha != 1.0:
        binary_into(out, np.array(alpha, out.dtype), out, K.B_MUL)
    if len(ins) > 2 and ins[2] is not None:
        c = ins[2]
        beta = a.get("beta", 1.0)
        if beta != 1.0:
            tmp = np.empty(c.shape, out.dtype)
            binary_into(c, np.array(beta, out.dtype), tmp, K.B_MUL)
            c = tmp
        binary_into(out, c, out, K.B_ADD)


def _broadcast_param(p: Arr | None, shape: tuple[int, ...]) -> Arr:
    if p is None:
        return _EMPTY
    if p.size == S.numel(shape):
        return flat(p)
    return np.ascontiguousarray(np.broadcast_to(p, shape)).reshape(-1)  # rare: a broadcast scale


def h_norm(rms: bool) -> Callable:
    def h(ins: list, outs: list, a: dict) -> None:
        x = ins[0]
        ax = S.norm_axis(a.get("axis", -1), x.ndim)
        rows, d = S.numel(x.shape[:ax]), S.numel(x.shape[ax:])
        scale = _broadcast_param(ins[1], x.shape[ax:])
        bias = _broadcast_param(ins[2] if len(ins) > 2 else None, x.shape[ax:])
        mean = outs[1] if len(outs) > 1 and outs[1] is not None else None
        inv = outs[2] if len(outs) > 2 and outs[2] is not None else None
        m = flat(mean) if mean is not None else np.empty(rows, np.float32) if inv is not None else _EMPTY
        v = flat(inv) if inv is not None else np.empty(rows, np.float32) if mean is not None else _EMPTY
        fn = K.norm_rows_par if _big(x.size) else K.norm_rows
        fn(flat(x), scale.astype(x.dtype, copy=False), bias.astype(x.dtype, copy=False), flat(outs[0]), m,
                    v, rows, d, float(a.get("epsilon", 1e-5)), rms)
    return h


def h_softmax(log: bool) -> Callable:
    def h(ins: list, outs: list, a: dict) -> None:
        x = ins[0]
        ax = S.norm_axis(a.get("axis", -1), x.ndim)
        fn = K.softmax_par if _big(x.size) else K.softmax
        fn(flat(x), flat(outs[0]), S.numel(x.shape[:ax]), x.shape[ax], S.numel(x.shape[ax + 1:]), log)
    return h


_REDUCE = {"ReduceSum": K.R_SUM, "ReduceMean": K.R_MEAN, "ReduceMax": K.R_MAX, "ReduceMin": K.R_MIN,
           "ReduceL2": K.R_L2, "ReduceSumSquare": K.R_SUMSQ, "ReduceProd": K.R_PROD}


def h_reduce(op: str) -> Callable:
    code = _REDUCE[op]

    def h(ins: list, outs: list, a: dict) -> None:
        x, out = ins[0], outs[0]
        have = len(ins) > 1 and ins[1] is not None
        axes, _ = S.reduce_axes(op, x.shape, {1: ins[1]} if have else {}, a, have)
        if not axes:  # noop_with_empty_axes
            unary_code(x, out, K.U_COPY)
            return
        if axes != list(range(axes[0], axes[-1] + 1)):
            # Reduced axes not adjacent: move them last (a temporary; exporters reduce one axis).
            kept = [i for i in range(x.ndim) if i not in axes]
            perm = kept + axes
            tmp = np.empty([x.shape[p] for p in perm], x.dtype)
            st = strides_of(x.shape)
            copy_nd(x, 0, [st[p] for p in perm], tmp, 0, strides_of(tmp.shape), tmp.shape)
            x = tmp
            axes = list(range(len(kept), x.ndim))
        outer = S.numel(x.shape[:axes[0]])
        n = S.numel(x.shape[axes[0]:axes[-1] + 1])
        inner = S.numel(x.shape[axes[-1] + 1:])
        if n == 0:
            if code in (K.R_SUM, K.R_SUMSQ, K.R_L2):
                fill: Any = 0
            elif code == K.R_PROD:
                fill = 1
            elif code == K.R_MEAN:
                fill = np.nan
            elif x.dtype == np.bool_:
                fill = code == K.R_MIN
            elif x.dtype.kind == "f":
                fill = -np.inf if code == K.R_MAX else np.inf
            else:
                fill = np.iinfo(x.dtype).min if code == K.R_MAX else np.iinfo(x.dtype).max
            out.fill(fill)
            return
        if x.dtype.kind in "iu" and code in (K.R_SUM, K.R_PROD):
            fn = K.reduce_int
        else:
            fn = K.reduce_par if _big(x.size) else K.reduce
        fn(flat(x), flat(out), outer, n, inner, code)
    return h


# ---- data movement --------------------------------------------------------------------------------------------

def check_indices(idx: Arr, n: int, where: str) -> None:
    if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise IndexError(f"{where}: index {int(idx.max()) if int(idx.max()) >= n else int(idx.min())} is outside "
                         f"[{-n}, {n})")


def h_gather(ins: list, outs: list, a: dict) -> None:
    x, idx = ins[0], ins[1]
    ax = S.norm_axis(a.get("axis", 0), x.ndim)
    n = x.shape[ax]
    check_indices(idx, n, "Gather")
    fn = K.gather_par if _big(outs[0].size) else K.gather
    fn(flat(x), flat(idx).astype(_I64, copy=False), flat(outs[0]), S.numel(x.shape[:ax]), n,
       S.numel(x.shape[ax + 1:]))


def h_gathernd(ins: list, outs: list, a: dict) -> None:
    data, idx = ins[0], ins[1]
    b = int(a.get("batch_dims", 0))
    k = idx.shape[-1]
    nb = S.numel(data.shape[:b])
    ni = S.numel(idx.shape[b:-1])
    st = strides_of(data.shape)
    dims = np.array(data.shape[b:b + k], _I64)
    for t in range(k):
        check_indices(idx[..., t], int(dims[t]), "GatherND")
    K.gathernd(flat(data), np.array(st[b:b + k], _I64), dims, flat(idx).astype(_I64, copy=False), flat(outs[0]),
               nb, ni, k, S.numel(data.shape[b:]), S.numel(data.shape[b + k:]))


def h_transpose(ins: list, outs: list, a: dict) -> None:
    x = ins[0]
    perm = a.get("perm") or list(range(x.ndim))[::-1]
    st = strides_of(x.shape)
    out = outs[0]
    copy_nd(x, 0, [st[p] for p in perm], out, 0, strides_of(out.shape), out.shape)


def h_concat(ins: list, outs: list, a: dict) -> None:
    out = outs[0]
    ax = S.norm_axis(a["axis"], out.ndim)
    ost = strides_of(out.shape)
    col = 0
    for x in ins:
        if x is None:
            continue
        copy_nd(x, 0, strides_of(x.shape), out, col * ost[ax], ost, x.shape)
        col += x.shape[ax]


def h_slice(ins: list, outs: list, a: dict) -> None:
    x = ins[0]
    values = {i: v for i, v in enumerate(ins) if i > 0 and v is not None}
    params = S.slice_params(x.shape, values, len(ins))
    st = strides_of(x.shape)
    off = sum(p[0] * s for p, s in zip(params, st) if p[2] > 0)
    out = outs[0]
    copy_nd(x, off, [p[1] * s for p, s in zip(params, st)], out, 0, strides_of(out.shape), out.shape)


def h_split(ins: list, outs: list, a: dict) -> None:
    x = ins[0]
    ax = S.norm_axis(a.get("axis", 0), x.ndim)
    st = strides_of(x.shape)
    start = 0
    for out in outs:
        if out is None:
            continue
        copy_nd(x, start * st[ax], st, out, 0, strides_of(out.shape), out.shape)
        start += out.shape[ax]


def h_expand(ins: list, outs: list, a: dict) -> None:
    x, out = ins[0], outs[0]
    copy_nd(x, 0, bcast_strides(x.shape, out.shape), out, 0, strides_of(out.shape), out.shape)


def h_trilu(ins: list, outs: list, a: dict) -> None:
    x = ins[0]
    k = int(ins[1].reshape(-1)[0]) if len(ins) > 1 and ins[1] is not None else 0
    rows, cols = x.shape[-2], x.shape[-1]
    K.trilu(flat(x), flat(outs[0]), S.numel(x.shape[:-2]), rows, cols, bool(a.get("upper", 1)), k)


def h_shape(ins: list, outs: list, a: dict) -> None:
    r = ins[0].ndim
    start = a.get("start", 0)
    start = min(max(start + r if start < 0 else start, 0), r)
    out = outs[0]
    out[:] = ins[0].shape[start:start + out.shape[0]]  # a few ints: metadata, no kernel


def h_size(ins: list, outs: list, a: dict) -> None:
    outs[0][...] = ins[0].size


def h_constant_of_shape(ins: list, outs: list, a: dict) -> None:
    outs[0].fill(a.get("value", 0))  # a memset: no kernel needed


def h_range(ins: list, outs: list, a: dict) -> None:
    K.arange(flat(outs[0]), ins[0].reshape(-1)[0], ins[2].reshape(-1)[0])


def h_cumsum(ins: list, outs: list, a: dict) -> None:
    x = ins[0]
    ax = S.norm_axis(int(ins[1].reshape(-1)[0]), x.ndim)
    K.cumsum(flat(x), flat(outs[0]), S.numel(x.shape[:ax]), x.shape[ax], S.numel(x.shape[ax + 1:]),
             bool(a.get("exclusive", 0)), bool(a.get("reverse", 0)))


HANDLERS: dict[str, Callable[[list, list, dict], Any]] = {
    "Gelu": h_gelu, "IsInf": h_isinf, "Clip": h_clip, "Cast": h_cast, "CastLike": h_cast, "Where": h_where,
    "MatMul": h_matmul, "linear": h_linear, "Gemm": h_gemm, "LayerNormalization": h_norm(False),
    "RMSNormalization": h_norm(True), "Softmax": h_softmax(False), "LogSoftmax": h_softmax(True),
    "Gather": h_gather, "GatherND": h_gathernd, "Transpose": h_transpose, "Concat": h_concat, "Slice": h_slice,
    "Split": h_split, "Expand": h_expand, "Trilu": h_trilu, "Shape": h_shape, "Size": h_size,
    "ConstantOfShape": h_constant_of_shape, "Range": h_range, "CumSum": h_cumsum,
}
HANDLERS.update({op: h_unary(op) for op in UNARY_CODES})
HANDLERS.update({op: h_binary(op) for op in ("Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less",
                                             "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor")})
HANDLERS.update({op: h_variadic(op) for op in ("Max", "Min", "Sum", "Mean")})
HANDLERS.update({op: h_reduce(op) for op in _REDUCE})

#: ONNX op types the executor runs.
SUPPORTED = frozenset(HANDLERS)
