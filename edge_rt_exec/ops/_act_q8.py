"""The activation-quantized path of `Linear` (opt-in, `act_quant="q8_0"`): the input row is quantized to int8
per 32-block (one float32 scale per block, as llama.cpp's q8_0 activations) and each q4_0 weight block is
multiplied with it as integer dot products; only the per-block sums are scaled in float32.

Math (the numpy twin, `quantize_q8` + `linear` on the dequantized x, is the definition): for block b of a row,
`d_x[b] = max|x_b| / 127`, `xq = round_half_away(x / d_x)` in [-127, 127]; the q4_0 block holds `w = d_w * (q - 8)`
with q in 0..15, so `w . x ~= sum_b d_w[b] * d_x[b] * sum_j (q_j - 8) * xq_j`. The integer sums are exact, so
they are the same on every target; the float part (one product and one fma per block pair and lane, a fixed
tree at the end) has a fixed order.

Layout the kernels share (prepared once per Linear call by `_quantize_row`): `xq[k]` int8; per group of 4
weights (a "lane", what one `vpdpbusd` lane sums) `xs[k/4]` int32 = `-8 * sum(xq of the group)` (the `-8` of
q4_0 folded into the accumulator's start value, so the weights stay unsigned 0..15) and `xd[k/4]` float32 = the
block's `d_x`. Two blocks fill one 16-lane vector (lanes 0-7 block b, 8-15 block b + 1).

The integer step `acc + sum_j u8(a[4l + j]) * s8(c[4l + j])` per lane l is `vpdpbusd` on AVX-512 VNNI hosts
(the `llvm.x86` intrinsic: LLVM does not form it from a partial sum) and generic LLVM vector IR elsewhere
(zext / sext, mul, adds: exact, the same integers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import formats
from ._ir import _Lazy, ir_tools
from ._jit import F32, I8, I32, I64, U8, arr, helper, kernel, prange

QK = formats.QK
BB, BB8 = formats.Q4_0.block_bytes, formats.Q8_0.block_bytes  #: bytes per q4_0 / q8_0 block
LANE = 4  #: weights per integer lane (vpdpbusd sums 4 u8 x s8 products per i32 lane)


def _has_vnni() -> bool:
    import llvmlite.binding as llvm

    f = llvm.get_host_cpu_features()
    return bool(f.get("avx512vnni") and f.get("avx512bw"))


def _dp4(T: Any, b: Any, acc: Any, a: Any, c: Any, vnni: bool) -> Any:
    """IR: `acc[l] + sum_{j<4} zext(a[4l + j]) * sext(c[4l + j])` for i32 lanes l (a, c: <4n x i8>)."""
    n = acc.type.count
    if vnni and n == 16:
        name = "llvm.x86.avx512.vpdpbusd.512"
        fn = b.module.globals.get(name)
        if fn is None:
            fn = T.ir.Function(b.module, T.ir.FunctionType(acc.type, [acc.type, a.type, c.type]), name=name)
        return b.call(fn, [acc, a, c])
    wide = T.vec(T.i32, 4 * n)
    p = b.mul(b.zext(a, wide), b.sext(c, wide))
    parts = [T.shuffle(b, p, p, [LANE * i + j for i in range(n)]) for j in range(LANE)]
    return b.add(acc, b.add(b.add(parts[0], parts[1]), b.add(parts[2], parts[3])))


def _build_dot(fmt: str) -> Any:
    """`dot_<fmt>_q8(row, xq, xs, xd) -> float32`: a q4_0 or q8_0 row (its bytes) times the quantized
    activations. q4_0: the unsigned quants 0..15 times xq from the accumulator start xs (the -8 folded in).
    q8_0: |w| times xq with w's sign (`vpdpbusd` multiplies unsigned by signed), from 0 (xs unused)."""
    T = ir_tools()
    vnni = _has_vnni()
    bb = formats.get(fmt).block_bytes

    def typer(typingctx: Any, row: Any, xq: Any, xs: Any, xd: Any) -> Any:
        def codegen(context: Any, b: Any, sig: Any, args: Any) -> Any:
            rp = T.array(context, b, sig.args[0], args[0]).data
            xa = T.array(context, b, sig.args[1], args[1])
            sp, dp = (T.array(context, b, sig.args[i], args[i]).data for i in (2, 3))
            xp, nb = xa.data, b.sdiv(T.length(b, xa), T.idx(QK))
            v16i8, v16f = T.vec(T.i8, 16), T.vec(T.f32, 16)
            acc = T.cgutils.alloca_once_value(b, T.const(v16f, 0.0))

            def weights(off: Any) -> Any:  # the block at off -> <32 x i8>: weights 0..31 (q4_0: unsigned quants)
                if fmt == "q8_0":
                    return T.load(b, rp, b.add(off, T.idx(2)), T.vec(T.i8, QK))
                q = T.load(b, rp, b.add(off, T.idx(2)), v16i8)
                lo, hi = b.and_(q, T.const(v16i8, 15)), b.lshr(q, T.const(v16i8, 4))
                return T.shuffle(b, lo, hi, list(range(32)))

            def integer(w: Any, xv: Any, lanes: int, off: Any) -> Any:  # exact int32 lane sums
                vi = T.vec(T.i32, lanes)
                if fmt == "q4_0":
                    return _dp4(T, b, T.load(b, sp, off, vi, 4), w, xv, vnni and lanes == 16)
                neg = b.icmp_signed("<", w, T.const(w.type, 0))
                mag = b.select(neg, b.sub(T.const(w.type, 0), w), w)  # |w|, -128 -> 128 as unsigned
                sx = b.select(neg, b.sub(T.const(xv.type, 0), xv), xv)  # xq in [-127, 127]: -xq fits
                return _dp4(T, b, T.const(vi, 0), mag, sx, vnni and lanes == 16)

            def scales(offs: list, lanes: int) -> Any:  # the rows' fp16 scales, each over 8 lanes, as float32
                hs = [T.load(b, rp, o, T.i16) for o in offs]
                v = T.ir.Constant(T.vec(T.i16, len(hs)), T.ir.Undefined)
                for i, h in enumerate(hs):
                    v = b.insert_element(v, h, T.ir.Constant(T.i32, i))
                v = T.shuffle(b, v, v, [i // 8 for i in range(lanes)])
                return b.fpext(b.bitcast(v, T.vec(T.f16, lanes)), T.vec(T.f32, lanes))

            with T.cgutils.for_range(b, b.sdiv(nb, T.idx(2))) as loop:  # two blocks per step
                blk = b.mul(loop.index, T.idx(2))
                o0 = b.mul(blk, T.idx(bb))
                o1 = b.add(o0, T.idx(bb))
                w = T.shuffle(b, weights(o0), weights(o1), list(range(64)))  # block b's 32 weights, then b + 1's
                lane0 = b.mul(b.mul(blk, T.idx(QK // LANE)), T.idx(4))
                xv = T.load(b, xp, b.mul(blk, T.idx(QK)), T.vec(T.i8, 64))
                dxv = T.load(b, dp, lane0, v16f, 4)
                isum = integer(w, xv, 16, lane0)
                scale = b.fmul(scales([o0, o1], 16), dxv)
                b.store(T.fma(b, b.sitofp(isum, v16f), scale, b.load(acc)), acc)
            total = T.hsum(b, b.load(acc))
            odd = b.icmp_signed("!=", b.srem(nb, T.idx(2)), T.idx(0))
            res = T.cgutils.alloca_once_value(b, total)
            with b.if_then(odd):  # the last block of an odd count: 8 lanes
                blk = b.sub(nb, T.idx(1))
                o0 = b.mul(blk, T.idx(bb))
                lane0 = b.mul(b.mul(blk, T.idx(QK // LANE)), T.idx(4))
                v8f = T.vec(T.f32, 8)
                xv = T.load(b, xp, b.mul(blk, T.idx(QK)), T.vec(T.i8, 32))
                dxv = T.load(b, dp, lane0, v8f, 4)
                isum = integer(weights(o0), xv, 8, lane0)
                part = b.fmul(b.sitofp(isum, v8f), b.fmul(scales([o0], 8), dxv))
                b.store(b.fadd(total, T.hsum(b, part)), res)
            return b.load(res)

        return T.types.float32(row, xq, xs, xd), codegen

    typer.__name__ = f"dot_{fmt}_q8"
    return T.intrinsic(typer)


#: `dot_<fmt>_q8(row, xq, xs, xd) -> float32`: one row times activations prepared by `_quantize_row`
dot_q4_0_q8 = _Lazy(lambda: _build_dot("q4_0"), "dot_q4_0_q8")
dot_q8_0_q8 = _Lazy(lambda: _build_dot("q8_0"), "dot_q8_0_q8")


PANEL = 16  #: weight rows per packed panel of the prefill kernel (four row groups)
SLOTS = 4  #: panel slots at most (the prefill kernel's workers)
RG, TG = 4, 2  #: the prefill tile: RG groups of 4 weight rows x TG groups of 4 tokens (measured best on Zen4)


def _build_pack() -> Any:
    """`pack_q4_0(w, r0, nr, pg, pd)`: rows r0..r0+3 of a q4_0 weight (rows past r0 + nr - 1 repeat the last
    one) -> the prefill tile's weight layout: pg `[nb * 128]` u8, per block 8 steps of 16 bytes (row i's
    weights 4e..4e+3 at 4i), the unsigned quants 0..15; pd `[nb * 4]` float32, the rows' scales per block."""
    T = ir_tools()
    bb = formats.Q4_0.block_bytes
    order = [ri * QK + LANE * e + j for e in range(QK // LANE) for ri in range(4) for j in range(LANE)]

    def typer(typingctx: Any, w: Any, r0: Any, nr: Any, pg: Any, pd: Any) -> Any:
        def codegen(context: Any, b: Any, sig: Any, args: Any) -> Any:
            wa = T.array(context, b, sig.args[0], args[0])
            gp, dp = (T.array(context, b, sig.args[i], args[i]).data for i in (3, 4))
            stride = b.extract_value(wa.strides, 0)
            nb = b.sdiv(b.extract_value(wa.shape, 1), T.idx(bb))
            last = b.sub(args[2], T.idx(1))
            base = b.bitcast(wa.data, T.i8.as_pointer())
            rows = []
            for i in range(4):
                ii = b.select(b.icmp_signed("<", T.idx(i), args[2]), T.idx(i), last)
                rows.append(b.gep(base, [b.mul(b.add(args[1], ii), stride)]))
            v16i8 = T.vec(T.i8, 16)
            with T.cgutils.for_range(b, nb) as loop:
                off = b.mul(loop.index, T.idx(bb))
                ws, hs = [], []
                for rp in rows:
                    q = T.load(b, rp, b.add(off, T.idx(2)), v16i8)
                    lo, hi = b.and_(q, T.const(v16i8, 15)), b.lshr(q, T.const(v16i8, 4))
                    ws.append(T.shuffle(b, lo, hi, list(range(32))))
                    hs.append(T.load(b, rp, off, T.i16))
                w01 = T.shuffle(b, ws[0], ws[1], list(range(64)))
                w23 = T.shuffle(b, ws[2], ws[3], list(range(64)))
                packed = T.shuffle(b, w01, w23, order)
                T.store(b, packed, gp, b.mul(loop.index, T.idx(QK * 4)))
                hv = T.ir.Constant(T.vec(T.i16, 4), T.ir.Undefined)
                for i, h in enumerate(hs):
                    hv = b.insert_element(hv, h, T.ir.Constant(T.i32, i))
                dv = b.fpext(b.bitcast(hv, T.vec(T.f16, 4)), T.vec(T.f32, 4))
                T.store(b, dv, dp, b.mul(loop.index, T.idx(16)), 4)
            return context.get_dummy_value()

        return T.types.void(w, r0, nr, pg, pd), codegen

    typer.__name__ = "pack_q4_0"
    return T.intrinsic(typer)


def _build_tile() -> Any:
    """`tile_q8(pg, pd, g0, xp, xc, xd, t0, res)`: res `[4 TG, 4 RG]` float32 = the dot products of token
    groups t0..t0+TG-1 (`_prepare_tokens` layout) with the packed row groups g0..g0+RG-1 (`pack_q4_0`). Lane
    4t + r of a 16-lane accumulator is (token t, row r): the whole 32-block sums in one lane (8 integer steps),
    then one conversion and one fma per block."""
    T = ir_tools()
    vnni = _has_vnni()

    def typer(typingctx: Any, pg: Any, pd: Any, g0: Any, xp: Any, xc: Any, xd: Any, t0: Any, res: Any) -> Any:
        def codegen(context: Any, b: Any, sig: Any, args: Any) -> Any:
            arrs = {i: T.array(context, b, sig.args[i], args[i]) for i in (0, 1, 3, 4, 5, 7)}

            def rowp(i: int, r: Any) -> Any:
                a = arrs[i]
                return b.gep(b.bitcast(a.data, T.i8.as_pointer()), [b.mul(r, b.extract_value(a.strides, 0))])

            nb = b.sdiv(b.extract_value(arrs[1].shape, 1), T.idx(4))
            gps = [rowp(0, b.add(args[2], T.idx(i))) for i in range(RG)]
            pds = [rowp(1, b.add(args[2], T.idx(i))) for i in range(RG)]
            xps = [rowp(3, b.add(args[6], T.idx(j))) for j in range(TG)]
            xcs = [rowp(4, b.add(args[6], T.idx(j))) for j in range(TG)]
            xds = [rowp(5, b.add(args[6], T.idx(j))) for j in range(TG)]
            v16f, v16i = T.vec(T.f32, 16), T.vec(T.i32, 16)
            facc = {(i, j): T.cgutils.alloca_once_value(b, T.const(v16f, 0.0)) for i in range(RG) for j in range(TG)}
            with T.cgutils.for_range(b, nb) as loop:
                blk = loop.index
                o64 = b.mul(blk, T.idx(64))
                acc = {(i, j): T.load(b, xcs[j], o64, v16i, 4) for i in range(RG) for j in range(TG)}
                for e in range(QK // LANE):
                    step = b.add(b.mul(blk, T.idx(QK // LANE)), T.idx(e))
                    av = [T.shuffle(b, q, q, list(range(16)) * 4)
                          for q in (T.load(b, g, b.mul(step, T.idx(16)), T.vec(T.i8, 16)) for g in gps)]
                    bv = [T.load(b, x, b.mul(step, T.idx(64)), T.vec(T.i8, 64)) for x in xps]
                    for (i, j) in acc:
                        acc[(i, j)] = _dp4(T, b, acc[(i, j)], av[i], bv[j], vnni)
                dw = [T.shuffle(b, v, v, list(range(4)) * 4)
                      for v in (T.load(b, p, b.mul(blk, T.idx(16)), T.vec(T.f32, 4), 4) for p in pds)]
                dx = [T.load(b, x, o64, v16f, 4) for x in xds]
                for (i, j), a in facc.items():
                    b.store(T.fma(b, b.sitofp(acc[(i, j)], v16f), b.fmul(dw[i], dx[j]), b.load(a)), a)
            ra = arrs[7]
            rs = b.extract_value(ra.strides, 0)
            for (i, j), a in facc.items():
                v = b.load(a)
                for t in range(4):
                    part = T.shuffle(b, v, v, [4 * t + r for r in range(4)])
                    row = b.mul(T.idx(4 * j + t), rs)
                    T.store(b, part, ra.data, b.add(row, T.idx(16 * i)), 4)
            return context.get_dummy_value()

        i64 = T.types.int64
        return T.types.void(pg, pd, i64, xp, xc, xd, i64, res), codegen

    typer.__name__ = "tile_q8"
    return T.intrinsic(typer)


pack_q4_0 = _Lazy(_build_pack, "pack_q4_0")
tile_q8 = _Lazy(_build_tile, "tile_q8")


def quantize_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The definition of the activation quantization: x `[..., k]` float32 -> (q int8 `[..., k]`, d float32
    `[..., k/32]`), per 32-block `d = max|x| / 127`, `q = round_half_away(x / d)` (0 for an all-zero block),
    all in float32 as the kernels compute it; `q * d` is the x the activation-quantized path multiplies."""
    x = np.asarray(x, np.float32)
    xb = x.reshape(x.shape[:-1] + (-1, QK))  # [..., k] -> [..., k/32, 32]
    d = (np.abs(xb).max(axis=-1) / np.float32(127.0)).astype(np.float32)  # [..., k/32]
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, np.float32(1.0)), np.float32(0.0))
    v = (xb * inv.astype(np.float32)[..., None]).astype(np.float32)
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    return q.astype(np.int8).reshape(x.shape), d


def dequantize_q8(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """`quantize_q8`'s inverse: q `[..., k]` int8, d `[..., k/32]` -> float32 `[..., k]`."""
    qb = q.astype(np.float32).reshape(q.shape[:-1] + (-1, QK))
    return (qb * d[..., None]).reshape(q.shape).astype(np.float32)


# ---- kernels -------------------------------------------------------------------------------------------------

@helper
def _quantize_row(x, xq, xs, xd):
    """x `[k]` -> xq `[k]`, xs / xd `[k/4]` as `quantize_q8` defines them (see the module doc for xs / xd)."""
    k = x.shape[0]
    if k % QK != 0 or xq.shape[0] < k or xs.shape[0] < k // LANE or xd.shape[0] < k // LANE:
        raise ValueError("act_q8: x must be whole 32-blocks and the buffers hold k / k/4 values")
    for blk in range(k // QK):
        o = blk * QK
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[o + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        for j in range(QK):  # branch-free, so LLVM vectorizes it
            v = x[o + j] * inv
            xq[o + j] = np.int32(np.copysign(np.floor(abs(v) + np.float32(0.5)), v))
        for g in range(QK // LANE):
            s = 0
            for j in range(LANE):
                s += np.int32(xq[o + g * LANE + j])
            xs[blk * (QK // LANE) + g] = -8 * s
            xd[blk * (QK // LANE) + g] = d


@helper
def _check_w(k, w, bias, out_cols, col0, bb):
    if k % QK != 0 or w.shape[1] != k // QK * bb:
        raise ValueError("linear: weight rows do not hold k weights of this format")
    if bias.shape[0] != 0 and bias.shape[0] != w.shape[0]:
        raise ValueError("linear: bias must have one value per weight row, or none")
    if col0 < 0 or col0 + w.shape[0] > out_cols:
        raise ValueError("linear: out has no columns col0 .. col0 + m")


@helper
def _check_q8(k, w, bias, out_cols, col0, xq, xs, xd, bb):
    _check_w(k, w, bias, out_cols, col0, bb)
    if xq.shape[-1] != k or xs.shape[-1] != k // LANE or xd.shape[-1] != k // LANE:
        raise ValueError("linear: the activation buffers must hold k (xq) and k/4 (xs, xd) values per row")


@helper
def _bias_of(bias, r):
    return bias[r] if bias.shape[0] != 0 else np.float32(0.0)


VEC_ROWS = 16  #: weight rows per parallel chunk (as linear_vec_*)

_X1, _X2 = arr(F32, 1, ro=True), arr(F32, 2, ro=True)
_W = arr(U8, 2, ro=True)


@kernel("void", _X1, _W, arr(F32, 1, ro=True), arr(F32, 1), I64, arr(I8, 1), arr(I32, 1), arr(F32, 1),
        parallel=True)
def linear_vec_q4_0_q8(x, w, bias, out, col0, xq, xs, xd):
    """`out[col0 + r] = w[r] . x + bias[r]` for a q4_0 weight with x quantized to int8 per block (into xq, xs,
    xd: k, k/4, k/4 values) once, then one integer-dot row per output."""
    k, m = x.shape[0], w.shape[0]
    _check_q8(k, w, bias, out.shape[0], col0, xq, xs, xd, BB)
    _quantize_row(x, xq, xs, xd)
    for c in prange((m + VEC_ROWS - 1) // VEC_ROWS):
        r0 = c * VEC_ROWS
        for r in range(r0, min(m, r0 + VEC_ROWS)):
            out[col0 + r] = dot_q4_0_q8(w[r], xq, xs, xd) + _bias_of(bias, r)


@kernel("void", _X1, _W, arr(F32, 1, ro=True), arr(F32, 1), I64, arr(I8, 1), arr(I32, 1), arr(F32, 1),
        parallel=True)
def linear_vec_q8_0_q8(x, w, bias, out, col0, xq, xs, xd):
    """As `linear_vec_q4_0_q8` for a q8_0 weight (a decoder's LM head on its last row)."""
    k, m = x.shape[0], w.shape[0]
    _check_q8(k, w, bias, out.shape[0], col0, xq, xs, xd, BB8)
    _quantize_row(x, xq, xs, xd)
    for c in prange((m + VEC_ROWS - 1) // VEC_ROWS):
        r0 = c * VEC_ROWS
        for r in range(r0, min(m, r0 + VEC_ROWS)):
            out[col0 + r] = dot_q8_0_q8(w[r], xq, xs, xd) + _bias_of(bias, r)


@helper
def _prepare_token(x, t, n, xt, xp, xc, xd):
    """Token t of x `[n, k]` quantized into the prefill tile's token layout (zeros for t >= n, the padding of
    the last group), through xt (this token's `[k]` int8 row, as int32 groups of 4): xp `[groups, nb * 128]`
    int32 (the int8 quants), per block 8 steps of 16 groups, token (t % 4)'s group at 4 * (t % 4) repeated 4
    times (one per row of a weight group); xc / xd `[groups, nb * 16]`: -8 * the block's sum of xq (int32)
    and its scale d_x, each at lanes 4 * (t % 4) .. + 3."""
    k = xt.shape[0] * LANE
    q8 = xt.view(np.int8)
    tg, ti = t // 4, t % 4
    for blk in range(k // QK):
        o = blk * QK
        d = np.float32(0.0)
        if t < n:
            for j in range(QK):
                d = max(d, abs(x[t, o + j]))
            d = d / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        s = 0
        for j in range(QK):
            v = x[t, o + j] * inv if t < n else np.float32(0.0)
            qi = np.int32(np.copysign(np.floor(abs(v) + np.float32(0.5)), v))
            q8[o + j] = qi
            s += qi
        for rr in range(4):
            xc[tg, blk * 16 + ti * 4 + rr] = -8 * s
            xd[tg, blk * 16 + ti * 4 + rr] = d
        for e in range(QK // LANE):
            g = xt[blk * (QK // LANE) + e]
            base = (blk * (QK // LANE) + e) * 16 + ti * 4
            for rr in range(4):
                xp[tg, base + rr] = g


@helper
def _token_groups(n):
    """Token groups of 4 the prefill layout holds for n tokens (a whole number of TG-group tiles)."""
    return ((n + 3) // 4 + TG - 1) // TG * TG


@kernel("void", _X2, _W, arr(F32, 1, ro=True), arr(F32, 2), I64, arr(I32, 2), arr(I32, 2), arr(I32, 2),
        arr(F32, 2), arr(U8, 3), arr(F32, 3), arr(F32, 3), parallel=True)
def linear_mat_q4_0_q8(x, w, bias, out, col0, xt, xp, xc, xd, pg, pd, res):
    """As `linear_vec_q4_0_q8` for n tokens: every token quantized once into the tile layout
    (`_prepare_token`), then per scratch slot a contiguous run of PANEL-row panels, each packed once
    (`pack_q4_0`: pg / pd `[slots, PANEL / 4, ...]`) and swept by every token group in RG x TG tiles (`tile_q8`,
    its result in res `[slots, 4 TG, 4 RG]`)."""
    n, k = x.shape
    m = w.shape[0]
    nb = k // QK
    _check_w(k, w, bias, out.shape[1], col0, BB)
    groups = _token_groups(n)
    if out.shape[0] != n or xp.shape[0] < groups or xp.shape[1] != nb * QK * 4 or xc.shape[1] != nb * 16 \
            or xt.shape[0] < 4 * groups or xt.shape[1] != k // LANE \
            or xd.shape[1] != nb * 16 or xc.shape[0] < groups or xd.shape[0] < groups:
        raise ValueError("linear: out needs a row per token, the token buffers a row per group of 4")
    if pg.shape[1] != PANEL // 4 or pg.shape[2] != nb * QK * 4 or pd.shape[1] != PANEL // 4 \
            or pd.shape[2] != nb * 4 or pd.shape[0] != pg.shape[0] or res.shape[0] != pg.shape[0] \
            or res.shape[1] != 4 * TG or res.shape[2] != 4 * RG or pg.shape[0] < 1:
        raise ValueError("linear: the panel buffers do not have the prefill tile's shapes")
    for t in prange(groups * 4):
        _prepare_token(x, t, n, xt[t], xp, xc, xd)
    slots, panels = pg.shape[0], (m + PANEL - 1) // PANEL
    for sl in prange(slots):  # worker sl owns slot sl and a contiguous run of panels
        for p in range(sl * panels // slots, (sl + 1) * panels // slots):
            r0 = p * PANEL
            nr = min(PANEL, m - r0)
            for g in range(PANEL // 4):
                if 4 * g < nr:
                    pack_q4_0(w, r0 + 4 * g, min(4, nr - 4 * g), pg[sl, g], pd[sl, g])
                else:  # a group past the weight's last row: a copy of it, computed and never stored
                    pack_q4_0(w, r0 + nr - 1, 1, pg[sl, g], pd[sl, g])
            for tg in range(0, groups, TG):
                for g in range(0, PANEL // 4, RG):
                    if 4 * g >= nr:
                        break
                    tile_q8(pg[sl], pd[sl], g, xp, xc, xd, tg, res[sl])
                    for jj in range(4 * TG):
                        t = tg * 4 + jj
                        if t < n:
                            for ii in range(min(4 * RG, nr - 4 * g)):
                                r = r0 + 4 * g + ii
                                out[t, col0 + r] = res[sl, jj, ii] + _bias_of(bias, r)


KERNELS = (linear_vec_q4_0_q8, linear_mat_q4_0_q8, linear_vec_q8_0_q8)
#: the weight formats with an activation-quantized decode kernel (q8_0: on the last row only, an LM head) and
#: those with a prefill kernel too
VEC_FORMATS, MAT_FORMATS = ("q4_0", "q8_0"), ("q4_0",)


def act_floats(n: int, k: int) -> int:
    """float32 elements of the activation scratch for up to n tokens of k features (decode: xq, xs, xd; prefill:
    the token layout of `_prepare_token`), whichever needs more."""
    dec = (k + 2 * k) // 4 + 16
    groups = ((n + 3) // 4 + TG - 1) // TG * TG
    pre = groups * (QK * 16 + 2 * 16 * 4 + 4 * QK) * (k // QK) // 4 + 16
    return max(dec, pre if n > 1 else 0)


def _slot_bytes(k: int) -> tuple[int, int, int]:
    """Bytes of one panel slot's pg, pd and res."""
    return PANEL * k, PANEL // 4 * (k // QK) * 16, 64 * TG * RG


def bind(x2: np.ndarray, w: np.ndarray, bias: np.ndarray, out2: np.ndarray, col0: int, act: np.ndarray,
         panels: np.ndarray, fmt: str = "q4_0") -> Any:
    """The call of the activation-quantized kernels on `[n, k]` x (n = 1: decode). act / panels: float32
    scratch (act_floats, and linear's panel slots for n > 1), views carved here."""
    from functools import partial

    from .registry import ShapeError

    n, k = x2.shape
    if fmt not in (VEC_FORMATS if n == 1 else MAT_FORMATS):
        raise ShapeError(f"Linear: act_quant q8_0 has no kernel for {fmt} weights at {n} tokens (only q4_0, "
                         "and q8_0 on one row)")
    if act.size < act_floats(n, k):
        raise ShapeError(f"Linear: act_quant needs {act_floats(n, k)} float32 of scratch, got {act.size}")
    raw = act.view(np.uint8)
    if n == 1:
        xq = raw[:k].view(np.int8)
        xs = raw[k:2 * k].view(np.int32)
        xd = raw[2 * k:3 * k].view(np.float32)
        kern = linear_vec_q4_0_q8 if fmt == "q4_0" else linear_vec_q8_0_q8
        return partial(kern.load(), x2[0], w, bias, out2[0], col0, xq, xs, xd)
    nb, groups = k // QK, ((n + 3) // 4 + TG - 1) // TG * TG
    a, c, z = groups * nb * QK * 16, groups * nb * 64, groups * 4 * k
    xp = raw[:a].view(np.int32).reshape(groups, nb * QK * 4)
    xc = raw[a:a + c].view(np.int32).reshape(groups, nb * 16)
    xd = raw[a + c:a + 2 * c].view(np.float32).reshape(groups, nb * 16)
    xt = raw[a + 2 * c:a + 2 * c + z].view(np.int32).reshape(groups * 4, k // LANE)
    gb, db, rb = _slot_bytes(k)
    slots = min(SLOTS, panels.size * 4 // (gb + db + rb))
    if slots == 0:
        raise ShapeError(f"Linear: act_quant prefill needs {(gb + db + rb) // 4} float32 of panel scratch, got "
                         f"{panels.size}")
    pr = panels.view(np.uint8)
    pg = pr[:slots * gb].reshape(slots, PANEL // 4, nb * QK * 4)
    pd = pr[slots * gb:slots * (gb + db)].view(np.float32).reshape(slots, PANEL // 4, nb * 4)
    res = pr[slots * (gb + db):slots * (gb + db + rb)].view(np.float32).reshape(slots, 4 * TG, 4 * RG)
    return partial(linear_mat_q4_0_q8.load(), x2, w, bias, out2, col0, xt, xp, xc, xd, pg, pd, res)


def warm(fmt: str, last_row: bool) -> None:
    (linear_vec_q4_0_q8 if fmt == "q4_0" else linear_vec_q8_0_q8).load()
    if not last_row and fmt in MAT_FORMATS:
        linear_mat_q4_0_q8.load()
