"""Plain-numpy twins of the ONNX ops the executor runs: the *definition* of each one (STYLE.md #6).

`run(op, inputs, attrs, n_out)` takes numpy arrays (None for an absent optional input) and returns the outputs
as new arrays. Semantics follow the ONNX operator specification (opset 13 and later) and its reference
implementation; `onnx_kernels.py` holds the numba kernels the engine runs instead, and the compiler folds
constant subgraphs with these functions. Attributes are plain JSON values (the compiler converts them):
dtypes are numpy names, tensors numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce
from typing import Any

import numpy as np

from . import onnx_shapes as S

Arr = np.ndarray
_SQRT1_2 = 1.0 / math.sqrt(2.0)


def run(op: str, ins: list[Arr | None], attrs: dict[str, Any], n_out: int = 1) -> list[Arr]:
    fn = REF.get(op)
    if fn is None:
        raise S.ShapeError(f"no reference implementation of {op}")
    with np.errstate(all="ignore"):
        out = fn(ins, attrs, n_out)
    return [np.asarray(o) for o in out]


def _contig(x: Arr) -> Arr:
    """A C-contiguous copy that keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.array(x, order="C", copy=True)


def _keep(x: Arr, like: Arr) -> Arr:
    return np.asarray(x).astype(like.dtype, copy=False)


# ---- element-wise -------------------------------------------------------------------------------------------

def _erf(x: Arr) -> Arr:
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


def gelu(x: Arr, approximate: str = "none") -> Arr:
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))
    else:
        y = 0.5 * x64 * (1.0 + _erf(x64 * _SQRT1_2))
    return _keep(y, x)


def _unary(f: Callable[[Arr], Arr]) -> Callable:
    return lambda ins, a, n: [_keep(f(ins[0]), ins[0])]


def _div(x: Arr, y: Arr) -> Arr:
    if np.issubdtype(x.dtype, np.integer):
        q = np.floor_divide(x, y)  # truncate toward zero, in integer arithmetic
        r = np.remainder(x, y)
        return q + ((r != 0) & ((x < 0) ^ (y < 0))).astype(q.dtype)
    return np.divide(x, y)


def _mod(ins: list, a: dict, n: int) -> list:
    x, y = ins[0], ins[1]
    if a.get("fmod", 0):
        return [_keep(np.fmod(x, y), x)]
    return [_keep(np.mod(x, y), x)]


def _binary(f: Callable[[Arr, Arr], Arr]) -> Callable:
    return lambda ins, a, n: [_keep(f(ins[0], ins[1]), ins[0])]


def _compare(f: Callable[[Arr, Arr], Arr]) -> Callable:
    return lambda ins, a, n: [np.asarray(f(ins[0], ins[1]), dtype=bool)]


def _variadic(f: Callable[[Arr, Arr], Arr]) -> Callable:
    return lambda ins, a, n: [_keep(reduce(f, [x for x in ins if x is not None]), ins[0])]


def _mean(ins: list, a: dict, n: int) -> list:
    xs = [x for x in ins if x is not None]
    return [_keep(reduce(np.add, xs) / len(xs), xs[0])]


