"""Shared numba pieces of the ggml block formats: per-format row decode and dot products, the f32 register tile
of the prefill kernels, and the gather kernels that dequantize embedding rows (`dequant_rows_<fmt>`,
`dequant_row_bytes_<fmt>`).

Why the inner loops are LLVM IR (numba intrinsics) and not plain numba loops: a ggml block is 32 weights behind
one fp16 scale. Written as numba loops (`for b in range(nb): for j in range(16): ...`), LLVM fully unrolls the
16-wide inner loop and then either leaves it scalar (numba runs LLVM with the SLP vectorizer off) or vectorizes
the *block* loop with gathers. Measured on Zen4 (q4_0 1536x576 decode matvec, 2 threads): plain numba variants
reached 2-10 G weights/s; the same loop written here as explicit `<16 x float>` LLVM IR reaches 30. The IR uses
only generic LLVM vector operations (no x86 intrinsics): `fpext half`, `zext`/`sitofp`, `llvm.fma`, shuffles;
LLVM lowers them to AVX-512/AVX2 on x86 and NEON on aarch64 (checked under qemu, cortex-a72). The row decode
and dot products spell every sum out (one `llvm.fma` per lane of a fixed 16 lanes, a fixed shuffle tree), so
their results are bit-identical on every target; the prefill tile sizes its lanes to the target's registers
(16 / 8 / 4), so prefill sums differ across targets in the last bits.

Laziness: an intrinsic here is a `_Lazy` object. numba asks it for its type (`_numba_type_`) when it types a
kernel that calls it, so llvmlite and numba are imported, and the IR builders run, only when a kernel is compiled;
a kernel loaded from numba's cache never builds them. Callers pass contiguous arrays whose sizes they have
checked (the intrinsics do no bounds checking): a row's bytes and `x`/`out` of `k` float32.

Caution: numba's cache checks only the source file of the kernel itself, so after editing the IR here, delete
the cached `matmul.*` kernels (NUMBA_CACHE_DIR) or they keep the old code.
"""

from __future__ import annotations

from typing import Any

from .. import formats
from ._ir import _IR, _Lazy, ir_tools
from ._jit import F32, I64, U8, U16, arr, helper, kernel

QK = formats.QK  #: weights per block


# ---- per-format block decode (IR) ----------------------------------------------------------------------------

#: block geometry of the IR decoders: bytes per block, offset of the quants
_GEOM = {"q8_0": (formats.Q8_0.block_bytes, 2), "q4_0": (formats.Q4_0.block_bytes, 2),
         "q4_1": (formats.Q4_1.block_bytes, 4)}


def _decode_block(T: _IR, b: Any, fmt: str, base: Any, off: Any) -> tuple:
    """IR: the block at `base + off` -> (lo, hi, d, m): its weights 0..15 and 16..31 as `<16 x float>` of
    integer values, the scale and (q4_1) the minimum splat over 16 lanes; weight j = d * q_j (+ m).

    Nibbles are split after widening to 32-bit lanes (one zero-extend, then a 32-bit and / shift: x86 has no
    byte shifts), and the fp16 scale is splat as a half vector and widened once (`vcvtph2ps`): both measured
    faster than splitting bytes and splatting a scalar."""
    d = T.half_splat(b, base, off)
    if fmt == "q8_0":
        q = T.load(b, base, b.add(off, T.idx(2)), T.vec(T.i8, 32))
        lo = b.sitofp(T.shuffle(b, q, q, list(range(16))), T.vf)
        hi = b.sitofp(T.shuffle(b, q, q, list(range(16, 32))), T.vf)
        return lo, hi, d, None
    vi32 = T.vec(T.i32, 16)
    qoff = 2 if fmt == "q4_0" else 4
    q = b.zext(T.load(b, base, b.add(off, T.idx(qoff)), T.vec(T.i8, 16)), vi32)
    lo, hi = b.and_(q, T.const(vi32, 15)), b.lshr(q, T.const(vi32, 4))  # byte j: weights j (low), j + 16 (high)
    if fmt == "q4_0":
        lo, hi = b.sub(lo, T.const(vi32, 8)), b.sub(hi, T.const(vi32, 8))
        return b.sitofp(lo, T.vf), b.sitofp(hi, T.vf), d, None
    return b.sitofp(lo, T.vf), b.sitofp(hi, T.vf), d, T.half_splat(b, base, b.add(off, T.idx(2)))


