"""Element-wise maps of one operand: the unary functions (Exp, Gelu, Clip, ...), Cast, and the fused `SiluMul`
of Llama's MLP. (Maps of several broadcast operands are in `binary.py`.)

One kernel, `unary`, maps one flat input through the function an integer code selects. Maps compute in
float64 and round once (as torch does for GELU and SiLU); each kernel has a `_par` variant that runs `prange`
over chunks, used above `PAR_MIN` elements. bool tensors reach the kernels as their uint8 view.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._copy import _CHUNK, _kdt
from ._jit import F64, I64, arr, helper, kernel, prange
from .registry import (
    PAR_MIN,
    OpDef,
    Sample,
    ShapeError,
    Site,
    WarmSpec,
    flat,
    register,
)

# ---- unary maps ------------------------------------------------------------------------------------------------

U_SQRT, U_RECIP, U_NEG, U_EXP, U_ERF, U_TANH, U_SIGMOID, U_RELU, U_GELU_ERF, U_GELU_TANH = range(10)
U_COS, U_SIN, U_LOG, U_ABS, U_FLOOR, U_CEIL, U_SOFTPLUS, U_CLIP, U_COPY, U_ISNAN, U_ISINF, U_NOT = range(10, 22)
U_CAST_BOOL = 22

_S2PI = math.sqrt(2.0 / math.pi)
_R2 = 1.0 / math.sqrt(2.0)


@helper
def _unary_span(x, out, code, p0, p1, lo, hi):  # noqa: C901
    if code == U_COPY:
        for i in range(lo, hi):
            out[i] = x[i]
    elif code == U_NEG:
        for i in range(lo, hi):
            out[i] = -x[i]
    elif code == U_ABS:
        for i in range(lo, hi):
            out[i] = abs(x[i])
    elif code == U_RELU:
        for i in range(lo, hi):
            v = x[i]
            out[i] = v if v > 0 else v - v
    elif code == U_CLIP:
        for i in range(lo, hi):
            v = np.float64(x[i])
            if v < p0:
                v = p0
            if v > p1:
                v = p1
            out[i] = v
    elif code == U_NOT:
        for i in range(lo, hi):
            out[i] = 1 if x[i] == 0 else 0
    elif code == U_CAST_BOOL:
        for i in range(lo, hi):
            out[i] = 1 if x[i] != 0 else 0
    elif code == U_ISNAN:
        for i in range(lo, hi):
            out[i] = 1 if np.isnan(np.float64(x[i])) else 0
    elif code == U_ISINF:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = 1 if (v == np.inf and p0 != 0) or (v == -np.inf and p1 != 0) else 0
    elif code == U_SQRT:
        for i in range(lo, hi):
            out[i] = math.sqrt(np.float64(x[i]))
    elif code == U_RECIP:
        for i in range(lo, hi):
            out[i] = 1.0 / np.float64(x[i])
    elif code == U_EXP:
        for i in range(lo, hi):
            out[i] = math.exp(np.float64(x[i]))
    elif code == U_ERF:
        for i in range(lo, hi):
            out[i] = math.erf(np.float64(x[i]))
    elif code == U_TANH:
        for i in range(lo, hi):
            out[i] = math.tanh(np.float64(x[i]))
    elif code == U_SIGMOID:
        for i in range(lo, hi):
            out[i] = 1.0 / (1.0 + math.exp(-np.float64(x[i])))
    elif code == U_GELU_ERF:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = 0.5 * v * (1.0 + math.erf(v * _R2))
    elif code == U_GELU_TANH:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = 0.5 * v * (1.0 + math.tanh(_S2PI * (v + 0.044715 * v * v * v)))
    elif code == U_COS:
        for i in range(lo, hi):
            out[i] = math.cos(np.float64(x[i]))
    elif code == U_SIN:
        for i in range(lo, hi):
            out[i] = math.sin(np.float64(x[i]))
    elif code == U_LOG:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = math.log(v) if v > 0 else (-np.inf if v == 0 else np.nan)
    elif code == U_FLOOR:
        for i in range(lo, hi):
            out[i] = math.floor(np.float64(x[i]))
    elif code == U_CEIL:
        for i in range(lo, hi):
            out[i] = math.ceil(np.float64(x[i]))
    elif code == U_SOFTPLUS:
        for i in range(lo, hi):
            v = np.float64(x[i])
            out[i] = v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v))


@kernel(error_model="numpy")
def unary(x, out, code, p0, p1):
    """`out = f(x)` element-wise over flat arrays (`code` selects f); `p0`, `p1`: Clip bounds / IsInf flags.
    `out` may alias `x`."""
    if out.size != x.size:
        raise ValueError("unary: x and out differ in size")
    _unary_span(x, out, code, p0, p1, 0, x.size)


@kernel(parallel=True, error_model="numpy")
def unary_par(x, out, code, p0, p1):
    n = x.size
    if out.size != n:
        raise ValueError("unary: x and out differ in size")
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        _unary_span(x, out, code, p0, p1, c * _CHUNK, min(n, (c + 1) * _CHUNK))


def _unary_kernel(n: int) -> Any:
    return (unary_par if n >= PAR_MIN else unary).load()


def bind_unary_code(x: np.ndarray, out: np.ndarray, code: int, p0: float = 0.0, p1: float = 0.0) -> Callable:
    """A bound `unary` call (used by the movement ops for copies too)."""
    fn, xf, of = _unary_kernel(out.size), flat(x), flat(out)
    p0, p1 = float(p0), float(p1)
    return lambda: fn(xf, of, code, p0, p1)


def _warm_unary(spec: WarmSpec) -> None:
    x = arr(_kdt(spec.in_dtypes[0]), 1, ro=spec.readonly[0])
    o = arr(_kdt(spec.out_dtypes[0]), 1)
    unary.warm(x, o, I64, F64, F64)
    if spec.big:
        unary_par.warm(x, o, I64, F64, F64)


def _keep(y: Any, like: np.ndarray) -> np.ndarray:
    return np.asarray(y).astype(like.dtype, copy=False)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(np.asarray(x, np.float64))


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU: exact `x/2 (1 + erf(x / sqrt 2))`, or GPT-2's tanh form `x/2 (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))`."""
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(_S2PI * (x64 + 0.044715 * x64**3)))
    else:
        y = 0.5 * x64 * (1.0 + _erf(x64 * _R2))
    return _keep(y, x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(x.astype(np.float64)))


