"""Data movement: Identity and the reshaping ops (copies into the output buffer), Transpose, Concat, Slice, Split,
Expand, Tile and Trilu. (The ops that make shapes and ranges are in `shapes.py`.)

One kernel, `_copy.copy_strided`, moves every strided view: Transpose permutes the source strides, Slice
offsets and scales them, Concat and Split offset the destination or the source, Expand broadcasts with zero
strides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._copy import _kdt, bind_copy, bind_copy_broadcast, copy_strided, copy_strided_par, warm_copy
from ._jit import I64, arr, kernel
from .elementwise import U_COPY, _warm_unary, bind_unary_code, unary, unary_par
from .registry import (
    OpDef,
    Sample,
    ShapeError,
    Site,
    WarmSpec,
    broadcast,
    flat,
    ints,
    need_value,
    norm_axis,
    numel,
    register,
    strides_of,
)

_I64_1 = arr(I64, 1)

def _warm_copies(spec: WarmSpec) -> None:
    for d, ro in zip(spec.in_dtypes, spec.readonly):
        if d:
            warm_copy(d, ro, spec.big, spec.out_dtypes[0])


def _contig(x: np.ndarray) -> np.ndarray:
    """A C-contiguous copy that keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    return np.array(x, order="C", copy=True)


# ---- reshaping ops: a copy into the output's shape -------------------------------------------------------------

def reshape_target(shape: tuple[int, ...], target: list[int], allowzero: int) -> tuple[int, ...]:
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


def _reshape_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    return [(reshape_target(s[0], ints(need_value(v, 1, "Reshape")), int(a["allowzero"])), d[0])]


def _flatten_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x = s[0]
    ax = a["axis"] + len(x) if a["axis"] < 0 else a["axis"]
    if not 0 <= ax <= len(x):
        raise ShapeError(f"Flatten: axis {a['axis']} out of range")
    return [((numel(x[:ax]), numel(x[ax:])), d[0])]


def _unsqueeze_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x = list(s[0])
    axes = ints(v[1]) if 1 in v else list(a.get("axes") or [])
    r = len(x) + len(axes)
    axes = sorted(norm_axis(ax, r) for ax in axes)
    if len(set(axes)) != len(axes):
        raise ShapeError("Unsqueeze: repeated axes")
    for ax in axes:
        x.insert(ax, 1)
    return [(tuple(x), d[0])]


def _squeeze_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x = s[0]
    if 1 in v:
        axes = ints(v[1])
    elif a.get("axes") is not None:
        axes = list(a["axes"])
    else:
        axes = [i for i, e in enumerate(x) if e == 1]
    axset = {norm_axis(ax, len(x)) for ax in axes}
    for ax in axset:
        if x[ax] != 1:
            raise ShapeError(f"Squeeze: dim {ax} is {x[ax]}, not 1")
    return [(tuple(e for i, e in enumerate(x) if i not in axset), d[0])]


def _by_rule_twin(rule: Callable) -> Callable:
    """The twin of an op that only changes the shape: the rule gives the shape, the data is copied."""
    def twin(ins: list, a: dict, n: int) -> list:
        values = {i: x for i, x in enumerate(ins) if i > 0 and x is not None}
        (shape, _), = rule([None if x is None else x.shape for x in ins],
                           [None if x is None else x.dtype.name for x in ins], values, a, 1)
        return [ins[0].reshape(shape).copy()]
    return twin


def _copy_bind(s: Site) -> Callable:
    return bind_unary_code(s.ins[0], s.outs[0], U_COPY)


def _shape_sample(*cases: tuple[tuple[int, ...], Any, dict]) -> Callable[[np.random.Generator], list[Sample]]:
    def sample(rng: np.random.Generator) -> list[Sample]:
        out = []
        for shape, second, attrs in cases:
            x = rng.standard_normal(shape).astype(np.float32)
            ins = [x] if second is None else [x, np.array(second, np.int64)]
            out.append(Sample(ins, attrs))
        return out
    return sample