def _build_dot(fmt: str) -> Any:
    """`dot_<fmt>(row, x) -> float32`: sum over k = len(x) of row's weights times x (fp32 activations)."""
    T = ir_tools()
    ir = T.ir

    def typer(typingctx: Any, row: Any, x: Any) -> Any:
        def codegen(context: Any, b: Any, sig: Any, args: Any) -> Any:
            rp = T.array(context, b, sig.args[0], args[0]).data
            xa = T.array(context, b, sig.args[1], args[1])
            k, xp = T.length(b, xa), xa.data
            zero = T.const(T.vf, 0.0)
            acc = T.cgutils.alloca_once_value(b, zero)
            if fmt == "f16":  # 16 halves at a time, then a scalar tail
                tail = T.cgutils.alloca_once_value(b, ir.Constant(T.f32, 0.0))
                nv = b.sdiv(k, T.idx(16))
                with T.cgutils.for_range(b, nv) as loop:
                    i = b.mul(loop.index, T.idx(16))
                    w = T.halves(b, rp, b.mul(i, T.idx(2)), 16)
                    xv = T.load(b, xp, b.mul(i, T.idx(4)), T.vf, 4)
                    b.store(T.fma(b, w, xv, b.load(acc)), acc)
                with T.cgutils.for_range_slice(b, b.mul(nv, T.idx(16)), k, T.idx(1)) as (i, _):
                    w = T.half(b, rp, b.mul(i, T.idx(2)))
                    xs = T.load(b, xp, b.mul(i, T.idx(4)), T.f32, 4)
                    b.store(T.fma(b, w, xs, b.load(tail)), tail)
                return b.fadd(T.hsum(b, b.load(acc)), b.load(tail))
            bb, _ = _GEOM[fmt]
            accm = T.cgutils.alloca_once_value(b, zero)
            with T.cgutils.for_range(b, b.sdiv(k, T.idx(QK))) as loop:
                blk = loop.index
                lo, hi, d, m = _decode_block(T, b, fmt, rp, b.mul(blk, T.idx(bb)))
                xo = b.mul(blk, T.idx(QK * 4))
                xl = T.load(b, xp, xo, T.vf, 4)
                xh = T.load(b, xp, b.add(xo, T.idx(64)), T.vf, 4)
                if m is None:  # d * sum_j q_j x_j, lane-wise
                    b.store(T.fma(b, T.fma(b, hi, xh, b.fmul(lo, xl)), d, b.load(acc)), acc)
                else:  # q4_1: weights d * q + m, one chain per half of the block
                    b.store(T.fma(b, T.fma(b, lo, d, m), xl, b.load(acc)), acc)
                    b.store(T.fma(b, T.fma(b, hi, d, m), xh, b.load(accm)), accm)
            total = b.load(acc)
            if fmt == "q4_1":
                total = b.fadd(total, b.load(accm))
            return T.hsum(b, total)

        return T.types.float32(row, x), codegen

    typer.__name__ = f"dot_{fmt}"
    return T.intrinsic(typer)


