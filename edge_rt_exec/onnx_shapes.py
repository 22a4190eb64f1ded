"""Shapes and dtypes of ONNX ops, shared by the compiler (shapes at the plan's maximum dims) and the engine
(shapes of the actual run, which may be smaller).

`infer(op, shapes, dtypes, values, attrs)` returns the output `(shape, dtype)` pairs of one op from its input
shapes and dtypes; `values` holds the contents of the small integer inputs that decide shapes (Reshape's
target, Slice's starts, ...), indexed by input position. Shapes are tuples of ints, dtypes numpy names
("float32", "int64", "bool", ...). A disagreement raises `ShapeError` (the caller names the node).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Shape = tuple[int, ...]

#: ONNX TensorProto element types the executor runs (bool is computed as uint8 by the kernels).
ONNX_DTYPES: dict[int, str] = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
                               9: "bool", 11: "float64", 12: "uint32", 13: "uint64"}
#: Names of the element types it does not run, for messages.
ONNX_DTYPE_NAMES: dict[int, str] = {0: "UNDEFINED", 8: "STRING", 10: "FLOAT16", 14: "COMPLEX64", 15: "COMPLEX128",
                                    16: "BFLOAT16", 17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2",
                                    20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1",
                                    24: "FLOAT8E8M0", 25: "UINT2", 26: "INT2"}
FLOATS = ("float32", "float64")
INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


class ShapeError(ValueError):
    """Input shapes, dtypes or values an op cannot take."""


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def broadcast(*shapes: Shape) -> Shape:
    """Numpy (multidirectional) broadcasting."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        d = 1
        for s in shapes:
            k = i - (rank - len(s))
            if k < 0:
                continue
            e = s[k]
            if e == d or e == 1:
                continue
            if d == 1:
                d = e
            else:
                raise ShapeError(f"shapes {[list(x) for x in shapes]} do not broadcast")
        out.append(d)
    return tuple(out)


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _ints(v: Any) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1).tolist()]


def _need(values: dict[int, Any], i: int, op: str) -> Any:
    if i not in values:
        raise ShapeError(f"{op} needs the value of input {i} (it decides the output shape)")
    return values[i]


# ---- op families ---------------------------------------------------------------------------------------------

UNARY_SAME = {"Sqrt", "Reciprocal", "Neg", "Exp", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "Cos", "Sin", "Log",
              "Abs", "Floor", "Ceil", "Softplus", "Identity", "Clip", "Softmax", "LogSoftmax", "Trilu"}
BINARY_SAME = {"Add", "Sub", "Mul", "Div", "Pow", "Mod"}
VARIADIC = {"Max", "Min", "Sum", "Mean"}
COMPARE = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}
LOGICAL = {"And", "Or", "Xor"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd", "ReduceSumSquare"}

#: Inputs whose values (not only shapes) decide output shapes; the engine reads them from the arena.
VALUE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Slice": (1, 2, 3, 4), "Split": (1,),
    "Range": (0, 1, 2), "ConstantOfShape": (0,), "Tile": (1,), "Trilu": (1,), "Clip": (1, 2),
    "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceL2": (1,),
    "ReduceProd": (1,), "ReduceSumSquare": (1,), "CumSum": (1,),
}


def reduce_axes(op: str, shape: Shape, values: dict[int, Any], attrs: dict[str, Any],
                have_axes_input: bool) -> tuple[list[int], bool]:
    """(sorted normalised axes, keepdims). Opset >= 18 (and ReduceSum >= 13) take axes as an input."""
    rank = len(shape)
    if have_axes_input:
        axes = _ints(_need(values, 1, op))
    else:
        axes = list(attrs.get("axes", []))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [], bool(attrs.get("keepdims", 1))
        axes = list(range(rank))
    return sorted({norm_axis(a, rank) for a in axes}), bool(attrs.get("keepdims", 1))