for _name, _rule, _attrs, _vin, _samp in [
    ("Identity", lambda s, d, v, a, n: [(tuple(s[0]), d[0])], {}, (), _shape_sample(((2, 3), None, {}))),
    ("Reshape", _reshape_rule, {"allowzero": 0}, (1,), _shape_sample(((2, 3, 4), [4, -1], {}),
                                                                      ((2, 3, 4), [0, 12], {}))),
    ("Flatten", _flatten_rule, {"axis": 1}, (), _shape_sample(((2, 3, 4), None, {"axis": 2}))),
    ("Unsqueeze", _unsqueeze_rule, {"axes": None}, (1,), _shape_sample(((2, 3), [0, -1], {}))),
    ("Squeeze", _squeeze_rule, {"axes": None}, (1,), _shape_sample(((2, 1, 3, 1), [1], {}), ((1, 3, 1), None, {}))),
]:
    _twin = (lambda ins, a, n: [ins[0].copy()]) if _name == "Identity" else _by_rule_twin(_rule)
    register(OpDef(name=_name, shape=_rule, twin=_twin, bind=_copy_bind, warm=_warm_unary,
                   kernels=(unary, unary_par), sample=_samp, attrs=_attrs, value_inputs=_vin,
                   doc=f"ONNX {_name}: the data is copied into the output buffer (the unary copy kernel)"))


# ---- Transpose, Concat, Slice, Split, Expand, Tile -------------------------------------------------------------

def _transpose_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x = s[0]
    perm = a["perm"] or list(range(len(x)))[::-1]
    if sorted(perm) != list(range(len(x))):
        raise ShapeError(f"Transpose: perm {perm} is not a permutation of rank {len(x)}")
    return [(tuple(x[p] for p in perm), d[0])]


def _transpose_bind(s: Site) -> Callable:
    x, out = s.ins[0], s.outs[0]
    perm = s.attrs["perm"] or list(range(x.ndim))[::-1]
    st = strides_of(x.shape)
    return bind_copy(x, 0, [st[p] for p in perm], out, 0, strides_of(out.shape), out.shape)


register(OpDef(
    name="Transpose", shape=_transpose_rule,
    twin=lambda ins, a, n: [_contig(np.transpose(ins[0], a["perm"] or list(range(ins[0].ndim))[::-1]))],
    bind=_transpose_bind, warm=_warm_copies, kernels=(copy_strided, copy_strided_par),
    sample=_shape_sample(((2, 3, 4), None, {"perm": [2, 0, 1]}), ((3, 5), None, {})), attrs={"perm": None},
    doc="ONNX Transpose",
))


def _concat_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    xs = [x for x in s if x is not None]
    ax = norm_axis(a["axis"], len(xs[0]))
    out = list(xs[0])
    for x in xs[1:]:
        if len(x) != len(out) or any(x[i] != out[i] for i in range(len(out)) if i != ax):
            raise ShapeError(f"Concat: shapes {[list(y) for y in xs]} differ off axis {ax}")
        out[ax] += x[ax]
    return [(tuple(out), d[0])]


def _concat_bind(s: Site) -> Callable:
    out = s.outs[0]
    ax = norm_axis(s.attrs["axis"], out.ndim)
    ost = strides_of(out.shape)
    calls, col = [], 0
    for x in s.ins:
        if x is None:
            continue
        calls.append(bind_copy(x, 0, strides_of(x.shape), out, col * ost[ax], ost, x.shape))
        col += x.shape[ax]
    return lambda: [c() for c in calls]


def _concat_sample(rng: np.random.Generator) -> list[Sample]:
    a, b = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 5)).astype(np.float32)
    return [Sample([a, b, a], {"axis": 1}), Sample([a, a], {"axis": 0})]


register(OpDef(
    name="Concat", shape=_concat_rule,
    twin=lambda ins, a, n: [np.concatenate([x for x in ins if x is not None],
                                           axis=norm_axis(a["axis"], next(x for x in ins if x is not None).ndim))],
    bind=_concat_bind, warm=_warm_copies, kernels=(copy_strided, copy_strided_par), sample=_concat_sample,
    attrs={"axis": None}, required=("axis",), doc="ONNX Concat",
))