def _build_deq(fmt: str) -> Any:
    """`deq_<fmt>(row, out)`: the first len(out) weights of a row (its bytes in `row`, any dtype) -> float32."""
    T = ir_tools()

    def typer(typingctx: Any, row: Any, out: Any) -> Any:
        def codegen(context: Any, b: Any, sig: Any, args: Any) -> Any:
            rp = T.array(context, b, sig.args[0], args[0]).data
            oa = T.array(context, b, sig.args[1], args[1])
            k, op = T.length(b, oa), oa.data
            if fmt in ("f16", "f32"):
                size = 2 if fmt == "f16" else 4
                nv = b.sdiv(k, T.idx(16))
                with T.cgutils.for_range(b, nv) as loop:
                    i = b.mul(loop.index, T.idx(16))
                    v = (T.halves(b, rp, b.mul(i, T.idx(2)), 16) if fmt == "f16"
                         else T.load(b, rp, b.mul(i, T.idx(4)), T.vf))
                    T.store(b, v, op, b.mul(i, T.idx(4)), 4)
                with T.cgutils.for_range_slice(b, b.mul(nv, T.idx(16)), k, T.idx(1)) as (i, _):
                    v = (T.half(b, rp, b.mul(i, T.idx(2))) if fmt == "f16"
                         else T.load(b, rp, b.mul(i, T.idx(size)), T.f32))
                    T.store(b, v, op, b.mul(i, T.idx(4)), 4)
                return context.get_dummy_value()
            bb, _ = _GEOM[fmt]
            with T.cgutils.for_range(b, b.sdiv(k, T.idx(QK))) as loop:
                blk = loop.index
                lo, hi, d, m = _decode_block(T, b, fmt, rp, b.mul(blk, T.idx(bb)))
                if m is None:
                    lo, hi = b.fmul(lo, d), b.fmul(hi, d)
                else:
                    lo, hi = T.fma(b, lo, d, m), T.fma(b, hi, d, m)
                oo = b.mul(blk, T.idx(QK * 4))
                T.store(b, lo, op, oo, 4)
                T.store(b, hi, op, b.add(oo, T.idx(64)), 4)
            return context.get_dummy_value()

        return T.types.void(row, out), codegen

    typer.__name__ = f"deq_{fmt}"
    return T.intrinsic(typer)


def _tile_geometry() -> tuple[int, int]:
    """(lanes, rows per pass) of the f32 tile for the host: 16 zmm accumulators on AVX-512, two passes of
    8 ymm on AVX2 (16 registers), 16 q registers on NEON (32 registers)."""
    import llvmlite.binding as llvm

    feats = llvm.get_host_cpu_features()
    if feats.get("avx512f"):
        return 16, 4
    if feats.get("avx2") or feats.get("avx"):
        return 8, 2
    return 4, 4


#: the output tile of `tile_f32`: TILE_T tokens x TILE_R rows (register blocking inside is per target)
TILE_T, TILE_R = 4, 4


