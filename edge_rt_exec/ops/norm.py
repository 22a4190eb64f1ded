"""Normalisations over the trailing axes: LayerNormalization and RMSNormalization (ONNX names; the transformer
families emit them too).

One kernel normalises each row of `d` elements (the axes from `axis` on, flattened). Its numerics are
torch's, which HF transformers computes and our greedy tokens are compared against: the statistics
accumulate in float64 and are rounded to float32 where torch holds them in float32 (LayerNorm's mean and
rstd; RMSNorm's variance, then `rsqrt(variance + eps)`), and the affine part is float32 arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ._jit import F32, F64, I64, arr, helper, kernel, prange
from .registry import PAR_MIN, OpDef, Sample, ShapeError, Site, WarmSpec, flat, norm_axis, numel, register

_F32 = np.float32


@helper
def _norm_row(x, scale, bias, out, mean_out, inv_out, r, d, eps, rms):
    base = r * d
    if rms:
        s = 0.0
        for j in range(d):
            s += np.float64(x[base + j]) * np.float64(x[base + j])
        mean = np.float32(0.0)
        # HF: variance in float32, then rsqrt(variance + eps) in float32
        rstd = np.float32(1.0 / math.sqrt(np.float64(np.float32(s / d) + np.float32(eps))))
        for j in range(d):  # reads x[j] before writing out[j]: safe when out aliases x
            out[base + j] = scale[j] * (x[base + j] * rstd)
    else:
        s = 0.0
        for j in range(d):
            s += np.float64(x[base + j])
        mean = np.float32(s / d)
        v = 0.0
        for j in range(d):
            c = np.float64(x[base + j]) - np.float64(mean)
            v += c * c
        rstd = np.float32(1.0 / math.sqrt(v / d + eps))
        if bias.size:
            for j in range(d):
                out[base + j] = (x[base + j] - mean) * rstd * scale[j] + bias[j]
        else:
            for j in range(d):
                out[base + j] = (x[base + j] - mean) * rstd * scale[j]
    if mean_out.size:
        mean_out[r] = mean
    if inv_out.size:
        inv_out[r] = rstd


@helper
def _check(x, scale, bias, out, mean_out, inv_out, rows, d):
    if x.size < rows * d or out.size < rows * d or scale.size != d or (bias.size != 0 and bias.size != d):
        raise ValueError("norm_rows: shapes do not match (x, out [rows*d], scale [d], bias [d] or empty)")
    if (mean_out.size != 0 and mean_out.size < rows) or (inv_out.size != 0 and inv_out.size < rows):
        raise ValueError("norm_rows: statistics outputs hold fewer than `rows` values")


@kernel()
def norm_rows(x, scale, bias, out, mean_out, inv_out, rows, d, eps, rms):
    """Normalise `rows` rows of `d` elements of flat `x` into `out` (may alias `x`): LayerNorm, or RMSNorm when
    `rms`. `scale` and `bias` hold `d` elements (bias may be empty); `mean_out` / `inv_out` get each row's
    mean and 1/std when non-empty."""
    _check(x, scale, bias, out, mean_out, inv_out, rows, d)
    for r in range(rows):
        _norm_row(x, scale, bias, out, mean_out, inv_out, r, d, eps, rms)


@kernel(parallel=True)
def norm_rows_par(x, scale, bias, out, mean_out, inv_out, rows, d, eps, rms):
    _check(x, scale, bias, out, mean_out, inv_out, rows, d)
    for r in prange(rows):
        _norm_row(x, scale, bias, out, mean_out, inv_out, r, d, eps, rms)


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None, axis: int = -1,
               epsilon: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch LayerNorm over the axes from `axis` on: biased variance, `(x - mean) * rsqrt(var + eps) * w + b`.
    Returns (y, mean, 1/std) with the statistics shaped `x.shape[:axis] + (1, ...)` (ONNX's extra outputs)."""
    ax = norm_axis(axis, x.ndim)
    axes = tuple(range(ax, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True).astype(_F32)  # [..., d] -> [..., 1]
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)  # [..., 1]
    rstd = (1.0 / np.sqrt(var + epsilon)).astype(_F32)  # [..., 1]
    y = (x.astype(_F32) - mean) * rstd * scale.astype(_F32)
    if bias is not None:
        y = y + bias
    return y.astype(_F32), mean, rstd


def rms_norm(x: np.ndarray, scale: np.ndarray, axis: int = -1, epsilon: float = 1e-5) -> np.ndarray:
    """LlamaRMSNorm over the axes from `axis` on: `scale * (x * rsqrt(mean(x**2) + eps))`, in float32 like HF."""
    ax = norm_axis(axis, x.ndim)
    axes = tuple(range(ax, x.ndim))
    ms = (x.astype(np.float64) ** 2).mean(axis=axes, keepdims=True)  # [..., d] -> [..., 1]
    rstd = (1.0 / np.sqrt(ms.astype(_F32) + _F32(epsilon))).astype(_F32)  # [..., 1]
    return (scale.astype(_F32) * (x.astype(_F32) * rstd)).astype(_F32)