def _clip(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else None
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else None
    y = x
    if lo is not None:
        y = np.maximum(y, lo)
    if hi is not None:
        y = np.minimum(y, hi)
    return [_keep(y, x)]


def _cast(ins: list, a: dict, n: int) -> list:
    return [ins[0].astype(np.dtype(a["to"]))]


def _castlike(ins: list, a: dict, n: int) -> list:
    return [ins[0].astype(ins[1].dtype)]


def _where(ins: list, a: dict, n: int) -> list:
    return [np.where(ins[0], ins[1], ins[2]).astype(ins[1].dtype)]


def _sigmoid(x: Arr) -> Arr:
    x64 = x.astype(np.float64)
    return 1.0 / (1.0 + np.exp(-x64))


def _softplus(x: Arr) -> Arr:
    return np.log1p(np.exp(x.astype(np.float64)))


# ---- linear algebra and normalisation ------------------------------------------------------------------------

def _matmul(ins: list, a: dict, n: int) -> list:
    return [_keep(np.matmul(ins[0], ins[1]), ins[0])]


def linear(x: Arr, weight: Arr, bias: Arr | None = None) -> Arr:
    """The compiler's MatMul(+Add) fusion: `x @ weight.T + bias`, weight stored `[out, in]`."""
    y = x @ weight.T  # [..., k] @ [k, m] -> [..., m]
    if bias is not None and bias.size:
        y = y + bias
    return y.astype(np.float32)


def _linear(ins: list, a: dict, n: int) -> list:
    return [linear(ins[0], ins[1], ins[2] if len(ins) > 2 else None)]


def _gemm(ins: list, a: dict, n: int) -> list:
    A = ins[0].T if a.get("transA", 0) else ins[0]
    B = ins[1].T if a.get("transB", 0) else ins[1]
    y = a.get("alpha", 1.0) * (A @ B)
    if len(ins) > 2 and ins[2] is not None:
        y = y + a.get("beta", 1.0) * ins[2]
    return [_keep(y, ins[0])]


def _softmax(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    ax = S.norm_axis(a.get("axis", -1), x.ndim)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=ax, keepdims=True))
    return [_keep(e / e.sum(axis=ax, keepdims=True), x)]