def _build_tile() -> Any:
    """`tile_f32(x, t0, nt, w, r0, nr, out, c0, bias, b0)`: for i < nt, j < nr (both <= 4):
    `out[t0 + i, c0 + j] = x[t0 + i] . w[r0 + j] (+ bias[b0 + j] when bias is not empty)`.

    x `[n, k]`, w `[rows, k]` and out 2-D float32, C-contiguous, rows checked by the caller. Token / row
    indices past nt / nr are clamped to the last valid one (computed, never stored), so one code path serves
    the edge tiles. Each (token, row) sum runs over k in `lanes` partial sums (one fma each per step) and a
    fixed tree at the end."""
    T = ir_tools()
    ir = T.ir
    lanes, rows_per_pass = _tile_geometry()
    vt = T.vec(T.f32, lanes)

    def typer(typingctx: Any, x: Any, t0: Any, nt: Any, w: Any, r0: Any, nr: Any, out: Any, c0: Any,
              bias: Any, b0: Any) -> Any:
        def codegen(context: Any, b: Any, sig: Any, args: Any) -> Any:
            xa, wa, oa, ba = (T.array(context, b, sig.args[i], args[i]) for i in (0, 3, 6, 8))
            t0v, ntv, r0v, nrv, c0v, b0v = (args[i] for i in (1, 2, 4, 5, 7, 9))
            k = b.extract_value(xa.shape, 1)
            xs, ws, os_ = (b.extract_value(a.strides, 0) for a in (xa, wa, oa))

            def row_ptr(a: Any, stride: Any, first: Any, i: int, count: Any) -> Any:
                last = b.sub(count, T.idx(1))
                ii = b.select(b.icmp_signed("<", T.idx(i), count), T.idx(i), last)
                return b.gep(b.bitcast(a.data, T.i8.as_pointer()), [b.mul(b.add(first, ii), stride)])

            xp = [row_ptr(xa, xs, t0v, i, ntv) for i in range(TILE_T)]
            wp = [row_ptr(wa, ws, r0v, j, nrv) for j in range(TILE_R)]
            nv = b.sdiv(k, T.idx(lanes))
            sums = {}
            for j0 in range(0, TILE_R, rows_per_pass):  # register blocking: rows_per_pass rows at a time
                js = range(j0, j0 + rows_per_pass)
                acc = {(i, j): T.cgutils.alloca_once_value(b, T.const(vt, 0.0)) for i in range(TILE_T) for j in js}
                with T.cgutils.for_range(b, nv) as loop:
                    off = b.mul(loop.index, T.idx(lanes * 4))
                    xv = [T.load(b, xp[i], off, vt, 4) for i in range(TILE_T)]
                    wv = {j: T.load(b, wp[j], off, vt, 4) for j in js}
                    for (i, j), a in acc.items():
                        b.store(T.fma(b, xv[i], wv[j], b.load(a)), a)
                order = list(acc)
                red = T.transpose_sum(b, [b.load(acc[p]) for p in order])
                flat_sums = [b.extract_element(v, ir.Constant(T.i32, q)) for v in red for q in range(v.type.count)]
                sums.update(zip(order, flat_sums))
            tails = {p: T.cgutils.alloca_once_value(b, sums[p]) for p in sums}
            with T.cgutils.for_range_slice(b, b.mul(nv, T.idx(lanes)), k, T.idx(1)) as (kk, _):
                off = b.mul(kk, T.idx(4))
                xv = [T.load(b, xp[i], off, T.f32, 4) for i in range(TILE_T)]
                wv = [T.load(b, wp[j], off, T.f32, 4) for j in range(TILE_R)]
                for (i, j), a in tails.items():
                    b.store(T.fma(b, xv[i], wv[j], b.load(a)), a)
            has_bias = b.icmp_signed(">", b.extract_value(ba.shape, 0), T.idx(0))
            full = b.icmp_signed("==", nrv, T.idx(TILE_R))
            vr = T.vec(T.f32, TILE_R)
            for i in range(TILE_T):
                row = b.mul(b.add(t0v, T.idx(i)), os_)
                with b.if_then(b.icmp_signed("<", T.idx(i), ntv)):
                    with b.if_else(full) as (whole, part):
                        with whole:  # the usual case: TILE_R contiguous outputs, one vector store
                            v = ir.Constant(vr, ir.Undefined)
                            for j in range(TILE_R):
                                v = b.insert_element(v, b.load(tails[(i, j)]), ir.Constant(T.i32, j))
                            vs = T.cgutils.alloca_once_value(b, v)
                            with b.if_then(has_bias):
                                bv = T.load(b, ba.data, b.mul(b0v, T.idx(4)), vr, 4)
                                b.store(b.fadd(b.load(vs), bv), vs)
                            T.store(b, b.load(vs), oa.data, b.add(row, b.mul(c0v, T.idx(4))), 4)
                        with part:  # the last rows of a weight: element by element
                            for j in range(TILE_R):
                                a = tails[(i, j)]
                                with b.if_then(b.icmp_signed("<", T.idx(j), nrv)):
                                    with b.if_then(has_bias):
                                        bv = T.load(b, ba.data, b.mul(b.add(b0v, T.idx(j)), T.idx(4)), T.f32, 4)
                                        b.store(b.fadd(b.load(a), bv), a)
                                    col = b.mul(b.add(c0v, T.idx(j)), T.idx(4))
                                    T.store(b, b.load(a), oa.data, b.add(row, col), 4)
            return context.get_dummy_value()

        i64 = T.types.int64
        return T.types.void(x, i64, i64, w, i64, i64, out, i64, bias, i64), codegen

    typer.__name__ = "tile_f32"
    return T.intrinsic(typer)