def _rule(rms: bool) -> Callable:
    def rule(s: list, d: list, v: dict, a: dict, n: int) -> list:
        x = tuple(s[0])
        ax = norm_axis(a["axis"], len(x))
        norm = numel(x[ax:])
        for i, what in ((1, "scale"), (2, "bias")):
            if i < len(s) and s[i] is not None and numel(s[i]) not in (norm, 1) and tuple(s[i]) != x[ax:]:
                raise ShapeError(f"{what} {list(s[i])} does not match the normalised shape {list(x[ax:])}")
        stat = x[:ax] + (1,) * (len(x) - ax)
        outs = [(x, d[0])] + ([] if rms else [(stat, "float32"), (stat, "float32")])
        return outs[:n]
    return rule


def _param(p: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A scale or bias as the `d` contiguous float32 elements the kernel takes (a rare broadcast one copied)."""
    if p is None:
        return np.zeros(0, np.float32)
    if p.size == numel(shape) and p.dtype == np.float32:
        return flat(p)
    return np.ascontiguousarray(np.broadcast_to(p, shape), dtype=np.float32).reshape(-1)


def _bind(rms: bool) -> Callable[[Site], Callable]:
    def bind(s: Site) -> Callable:
        x = s.ins[0]
        ax = norm_axis(s.attrs["axis"], x.ndim)
        rows, d = numel(x.shape[:ax]), numel(x.shape[ax:])
        scale = _param(s.ins[1], x.shape[ax:])
        bias = _param(s.ins[2] if len(s.ins) > 2 and not rms else None, x.shape[ax:])
        stats = [flat(s.outs[i]) if i < len(s.outs) and s.outs[i] is not None else np.zeros(0, np.float32)
                 for i in (1, 2)]
        fn = (norm_rows_par if rows > 1 and rows * d >= PAR_MIN else norm_rows).load()
        xf, of, eps = flat(x), flat(s.outs[0]), float(s.attrs["epsilon"])
        return lambda: fn(xf, scale, bias, of, stats[0], stats[1], rows, d, eps, rms)
    return bind


_W = arr(F32, 1)


def _warm(spec: WarmSpec) -> None:
    # scale/bias: mapped weights are read-only; copied (broadcast) or absent ones are writable
    scale = arr(F32, 1, ro=spec.readonly[1] if len(spec.readonly) > 1 else False)
    biases = [arr(F32, 1, ro=spec.readonly[2])] if len(spec.readonly) > 2 and spec.in_dtypes[2] else []
    for k in (norm_rows, norm_rows_par) if spec.big else (norm_rows,):
        for bias in biases + [_W]:
            k.warm(arr(F32, 1, ro=spec.readonly[0]), scale, bias, _W, _W, _W, I64, I64, F64, "bool")


def _sample(rms: bool) -> Callable[[np.random.Generator], list[Sample]]:
    def sample(rng: np.random.Generator) -> list[Sample]:
        out = []
        for shape, axis in (((3, 64), -1), ((2, 3, 8), 1), ((100, 576), -1)):
            x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
            w = rng.standard_normal(shape[axis:] if axis > 0 else shape[-1:]).astype(np.float32)
            b = rng.standard_normal(w.shape).astype(np.float32)
            ins = [x, w] if rms else [x, w, b]
            out.append(Sample(ins, {"axis": axis, "epsilon": 1e-6}, n_out=1 if rms else 3))
        return out
    return sample


def _ln_twin(ins: list, a: dict, n: int) -> list:
    return list(layer_norm(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a["axis"], a["epsilon"]))[:n]


register(OpDef(
    name="LayerNormalization", shape=_rule(False), twin=_ln_twin, bind=_bind(False), warm=_warm,
    kernels=(norm_rows, norm_rows_par), sample=_sample(False), attrs={"axis": -1, "epsilon": 1e-5}, inplace={0: 0},
    flops=lambda i, o, a: 8 * numel(i[0]), doc="ONNX LayerNormalization (torch numerics; Mean/InvStdDev outputs)",
))
register(OpDef(
    name="RMSNormalization", shape=_rule(True),
    twin=lambda ins, a, n: [rms_norm(ins[0], ins[1], a["axis"], a["epsilon"])], bind=_bind(True), warm=_warm,
    kernels=(norm_rows, norm_rows_par), sample=_sample(True), attrs={"axis": -1, "epsilon": 1e-5}, inplace={0: 0},
    flops=lambda i, o, a: 4 * numel(i[0]), doc="ONNX RMSNormalization (opset 23; LlamaRMSNorm's numerics)",
))
