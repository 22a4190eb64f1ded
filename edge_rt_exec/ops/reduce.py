"""Reductions: ReduceSum/Mean/Max/Min/L2/SumSquare/Prod, Softmax and LogSoftmax, ArgMax/ArgMin, CumSum, and the
sentence-transformers pooling `MeanPoolL2`.

Every reduction sees its input as `[outer, n, inner]` (the reduced axes adjacent and flattened into `n`) and
accumulates in float64. `softmax_line` is the one softmax of the executor: the attention kernels inline it
on their score rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._copy import _kdt, bind_copy, warm_copy
from ._jit import F32, I64, arr, helper, kernel, prange
from .elementwise import U_COPY, bind_unary_code
from .registry import (
    PAR_MIN,
    OpDef,
    Sample,
    ShapeError,
    Site,
    WarmSpec,
    flat,
    ints,
    norm_axis,
    numel,
    register,
    strides_of,
)

# ---- Reduce* ---------------------------------------------------------------------------------------------------

R_SUM, R_MEAN, R_MAX, R_MIN, R_L2, R_SUMSQ, R_PROD = range(7)
_CODES = {"ReduceSum": R_SUM, "ReduceMean": R_MEAN, "ReduceMax": R_MAX, "ReduceMin": R_MIN, "ReduceL2": R_L2,
          "ReduceSumSquare": R_SUMSQ, "ReduceProd": R_PROD}


@helper
def _reduce_one(x, out, n, inner, code, t):
    base = (t // inner) * n * inner + t % inner
    acc = np.float64(x[base])
    if code == R_L2 or code == R_SUMSQ:
        acc = acc * acc
    for k in range(1, n):
        v = np.float64(x[base + k * inner])
        if code == R_MAX:
            if v > acc or v != v:
                acc = v
        elif code == R_MIN:
            if v < acc or v != v:
                acc = v
        elif code == R_L2 or code == R_SUMSQ:
            acc += v * v
        elif code == R_PROD:
            acc *= v
        else:
            acc += v
    if code == R_MEAN:
        acc /= n
    elif code == R_L2:
        acc = math.sqrt(acc)
    out[t] = acc


@kernel(error_model="numpy")
def reduce(x, out, outer, n, inner, code):
    """Reduce the middle axis of `x` as `[outer, n, inner]` (n >= 1) into `out` `[outer, inner]`."""
    if x.size != outer * n * inner or out.size != outer * inner:
        raise ValueError("reduce: sizes do not match [outer, n, inner]")
    for t in range(outer * inner):
        _reduce_one(x, out, n, inner, code, t)


@kernel(parallel=True, error_model="numpy")
def reduce_par(x, out, outer, n, inner, code):
    if x.size != outer * n * inner or out.size != outer * inner:
        raise ValueError("reduce: sizes do not match [outer, n, inner]")
    for t in prange(outer * inner):
        _reduce_one(x, out, n, inner, code, t)


@kernel()
def reduce_int(x, out, outer, n, inner, code):
    """`reduce` for integer sums and products, in int64 (wraps like numpy)."""
    if x.size != outer * n * inner or out.size != outer * inner:
        raise ValueError("reduce_int: sizes do not match [outer, n, inner]")
    for t in range(outer * inner):
        base = (t // inner) * n * inner + t % inner
        acc = np.int64(x[base])
        for k in range(1, n):
            v = np.int64(x[base + k * inner])
            if code == R_PROD:
                acc *= v
            else:
                acc += v
        out[t] = acc


def reduce_axes(op: str, shape: tuple[int, ...], values: dict[int, Any], attrs: dict[str, Any],
                have_axes_input: bool) -> tuple[list[int], bool]:
    """(sorted normalised axes, keepdims). Opset >= 18 (and ReduceSum >= 13) take axes as an input."""
    rank = len(shape)
    if have_axes_input:
        if 1 not in values:
            raise ShapeError(f"{op} needs the value of input 1 (it decides the output shape)")
        axes = ints(values[1])
    else:
        axes = list(attrs.get("axes") or [])
    if not axes:
        if attrs["noop_with_empty_axes"]:
            return [], bool(attrs["keepdims"])
        axes = list(range(rank))
    return sorted({norm_axis(a, rank) for a in axes}), bool(attrs["keepdims"])


def _reduce_rule(op: str) -> Callable:
    def rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
        x = tuple(s[0])
        axes, keep = reduce_axes(op, x, v, a, len(s) > 1 and s[1] is not None)
        if keep:
            out = tuple(1 if i in axes else x[i] for i in range(len(x)))
        else:
            out = tuple(x[i] for i in range(len(x)) if i not in axes)
        return [(out, d[0])]
    return rule


def _reduce_twin(op: str) -> Callable:
    def twin(ins: list, a: dict, n: int) -> list:
        x = ins[0]
        have = len(ins) > 1 and ins[1] is not None
        axes, keep = reduce_axes(op, x.shape, {1: ins[1]} if have else {}, a, have)
        if not axes and a["noop_with_empty_axes"]:
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
        return [np.asarray(y).astype(x.dtype, copy=False)]
    return twin


def _empty_fill(code: int, dtype: np.dtype) -> Any:
    """What reducing an empty axis gives (numpy's identities; nan for a mean)."""
    if code in (R_SUM, R_SUMSQ, R_L2):
        return 0
    if code == R_PROD:
        return 1
    if code == R_MEAN:
        return np.nan
    if dtype == np.bool_:
        return code == R_MIN
    if dtype.kind == "f":
        return -np.inf if code == R_MAX else np.inf
    return np.iinfo(dtype).min if code == R_MAX else np.iinfo(dtype).max


def _reduce_bind(op: str) -> Callable[[Site], Callable]:
    code = _CODES[op]

    def bind(s: Site) -> Callable:
        x, out = s.ins[0], s.outs[0]
        have = len(s.ins) > 1 and s.ins[1] is not None
        axes, _ = reduce_axes(op, x.shape, s.values, s.attrs, have)
        if not axes:  # noop_with_empty_axes
            return bind_unary_code(x, out, U_COPY)
        calls = []
        if axes != list(range(axes[0], axes[-1] + 1)):
            # Reduced axes not adjacent: move them last into a temporary (exporters reduce one axis).
            kept = [i for i in range(x.ndim) if i not in axes]
            perm = kept + axes
            tmp = np.empty([x.shape[p] for p in perm], x.dtype)
            st = strides_of(x.shape)
            calls.append(bind_copy(x, 0, [st[p] for p in perm], tmp, 0, strides_of(tmp.shape), tmp.shape))
            x, axes = tmp, list(range(len(kept), tmp.ndim))
        outer, n = numel(x.shape[:axes[0]]), numel(x.shape[axes[0]:axes[-1] + 1])
        inner = numel(x.shape[axes[-1] + 1:])
        if n == 0:
            fill = _empty_fill(code, x.dtype)
            return lambda: out.fill(fill)
        if x.dtype.kind in "iu" and code in (R_SUM, R_PROD):
            fn = reduce_int.load()
        else:
            fn = (reduce_par if x.size >= PAR_MIN else reduce).load()
        xf, of = flat(x), flat(out)
        calls.append(lambda: fn(xf, of, outer, n, inner, code))
        return calls[0] if len(calls) == 1 else (lambda: [c() for c in calls])
    return bind


def _reduce_warm(op: str) -> Callable[[WarmSpec], None]:
    def warm(spec: WarmSpec) -> None:
        dt, ro = _kdt(spec.in_dtypes[0]), spec.readonly[0]
        o = arr(_kdt(spec.out_dtypes[0]), 1)
        for x in (arr(dt, 1, ro=ro), arr(dt, 1)):  # the second: a temporary of transposed axes
            if dt[0] in "iu" and op in ("ReduceSum", "ReduceProd"):
                reduce_int.warm(x, o, I64, I64, I64, I64)
            else:
                for k in (reduce, reduce_par) if spec.big else (reduce,):
                    k.warm(x, o, I64, I64, I64, I64)
        warm_copy(spec.in_dtypes[0], ro, spec.big)
    return warm


def _reduce_sample(rng: np.random.Generator) -> list[Sample]:
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    return [Sample([x], {"axes": [1]}), Sample([x], {"axes": [0, 2], "keepdims": 0}),
            Sample([x, np.array([-1], np.int64)], {}), Sample([rng.integers(-4, 4, (3, 4))], {"axes": [1]})]


for _op in _CODES:
    register(OpDef(name=_op, shape=_reduce_rule(_op), twin=_reduce_twin(_op), bind=_reduce_bind(_op),
                   warm=_reduce_warm(_op), kernels=(reduce, reduce_par, reduce_int), sample=_reduce_sample,
                   attrs={"axes": None, "keepdims": 1, "noop_with_empty_axes": 0}, value_inputs=(1,),
                   doc=f"ONNX {_op} (axes as attribute or, opset 18+, input)"))


# ---- Softmax ---------------------------------------------------------------------------------------------------

@helper
def softmax_line(x, out, base, n, stride, log):
    """Softmax (or log-softmax) of `n` elements of `x` from `base` with `stride` into `out` (may alias `x`).
    Each exponential is computed once, in float64, and stored; the sum accumulates in float64. A row of only
    -inf gives NaN, as numpy and the ONNX reference do (the attention kernels never pass one)."""
    m = -np.inf
    for t in range(n):
        v = np.float64(x[base + t * stride])
        if v > m:
            m = v
    s = 0.0
    if log:
        for t in range(n):
            s += math.exp(np.float64(x[base + t * stride]) - m)
        ls = math.log(s)
        for t in range(n):
            out[base + t * stride] = np.float64(x[base + t * stride]) - m - ls
    else:
        for t in range(n):
            e = math.exp(np.float64(x[base + t * stride]) - m)
            out[base + t * stride] = e
            s += e
        inv = 1.0 / s
        for t in range(n):
            out[base + t * stride] = out[base + t * stride] * inv


@kernel()
def softmax(x, out, outer, n, inner, log):
    """Softmax (or log-softmax) over the middle axis of `x` as `[outer, n, inner]`."""
    if x.size != outer * n * inner or out.size != x.size:
        raise ValueError("softmax: sizes do not match [outer, n, inner]")
    for t in range(outer * inner):
        softmax_line(x, out, (t // inner) * n * inner + t % inner, n, inner, log)


@kernel(parallel=True)
def softmax_par(x, out, outer, n, inner, log):
    if x.size != outer * n * inner or out.size != x.size:
        raise ValueError("softmax: sizes do not match [outer, n, inner]")
    for t in prange(outer * inner):
        softmax_line(x, out, (t // inner) * n * inner + t % inner, n, inner, log)


def _softmax_twin(log: bool) -> Callable:
    def twin(ins: list, a: dict, n: int) -> list:
        x = ins[0]
        ax = norm_axis(a["axis"], x.ndim)
        x64 = x.astype(np.float64)
        m = x64 - x64.max(axis=ax, keepdims=True)
        y = m - np.log(np.exp(m).sum(axis=ax, keepdims=True)) if log else \
            np.exp(m) / np.exp(m).sum(axis=ax, keepdims=True)
        return [y.astype(x.dtype)]
    return twin


def _softmax_bind(log: bool) -> Callable[[Site], Callable]:
    def bind(s: Site) -> Callable:
        x = s.ins[0]
        ax = norm_axis(s.attrs["axis"], x.ndim)
        fn = (softmax_par if x.size >= PAR_MIN else softmax).load()
        xf, of = flat(x), flat(s.outs[0])
        outer, n, inner = numel(x.shape[:ax]), x.shape[ax], numel(x.shape[ax + 1:])
        return lambda: fn(xf, of, outer, n, inner, log)
    return bind


def _softmax_warm(spec: WarmSpec) -> None:
    x, o = arr(_kdt(spec.in_dtypes[0]), 1, ro=spec.readonly[0]), arr(_kdt(spec.out_dtypes[0]), 1)
    for k in (softmax, softmax_par) if spec.big else (softmax,):
        k.warm(x, o, I64, I64, I64, "bool")


def _softmax_sample(rng: np.random.Generator) -> list[Sample]:
    x = (rng.standard_normal((3, 4, 7)) * 4).astype(np.float32)
    masked = x.copy()
    masked[0, 1, :] = -np.inf  # a fully masked row: NaN, as numpy gives
    masked[1, 2, 3:] = -np.inf
    return [Sample([x], {"axis": -1}), Sample([x], {"axis": 1}), Sample([masked], {"axis": -1}),
            Sample([rng.standard_normal((9, 5000)).astype(np.float32)], {})]


for _op, _log in (("Softmax", False), ("LogSoftmax", True)):
    register(OpDef(name=_op, shape=lambda s, d, v, a, n: [(tuple(s[0]), d[0])], twin=_softmax_twin(_log),
                   bind=_softmax_bind(_log), warm=_softmax_warm, kernels=(softmax, softmax_par),
                   sample=_softmax_sample, attrs={"axis": -1}, inplace={0: 0}, doc=f"ONNX {_op} (opset 13+)"))


# ---- ArgMax / ArgMin -------------------------------------------------------------------------------------------

@kernel()
def arg_reduce(x, out, outer, n, inner, is_max, last):
    """Index of the first (or `last`) maximum (`is_max`) or minimum along the middle axis of `[outer, n, inner]`;
    NaN wins, as in numpy."""
    if n == 0 or x.size != outer * n * inner or out.size != outer * inner:
        raise ValueError("arg_reduce: sizes do not match [outer, n >= 1, inner]")
    for t in range(outer * inner):
        base = (t // inner) * n * inner + t % inner
        best = 0
        bv = np.float64(x[base])
        for k in range(1, n):
            v = np.float64(x[base + k * inner])
            if bv != bv:
                break
            better = (v > bv if is_max else v < bv) or v != v or (last and v == bv)
            if better:
                best = k
                bv = v
        out[t] = best


def _arg_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x = tuple(s[0])
    ax = norm_axis(a["axis"], len(x))
    return [(x[:ax] + ((1,) if a["keepdims"] else ()) + x[ax + 1:], "int64")]


def _arg_twin(is_max: bool) -> Callable:
    def twin(ins: list, a: dict, n: int) -> list:
        x = ins[0]
        ax = norm_axis(a["axis"], x.ndim)
        f = np.argmax if is_max else np.argmin
        y = x.shape[ax] - 1 - f(np.flip(x, ax), axis=ax) if a["select_last_index"] else f(x, axis=ax)
        return [(np.expand_dims(y, ax) if a["keepdims"] else y).astype(np.int64)]
    return twin


def _arg_bind(is_max: bool) -> Callable[[Site], Callable]:
    def bind(s: Site) -> Callable:
        x = s.ins[0]
        ax = norm_axis(s.attrs["axis"], x.ndim)
        fn, xf, of = arg_reduce.load(), flat(x), flat(s.outs[0])
        outer, n, inner = numel(x.shape[:ax]), x.shape[ax], numel(x.shape[ax + 1:])
        last = bool(s.attrs["select_last_index"])
        return lambda: fn(xf, of, outer, n, inner, is_max, last)
    return bind


def _arg_sample(rng: np.random.Generator) -> list[Sample]:
    x = rng.integers(0, 4, (3, 5, 2)).astype(np.float32)  # ties on purpose
    return [Sample([x], {"axis": 1}), Sample([x], {"axis": 0, "keepdims": 0, "select_last_index": 1}),
            Sample([np.array([[1.0, np.nan, 3.0]], np.float32)], {"axis": 1})]


for _op, _mx in (("ArgMax", True), ("ArgMin", False)):
    register(OpDef(name=_op, shape=_arg_rule, twin=_arg_twin(_mx), bind=_arg_bind(_mx),
                   warm=lambda sp: arg_reduce.warm(arr(_kdt(sp.in_dtypes[0]), 1, ro=sp.readonly[0]), arr(I64, 1),
                                                   I64, I64, I64, "bool", "bool"),
                   kernels=(arg_reduce,), sample=_arg_sample, attrs={"axis": 0, "keepdims": 1, "select_last_index": 0},
                   doc=f"ONNX {_op}"))


# ---- CumSum ----------------------------------------------------------------------------------------------------

@kernel()
def cumsum(x, out, outer, n, inner, exclusive, reverse):
    """Running sums along the middle axis of `[outer, n, inner]`."""
    if x.size != outer * n * inner or out.size != x.size:
        raise ValueError("cumsum: sizes do not match [outer, n, inner]")
    for o in range(outer):
        for i in range(inner):
            acc = x[0] - x[0]
            for t in range(n):
                j = n - 1 - t if reverse else t
                p = (o * n + j) * inner + i
                v = x[p]
                if exclusive:
                    out[p] = acc
                    acc += v
                else:
                    acc += v
                    out[p] = acc


def _cumsum_twin(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    ax = norm_axis(int(ins[1].reshape(-1)[0]), x.ndim)
    y = np.flip(x, ax) if a["reverse"] else x
    c = np.cumsum(y, axis=ax, dtype=x.dtype)
    if a["exclusive"]:
        c = c - y
    return [np.array(np.flip(c, ax) if a["reverse"] else c, order="C")]


def _cumsum_bind(s: Site) -> Callable:
    x = s.ins[0]
    ax = norm_axis(int(s.values[1].reshape(-1)[0]), x.ndim)
    fn, xf, of = cumsum.load(), flat(x), flat(s.outs[0])
    outer, n, inner = numel(x.shape[:ax]), x.shape[ax], numel(x.shape[ax + 1:])
    ex, rev = bool(s.attrs["exclusive"]), bool(s.attrs["reverse"])
    return lambda: fn(xf, of, outer, n, inner, ex, rev)


register(OpDef(
    name="CumSum", shape=lambda s, d, v, a, n: [(tuple(s[0]), d[0])], twin=_cumsum_twin, bind=_cumsum_bind,
    warm=lambda sp: cumsum.warm(arr(_kdt(sp.in_dtypes[0]), 1, ro=sp.readonly[0]), arr(_kdt(sp.out_dtypes[0]), 1),
                                I64, I64, I64, "bool", "bool"),
    kernels=(cumsum,),
    sample=lambda rng: [Sample([rng.standard_normal((3, 4)).astype(np.float32), np.array(1)],
                               {"exclusive": 1, "reverse": 1}), Sample([rng.integers(0, 9, (5,)), np.array(0)], {})],
    attrs={"exclusive": 0, "reverse": 0}, value_inputs=(1,), doc="ONNX CumSum",
))


# ---- MeanPoolL2 ------------------------------------------------------------------------------------------------

@kernel("void", arr(F32, 2, ro=True), arr(I64, 2, ro=True), arr(F32, 2))
def mean_pool_l2(x, mask, out):
    """sentence-transformers mean pooling of `x[B*S, d]` over the tokens whose `mask[B, S]` is 1, then
    `v / max(|v|, 1e-12)`, into `out[B, d]`. Sums in float32 like sentence-transformers."""
    batch, seq = mask.shape
    d = x.shape[1]
    if x.shape[0] != batch * seq or out.shape[0] != batch or out.shape[1] != d:
        raise ValueError("mean_pool_l2: shapes do not match (x[B*S, d], mask[B, S], out[B, d])")
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


def mean_pool_l2_twin(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers mean pooling over tokens with mask 1, then `x / max(||x||, 1e-12)`."""
    batch, seq = mask.shape
    xs = x.reshape(batch, seq, -1).astype(np.float64)  # [B*S, d] -> [B, S, d]
    m = (mask != 0).astype(np.float64)[:, :, None]  # [B, S] -> [B, S, 1]
    pooled = (xs * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)  # [B, S, d] -> [B, d]
    pooled = pooled.astype(np.float32).astype(np.float64)
    norm = np.sqrt((pooled**2).sum(axis=-1, keepdims=True))  # [B, d] -> [B, 1]
    return (pooled / np.maximum(norm, 1e-12)).astype(np.float32)


def _pool_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x, mask = s[0], s[1]
    if len(x) != 2 or len(mask) != 2 or x[0] != mask[0] * mask[1]:
        raise ShapeError(f"MeanPoolL2: x {list(x)} is not [B*S, d] for mask {list(mask)}")
    return [((mask[0], x[1]), "float32")]


def _pool_bind(s: Site) -> Callable:
    fn, x, mask, out = mean_pool_l2.load(), s.ins[0], s.ins[1], s.outs[0]
    return lambda: fn(x, mask, out)


def _pool_sample(rng: np.random.Generator) -> list[Sample]:
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.int64)
    return [Sample([rng.standard_normal((12, 16)).astype(np.float32), mask], {})]


register(OpDef(
    name="MeanPoolL2", shape=_pool_rule, twin=lambda ins, a, n: [mean_pool_l2_twin(ins[0], ins[1])],
    bind=_pool_bind, warm=lambda spec: mean_pool_l2.load(), kernels=(mean_pool_l2,), sample=_pool_sample,
    doc="edge-rt: masked mean pooling + L2 normalisation (sentence-transformers)",
    domain="edge-rt",
))