#: `tile_f32(x, t0, nt, w, r0, nr, out, c0, bias, b0)`: one TILE_T x TILE_R output tile of x @ w.T (+ bias)
tile_f32 = _Lazy(_build_tile, "tile_f32")


QUANT_FORMATS = ("q8_0", "q4_0", "q4_1")
#: `dot_<fmt>(row, x) -> float32` for the formats whose rows are not float32 (f32 rows are a plain numba loop)
dot_f16, dot_q8_0, dot_q4_0, dot_q4_1 = (_Lazy(lambda f=f: _build_dot(f), f"dot_{f}")  # type: ignore[misc]
                                         for f in ("f16",) + QUANT_FORMATS)
#: `deq_<fmt>(row, out)`: decode `len(out)` weights of one row into float32
deq_f32, deq_f16, deq_q8_0, deq_q4_0, deq_q4_1 = (_Lazy(lambda f=f: _build_deq(f), f"deq_{f}")  # type: ignore[misc]
                                                  for f in ("f32", "f16") + QUANT_FORMATS)


# ---- quantized row gather (embedding tables kept in their format) --------------------------------------------

@helper
def _check_rows(row_nbytes, ids, out, block, block_bytes):
    """Shapes of a gather: one out row per id, and table rows of exactly out.shape[1] weights."""
    k = out.shape[1]
    if out.shape[0] != ids.shape[0]:
        raise ValueError("dequant_rows: out must have one row per id")
    if k % block != 0 or row_nbytes != k // block * block_bytes:
        raise ValueError("dequant_rows: table rows do not hold out.shape[1] weights of this format")


@helper
def _row_id(ids, i, vocab):
    """ids[i] as a row: ONNX Gather's range [-V, V), negative ids counting from the end; else IndexError."""
    r = ids[i]
    if r < -vocab or r >= vocab:
        raise IndexError("dequant_rows: id out of range [-V, V)")
    return r + vocab if r < 0 else r


@helper
def _check_raw(raw, out, block, block_bytes):
    k = out.shape[0]
    if k % block != 0 or raw.shape[0] != k // block * block_bytes:
        raise ValueError("dequant_row_bytes: raw must be exactly one row of out.shape[0] weights")


_RO_IDS = arr(I64, 1, ro=True)
_RAW = arr(U8, 1, ro=True)
_B = {f: (formats.get(f).block, formats.get(f).block_bytes) for f in ("f32", "f16") + QUANT_FORMATS}
_F32B, _F16B, _Q80B, _Q40B, _Q41B = (_B[f] for f in ("f32", "f16", "q8_0", "q4_0", "q4_1"))


@kernel("void", arr(F32, 2, ro=True), _RO_IDS, arr(F32, 2))
def dequant_rows_f32(table, ids, out):
    """`out[i] = table[ids[i]]` (f32 table); ids in [-V, V) (negative from the end), others raise IndexError."""
    _check_rows(table.shape[1] * 4, ids, out, _F32B[0], _F32B[1])
    for i in range(ids.shape[0]):
        deq_f32(table[_row_id(ids, i, table.shape[0])], out[i])