def slice_params(shape: tuple[int, ...], values: dict[int, Any], n_inputs: int) -> list[tuple[int, int, int]]:
    """Per axis `(start, step, length)` of an ONNX Slice (opset >= 10 inputs), clamped like the spec."""
    rank = len(shape)
    starts = ints(need_value(values, 1, "Slice"))
    ends = ints(need_value(values, 2, "Slice"))
    axes = ints(values[3]) if n_inputs > 3 and 3 in values else list(range(len(starts)))
    steps = ints(values[4]) if n_inputs > 4 and 4 in values else [1] * len(starts)
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
            k = max(0, -(-(e - s) // st))
        else:
            s = min(max(s, -1), d - 1)
            e = min(max(e, -1), d - 1)
            k = max(0, -(-(s - e) // -st))
        out[a] = (s, st, k)
    return out


def _slice_twin(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    values = {i: v for i, v in enumerate(ins) if i > 0 and v is not None}
    idx = []
    for s, st, ln in slice_params(x.shape, values, len(ins)):
        stop = s + st * ln
        idx.append(slice(s, stop if stop >= 0 else None, st))
    return [_contig(x[tuple(idx)])]


def _slice_bind(s: Site) -> Callable:
    x, out = s.ins[0], s.outs[0]
    params = slice_params(x.shape, s.values, len(s.ins))
    st = strides_of(x.shape)
    off = sum(p[0] * k for p, k in zip(params, st) if p[2] > 0)
    return bind_copy(x, off, [p[1] * k for p, k in zip(params, st)], out, 0, strides_of(out.shape), out.shape)


def _slice_sample(rng: np.random.Generator) -> list[Sample]:
    x = rng.standard_normal((4, 6)).astype(np.float32)
    i = np.array
    return [Sample([x, i([1, -1]), i([3, 0]), i([0, 1]), i([1, -2])], {}), Sample([x, i([2]), i([100])], {})]


register(OpDef(
    name="Slice", shape=lambda s, d, v, a, n: [(tuple(p[2] for p in slice_params(s[0], v, len(s))), d[0])],
    twin=_slice_twin, bind=_slice_bind, warm=_warm_copies, kernels=(copy_strided, copy_strided_par),
    sample=_slice_sample, value_inputs=(1, 2, 3, 4), doc="ONNX Slice (opset 10+: starts/ends/axes/steps inputs)",
))


def split_sizes(shape: tuple[int, ...], axis: int, values: dict[int, Any], attrs: dict[str, Any], n_out: int,
                have_split_input: bool) -> list[int]:
    d = int(shape[axis])
    if have_split_input:
        sizes = ints(need_value(values, 1, "Split"))
    elif attrs.get("split") is not None:
        sizes = [int(x) for x in attrs["split"]]
    else:
        k = int(attrs.get("num_outputs") or n_out)
        if attrs.get("num_outputs") is not None:
            chunk = -(-d // k)
            sizes = [min(chunk, max(0, d - i * chunk)) for i in range(k)]
        else:
            if d % k:
                raise ShapeError(f"Split: dim {d} does not split into {k} equal parts")
            sizes = [d // k] * k
    if sum(sizes) != d or len(sizes) != n_out or min(sizes, default=0) < 0:
        raise ShapeError(f"Split: sizes {sizes} do not split dim {d} into {n_out} outputs")
    return sizes


def _split_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x = s[0]
    ax = norm_axis(a["axis"], len(x))
    sizes = split_sizes(x, ax, v, a, n, len(s) > 1 and s[1] is not None)
    return [(tuple(x[:ax]) + (k,) + tuple(x[ax + 1:]), d[0]) for k in sizes]


def _split_twin(ins: list, a: dict, n: int) -> list:
    x = ins[0]
    ax = norm_axis(a["axis"], x.ndim)
    have = len(ins) > 1 and ins[1] is not None
    sizes = split_sizes(x.shape, ax, {1: ins[1]} if have else {}, a, n, have)
    return [_contig(p) for p in np.split(x, np.cumsum(sizes)[:-1], axis=ax)]


def _split_bind(s: Site) -> Callable:
    x = s.ins[0]
    ax = norm_axis(s.attrs["axis"], x.ndim)
    st = strides_of(x.shape)
    calls, start = [], 0
    for out in s.outs:
        if out is None:
            continue
        calls.append(bind_copy(x, start * st[ax], st, out, 0, strides_of(out.shape), out.shape))
        start += out.shape[ax]
    return lambda: [c() for c in calls]


register(OpDef(
    name="Split", shape=_split_rule, twin=_split_twin, bind=_split_bind, warm=_warm_copies,
    kernels=(copy_strided, copy_strided_par),
    sample=lambda rng: [Sample([rng.standard_normal((4, 6)).astype(np.float32), np.array([2, 4], np.int64)],
                               {"axis": 1}, n_out=2),
                        Sample([rng.standard_normal((6, 2)).astype(np.float32)], {"num_outputs": 4}, n_out=4)],
    attrs={"axis": 0, "split": None, "num_outputs": None}, value_inputs=(1,), doc="ONNX Split",
))


def _expand_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    return [(broadcast(s[0], tuple(ints(need_value(v, 1, "Expand")))), d[0])]


register(OpDef(
    name="Expand", shape=_expand_rule,
    twin=lambda ins, a, n: [_contig(np.broadcast_to(ins[0], broadcast(ins[0].shape, tuple(ints(ins[1])))))],
    bind=lambda s: bind_copy_broadcast(s.ins[0], s.outs[0]), warm=_warm_copies,
    kernels=(copy_strided, copy_strided_par),
    sample=_shape_sample(((3, 1), [2, 3, 4], {})), value_inputs=(1,), doc="ONNX Expand",
))


@kernel()
def tile(x, out, in_shape, out_shape):
    """ONNX Tile: `out[i] = x[i mod in_shape]` per dim, both flat C-contiguous (`out_shape` a multiple of
    `in_shape` in every dim, checked by the caller)."""
    nd = in_shape.size
    n = out.size
    for o in range(n):
        r = o
        src = 0
        mul = 1
        for d in range(nd - 1, -1, -1):
            k = r % out_shape[d]
            r //= out_shape[d]
            src += (k % in_shape[d]) * mul
            mul *= in_shape[d]
        out[o] = x[src]


def _tile_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    rep = ints(need_value(v, 1, "Tile"))
    if len(rep) != len(s[0]) or min(rep, default=0) < 0:
        raise ShapeError(f"Tile: repeats {rep} do not match the rank {len(s[0])} of the input")
    return [(tuple(x * r for x, r in zip(s[0], rep)), d[0])]


def _tile_bind(s: Site) -> Callable:
    x, out = s.ins[0], s.outs[0]
    if out.size == 0:
        return lambda: None
    if x.ndim == 0 or any(o % i for o, i in zip(out.shape, x.shape)) or out.ndim != x.ndim:
        raise ShapeError(f"Tile: output {list(out.shape)} is not a tiling of {list(x.shape)}")
    fn, xf, of = tile.load(), flat(x), flat(out)
    ish, osh = np.array(x.shape, np.int64), np.array(out.shape, np.int64)
    return lambda: fn(xf, of, ish, osh)


def _tile_warm(spec: WarmSpec) -> None:
    tile.warm(arr(_kdt(spec.in_dtypes[0]), 1, ro=spec.readonly[0]), arr(_kdt(spec.out_dtypes[0]), 1), _I64_1,
              _I64_1)


register(OpDef(
    name="Tile", shape=_tile_rule, twin=lambda ins, a, n: [np.tile(ins[0], ints(ins[1]))], bind=_tile_bind,
    warm=_tile_warm, kernels=(tile,), sample=_shape_sample(((2, 3), [2, 3], {}), ((2, 1, 3), [1, 4, 1], {})),
    value_inputs=(1,), doc="ONNX Tile",
))


# ---- Trilu ---------------------------------------------------------------------------------------------------

@kernel()
def trilu(x, out, batch, rows, cols, upper, k):
    """Keep the upper (`j - i >= k`) or lower (`j - i <= k`) triangle of each `[rows, cols]` matrix."""
    if x.size != batch * rows * cols or out.size != x.size:
        raise ValueError("trilu: sizes do not match")
    for b in range(batch):
        for i in range(rows):
            base = (b * rows + i) * cols
            for j in range(cols):
                keep = (j - i >= k) if upper else (j - i <= k)
                out[base + j] = x[base + j] if keep else x[base + j] - x[base + j]


def _trilu_bind(s: Site) -> Callable:
    x, out = s.ins[0], s.outs[0]
    k = int(s.values[1].reshape(-1)[0]) if 1 in s.values else 0
    rows, cols = x.shape[-2], x.shape[-1]
    fn, xf, of, batch, upper = trilu.load(), flat(x), flat(out), numel(x.shape[:-2]), bool(s.attrs["upper"])
    return lambda: fn(xf, of, batch, rows, cols, upper, k)


def _trilu_twin(ins: list, a: dict, n: int) -> list:
    k = int(ins[1].reshape(-1)[0]) if len(ins) > 1 and ins[1] is not None else 0
    return [np.triu(ins[0], k) if a["upper"] else np.tril(ins[0], k)]


register(OpDef(
    name="Trilu", shape=lambda s, d, v, a, n: [(tuple(s[0]), d[0])], twin=_trilu_twin, bind=_trilu_bind,
    warm=lambda sp: trilu.warm(arr(_kdt(sp.in_dtypes[0]), 1, ro=sp.readonly[0]), arr(_kdt(sp.out_dtypes[0]), 1),
                               I64, I64, I64, "bool", I64),
    kernels=(trilu,), sample=_shape_sample(((2, 3, 4), [1], {"upper": 0}), ((3, 3), None, {})),
    attrs={"upper": 1}, value_inputs=(1,), doc="ONNX Trilu",
))
