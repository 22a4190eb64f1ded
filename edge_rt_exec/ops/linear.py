"""`Linear`, the edge-rt op `x @ weight.T + bias` with the weight in any weight format (the transformer families'
projections and LM heads; a constant-weight ONNX MatMul/Gemm is fused into it by the compiler). The generic
ONNX MatMul and Gemm are in `matmul.py`.

Its kernels, one pair per weight format `fmt` (`f32`, `f16`, `q8_0`, `q4_0`, `q4_1`), all reading the
weight in place in its stored layout (ggml blocks for the quantized formats, zero copy):

* `linear_vec_<fmt>(x[k], w, bias, out[M], col0)`, decode (one token): memory-bound, each weight byte is read
  once. Rows are split into chunks of `VEC_ROWS` over the thread pool; each row is one dot product
  (`_quant.dot_<fmt>`: decode a 32-weight block into two 16-lane float vectors, multiply by x, scale).
* `linear_mat_<fmt>(x[n, k], w, bias, out[n, M], col0, scratch)`, prefill (n > 1): compute-bound. Each task
  takes a panel of `PANEL` weight rows, dequantizes it once into its worker's float32 scratch slot
  (`[SLOTS, PANEL, k]`) and sweeps every token over it in 4-token x 4-row register tiles (`_quant.tile_f32`),
  so a weight is decoded once per call however many tokens there are. f32 weights are tiled in place.

Activations stay float32 (a q4_1 plan computes what the dequantized model computes, up to summation order).
The sums use fused multiply-adds in a fixed order per target (see `_quant.py`).

Opt-in `act_quant="q8_0"` (set by the compiler's `act_quant=q8_0` on q4_0 weights, and on a q8_0 LM head): x is
quantized to int8 per 32-block first, as llama.cpp does, and the blocks are multiplied as integer dot products
(`_act_q8.py`); the twin quantizes x the same way (`_act_q8.quantize_q8`) and multiplies the dequantized x.

A row tile (`rows=[r0, r1]`: the weight input holds rows r0..r1 of the full `[out_features, k]` weight, the
bias its r0..r1 slice) writes columns r0..r1 of the `[..., out_features]` output and leaves the others alone.
Contract of the twin for a tile: it returns only those columns, `[..., r1 - r0]` (what the engine's validate
mode compares with `out[..., r0:r1]`). `last_row=1`: only the last row of x is used and the output is
`[1, out_features]` (a decoder's LM head).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from .. import formats as F
from . import _act_q8 as A8
from . import _quant as Q
from ._jit import DOT_FLAGS, F32, I64, U8, U16, arr, helper, kernel, prange
from ._quant import deq_f16, deq_q4_0, deq_q4_1, deq_q8_0, dot_f16, dot_q4_0, dot_q4_1, dot_q8_0, tile_f32
from .registry import (
    OpDef,
    Sample,
    ShapeError,
    Site,
    WarmSpec,
    flat,
    numel,
    register,
)

_F32 = np.float32
_EMPTY = np.zeros(0, np.float32)
_EMPTY.setflags(write=False)

VEC_ROWS = 16  #: weight rows per parallel chunk of the decode kernels
PANEL = 16  #: weight rows a prefill task dequantizes at once (a multiple of the tile's 4 rows)
SLOTS = 4  #: panel buffers in the scratch: the prefill kernels' workers (more threads than slots idle)
TT, TR = Q.TILE_T, Q.TILE_R

FORMATS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
ACT_QUANTS = ("none", "q8_0")  #: values of the `act_quant` attribute: float32 activations, or int8 per 32-block
#: (weights per block, view elements per block) of each format, for the shape checks in the kernels
_GEO = {f: (F.get(f).block, F.get(f).block_bytes // np.dtype(F.get(f).view_dtype).itemsize) for f in FORMATS}
_G32, _G16, _G80, _G40, _G41 = (_GEO[f] for f in FORMATS)


# ---- shared kernel pieces ------------------------------------------------------------------------------------

@helper
def _check_w(k, w, bias, block, per_block):
    """Weight `w` (a format view) holds rows of k weights; bias has one value per row or none."""
    if k % block != 0 or w.shape[1] != k // block * per_block:
        raise ValueError("linear: weight rows do not hold k weights of this format")
    if bias.shape[0] != 0 and bias.shape[0] != w.shape[0]:
        raise ValueError("linear: bias must have one value per weight row, or none")


@helper
def _check_vec(x, w, bias, out, col0, block, per_block):
    _check_w(x.shape[0], w, bias, block, per_block)
    if col0 < 0 or col0 + w.shape[0] > out.shape[0]:
        raise ValueError("linear: out has no columns col0 .. col0 + m")
    return w.shape[0]


@helper
def _check_mat(x, w, bias, out, col0, scratch, block, per_block, slots_needed):
    n, k = x.shape
    _check_w(k, w, bias, block, per_block)
    if out.shape[0] != n or col0 < 0 or col0 + w.shape[0] > out.shape[1]:
        raise ValueError("linear: out must be [n, >= col0 + m]")
    if scratch.shape[1] < PANEL or scratch.shape[2] != k or scratch.shape[0] < slots_needed:
        raise ValueError("linear: scratch must be [slots, PANEL, k], with a slot at least (but for f32)")
    return n, k, w.shape[0]


@helper
def _bias_at(bias, r):
    return bias[r] if bias.shape[0] != 0 else _F32(0.0)


@helper
def _rows_of(c, m, per):
    """Rows [r0, r1) of chunk c of `per` rows."""
    r0 = c * per
    return r0, min(m, r0 + per)


@helper
def _tiles(x, w, wr0, nr, out, c0, bias, b0):
    """out[t, c0 + j] = x[t] . w[wr0 + j] + bias[b0 + j] for every token t and j < nr, in TT x TR tiles."""
    n = x.shape[0]
    for t in range(0, n, TT):
        for j in range(0, nr, TR):
            tile_f32(x, t, min(TT, n - t), w, wr0 + j, min(TR, nr - j), out, c0 + j, bias, b0 + j)


@helper
def _dot_f32(w, x):
    acc = _F32(0.0)
    for i in range(x.shape[0]):
        acc += w[i] * x[i]
    return acc


# ---- Linear: decode (one token) ------------------------------------------------------------------------------

_X1, _B1, _O1 = arr(F32, 1, ro=True), arr(F32, 1, ro=True), arr(F32, 1)


@kernel("void", _X1, arr(F32, 2, ro=True), _B1, _O1, I64, parallel=True, fastmath=DOT_FLAGS)
def linear_vec_f32(x, w, bias, out, col0):
    """`out[col0 + r] = w[r] . x + bias[r]` for every row r of a float32 weight `[m, k]`."""
    m = _check_vec(x, w, bias, out, col0, _G32[0], _G32[1])
    for c in prange((m + VEC_ROWS - 1) // VEC_ROWS):
        r0, r1 = _rows_of(c, m, VEC_ROWS)
        for r in range(r0, r1):
            out[col0 + r] = _dot_f32(w[r], x) + _bias_at(bias, r)


@kernel("void", _X1, arr(U16, 2, ro=True), _B1, _O1, I64, parallel=True)
def linear_vec_f16(x, w, bias, out, col0):
    """As `linear_vec_f32` for an f16 weight (raw halves, `[m, k]` uint16)."""
    m = _check_vec(x, w, bias, out, col0, _G16[0], _G16[1])
    for c in prange((m + VEC_ROWS - 1) // VEC_ROWS):
        r0, r1 = _rows_of(c, m, VEC_ROWS)
        for r in range(r0, r1):
            out[col0 + r] = dot_f16(w[r], x) + _bias_at(bias, r)


@kernel("void", _X1, arr(U8, 2, ro=True), _B1, _O1, I64, parallel=True)
def linear_vec_q8_0(x, w, bias, out, col0):
    """As `linear_vec_f32` for a q8_0 weight (`[m, row_bytes]` ggml blocks)."""
    m = _check_vec(x, w, bias, out, col0, _G80[0], _G80[1])
    for c in prange((m + VEC_ROWS - 1) // VEC_ROWS):
        r0, r1 = _rows_of(c, m, VEC_ROWS)
        for r in range(r0, r1):
            out[col0 + r] = dot_q8_0(w[r], x) + _bias_at(bias, r)


@kernel("void", _X1, arr(U8, 2, ro=True), _B1, _O1, I64, parallel=True)
def linear_vec_q4_0(x, w, bias, out, col0):
    """As `linear_vec_f32` for a q4_0 weight."""
    m = _check_vec(x, w, bias, out, col0, _G40[0], _G40[1])
    for c in prange((m + VEC_ROWS - 1) // VEC_ROWS):
        r0, r1 = _rows_of(c, m, VEC_ROWS)
        for r in range(r0, r1):
            out[col0 + r] = dot_q4_0(w[r], x) + _bias_at(bias, r)


@kernel("void", _X1, arr(U8, 2, ro=True), _B1, _O1, I64, parallel=True)
def linear_vec_q4_1(x, w, bias, out, col0):
    """As `linear_vec_f32` for a q4_1 weight."""
    m = _check_vec(x, w, bias, out, col0, _G41[0], _G41[1])
    for c in prange((m + VEC_ROWS - 1) // VEC_ROWS):
        r0, r1 = _rows_of(c, m, VEC_ROWS)
        for r in range(r0, r1):
            out[col0 + r] = dot_q4_1(w[r], x) + _bias_at(bias, r)


# ---- Linear: prefill (n tokens) ------------------------------------------------------------------------------

_X2, _O2, _S3 = arr(F32, 2, ro=True), arr(F32, 2), arr(F32, 3)


@kernel("void", _X2, arr(F32, 2, ro=True), _B1, _O2, I64, _S3, parallel=True)
def linear_mat_f32(x, w, bias, out, col0, scratch):
    """`out[t, col0 + r] = x[t] . w[r] + bias[r]` for a float32 weight, tiled in place (scratch unused: it may
    have no slots)."""
    n, k, m = _check_mat(x, w, bias, out, col0, scratch, _G32[0], _G32[1], 0)
    for p in prange((m + PANEL - 1) // PANEL):
        r0, r1 = _rows_of(p, m, PANEL)
        _tiles(x, w, r0, r1 - r0, out, col0 + r0, bias, r0)


@kernel("void", _X2, arr(U16, 2, ro=True), _B1, _O2, I64, _S3, parallel=True)
def linear_mat_f16(x, w, bias, out, col0, scratch):
    """As `linear_mat_f32` for an f16 weight. The panels of PANEL rows are split into one contiguous run per
    scratch slot; the slot's worker widens each panel into the slot once and tiles every token over it. Which worker
    (or thread) computes a row never changes its result: the same code path for every row, always."""
    n, k, m = _check_mat(x, w, bias, out, col0, scratch, _G16[0], _G16[1], 1)
    slots, panels = scratch.shape[0], (m + PANEL - 1) // PANEL
    for s in prange(slots):  # worker s owns scratch[s] and a contiguous run of panels
        panel = scratch[s]
        for p in range(s * panels // slots, (s + 1) * panels // slots):
            r0, r1 = _rows_of(p, m, PANEL)
            for r in range(r0, r1):
                deq_f16(w[r], panel[r - r0])
            _tiles(x, panel, 0, r1 - r0, out, col0 + r0, bias, r0)


@kernel("void", _X2, arr(U8, 2, ro=True), _B1, _O2, I64, _S3, parallel=True)
def linear_mat_q8_0(x, w, bias, out, col0, scratch):
    """As `linear_mat_f16` for a q8_0 weight."""
    n, k, m = _check_mat(x, w, bias, out, col0, scratch, _G80[0], _G80[1], 1)
    slots, panels = scratch.shape[0], (m + PANEL - 1) // PANEL
    for s in prange(slots):  # worker s owns scratch[s] and a contiguous run of panels
        panel = scratch[s]
        for p in range(s * panels // slots, (s + 1) * panels // slots):
            r0, r1 = _rows_of(p, m, PANEL)
            for r in range(r0, r1):
                deq_q8_0(w[r], panel[r - r0])
            _tiles(x, panel, 0, r1 - r0, out, col0 + r0, bias, r0)


@kernel("void", _X2, arr(U8, 2, ro=True), _B1, _O2, I64, _S3, parallel=True)
def linear_mat_q4_0(x, w, bias, out, col0, scratch):
    """As `linear_mat_f16` for a q4_0 weight."""
    n, k, m = _check_mat(x, w, bias, out, col0, scratch, _G40[0], _G40[1], 1)
    slots, panels = scratch.shape[0], (m + PANEL - 1) // PANEL
    for s in prange(slots):  # worker s owns scratch[s] and a contiguous run of panels
        panel = scratch[s]
        for p in range(s * panels // slots, (s + 1) * panels // slots):
            r0, r1 = _rows_of(p, m, PANEL)
            for r in range(r0, r1):
                deq_q4_0(w[r], panel[r - r0])
            _tiles(x, panel, 0, r1 - r0, out, col0 + r0, bias, r0)


@kernel("void", _X2, arr(U8, 2, ro=True), _B1, _O2, I64, _S3, parallel=True)
def linear_mat_q4_1(x, w, bias, out, col0, scratch):
    """As `linear_mat_f16` for a q4_1 weight."""
    n, k, m = _check_mat(x, w, bias, out, col0, scratch, _G41[0], _G41[1], 1)
    slots, panels = scratch.shape[0], (m + PANEL - 1) // PANEL
    for s in prange(slots):  # worker s owns scratch[s] and a contiguous run of panels
        panel = scratch[s]
        for p in range(s * panels // slots, (s + 1) * panels // slots):
            r0, r1 = _rows_of(p, m, PANEL)
            for r in range(r0, r1):
                deq_q4_1(w[r], panel[r - r0])
            _tiles(x, panel, 0, r1 - r0, out, col0 + r0, bias, r0)


VEC = {"f32": linear_vec_f32, "f16": linear_vec_f16, "q8_0": linear_vec_q8_0, "q4_0": linear_vec_q4_0,
       "q4_1": linear_vec_q4_1}
MAT = {"f32": linear_mat_f32, "f16": linear_mat_f16, "q8_0": linear_mat_q8_0, "q4_0": linear_mat_q4_0,
       "q4_1": linear_mat_q4_1}


# ---- Linear: the op ------------------------------------------------------------------------------------------

def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The definition: `x @ weight.T + bias` in float32, weight `[out, in]` (already dequantized)."""
    y = x.astype(_F32) @ weight.astype(_F32).T  # [..., k] @ [k, m] -> [..., m]
    if bias is not None and bias.size:
        y = y + bias.astype(_F32)
    return y.astype(_F32)