def _same(s: list, d: list, v: dict, a: dict, n: int) -> list:
    return [(tuple(s[0]), d[0])]


def _to_bool(s: list, d: list, v: dict, a: dict, n: int) -> list:
    return [(tuple(s[0]), "bool")]


def _float_sample(rng: np.random.Generator, positive: bool = False) -> list[Sample]:
    out = []
    for shape in [(3, 5), (2, 3, 4), (1, 70000)]:
        x = rng.standard_normal(shape).astype(np.float32) * 3
        if positive:
            x = np.abs(x) + 0.1
        out.append(Sample([x], {}))
    return out


#: name -> (code, numpy function, positive inputs only in samples)
_UNARY: dict[str, tuple[int, Callable[[np.ndarray], Any], bool]] = {
    "Sqrt": (U_SQRT, np.sqrt, True), "Reciprocal": (U_RECIP, np.reciprocal, True), "Neg": (U_NEG, np.negative, False),
    "Exp": (U_EXP, np.exp, False), "Erf": (U_ERF, _erf, False), "Tanh": (U_TANH, np.tanh, False),
    "Sigmoid": (U_SIGMOID, _sigmoid, False), "Relu": (U_RELU, lambda x: np.maximum(x, 0), False),
    "Cos": (U_COS, np.cos, False), "Sin": (U_SIN, np.sin, False), "Log": (U_LOG, np.log, True),
    "Abs": (U_ABS, np.abs, False), "Floor": (U_FLOOR, np.floor, False), "Ceil": (U_CEIL, np.ceil, False),
    "Softplus": (U_SOFTPLUS, _softplus, False),
}

for _name, (_code, _fn, _pos) in _UNARY.items():
    register(OpDef(
        name=_name, shape=_same,
        twin=(lambda f: lambda ins, a, n: [_keep(f(ins[0]), ins[0])])(_fn),
        bind=(lambda c: lambda s: bind_unary_code(s.ins[0], s.outs[0], c))(_code),
        warm=_warm_unary, kernels=(unary, unary_par),
        sample=(lambda p: lambda rng: _float_sample(rng, p))(_pos),
        inplace={0: 0}, doc=f"ONNX {_name}, element-wise",
    ))


def _gelu_twin(ins: list, a: dict, n: int) -> list:
    return [gelu(ins[0], a["approximate"])]


def _gelu_bind(s: Site) -> Callable:
    return bind_unary_code(s.ins[0], s.outs[0], U_GELU_TANH if s.attrs["approximate"] == "tanh" else U_GELU_ERF)


def _gelu_sample(rng: np.random.Generator) -> list[Sample]:
    return [Sample(c.ins, {"approximate": ap}) for c in _float_sample(rng) for ap in ("none", "tanh")]


