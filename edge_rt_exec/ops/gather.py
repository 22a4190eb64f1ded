"""Gathers: Gather (embedding lookups included) and GatherND.

A Gather whose data is a weight is an embedding lookup: the table stays in its weight format and only the
rows asked for are dequantized (`_quant.dequant_rows_<format>`); in a streamed plan the table is never loaded
at all: each row is read from the weights file (`Site.streamed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import formats as F
from ._copy import _kdt
from ._jit import I64, arr, kernel, prange
from .registry import PAR_MIN, OpDef, Sample, ShapeError, Site, WarmSpec, flat, norm_axis, numel, register

_CHUNK = 1 << 13


@kernel()
def gather(x, idx, out, outer, n, inner):
    """`x` as `[outer, n, inner]`, `idx` flat `[m]` (negatives wrap; out of range raises IndexError) ->
    `out` `[outer, m, inner]`."""
    m = idx.size
    if x.size != outer * n * inner or out.size != outer * m * inner:
        raise ValueError("gather: sizes do not match")
    for i in range(m):
        if idx[i] < -n or idx[i] >= n:
            raise IndexError("Gather: index out of range")
    for t in range(outer * m):
        k = idx[t % m]
        if k < 0:
            k += n
        src = ((t // m) * n + k) * inner
        dst = t * inner
        for i in range(inner):
            out[dst + i] = x[src + i]


@kernel(parallel=True)
def gather_par(x, idx, out, outer, n, inner):
    m = idx.size
    if x.size != outer * n * inner or out.size != outer * m * inner:
        raise ValueError("gather: sizes do not match")
    for i in range(m):
        if idx[i] < -n or idx[i] >= n:
            raise IndexError("Gather: index out of range")
    rows = outer * m
    per = max(1, _CHUNK // max(inner, 1))
    for c in prange((rows + per - 1) // per):
        for t in range(c * per, min(rows, (c + 1) * per)):
            k = idx[t % m]
            if k < 0:
                k += n
            src = ((t // m) * n + k) * inner
            dst = t * inner
            for i in range(inner):
                out[dst + i] = x[src + i]


def _gather_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x, idx = s[0], s[1]
    ax = norm_axis(a["axis"], len(x))
    return [(tuple(x[:ax]) + tuple(idx) + tuple(x[ax + 1:]), "float32" if d[0] is None else d[0])]


def _gather_twin(ins: list, a: dict, n: int) -> list:
    x, idx = ins[0], ins[1].astype(np.int64)
    ax = norm_axis(a["axis"], x.ndim)
    d = x.shape[ax]
    if idx.size and (idx.min() < -d or idx.max() >= d):
        raise IndexError(f"Gather: index out of range [{-d}, {d})")
    return [np.take(x, np.where(idx < 0, idx + d, idx), axis=ax)]


def _rows_kernel(fmt: str) -> Any:
    from . import _quant

    return getattr(_quant, f"dequant_rows_{fmt}")


def _bind_gather(s: Site) -> Callable:
    x, idx, out = s.ins[0], s.ins[1], s.outs[0]
    fmt = s.formats[0]
    shape = s.shapes[0]
    ax = norm_axis(s.attrs["axis"], len(shape))
    ids = flat(idx)
    if ids.dtype != np.int64:
        raise ShapeError(f"Gather: indices are {ids.dtype}, expected int64")
    if 0 in s.streamed:  # a table in the weights file, never loaded: read the rows asked for
        if ax != 0:
            raise ShapeError("Gather: a streamed table is gathered along axis 0 only")
        return _bind_streamed_rows(s.streamed[0], fmt or "f32", shape, ids, out)
    if fmt is not None and fmt != "f32":
        if ax != 0 or len(shape) != 2:
            raise ShapeError(f"Gather: a {fmt} table must be [rows, d] and gathered along axis 0")
        fn, o2 = _rows_kernel(fmt).load(), out.reshape(-1, shape[1])
        return lambda: fn(x, ids, o2)
    fn = (gather_par if out.size >= PAR_MIN else gather).load()
    xf, of = flat(x), flat(out)
    outer, n, inner = numel(shape[:ax]), shape[ax], numel(shape[ax + 1:])
    return lambda: fn(xf, ids, of, outer, n, inner)


def _bind_streamed_rows(reader: Any, fmt: str, shape: tuple[int, ...], ids: np.ndarray, out: np.ndarray) -> Callable:
    """Rows of a table that stays in the file: `reader(row, buf)` fills `buf` with the stored bytes of one row;
    quantized rows go through a one-row buffer and are dequantized into `out`."""
    f = F.get(fmt)
    rows, d = shape[0], numel(shape[1:])
    o2 = out.reshape(-1, d)
    if f.name == "f32":
        def call() -> None:
            for r, i in enumerate(ids.tolist()):
                if not -rows <= i < rows:
                    raise IndexError(f"Gather: index {i} is outside the {rows}-row table")
                reader(i % rows, o2[r])
        return call
    raw = np.empty(f.row_bytes(d), np.uint8)
    one = np.zeros(1, np.int64)
    table = f.view(raw, [1, d])
    fn = _rows_kernel(fmt).load()

    def call_q() -> None:
        for r, i in enumerate(ids.tolist()):
            if not -rows <= i < rows:
                raise IndexError(f"Gather: index {i} is outside the {rows}-row table")
            reader(i % rows, raw)
            fn(table, one, o2[r:r + 1])
    return call_q


def _warm_gather(spec: WarmSpec) -> None:
    fmt = spec.formats[0]
    if fmt is not None and fmt != "f32":
        _rows_kernel(fmt).load()
        return
    x = arr(_kdt(spec.in_dtypes[0]), 1, ro=spec.readonly[0])
    o = arr(_kdt(spec.out_dtypes[0]), 1)
    for k in (gather, gather_par) if spec.big else (gather,):
        k.warm(x, arr(I64, 1), o, I64, I64, I64)


def _gather_sample(rng: np.random.Generator) -> list[Sample]:
    table = rng.standard_normal((50, 64)).astype(np.float32)
    ids = np.array([3, 0, 49, -1, 7], np.int64)
    out = [Sample([table, ids], {"axis": 0}), Sample([table, ids[:2].reshape(2, 1)], {"axis": 1}),
           Sample([rng.integers(0, 9, (4, 3)), np.array([2, 0], np.int64)], {"axis": 0})]
    for fmt in ("f16", "q8_0", "q4_0", "q4_1"):
        f = F.get(fmt)
        out.append(Sample([f.quantize(table), ids], {"axis": 0}, formats=[fmt, None], tol=1e-6))
    return out


register(OpDef(
    name="Gather", shape=_gather_rule, twin=_gather_twin, bind=_bind_gather, warm=_warm_gather,
    kernels=(gather, gather_par), sample=_gather_sample, attrs={"axis": 0}, row_gather=(0,),
    doc="ONNX Gather; on a weight table (any format, resident or streamed) an embedding lookup",
))


# ---- GatherND --------------------------------------------------------------------------------------------------

@kernel()
def gathernd(data, dstr, dims, idx, out, nb, ni, k, bstride, inner):
    """`data` flat; index tuples `idx` `[nb, ni, k]` address dims `dims[:k]` (strides `dstr`) of batch `b`
    (stride `bstride`); each copies `inner` elements to `out` `[nb, ni, inner]`. Out-of-range indices raise."""
    for b in range(nb):
        for j in range(ni):
            off = b * bstride
            for t in range(k):
                v = idx[(b * ni + j) * k + t]
                if v < -dims[t] or v >= dims[t]:
                    raise IndexError("GatherND: index out of range")
                if v < 0:
                    v += dims[t]
                off += v * dstr[t]
            dst = (b * ni + j) * inner
            for i in range(inner):
                out[dst + i] = data[off + i]


def _gathernd_rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x, idx = s[0], s[1]
    b = int(a["batch_dims"])
    k = idx[-1]
    if b + k > len(x):
        raise ShapeError("GatherND: index tuples longer than the data rank")
    return [(tuple(idx[:-1]) + tuple(x[b + k:]), d[0])]


def _gathernd_twin(ins: list, a: dict, n: int) -> list:
    data, idx = ins[0], ins[1].astype(np.int64)
    b = int(a["batch_dims"])
    nb = numel(data.shape[:b])
    k = idx.shape[-1]
    d2 = data.reshape((nb,) + data.shape[b:])  # [batch, ...]
    i2 = idx.reshape((nb, -1, k))  # [batch, n, k]
    rest = data.shape[b + k:]
    out = np.empty((nb, i2.shape[1]) + rest, data.dtype)
    for bi in range(nb):
        for j in range(i2.shape[1]):
            ix = []
            for t, v in enumerate(i2[bi, j]):
                dim = data.shape[b + t]
                if not -dim <= v < dim:
                    raise IndexError("GatherND: index out of range")
                ix.append(int(v) + (dim if v < 0 else 0))
            out[bi, j] = d2[(bi,) + tuple(ix)]
    return [out.reshape(idx.shape[:-1] + rest)]


def _gathernd_bind(s: Site) -> Callable:
    from .registry import strides_of

    data, idx, out = s.ins[0], s.ins[1], s.outs[0]
    b = int(s.attrs["batch_dims"])
    k = idx.shape[-1]
    st = strides_of(data.shape)
    fn = gathernd.load()
    dstr, dims = np.array(st[b:b + k], np.int64), np.array(data.shape[b:b + k], np.int64)
    nb, ni = numel(data.shape[:b]), numel(idx.shape[b:-1])
    bstride, inner = numel(data.shape[b:]), numel(data.shape[b + k:])
    df, xf, of = flat(data), flat(idx), flat(out)
    return lambda: fn(df, dstr, dims, xf, of, nb, ni, k, bstride, inner)


register(OpDef(
    name="GatherND", shape=_gathernd_rule, twin=_gathernd_twin, bind=_gathernd_bind,
    warm=lambda sp: gathernd.warm(arr(_kdt(sp.in_dtypes[0]), 1, ro=sp.readonly[0]), arr(I64, 1), arr(I64, 1),
                                  arr(_kdt(sp.in_dtypes[1]), 1, ro=sp.readonly[1]), arr(_kdt(sp.out_dtypes[0]), 1),
                                  I64, I64, I64, I64, I64),
    kernels=(gathernd,),
    sample=lambda rng: [Sample([rng.standard_normal((2, 3, 4)).astype(np.float32),
                                np.array([[[0, 1]], [[2, -1]]], np.int64)], {"batch_dims": 1})],
    attrs={"batch_dims": 0}, doc="ONNX GatherND",
))
