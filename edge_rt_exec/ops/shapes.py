"""Ops that make values from shapes: Shape, Size (metadata, written with numpy), ConstantOfShape (a fill) and Range.

Their outputs are the small integer tensors ONNX graphs compute shapes with (a Reshape's target, Slice's
starts); the engine reads them as value inputs when it binds the ops downstream.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._copy import _kdt
from ._jit import arr, kernel
from .registry import OpDef, Sample, ShapeError, Site, WarmSpec, flat, ints, need_value, register


def _shape_range(rank: int, a: dict) -> tuple[int, int]:
    start = a["start"]
    end = rank if a["end"] is None else a["end"]
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return start, max(start, end)


def _shape_bind(s: Site) -> Callable:
    lo, hi = _shape_range(s.ins[0].ndim, s.attrs)
    out, dims = s.outs[0], np.array(s.ins[0].shape[lo:hi], np.int64)

    def call() -> None:
        out[:] = dims  # a few ints of metadata: no kernel
    return call


register(OpDef(
    name="Shape", shape=lambda s, d, v, a, n: [((_shape_range(len(s[0]), a)[1] - _shape_range(len(s[0]), a)[0],),
                                                "int64")],
    twin=lambda ins, a, n: [np.array(ins[0].shape[slice(*_shape_range(ins[0].ndim, a))], np.int64)],
    bind=_shape_bind, warm=lambda spec: None, kernels=(),
    sample=lambda rng: [Sample([np.zeros((2, 3, 4), np.float32)], {"start": 1})],
    attrs={"start": 0, "end": None}, doc="ONNX Shape (metadata: written with numpy, no kernel)",
))


def _size_bind(s: Site) -> Callable:
    out, n = s.outs[0], s.ins[0].size

    def call() -> None:
        out[...] = n
    return call


register(OpDef(
    name="Size", shape=lambda s, d, v, a, n: [((), "int64")],
    twin=lambda ins, a, n: [np.array(ins[0].size, dtype=np.int64)], bind=_size_bind, warm=lambda spec: None,
    kernels=(), sample=lambda rng: [Sample([np.zeros((2, 3), np.float32)], {})],
    doc="ONNX Size (metadata: written with numpy, no kernel)",
))


def _cos_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    dims = tuple(ints(need_value(v, 0, "ConstantOfShape")))
    if any(x < 0 for x in dims):
        raise ShapeError(f"ConstantOfShape: negative dims {list(dims)}")
    return [(dims, a["dtype"])]


def _cos_bind(s: Site) -> Callable:
    out, value = s.outs[0], s.attrs["value"]
    return lambda: out.fill(value)  # a memset: numpy's fill, no kernel


register(OpDef(
    name="ConstantOfShape", shape=_cos_rule,
    twin=lambda ins, a, n: [np.full(tuple(ints(ins[0])), a["value"], dtype=np.dtype(a["dtype"]))],
    bind=_cos_bind, warm=lambda spec: None, kernels=(),
    sample=lambda rng: [Sample([np.array([2, 3], np.int64)], {"value": 1.5})],
    attrs={"value": 0.0, "dtype": "float32"}, value_inputs=(0,),
    doc="ONNX ConstantOfShape (`value`/`dtype` as plain attributes; a fill, no kernel)",
))


def range_length(start: float, limit: float, delta: float) -> int:
    if delta == 0:
        raise ShapeError("Range: delta is 0")
    return max(0, int(np.ceil((limit - start) / delta)))


@kernel()
def arange(out, start, delta):
    for i in range(out.size):
        out[i] = start + i * delta


def _range_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    st, lim, de = (float(np.asarray(need_value(v, i, "Range")).reshape(-1)[0]) for i in range(3))
    return [((range_length(st, lim, de),), d[0])]


def _range_twin(ins: list, a: dict, n: int) -> list:
    start, limit, delta = (v.reshape(-1)[0] for v in ins[:3])
    length = range_length(float(start), float(limit), float(delta))
    return [(start + np.arange(length, dtype=np.float64 if ins[0].dtype.kind == "f" else np.int64) * delta)
            .astype(ins[0].dtype)]


def _range_bind(s: Site) -> Callable:
    out = s.outs[0]
    start, delta = s.values[0].reshape(-1)[0], s.values[2].reshape(-1)[0]
    fn, of = arange.load(), flat(out)
    return lambda: fn(of, start, delta)


def _range_warm(spec: WarmSpec) -> None:
    dt = _kdt(spec.in_dtypes[0])
    arange.warm(arr(_kdt(spec.out_dtypes[0]), 1), dt, dt)


register(OpDef(
    name="Range", shape=_range_rule, twin=_range_twin, bind=_range_bind, warm=_range_warm, kernels=(arange,),
    sample=lambda rng: [Sample([np.array(1.0, np.float32), np.array(4.0, np.float32), np.array(0.5, np.float32)],
                               {}),
                        Sample([np.array(10), np.array(2), np.array(-3)], {})],
    value_inputs=(0, 1, 2), doc="ONNX Range",
))