@kernel("void", arr(U16, 2, ro=True), _RO_IDS, arr(F32, 2))
def dequant_rows_f16(table, ids, out):
    """`out[i] = dequantize(table[ids[i]])` for an f16 table (raw halves); ids checked as above."""
    _check_rows(table.shape[1] * 2, ids, out, _F16B[0], _F16B[1])
    for i in range(ids.shape[0]):
        deq_f16(table[_row_id(ids, i, table.shape[0])], out[i])


@kernel("void", arr(U8, 2, ro=True), _RO_IDS, arr(F32, 2))
def dequant_rows_q8_0(table, ids, out):
    """`out[i] = dequantize(table[ids[i]])` for a q8_0 table `[V, row_bytes]`; ids checked as above."""
    _check_rows(table.shape[1], ids, out, _Q80B[0], _Q80B[1])
    for i in range(ids.shape[0]):
        deq_q8_0(table[_row_id(ids, i, table.shape[0])], out[i])


@kernel("void", arr(U8, 2, ro=True), _RO_IDS, arr(F32, 2))
def dequant_rows_q4_0(table, ids, out):
    """`out[i] = dequantize(table[ids[i]])` for a q4_0 table; ids checked as above."""
    _check_rows(table.shape[1], ids, out, _Q40B[0], _Q40B[1])
    for i in range(ids.shape[0]):
        deq_q4_0(table[_row_id(ids, i, table.shape[0])], out[i])


@kernel("void", arr(U8, 2, ro=True), _RO_IDS, arr(F32, 2))
def dequant_rows_q4_1(table, ids, out):
    """`out[i] = dequantize(table[ids[i]])` for a q4_1 table; ids checked as above."""
    _check_rows(table.shape[1], ids, out, _Q41B[0], _Q41B[1])
    for i in range(ids.shape[0]):
        deq_q4_1(table[_row_id(ids, i, table.shape[0])], out[i])


@kernel("void", _RAW, arr(F32, 1))
def dequant_row_bytes_f32(raw, out):
    """One f32 row's raw bytes (any alignment, as read from the weights file) -> `out`."""
    _check_raw(raw, out, _F32B[0], _F32B[1])
    deq_f32(raw, out)


@kernel("void", _RAW, arr(F32, 1))
def dequant_row_bytes_f16(raw, out):
    """One f16 row's raw bytes -> float32 `out`."""
    _check_raw(raw, out, _F16B[0], _F16B[1])
    deq_f16(raw, out)


@kernel("void", _RAW, arr(F32, 1))
def dequant_row_bytes_q8_0(raw, out):
    """One q8_0 row's raw bytes -> float32 `out`."""
    _check_raw(raw, out, _Q80B[0], _Q80B[1])
    deq_q8_0(raw, out)


@kernel("void", _RAW, arr(F32, 1))
def dequant_row_bytes_q4_0(raw, out):
    """One q4_0 row's raw bytes -> float32 `out`."""
    _check_raw(raw, out, _Q40B[0], _Q40B[1])
    deq_q4_0(raw, out)


@kernel("void", _RAW, arr(F32, 1))
def dequant_row_bytes_q4_1(raw, out):
    """One q4_1 row's raw bytes -> float32 `out`."""
    _check_raw(raw, out, _Q41B[0], _Q41B[1])
    deq_q4_1(raw, out)


#: the view dtype token of each format's weight arrays (what `formats.get(fmt).view` returns)
VIEW_DTYPE = {"f32": F32, "f16": U16, "q8_0": U8, "q4_0": U8, "q4_1": U8}
DEQUANT_ROWS = {"f32": dequant_rows_f32, "f16": dequant_rows_f16, "q8_0": dequant_rows_q8_0,
                "q4_0": dequant_rows_q4_0, "q4_1": dequant_rows_q4_1}
DEQUANT_ROW_BYTES = {"f32": dequant_row_bytes_f32, "f16": dequant_row_bytes_f16, "q8_0": dequant_row_bytes_q8_0,
                     "q4_0": dequant_row_bytes_q4_0, "q4_1": dequant_row_bytes_q4_1}