def slice_params(shape: Shape, values: dict[int, Any], n_inputs: int) -> list[tuple[int, int, int]]:
    """Per axis `(start, step, length)` of an ONNX Slice (opset >= 10 inputs), clamped like the spec."""
    rank = len(shape)
    starts = _ints(_need(values, 1, "Slice"))
    ends = _ints(_need(values, 2, "Slice"))
    axes = _ints(values[3]) if n_inputs > 3 and 3 in values else list(range(len(starts)))
    steps = _ints(values[4]) if n_inputs > 4 and 4 in values else [1] * len(starts)
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise ShapeError("Slice: starts, ends, axes and steps differ in length")
    out = [(0, 1, int(d)) for d in shape]
    seen = set()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = norm_axis(a, rank)
        if a in seen:
            raise ShapeError(f"Slice: axis {a} repeated")
        seen.add(a)
        if st == 0:
            raise ShapeError("Slice: step 0")
        d = int(shape[a])
        if s < 0:
            s += d
        if e < 0:
            e += d
        if st > 0:
            s = min(max(s, 0), d)
            e = min(max(e, 0), d)
            n = max(0, -(-(e - s) // st))
        else:
            s = min(max(s, -1), d - 1)
            e = min(max(e, -1), d - 1)
            n = max(0, -(-(s - e) // -st))
        out[a] = (s, st, n)
    return out


def split_sizes(shape: Shape, axis: int, values: dict[int, Any], attrs: dict[str, Any], n_out: int,
                have_split_input: bool) -> list[int]:
    d = int(shape[axis])
    if have_split_input:
        sizes = _ints(_need(values, 1, "Split"))
    elif "split" in attrs:
        sizes = [int(x) for x in attrs["split"]]
    else:
        n = int(attrs.get("num_outputs", n_out))
        if "num_outputs" in attrs:
            chunk = -(-d // n)
            sizes = [min(chunk, max(0, d - i * chunk)) for i in range(n)]
        else:
            if d % n:
                raise ShapeError(f"Split: dim {d} does not split into {n} equal parts")
            sizes = [d // n] * n
    if sum(sizes) != d or len(sizes) != n_out or min(sizes, default=0) < 0:
        raise ShapeError(f"Split: sizes {sizes} do not split dim {d} into {n_out} outputs")
    return sizes


def reshape_target(shape: Shape, target: list[int], allowzero: int) -> Shape:
    out = []
    infer = -1
    for i, t in enumerate(target):
        if t == -1:
            if infer >= 0:
                raise ShapeError("Reshape: more than one -1 in the target shape")
            infer = i
            out.append(1)
        elif t == 0 and not allowzero:
            if i >= len(shape):
                raise ShapeError(f"Reshape: 0 at position {i} copies a dim the input (rank {len(shape)}) lacks")
            out.append(int(shape[i]))
        elif t < 0:
            raise ShapeError(f"Reshape: invalid target dim {t}")
        else:
            out.append(int(t))
    total = numel(shape)
    if infer >= 0:
        rest = numel(out)
        if rest == 0 or total % rest:
            raise ShapeError(f"Reshape: cannot reshape {list(shape)} into {target}")
        out[infer] = total // rest
    if numel(out) != total:
        raise ShapeError(f"Reshape: cannot reshape {list(shape)} ({total} elements) into {out}")
    return tuple(out)


def range_length(start: float, limit: float, delta: float) -> int:
    if delta == 0:
        raise ShapeError("Range: delta is 0")
    return max(0, int(np.ceil((limit - start) / delta)))


def matmul_shape(a: Shape, b: Shape) -> Shape:
    if not a or not b:
        raise ShapeError("MatMul: scalar operands")
    a2 = (1,) + tuple(a) if len(a) == 1 else tuple(a)
    b2 = tuple(b) + (1,) if len(b) == 1 else tuple(b)
    if a2[-1] != b2[-2]:
        raise ShapeError(f"MatMul: inner dims differ ({list(a)} @ {list(b)})")
    batch = broadcast(a2[:-2], b2[:-2])
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


# ---- the table -----------------------------------------------------------------------------------------------

def infer(op: str, shapes: list[Shape | None], dtypes: list[str | None], values: dict[int, Any],
          attrs: dict[str, Any], n_out: int = 1) -> list[tuple[Shape, str]]:
    """Output (shape, dtype) of op `op`; absent optional inputs have shape None."""
    fn = _TABLE.get(op)
    if fn is None:
        raise ShapeError(f"no shape rule for op {op}")
    return fn(shapes, dtypes, values, attrs, n_out)


def _same(s, d, v, a, n):  # noqa: ANN001
    return [(tuple(s[0]), d[0])]


def _binary(s, d, v, a, n):  # noqa: ANN001
    return [(broadcast(s[0], s[1]), d[0])]


def _variadic(s, d, v, a, n):  # noqa: ANN001
    return [(broadcast(*[x for x in s if x is not None]), d[0])]


def _compare(s, d, v, a, n):  # noqa: ANN001
    return [(broadcast(s[0], s[1]), "bool")]


def _where(s, d, v, a, n):  # noqa: ANN001
    return [(broadcast(s[0], s[1], s[2]), d[1])]


def _not(s, d, v, a, n):  # noqa: ANN001
    return [(tuple(s[0]), "bool")]


def _cast(s, d, v, a, n):  # noqa: ANN001
    return [(tuple(s[0]), a["to"])]


def _castlike(s, d, v, a, n):  # noqa: ANN001
    return [(tuple(s[0]), d[1])]


def _matmul(s, d, v, a, n):  # noqa: ANN001
    return [(matmul_shape(s[0], s[1]), d[0])]


def _linear(s, d, v, a, n):  # noqa: ANN001
    x = s[0]
    if not x or x[-1] != a["in_features"]:
        raise ShapeError(f"linear: input {list(x)} does not end in {a['in_features']}")
    return [(tuple(x[:-1]) + (a["out_features"],), d[0])]


def _gemm(s, d, v, a, n):  # noqa: ANN001
    A, B = s[0], s[1]
    if len(A) != 2 or len(B) != 2:
        raise ShapeError("Gemm: A and B must be 2-D")
    m, k = (A[1], A[0]) if a.get("transA", 0) else A
    k2, nn = (B[1], B[0]) if a.get("transB", 0) else B
    if k != k2:
        raise ShapeError(f"Gemm: inner dims {k} and {k2} differ")
    if len(s) > 2 and s[2] is not None:
        broadcast((m, nn), s[2])
    return [((m, nn), d[0])]


def _layernorm(s, d, v, a, n):  # noqa: ANN001
    x = tuple(s[0])
    ax = norm_axis(a.get("axis", -1), len(x))
    stat = x[:ax] + (1,) * (len(x) - ax)
    return [(x, d[0]), (stat, "float32"), (stat, "float32")][:n]


def _reduce(op: str) -> Callable:
    def f(s, d, v, a, n):  # noqa: ANN001
        x = tuple(s[0])
        axes, keep = reduce_axes(op, x, v, a, len(s) > 1 and s[1] is not None)
        if keep:
            out = tuple(1 if i in axes else x[i] for i in range(len(x)))
        else:
            out = tuple(x[i] for i in range(len(x)) if i not in axes)
        return [(out, d[0])]
    return f


def _gather(s, d, v, a, n):  # noqa: ANN001
    x, idx = s[0], s[1]
    ax = norm_axis(a.get("axis", 0), len(x))
    return [(tuple(x[:ax]) + tuple(idx) + tuple(x[ax + 1:]), d[0])]


def _gathernd(s, d, v, a, n):  # noqa: ANN001
    x, idx = s[0], s[1]
    b = int(a.get("batch_dims", 0))
    k = idx[-1]
    if b + k > len(x):
        raise ShapeError("GatherND: index tuples longer than the data rank")
    return [(tuple(idx[:-1]) + tuple(x[b + k:]), d[0])]


def _reshape(s, d, v, a, n):  # noqa: ANN001
    return [(reshape_target(s[0], _ints(_need(v, 1, "Reshape")), int(a.get("allowzero", 0))), d[0])]


def _flatten(s, d, v, a, n):  # noqa: ANN001
    x = s[0]
    ax = a.get("axis", 1)
    ax = ax + len(x) if ax < 0 else ax
    if not 0 <= ax <= len(x):
        raise ShapeError(f"Flatten: axis {a.get('axis', 1)} out of range")
    return [((numel(x[:ax]), numel(x[ax:])), d[0])]


def _transpose(s, d, v, a, n):  # noqa: ANN001
    x = s[0]
    perm = a.get("perm") or list(range(len(x)))[::-1]
    if sorted(perm) != list(range(len(x))):
        raise ShapeError(f"Transpose: perm {perm} is not a permutation of rank {len(x)}")
    return [(tuple(x[p] for p in perm), d[0])]


def _unsqueeze(s, d, v, a, n):  # noqa: ANN001
    x = list(s[0])
    axes = _ints(v[1]) if 1 in v else list(a.get("axes", []))
    r = len(x) + len(axes)
    axes = sorted(norm_axis(ax, r) for ax in axes)
    if len(set(axes)) != len(axes):
        raise ShapeError("Unsqueeze: repeated axes")
    for ax in axes:
        x.insert(ax, 1)
    return [(tuple(x), d[0])]


def _squeeze(s, d, v, a, n):  # noqa: ANN001
    x = s[0]
    if 1 in v:
        axes = _ints(v[1])
    elif "axes" in a:
        axes = list(a["axes"])
    else:
        axes = [i for i, e in enumerate(x) if e == 1]
    axes = {norm_axis(ax, len(x)) for ax in axes}
    for ax in axes:
        if x[ax] != 1:
            raise ShapeError(f"Squeeze: dim {ax} is {x[ax]}, not 1")
    return [(tuple(e for i, e in enumerate(x) if i not in axes), d[0])]


def _concat(s, d, v, a, n):  # noqa: ANN001
    xs = [x for x in s if x is not None]
    ax = norm_axis(a["axis"], len(xs[0]))
    out = list(xs[0])
    for x in xs[1:]:
        if len(x) != len(out) or any(x[i] != out[i] for i in range(len(out)) if i != ax):
            raise ShapeError(f"Concat: shapes {[list(y) for y in xs]} differ off axis {ax}")
        out[ax] += x[ax]
    return [(tuple(out), d[0])]


def _slice(s, d, v, a, n):  # noqa: ANN001
    return [(tuple(p[2] for p in slice_params(s[0], v, len(s))), d[0])]


def _split(s, d, v, a, n):  # noqa: ANN001
    x = s[0]
    ax = norm_axis(a.get("axis", 0), len(x))
    sizes = split_sizes(x, ax, v, a, n, len(s) > 1 and s[1] is not None)
    return [(tuple(x[:ax]) + (k,) + tuple(x[ax + 1:]), d[0]) for k in sizes]


def _expand(s, d, v, a, n):  # noqa: ANN001
    return [(broadcast(s[0], tuple(_ints(_need(v, 1, "Expand")))), d[0])]


def _shape(s, d, v, a, n):  # noqa: ANN001
    r = len(s[0])
    start, end = a.get("start", 0), a.get("end", r)
    start = min(max(start + r if start < 0 else start, 0), r)
    end = min(max(end + r if end < 0 else end, 0), r)
    return [((max(0, end - start),), "int64")]


def _size(s, d, v, a, n):  # noqa: ANN001
    return [((), "int64")]


def _constant_of_shape(s, d, v, a, n):  # noqa: ANN001
    dims = tuple(_ints(_need(v, 0, "ConstantOfShape")))
    if any(x < 0 for x in dims):
        raise ShapeError(f"ConstantOfShape: negative dims {list(dims)}")
    return [(dims, a.get("dtype", "float32"))]


def _range(s, d, v, a, n):  # noqa: ANN001
    st, lim, de = (float(np.asarray(_need(v, i, "Range")).reshape(-1)[0]) for i in range(3))
    return [((range_length(st, lim, de),), d[0])]


def _tile(s, d, v, a, n):  # noqa: ANN001
    rep = _ints(_need(v, 1, "Tile"))
    return [(tuple(x * r for x, r in zip(s[0], rep)), d[0])]


def _isnan(s, d, v, a, n):  # noqa: ANN001
    return [(tuple(s[0]), "bool")]


def _argmax(s, d, v, a, n):  # noqa: ANN001
    x = tuple(s[0])
    ax = norm_axis(a.get("axis", 0), len(x))
    out = x[:ax] + ((1,) if a.get("keepdims", 1) else ()) + x[ax + 1:]
    return [(out, "int64")]


_TABLE: dict[str, Callable] = {}
for _op in UNARY_SAME | {"CumSum"}:
    _TABLE[_op] = _same
for _op in BINARY_SAME:
    _TABLE[_op] = _binary
for _op in VARIADIC:
    _TABLE[_op] = _variadic
for _op in COMPARE | LOGICAL:
    _TABLE[_op] = _compare
for _op in REDUCE:
    _TABLE[_op] = _reduce(_op)
_TABLE.update({
    "Where": _where, "Not": _not, "IsNaN": _isnan, "IsInf": _isnan, "Cast": _cast, "CastLike": _castlike,
    "MatMul": _matmul, "linear": _linear, "Gemm": _gemm, "LayerNormalization": _layernorm,
    "RMSNormalization": _layernorm, "Gather": _gather, "GatherND": _gathernd, "Reshape": _reshape,
    "Flatten": _flatten, "Transpose": _transpose, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat,
    "Slice": _slice, "Split": _split, "Expand": _expand, "Shape": _shape, "Size": _size,
    "ConstantOfShape": _constant_of_shape, "Range": _range, "Tile": _tile, "ArgMax": _argmax, "ArgMin": _argmax,
})