def _tile(a: dict) -> tuple[int, int] | None:
    rows = a.get("rows")
    if rows is None:
        return None
    r0, r1 = (int(v) for v in rows)
    return r0, r1


def _linear_twin(ins: list, a: dict, n: int) -> list:
    x, w = ins[0], ins[1]
    if a.get("last_row"):
        x = x.reshape(-1, x.shape[-1])[-1:]  # [..., k] -> [1, k]
    if a.get("act_quant") == "q8_0":
        x = A8.dequantize_q8(*A8.quantize_q8(x))  # [..., k]: the int8 activations the kernels multiply
    return [linear(x, w, ins[2] if len(ins) > 2 else None)]  # a tile: its r1 - r0 columns


def _linear_shape(s: list, d: list, v: dict, a: dict, n: int) -> list:
    x, w = s[0], s[1]
    M = int(a["out_features"])
    if x is None or len(x) < 1 or w is None or len(w) != 2:
        raise ShapeError(f"Linear: needs x [..., k] and a 2-D weight, got {x} and {w}")
    if d[0] not in (None, "float32"):
        raise ShapeError(f"Linear: x is {d[0]}, expected float32")
    m, k = int(w[0]), int(w[1])
    if int(x[-1]) != k:
        raise ShapeError(f"Linear: x {list(x)} does not end in the weight's {k} input features")
    if a.get("act_quant", "none") not in ACT_QUANTS:
        raise ShapeError(f"Linear: act_quant {a.get('act_quant')!r} is not one of {', '.join(ACT_QUANTS)}")
    tile = _tile(a)
    if tile is not None:
        r0, r1 = tile
        if not 0 <= r0 < r1 <= M or r1 - r0 != m:
            raise ShapeError(f"Linear: rows {[r0, r1]} do not fit out_features {M} with a {m}-row weight tile")
    elif m != M:
        raise ShapeError(f"Linear: weight has {m} rows, out_features is {M}")
    if len(s) > 2 and s[2] is not None and numel(s[2]) != m:
        raise ShapeError(f"Linear: bias {list(s[2])} does not have the weight's {m} rows")
    if a.get("last_row"):
        return [((1, M), "float32")]
    return [(tuple(x[:-1]) + (M,), "float32")]


