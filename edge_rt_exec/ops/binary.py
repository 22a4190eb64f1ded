"""Element-wise maps of broadcast operands: the binary ops (Add, Mul, Less, And, ...), the variadic ones
(Max, Min, Sum, Mean) and Where.

`binary` walks two inputs over the output's collapsed shape (`registry.collapse` merges the dims that are
contiguous in every operand, so a same-shape Add is one flat loop); each input has its own element strides,
0 along a broadcast dim. Arithmetic on floats is done in the operands' dtype except Div, Pow and Mod (float64,
rounded once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce
from typing import Any

import numpy as np

from ._copy import _CHUNK, _kdt, bind_copy_broadcast, offsets2, warm_copy
from ._jit import I64, arr, helper, kernel, prange
from .elementwise import _keep
from .registry import PAR_MIN, OpDef, Sample, Site, WarmSpec, bcast_strides, broadcast, collapse, flat, register

# ---- broadcasting binary maps ----------------------------------------------------------------------------------

B_ADD, B_SUB, B_MUL, B_DIV, B_DIV_INT, B_POW_F, B_POW_I, B_MAX, B_MIN = range(9)
B_EQ, B_LT, B_LE, B_GT, B_GE, B_AND, B_OR, B_XOR, B_MOD_INT, B_MOD_F, B_FMOD = range(9, 20)


@helper
def _binary_span(code, a, ao, sa, b, bo, sb, out, oo, n):  # noqa: C901
    if code == B_ADD:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] + b[bo + j * sb]
    elif code == B_MUL:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] * b[bo + j * sb]
    elif code == B_SUB:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] - b[bo + j * sb]
    elif code == B_DIV:
        for j in range(n):
            out[oo + j] = np.float64(a[ao + j * sa]) / np.float64(b[bo + j * sb])
    elif code == B_DIV_INT:
        for j in range(n):
            x = a[ao + j * sa]
            y = b[bo + j * sb]
            if y == 0:
                out[oo + j] = 0
            else:
                q = x // y
                if (x % y != 0) and ((x < 0) != (y < 0)):
                    q += 1
                out[oo + j] = q
    elif code == B_POW_F:
        for j in range(n):
            out[oo + j] = math.pow(np.float64(a[ao + j * sa]), np.float64(b[bo + j * sb]))
    elif code == B_POW_I:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] ** b[bo + j * sb]
    elif code == B_MAX:
        for j in range(n):
            x = a[ao + j * sa]
            y = b[bo + j * sb]
            out[oo + j] = x if (x > y or x != x) else y
    elif code == B_MIN:
        for j in range(n):
            x = a[ao + j * sa]
            y = b[bo + j * sb]
            out[oo + j] = x if (x < y or x != x) else y
    elif code == B_EQ:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] == b[bo + j * sb]
    elif code == B_LT:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] < b[bo + j * sb]
    elif code == B_LE:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] <= b[bo + j * sb]
    elif code == B_GT:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] > b[bo + j * sb]
    elif code == B_GE:
        for j in range(n):
            out[oo + j] = a[ao + j * sa] >= b[bo + j * sb]
    elif code == B_AND:
        for j in range(n):
            out[oo + j] = (a[ao + j * sa] != 0) and (b[bo + j * sb] != 0)
    elif code == B_OR:
        for j in range(n):
            out[oo + j] = (a[ao + j * sa] != 0) or (b[bo + j * sb] != 0)
    elif code == B_XOR:
        for j in range(n):
            out[oo + j] = (a[ao + j * sa] != 0) != (b[bo + j * sb] != 0)
    elif code == B_MOD_INT:
        for j in range(n):
            y = b[bo + j * sb]
            out[oo + j] = a[ao + j * sa] % y if y != 0 else 0
    elif code == B_MOD_F:
        for j in range(n):
            out[oo + j] = np.remainder(np.float64(a[ao + j * sa]), np.float64(b[bo + j * sb]))
    elif code == B_FMOD:
        for j in range(n):
            out[oo + j] = np.fmod(np.float64(a[ao + j * sa]), np.float64(b[bo + j * sb]))


@kernel(error_model="numpy")
def binary(a, b, out, shape, sa, sb, code):
    """`out = a (op) b` with broadcasting: `out` is contiguous of `shape`; `sa`, `sb` are the inputs' element
    strides over that shape (0 where broadcast). `out` may alias an input of the same shape."""
    nd = shape.size
    inner = shape[nd - 1]
    if inner == 0:
        return
    last_a = sa[nd - 1]
    last_b = sb[nd - 1]
    for o in range(out.size // inner):
        ao, bo = offsets2(o, shape, sa, sb)
        _binary_span(code, a, ao, last_a, b, bo, last_b, out, o * inner, inner)


@kernel(parallel=True, error_model="numpy")
def binary_par(a, b, out, shape, sa, sb, code):
    nd = shape.size
    inner = shape[nd - 1]
    if inner == 0:
        return
    last_a = sa[nd - 1]
    last_b = sb[nd - 1]
    per_row = (inner + _CHUNK - 1) // _CHUNK
    for t in prange((out.size // inner) * per_row):
        o = t // per_row
        lo = (t % per_row) * _CHUNK
        hi = min(inner, lo + _CHUNK)
        ao, bo = offsets2(o, shape, sa, sb)
        _binary_span(code, a, ao + lo * last_a, last_a, b, bo + lo * last_b, last_b, out, o * inner + lo, hi - lo)


def bind_binary(a: np.ndarray, b: np.ndarray, out: np.ndarray, code: int) -> Callable:
    """A bound `binary` call for broadcast operands `a`, `b` into `out`."""
    shape = out.shape
    broadcast(a.shape, b.shape, shape)
    sh, sa, sb = collapse(shape, bcast_strides(a.shape, shape), bcast_strides(b.shape, shape))
    fn = (binary_par if out.size >= PAR_MIN else binary).load()
    af, bf, of = flat(a), flat(b), flat(out)
    return lambda: fn(af, bf, of, sh, sa, sb, code)


_I64_1 = arr(I64, 1)


def _warm_binary(op: str) -> Callable[[WarmSpec], None]:
    """Loads what `_binary_bind(op)` calls: the second operand is cast to the first's dtype (a fresh, writable
    array) unless the dtypes match or the op is Pow."""

    def warm(spec: WarmSpec) -> None:
        (da, ra), (db, rb) = [(d, ro) for d, ro in zip(spec.in_dtypes, spec.readonly) if d][:2]
        if db != da and op != "Pow":
            db, rb = da, False
        o = arr(_kdt(spec.out_dtypes[0]), 1)
        a, b = arr(_kdt(da), 1, ro=ra), arr(_kdt(db), 1, ro=rb)
        for k in (binary, binary_par) if spec.big else (binary,):
            k.warm(a, b, o, _I64_1, _I64_1, _I64_1, I64)
    return warm


def _is_int(a: np.ndarray) -> bool:
    return a.dtype.kind in "iub"


def _div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer):
        q = np.floor_divide(x, y)  # truncate toward zero, in integer arithmetic
        r = np.remainder(x, y)
        return q + ((r != 0) & ((x < 0) ^ (y < 0))).astype(q.dtype)
    return np.divide(x, y)


def _binary_code(op: str, x: np.ndarray, y: np.ndarray, a: dict[str, Any]) -> int:
    if op == "Div":
        return B_DIV_INT if _is_int(x) else B_DIV
    if op == "Pow":
        return B_POW_I if _is_int(x) and _is_int(y) else B_POW_F
    if op == "Mod":
        return B_FMOD if a.get("fmod", 0) else (B_MOD_INT if _is_int(x) else B_MOD_F)
    return _BINARY_CODES[op]


_BINARY_CODES = {"Add": B_ADD, "Sub": B_SUB, "Mul": B_MUL, "Equal": B_EQ, "Less": B_LT, "LessOrEqual": B_LE,
                 "Greater": B_GT, "GreaterOrEqual": B_GE, "And": B_AND, "Or": B_OR, "Xor": B_XOR, "Max": B_MAX,
                 "Min": B_MIN, "Sum": B_ADD, "Mean": B_ADD}
_ARITH: dict[str, Callable] = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _div,
                               "Pow": np.power}
_COMPARE: dict[str, Callable] = {"Equal": np.equal, "Less": np.less, "LessOrEqual": np.less_equal,
                                 "Greater": np.greater, "GreaterOrEqual": np.greater_equal,
                                 "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}


def _binary_bind(op: str) -> Callable[[Site], Callable]:
    def bind(s: Site) -> Callable:
        x, y = s.ins[0], s.ins[1]
        if y.dtype != x.dtype and op != "Pow":
            y = y.astype(x.dtype)  # only scalars differ in practice (checked at compile time)
        return bind_binary(x, y, s.outs[0], _binary_code(op, x, y, s.attrs))
    return bind


def _arith_sample(op: str) -> Callable[[np.random.Generator], list[Sample]]:
    def sample(rng: np.random.Generator) -> list[Sample]:
        a = rng.standard_normal((4, 1, 6)).astype(np.float32)
        b = rng.standard_normal((3, 1)).astype(np.float32)
        if op in ("Div", "Pow", "Mod"):
            b = np.abs(b) + 0.5
        if op == "Pow":
            a = np.abs(a)
        big = rng.standard_normal((2, 40000)).astype(np.float32)
        cases = [Sample([a, b], {}), Sample([big, big[1:]], {})]
        ia, ib = rng.integers(-9, 9, (5,)), rng.integers(1, 5, (5,))
        if op in ("Add", "Sub", "Mul", "Div", "Mod"):
            cases.append(Sample([ia, ib], {}))
        if op == "Mod":
            cases.append(Sample([a, b], {"fmod": 1}))
        return cases
    return sample


def _binary_twin(f: Callable) -> Callable:
    return lambda ins, a, n: [_keep(f(ins[0], ins[1]), ins[0])]


def _mod_twin(ins: list, a: dict, n: int) -> list:
    x, y = ins[0], ins[1]
    return [_keep(np.fmod(x, y) if a["fmod"] else np.mod(x, y), x)]


def _broadcast_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    return [(broadcast(s[0], s[1]), d[0])]


def _compare_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    return [(broadcast(s[0], s[1]), "bool")]


for _op, _f in _ARITH.items():
    register(OpDef(name=_op, shape=_broadcast_rule, twin=_binary_twin(_f), bind=_binary_bind(_op),
                   warm=_warm_binary(_op), kernels=(binary, binary_par), sample=_arith_sample(_op), inplace={0: 0},
                   doc=f"ONNX {_op}, numpy broadcasting"))
register(OpDef(name="Mod", shape=_broadcast_rule, twin=_mod_twin, bind=_binary_bind("Mod"),
               warm=_warm_binary("Mod"), kernels=(binary, binary_par), sample=_arith_sample("Mod"), attrs={"fmod": 0},
               doc="ONNX Mod: integer (Python) or float (fmod=1: C fmod) remainder"))


def _compare_sample(rng: np.random.Generator) -> list[Sample]:
    a = rng.integers(0, 3, (4, 5)).astype(np.float32)
    return [Sample([a, a[:1]], {}), Sample([rng.random(6) > 0.5, rng.random(6) > 0.5], {})]


for _op, _f in _COMPARE.items():
    register(OpDef(name=_op, shape=_compare_rule,
                   twin=(lambda f: lambda ins, a, n: [np.asarray(f(ins[0], ins[1]), dtype=bool)])(_f),
                   bind=_binary_bind(_op), warm=_warm_binary(_op), kernels=(binary, binary_par), sample=_compare_sample,
                   doc=f"ONNX {_op}, numpy broadcasting, bool out"))


def _variadic_bind(op: str) -> Callable[[Site], Callable]:
    def bind(s: Site) -> Callable:
        xs = [x for x in s.ins if x is not None]
        out = s.outs[0]
        if len(xs) == 1:
            calls = [bind_copy_broadcast(xs[0], out)]
        else:
            calls = [bind_binary(xs[0], xs[1], out, _BINARY_CODES[op])]
            calls += [bind_binary(out, x, out, _BINARY_CODES[op]) for x in xs[2:]]
        if op == "Mean":
            calls.append(bind_binary(out, np.array(len(xs), out.dtype), out, B_DIV))
        if len(calls) == 1:
            return calls[0]
        return lambda: [c() for c in calls]
    return bind


def _warm_variadic(spec: WarmSpec) -> None:
    """Loads what `_variadic_bind` calls: out = x0 (op) x1, then out = out (op) xi, Mean's divide by a
    writable scalar, and the broadcast copy of a single operand."""
    ins = [(d, ro) for d, ro in zip(spec.in_dtypes, spec.readonly) if d]
    o = arr(_kdt(spec.out_dtypes[0]), 1)
    toks = [arr(_kdt(d), 1, ro=ro) for d, ro in ins]
    pairs = [(toks[0], toks[1])] if len(toks) > 1 else []
    pairs += [(o, t) for t in toks[2:]] + [(o, arr(_kdt(spec.out_dtypes[0]), 1))]
    for a, b in pairs:
        for k in (binary, binary_par) if spec.big else (binary,):
            k.warm(a, b, o, _I64_1, _I64_1, _I64_1, I64)
    if len(toks) == 1:
        warm_copy(ins[0][0], ins[0][1], spec.big)


_VARIADIC = {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}


def _variadic_sample(rng: np.random.Generator) -> list[Sample]:
    a = rng.standard_normal((3, 4)).astype(np.float32)
    return [Sample([a, a[:1] * 2, a[:, :1]], {}), Sample([a], {})]


def _variadic_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    return [(broadcast(*[x for x in s if x is not None]), d[0])]


for _op, _f in _VARIADIC.items():
    register(OpDef(name=_op, shape=_variadic_rule,
                   twin=(lambda f: lambda ins, a, n: [_keep(reduce(f, [x for x in ins if x is not None]), ins[0])])(_f),
                   bind=_variadic_bind(_op), warm=_warm_variadic, kernels=(binary, binary_par),
                   sample=_variadic_sample, doc=f"ONNX {_op} (variadic, broadcasting)"))


def _mean_twin(ins: list, a: dict, n: int) -> list:
    xs = [x for x in ins if x is not None]
    return [_keep(reduce(np.add, xs) / len(xs), xs[0])]


register(OpDef(name="Mean", shape=_variadic_rule, twin=_mean_twin, bind=_variadic_bind("Mean"), warm=_warm_variadic,
               kernels=(binary, binary_par), sample=_variadic_sample, doc="ONNX Mean (variadic, broadcasting)"))


# ---- Where -----------------------------------------------------------------------------------------------------

@helper
def _offsets3(o, shape, s1, s2, s3):
    p = 0
    q = 0
    u = 0
    r = o
    for d in range(shape.size - 2, -1, -1):
        k = r % shape[d]
        r //= shape[d]
        p += k * s1[d]
        q += k * s2[d]
        u += k * s3[d]
    return p, q, u


@helper
def _where_rows(c, x, y, out, shape, sc, sx, sy, o, lo, hi):
    nd = shape.size
    inner = shape[nd - 1]
    lc, lx, ly = sc[nd - 1], sx[nd - 1], sy[nd - 1]
    co, xo, yo = _offsets3(o, shape, sc, sx, sy)
    base = o * inner
    for j in range(lo, hi):
        out[base + j] = x[xo + j * lx] if c[co + j * lc] != 0 else y[yo + j * ly]


@kernel(error_model="numpy")
def where(c, x, y, out, shape, sc, sx, sy):
    """`out = c ? x : y` with broadcasting (`c` as uint8)."""
    inner = shape[shape.size - 1]
    if inner == 0:
        return
    for o in range(out.size // inner):
        _where_rows(c, x, y, out, shape, sc, sx, sy, o, 0, inner)


@kernel(parallel=True, error_model="numpy")
def where_par(c, x, y, out, shape, sc, sx, sy):
    inner = shape[shape.size - 1]
    if inner == 0:
        return
    per_row = (inner + _CHUNK - 1) // _CHUNK
    for t in prange((out.size // inner) * per_row):
        o = t // per_row
        lo = (t % per_row) * _CHUNK
        _where_rows(c, x, y, out, shape, sc, sx, sy, o, lo, min(inner, lo + _CHUNK))


def _where_bind(s: Site) -> Callable:
    c, x, y = s.ins
    out = s.outs[0]
    shape = out.shape
    sh, sc, sx, sy = collapse(shape, bcast_strides(c.shape, shape), bcast_strides(x.shape, shape),
                              bcast_strides(y.shape, shape))
    fn = (where_par if out.size >= PAR_MIN else where).load()
    cf, xf, yf, of = flat(c), flat(x), flat(y), flat(out)
    return lambda: fn(cf, xf, yf, of, sh, sc, sx, sy)


def _where_warm(spec: WarmSpec) -> None:
    toks = [arr(_kdt(d), 1, ro=ro) for d, ro in zip(spec.in_dtypes, spec.readonly)]
    for k in (where, where_par) if spec.big else (where,):
        k.warm(*toks, arr(_kdt(spec.out_dtypes[0]), 1), _I64_1, _I64_1, _I64_1, _I64_1)


register(OpDef(
    name="Where", shape=lambda s, d, v, a, n: [(broadcast(s[0], s[1], s[2]), d[1])],
    twin=lambda ins, a, n: [np.where(ins[0], ins[1], ins[2]).astype(ins[1].dtype)],
    bind=_where_bind, warm=_where_warm, kernels=(where, where_par),
    sample=lambda rng: [Sample([rng.random((3, 1)) > 0.5, rng.standard_normal((3, 4)).astype(np.float32),
                                np.float32(-1.0) * np.ones(4, np.float32)], {})],
    doc="ONNX Where, numpy broadcasting",
))