register(OpDef(
    name="Gelu", shape=_same, twin=_gelu_twin, bind=_gelu_bind, warm=_warm_unary, kernels=(unary, unary_par),
    sample=_gelu_sample, attrs={"approximate": "none"}, inplace={0: 0},
    doc="ONNX Gelu (opset 20): exact (erf) or `approximate='tanh'` (GPT-2's gelu_new)",
))


def _isinf_twin(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    return [(np.isposinf(x) & bool(a["detect_positive"])) | (np.isneginf(x) & bool(a["detect_negative"]))]


def _special_sample(rng: np.random.Generator) -> list[Sample]:
    x = np.array([0.0, -1.5, np.inf, -np.inf, np.nan, 2.0], np.float32)
    return [Sample([x], {})]


register(OpDef(
    name="IsInf", shape=_to_bool, twin=_isinf_twin,
    bind=lambda s: bind_unary_code(s.ins[0], s.outs[0], U_ISINF, s.attrs["detect_positive"],
                                   s.attrs["detect_negative"]),
    warm=_warm_unary, kernels=(unary, unary_par), sample=_special_sample,
    attrs={"detect_positive": 1, "detect_negative": 1}, doc="ONNX IsInf",
))
register(OpDef(
    name="IsNaN", shape=_to_bool, twin=lambda ins, a, n: [np.isnan(ins[0])],
    bind=lambda s: bind_unary_code(s.ins[0], s.outs[0], U_ISNAN), warm=_warm_unary, kernels=(unary, unary_par),
    sample=_special_sample, doc="ONNX IsNaN",
))
register(OpDef(
    name="Not", shape=_to_bool, twin=lambda ins, a, n: [np.logical_not(ins[0])],
    bind=lambda s: bind_unary_code(s.ins[0], s.outs[0], U_NOT), warm=_warm_unary, kernels=(unary, unary_par),
    sample=lambda rng: [Sample([rng.random(9) > 0.5], {})], inplace={0: 0}, doc="ONNX Not",
))


def _clip_twin(ins: list, a: dict, n: int) -> list:
    x, y = ins[0], ins[0]
    if len(ins) > 1 and ins[1] is not None:
        y = np.maximum(y, ins[1])
    if len(ins) > 2 and ins[2] is not None:
        y = np.minimum(y, ins[2])
    return [_keep(y, x)]


def _clip_bind(s: Site) -> Callable:
    lo = float(s.values[1].reshape(-1)[0]) if 1 in s.values else -np.inf
    hi = float(s.values[2].reshape(-1)[0]) if 2 in s.values else np.inf
    return bind_unary_code(s.ins[0], s.outs[0], U_CLIP, lo, hi)


register(OpDef(
    name="Clip", shape=_same, twin=_clip_twin, bind=_clip_bind, warm=_warm_unary, kernels=(unary, unary_par),
    sample=lambda rng: [Sample([rng.standard_normal(20).astype(np.float32), np.array(-0.5, np.float32),
                                np.array(0.7, np.float32)], {})],
    value_inputs=(1, 2), inplace={0: 0}, doc="ONNX Clip (opset 11+: bounds as inputs)",
))


# ---- casts -----------------------------------------------------------------------------------------------------

@kernel()
def cast(x, out):
    """Element-wise type conversion (C semantics: float -> int truncates)."""
    if out.size != x.size:
        raise ValueError("cast: x and out differ in size")
    for i in range(x.size):
        out[i] = x[i]


@kernel()
def cast_to_int(x, out):
    """Float -> integer: truncated toward zero to int64, then the low bits kept (two's complement), as numpy and
    ONNX Runtime give on x86-64 without AVX-512. A direct conversion is undefined outside the target's range
    and differs by CPU (AVX-512 and aarch64 give 0 or saturate a negative float cast to uint8)."""
    if out.size != x.size:
        raise ValueError("cast: x and out differ in size")
    for i in range(x.size):
        out[i] = np.int64(x[i])


def _to_int(x: np.ndarray, out: np.dtype) -> bool:
    return x.dtype.kind == "f" and out.kind in "iu"


def _cast_bind(s: Site) -> Callable:
    x, out = s.ins[0], s.outs[0]
    if out.dtype == np.bool_:
        return bind_unary_code(x, out, U_CAST_BOOL)
    fn, xf, of = (cast_to_int if _to_int(x, out.dtype) else cast).load(), flat(x), flat(out)
    return lambda: fn(xf, of)


def _cast_warm(spec: WarmSpec) -> None:
    if spec.out_dtypes[0] == "bool":
        _warm_unary(spec)
        return
    src, dst = np.dtype(spec.in_dtypes[0]), np.dtype(spec.out_dtypes[0])
    k = cast_to_int if src.kind == "f" and dst.kind in "iu" else cast
    k.warm(arr(_kdt(spec.in_dtypes[0]), 1, ro=spec.readonly[0]), arr(_kdt(spec.out_dtypes[0]), 1))


def _cast_twin(x: np.ndarray, to: np.dtype) -> np.ndarray:
    """numpy's astype, but float -> integer through int64 (`cast_to_int`: the same bits on every CPU)."""
    return x.astype(np.int64).astype(to) if _to_int(x, to) else x.astype(to)


def _cast_sample(rng: np.random.Generator) -> list[Sample]:
    x = (rng.standard_normal(11) * 10).astype(np.float32)  # negative values cast to uint8 wrap (240 for -16)
    return [Sample([x], {"to": t}) for t in ("int64", "int32", "float64", "bool", "uint8", "int8")]


register(OpDef(
    name="Cast", shape=lambda s, d, v, a, n: [(tuple(s[0]), a["to"])],
    twin=lambda ins, a, n: [_cast_twin(ins[0], np.dtype(a["to"]))], bind=_cast_bind, warm=_cast_warm,
    kernels=(cast, cast_to_int, unary, unary_par), sample=_cast_sample, attrs={"to": None}, required=("to",),
    doc="ONNX Cast (`to` is a numpy dtype name; the compiler converts ONNX's element type; float -> integer "
        "truncates toward zero and wraps to the target's width)",
))
register(OpDef(
    name="CastLike", shape=lambda s, d, v, a, n: [(tuple(s[0]), d[1])],
    twin=lambda ins, a, n: [_cast_twin(ins[0], ins[1].dtype)], bind=_cast_bind, warm=_cast_warm,
    kernels=(cast, cast_to_int, unary, unary_par),
    sample=lambda rng: [Sample([rng.standard_normal(5).astype(np.float32), np.zeros(1, np.int64)], {})],
    doc="ONNX CastLike",
))


# ---- SiluMul ---------------------------------------------------------------------------------------------------

@helper
def _silu_mul_span(gate, up, out, lo, hi):
    for j in range(lo, hi):
        g = np.float64(gate[j])
        out[j] = np.float32(g / (1.0 + math.exp(-g))) * up[j]


@kernel()
def silu_mul(gate, up, out):
    """Llama's MLP gating `silu(gate) * up` over flat float32 arrays; silu rounded to float32 first, as torch
    computes `act_fn(gate) * up`. `out` may alias `gate` or `up`."""
    n = gate.size
    if up.size != n or out.size != n:
        raise ValueError("silu_mul: gate, up and out differ in size")
    _silu_mul_span(gate, up, out, 0, n)


@kernel(parallel=True)
def silu_mul_par(gate, up, out):
    n = gate.size
    if up.size != n or out.size != n:
        raise ValueError("silu_mul: gate, up and out differ in size")
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        _silu_mul_span(gate, up, out, c * _CHUNK, min(n, (c + 1) * _CHUNK))


def silu_mul_twin(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """`silu(gate) * up`, `silu(g) = g * sigmoid(g)` (in float64, rounded to float32, then times up)."""
    g64 = gate.astype(np.float64)
    silu = (g64 / (1.0 + np.exp(-g64))).astype(np.float32)
    return (silu * up).astype(np.float32)


def _silu_bind(s: Site) -> Callable:
    g, u, out = s.ins[0], s.ins[1], s.outs[0]
    fn = (silu_mul_par if out.size >= PAR_MIN else silu_mul).load()
    gf, uf, of = flat(g), flat(u), flat(out)
    return lambda: fn(gf, uf, of)


def _silu_warm(spec: WarmSpec) -> None:
    a = arr("float32", 1)
    for k in (silu_mul, silu_mul_par) if spec.big else (silu_mul,):
        k.warm(a, a, a)


def _silu_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    if tuple(s[0]) != tuple(s[1]):
        raise ShapeError(f"SiluMul: gate {list(s[0])} and up {list(s[1])} differ")
    return [(tuple(s[0]), "float32")]


register(OpDef(
    name="SiluMul", shape=_silu_rule, twin=lambda ins, a, n: [silu_mul_twin(ins[0], ins[1])], bind=_silu_bind,
    warm=_silu_warm, kernels=(silu_mul, silu_mul_par),
    sample=lambda rng: [Sample([rng.standard_normal((3, 40)).astype(np.float32) * 4,
                                rng.standard_normal((3, 40)).astype(np.float32)], {}),
                        Sample([rng.standard_normal((20, 1700)).astype(np.float32),
                                rng.standard_normal((20, 1700)).astype(np.float32)], {})],
    inplace={0: 0}, doc="edge-rt: `silu(gate) * up` (Llama MLP)",
    domain="edge-rt",
))