def _fmt(fmt: str | None) -> str:
    f = fmt or "f32"
    if f not in VEC:
        raise ShapeError(f"Linear: no kernel for weight format {f!r}; known: {', '.join(VEC)}")
    return f


def _linear_scratch(shapes: list, a: dict) -> list[int]:
    k = int(shapes[1][1])
    n = 1 if a.get("last_row") else numel(shapes[0]) // k
    panels = [] if a.get("last_row") else [SLOTS * PANEL * k]  # per-thread panels (f32 weights do not use them)
    if a.get("act_quant") == "q8_0":
        return panels + [A8.act_floats(n, k)]  # the quantized activations
    return panels


def _bind_linear(s: Site) -> Callable[[], Any]:
    x, w = s.ins[0], s.ins[1]
    fmt = _fmt(s.formats[1] if len(s.formats) > 1 else None)
    m, k = (int(d) for d in s.shapes[1])
    M = int(s.attrs["out_features"])
    tile = _tile(s.attrs)
    col0 = tile[0] if tile else 0
    bias = s.ins[2] if len(s.ins) > 2 and s.ins[2] is not None else _EMPTY
    bias = flat(bias) if bias.size == m else flat(bias)[col0:col0 + m]  # a bias the engine did not tile
    if bias.dtype != np.float32 or bias.size not in (0, m):
        raise ShapeError(f"Linear: bias must be float32 with {m} values")
    x2 = x.reshape(-1, k)  # [..., k] -> [n, k]
    out2 = s.outs[0].reshape(-1, M)
    if s.attrs.get("last_row"):
        x2 = x2[-1:]
    if x2.shape[0] != out2.shape[0]:
        raise ShapeError(f"Linear: {x2.shape[0]} input rows but {out2.shape[0]} output rows")
    if not (x2.flags.c_contiguous and out2.flags.c_contiguous and np.shares_memory(out2, s.outs[0])):
        raise ShapeError("Linear: x and out must be contiguous views (a copy would be computed on, or written to)")
    if s.attrs.get("act_quant") == "q8_0":
        return A8.bind(x2, w, bias, out2, col0, s.scratch[-1] if s.scratch else _EMPTY, s.scratch[0]
                       if len(s.scratch) > 1 else _EMPTY, fmt)
    if x2.shape[0] == 1:
        return partial(VEC[fmt].load(), x2[0], w, bias, out2[0], col0)
    buf = s.scratch[0] if s.scratch else _EMPTY
    slots = 0 if fmt == "f32" else min(SLOTS, buf.size // (PANEL * k))  # as many panel slots as it holds
    if fmt != "f32" and slots == 0:
        raise ShapeError(f"Linear: a {fmt} weight at n > 1 needs scratch for {PANEL} rows of {k} float32 (got "
                         f"{buf.size}); the plan must give the op the scratch `OpDef.scratch` asks for")
    scratch = buf[:slots * PANEL * k].reshape(slots, PANEL, k) if slots else np.zeros((0, PANEL, k), _F32)
    return partial(MAT[fmt].load(), x2, w, bias, out2, col0, scratch)


def _warm_linear(spec: WarmSpec) -> None:
    fmt = _fmt(spec.formats[1] if len(spec.formats) > 1 else None)
    if spec.attrs.get("act_quant") == "q8_0":
        A8.warm(fmt, bool(spec.attrs.get("last_row")))
        return
    VEC[fmt].load()
    if not spec.attrs.get("last_row"):
        MAT[fmt].load()


def _linear_sample(rng: np.random.Generator) -> list[Sample]:
    """Every format; n in {1, 2, 3, 4, 5, 17, 76}; full weights and row tiles; last_row; with and without bias."""
    tol = {"f32": 2e-5, "f16": 2e-5, "q8_0": 2e-5, "q4_0": 2e-5, "q4_1": 2e-5}
    cases = []
    for i, fmt in enumerate(FORMATS):
        f = F.get(fmt)
        for j, n in enumerate((1, 2, 3, 4, 5, 17, 76)):
            k = (64, 96, 160)[(i + j) % 3]
            M = (20, 37, 48)[(i + 2 * j) % 3]
            tiled = (i + j) % 3 == 1
            r0, r1 = (5, M - 3) if tiled else (0, M)
            w = (rng.standard_normal((M, k)) * 0.5).astype(_F32)
            x = rng.standard_normal((n, k)).astype(_F32)
            if n == 17:
                x = x.reshape(1, 17, k)  # leading batch axis
            attrs: dict[str, Any] = {"out_features": M}
            if tiled:
                attrs["rows"] = [r0, r1]
            if n in (5, 76) and not tiled:
                attrs["last_row"] = 1
            wq = f.view(f.quantize(w[r0:r1]).reshape(-1).view(np.uint8), (r1 - r0, k))
            bias = rng.standard_normal(r1 - r0).astype(_F32) if j % 2 == 0 else None
            cases.append(Sample([x, wq, bias], attrs, [None, fmt, None], tol=tol[fmt]))
    f = F.get("q4_0")  # act_quant q8_0 (q4_0 weights only): decode, prefill tiles and their edges, last_row
    for j, n in enumerate((1, 2, 3, 5, 8, 9, 17, 76)):
        k, M = (64, 96, 160)[j % 3], (20, 37, 48, 16)[j % 4]
        tiled = j % 3 == 2
        r0, r1 = (5, M - 3) if tiled else (0, M)
        w = (rng.standard_normal((M, k)) * 0.5).astype(_F32)
        x = rng.standard_normal((n, k)).astype(_F32)
        attrs = {"out_features": M, "act_quant": "q8_0"}
        if tiled:
            attrs["rows"] = [r0, r1]
        if n == 5:
            attrs["last_row"] = 1
        wq = f.view(f.quantize(w[r0:r1]).reshape(-1).view(np.uint8), (r1 - r0, k))
        bias = rng.standard_normal(r1 - r0).astype(_F32) if j % 2 == 0 else None
        cases.append(Sample([x, wq, bias], attrs, [None, "q4_0", None], tol=2e-5))
    g = F.get("q8_0")  # a q8_0 LM head with act_quant: the last row only
    for n, k in ((1, 96), (5, 160)):
        w = (rng.standard_normal((37, k)) * 0.5).astype(_F32)
        wq = g.view(g.quantize(w).reshape(-1).view(np.uint8), (37, k))
        x = rng.standard_normal((n, k)).astype(_F32)
        attrs = {"out_features": 37, "act_quant": "q8_0", "last_row": 1}
        cases.append(Sample([x, wq, None], attrs, [None, "q8_0", None], tol=2e-5))
    return cases


register(OpDef(
    name="Linear", shape=_linear_shape, twin=_linear_twin, bind=_bind_linear, warm=_warm_linear,
    kernels=tuple(VEC.values()) + tuple(MAT.values()) + A8.KERNELS, sample=_linear_sample,
    attrs={"out_features": 0, "rows": None, "last_row": 0, "act_quant": "none"}, required=("out_features",),
    scratch=_linear_scratch, row_tiled=(1, 2), domain="edge-rt",
    flops=lambda i, o, a: 2 * numel(o[0]) // int(o[0][-1]) * int(i[1][0]) * int(i[1][1]),
    doc="x @ weight.T + bias with the weight in any weight format (decode matvec / tiled prefill); `rows` "
        "tiles the output features, `last_row` keeps only the last row of x",
))