def _log_softmax(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    ax = S.norm_axis(a.get("axis", -1), x.ndim)
    x64 = x.astype(np.float64)
    m = x64 - x64.max(axis=ax, keepdims=True)
    return [_keep(m - np.log(np.exp(m).sum(axis=ax, keepdims=True)), x)]


def _layernorm(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    ax = S.norm_axis(a.get("axis", -1), x.ndim)
    axes = tuple(range(ax, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)  # [..., 1, 1]
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(var + a.get("epsilon", 1e-5))
    y = (x64 - mean) * inv * ins[1]
    if len(ins) > 2 and ins[2] is not None:
        y = y + ins[2]
    return [_keep(y, x), mean.astype(np.float32), inv.astype(np.float32)][:n]


def _rmsnorm(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    ax = S.norm_axis(a.get("axis", -1), x.ndim)
    axes = tuple(range(ax, x.ndim))
    x64 = x.astype(np.float64)
    inv = 1.0 / np.sqrt((x64 * x64).mean(axis=axes, keepdims=True) + a.get("epsilon", 1e-5))
    return [_keep(x64 * inv * ins[1], x)]


def _reduce(op: str) -> Callable:
    def f(ins: list, a: dict, n: int) -> list:
        x = ins[0]
        have = len(ins) > 1 and ins[1] is not None
        axes, keep = S.reduce_axes(op, x.shape, {1: ins[1]} if have else {}, a, have)
        if not axes and a.get("noop_with_empty_axes", 0):
            return [x.copy()]
        ax = tuple(axes)
        if op == "ReduceSum":
            y = np.sum(x, axis=ax, keepdims=keep, dtype=x.dtype if x.dtype.kind != "f" else np.float64)
        elif op == "ReduceMean":
            y = np.mean(x, axis=ax, keepdims=keep, dtype=np.float64)
        elif op == "ReduceMax":
            init = False if x.dtype == bool else (-np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min)
            y = np.max(x, axis=ax, keepdims=keep, initial=init)
        elif op == "ReduceMin":
            init = True if x.dtype == bool else (np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).max)
            y = np.min(x, axis=ax, keepdims=keep, initial=init)
        elif op == "ReduceL2":
            y = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=ax, keepdims=keep))
        elif op == "ReduceSumSquare":
            y = np.sum(x.astype(np.float64) ** 2, axis=ax, keepdims=keep)
        else:  # ReduceProd
            y = np.prod(x, axis=ax, keepdims=keep)
        return [_keep(y, x)]
    return f


# ---- data movement ---------------------------------------------------------------------------------------------

def _gather(ins: list, a: dict, n: int) -> list:
    x, idx = ins[0], ins[1].astype(np.int64)
    ax = S.norm_axis(a.get("axis", 0), x.ndim)
    d = x.shape[ax]
    if idx.size and (idx.min() < -d or idx.max() >= d):
        raise IndexError(f"Gather: index out of range [{-d}, {d})")
    return [np.take(x, np.where(idx < 0, idx + d, idx), axis=ax)]


def _gathernd(ins: list, a: dict, n: int) -> list:
    data, idx = ins[0], ins[1].astype(np.int64)
    b = int(a.get("batch_dims", 0))
    bshape = data.shape[:b]
    nb = S.numel(bshape)
    k = idx.shape[-1]
    d2 = data.reshape((nb,) + data.shape[b:])  # [batch, ...]
    i2 = idx.reshape((nb, -1, k))  # [batch, n, k]
    rest = data.shape[b + k:]
    out = np.empty((nb, i2.shape[1]) + rest, data.dtype)
    for bi in range(nb):
        for j in range(i2.shape[1]):
            ix = tuple(int(v) + (data.shape[b + t] if v < 0 else 0) for t, v in enumerate(i2[bi, j]))
            out[bi, j] = d2[(bi,) + ix]
    return [out.reshape(idx.shape[:-1] + rest)]


def _shape_op(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    (shape, _), = S.infer("Shape", [x.shape], [x.dtype.name], {}, a)
    r = x.ndim
    start = a.get("start", 0)
    start = min(max(start + r if start < 0 else start, 0), r)
    return [np.array(x.shape[start:start + shape[0]], dtype=np.int64)]


def _reshape(ins: list, a: dict, n: int) -> list:
    shape = S.reshape_target(ins[0].shape, [int(v) for v in ins[1].reshape(-1)], int(a.get("allowzero", 0)))
    return [ins[0].reshape(shape).copy()]


def _by_rule(op: str) -> Callable:
    """Ops that only change the shape (Flatten, Unsqueeze, Squeeze): the rule gives it, the data is copied."""
    def f(ins: list, a: dict, n: int) -> list:
        values = {i: v for i, v in enumerate(ins) if i > 0 and v is not None}
        (shape, _), = S.infer(op, [None if v is None else v.shape for v in ins],
                              [None if v is None else v.dtype.name for v in ins], values, a)
        return [ins[0].reshape(shape).copy()]
    return f


def _transpose(ins: list, a: dict, n: int) -> list:
    perm = a.get("perm") or list(range(ins[0].ndim))[::-1]
    return [_contig(np.transpose(ins[0], perm))]


def _concat(ins: list, a: dict, n: int) -> list:
    xs = [x for x in ins if x is not None]
    return [np.concatenate(xs, axis=S.norm_axis(a["axis"], xs[0].ndim))]


def _slice(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    values = {i: v for i, v in enumerate(ins) if i > 0 and v is not None}
    params = S.slice_params(x.shape, values, len(ins))
    idx = []
    for s, st, ln in params:
        stop = s + st * ln
        idx.append(slice(s, stop if stop >= 0 else None, st))
    return [_contig(x[tuple(idx)])]


def _split(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    ax = S.norm_axis(a.get("axis", 0), x.ndim)
    have = len(ins) > 1 and ins[1] is not None
    sizes = S.split_sizes(x.shape, ax, {1: ins[1]} if have else {}, a, n, have)
    return [_contig(p) for p in np.split(x, np.cumsum(sizes)[:-1], axis=ax)]


def _expand(ins: list, a: dict, n: int) -> list:
    shape = S.broadcast(ins[0].shape, tuple(int(v) for v in ins[1].reshape(-1)))
    return [_contig(np.broadcast_to(ins[0], shape))]


def _tile(ins: list, a: dict, n: int) -> list:
    return [np.tile(ins[0], [int(v) for v in ins[1].reshape(-1)])]


def _trilu(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    k = int(ins[1].reshape(-1)[0]) if len(ins) > 1 and ins[1] is not None else 0
    return [np.triu(x, k) if a.get("upper", 1) else np.tril(x, k)]


def _constant_of_shape(ins: list, a: dict, n: int) -> list:
    dims = tuple(int(v) for v in ins[0].reshape(-1))
    return [np.full(dims, a.get("value", 0.0), dtype=np.dtype(a.get("dtype", "float32")))]


def _range(ins: list, a: dict, n: int) -> list:
    start, limit, delta = (v.reshape(-1)[0] for v in ins[:3])
    length = S.range_length(float(start), float(limit), float(delta))
    return [(start + np.arange(length, dtype=np.float64 if ins[0].dtype.kind == "f" else np.int64) * delta)
            .astype(ins[0].dtype)]


def _cumsum(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    ax = S.norm_axis(int(ins[1].reshape(-1)[0]), x.ndim)
    y = x
    if a.get("reverse", 0):
        y = np.flip(y, ax)
    c = np.cumsum(y, axis=ax, dtype=x.dtype)
    if a.get("exclusive", 0):
        c = c - y
    if a.get("reverse", 0):
        c = np.flip(c, ax)
    return [_contig(c)]


def _argmax(op: str) -> Callable:
    def f(ins: list, a: dict, n: int) -> list:
        x = ins[0]
        ax = S.norm_axis(a.get("axis", 0), x.ndim)
        if a.get("select_last_index", 0):
            y = x.shape[ax] - 1 - (np.argmax if op == "ArgMax" else np.argmin)(np.flip(x, ax), axis=ax)
        else:
            y = (np.argmax if op == "ArgMax" else np.argmin)(x, axis=ax)
        if a.get("keepdims", 1):
            y = np.expand_dims(y, ax)
        return [y.astype(np.int64)]
    return f


REF: dict[str, Callable[[list, dict, int], list]] = {
    "Identity": lambda ins, a, n: [ins[0].copy()],
    "Sqrt": _unary(np.sqrt), "Reciprocal": _unary(np.reciprocal), "Neg": _unary(np.negative),
    "Exp": _unary(np.exp), "Erf": _unary(_erf), "Tanh": _unary(np.tanh), "Sigmoid": _unary(_sigmoid),
    "Relu": _unary(lambda x: np.maximum(x, 0)), "Cos": _unary(np.cos), "Sin": _unary(np.sin), "Log": _unary(np.log),
    "Abs": _unary(np.abs), "Floor": _unary(np.floor), "Ceil": _unary(np.ceil), "Softplus": _unary(_softplus),
    "Gelu": lambda ins, a, n: [gelu(ins[0], a.get("approximate", "none"))],
    "Not": lambda ins, a, n: [np.logical_not(ins[0])],
    "IsNaN": lambda ins, a, n: [np.isnan(ins[0])],
    "IsInf": lambda ins, a, n: [(np.isposinf(ins[0]) & bool(a.get("detect_positive", 1)))
                                | (np.isneginf(ins[0]) & bool(a.get("detect_negative", 1)))],
    "Clip": _clip, "Cast": _cast, "CastLike": _castlike,
    "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply), "Div": _binary(_div),
    "Pow": _binary(np.power), "Mod": _mod,
    "Max": _variadic(np.maximum), "Min": _variadic(np.minimum), "Sum": _variadic(np.add), "Mean": _mean,
    "Equal": _compare(np.equal), "Less": _compare(np.less), "LessOrEqual": _compare(np.less_equal),
    "Greater": _compare(np.greater), "GreaterOrEqual": _compare(np.greater_equal),
    "And": _compare(np.logical_and), "Or": _compare(np.logical_or), "Xor": _compare(np.logical_xor),
    "Where": _where, "MatMul": _matmul, "linear": _linear, "Gemm": _gemm, "Softmax": _softmax,
    "LogSoftmax": _log_softmax, "LayerNormalization": _layernorm, "RMSNormalization": _rmsnorm,
    "Gather": _gather, "GatherND": _gathernd, "Shape": _shape_op,
    "Size": lambda ins, a, n: [np.array(ins[0].size, dtype=np.int64)],
    "Reshape": _reshape, "Flatten": _by_rule("Flatten"), "Unsqueeze": _by_rule("Unsqueeze"),
    "Squeeze": _by_rule("Squeeze"), "Transpose": _transpose, "Concat": _concat, "Slice": _slice, "Split": _split,
    "Expand": _expand, "Tile": _tile, "Trilu": _trilu, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "CumSum": _cumsum, "ArgMax": _argmax("ArgMax"), "ArgMin": _argmax("ArgMin"),
}
for _op in S.REDUCE:
    REF[_op] = _reduce(_op)
