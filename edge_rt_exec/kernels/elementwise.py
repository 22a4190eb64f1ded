"""Norms, activations, residual adds, softmax and argmax."""

from __future__ import annotations

import math

import numpy as np
from numba import prange
from numba import types as nt

from ._base import _F32, _PAR_MIN_WORK, _R1, _R2, _W2, _f64, _helper, _kernel

# ---------------------------------------------------------------------------------------------------- norms


@_helper()
def _layernorm_row(x, weight, bias, eps, out):
    d = x.shape[0]
    s = 0.0
    for j in range(d):
        s += np.float64(x[j])
    mean = _F32(s / d)
    v = 0.0
    for j in range(d):
        c = np.float64(x[j]) - np.float64(mean)
        v += c * c
    rstd = _F32(1.0 / math.sqrt(v / d + eps))
    for j in range(d):  # reads x[j] before writing out[j]: safe when out aliases x
        out[j] = (x[j] - mean) * rstd * weight[j] + bias[j]


@_kernel(nt.void(_R2, _R1, _R1, _f64, _W2), parallel=True)
def layernorm(x, weight, bias, eps, out):
    """torch LayerNorm over rows of `x[n, d]` (biased variance). `out` may alias `x`."""
    n, d = x.shape
    if weight.shape[0] != d or bias.shape[0] != d or out.shape[0] != n or out.shape[1] != d:
        raise ValueError("layernorm: shapes do not match (x[n,d], weight[d], bias[d], out[n,d])")
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _layernorm_row(x[i], weight, bias, eps, out[i])
    else:
        for i in prange(n):
            _layernorm_row(x[i], weight, bias, eps, out[i])


@_helper()
def _rmsnorm_row(x, weight, eps, out):
    d = x.shape[0]
    s = 0.0
    for j in range(d):
        s += np.float64(x[j]) * np.float64(x[j])
    # HF: variance in float32, then rsqrt(variance + eps) in float32.
    rstd = _F32(1.0 / math.sqrt(np.float64(_F32(s / d) + _F32(eps))))
    for j in range(d):  # safe when out aliases x
        out[j] = weight[j] * (x[j] * rstd)


@_kernel(nt.void(_R2, _R1, _f64, _W2), parallel=True)
def rmsnorm(x, weight, eps, out):
    """Llama RMSNorm over rows of `x[n, d]`: `weight * (x * rsqrt(mean(x^2) + eps))`. `out` may alias `x`."""
    n, d = x.shape
    if weight.shape[0] != d or out.shape[0] != n or out.shape[1] != d:
        raise ValueError("rmsnorm: shapes do not match (x[n,d], weight[d], out[n,d])")
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _rmsnorm_row(x[i], weight, eps, out[i])
    else:
        for i in prange(n):
            _rmsnorm_row(x[i], weight, eps, out[i])


# ------------------------------------------------------------------------------------------- element-wise


@_helper()
def _check_same_shape(a, out):
    if a.shape[0] != out.shape[0] or a.shape[1] != out.shape[1]:
        raise ValueError("element-wise kernel: inputs and out must have the same [n, d] shape")


@_helper()
def _gelu_tanh_row(x, out):
    c = math.sqrt(2.0 / math.pi)
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        out[j] = 0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v * v * v)))


@_kernel(nt.void(_R2, _W2), parallel=True)
def gelu_tanh(x, out):
    """GPT-2 GELU (tanh approximation), element-wise over `[n, d]`. `out` may alias `x`."""
    _check_same_shape(x, out)
    n, d = x.shape
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _gelu_tanh_row(x[i], out[i])
    else:
        for i in prange(n):
            _gelu_tanh_row(x[i], out[i])


@_helper()
def _gelu_erf_row(x, out):
    c = 1.0 / math.sqrt(2.0)
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        out[j] = v * 0.5 * (1.0 + math.erf(v * c))


@_kernel(nt.void(_R2, _W2), parallel=True)
def gelu_erf(x, out):
    """Exact GELU `x * 0.5 * (1 + erf(x / sqrt 2))` (torch's default), element-wise. `out` may alias `x`."""
    _check_same_shape(x, out)
    n, d = x.shape
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _gelu_erf_row(x[i], out[i])
    else:
        for i in prange(n):
            _gelu_erf_row(x[i], out[i])


@_helper()
def _silu_mul_row(gate, up, out):
    for j in range(gate.shape[0]):
        g = np.float64(gate[j])
        out[j] = _F32(g / (1.0 + math.exp(-g))) * up[j]


@_kernel(nt.void(_R2, _R2, _W2), parallel=True)
def silu_mul(gate, up, out):
    """Llama MLP gating `silu(gate) * up`, element-wise. `out` may alias `gate` or `up`."""
    _check_same_shape(gate, out)
    _check_same_shape(up, out)
    n, d = gate.shape
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            _silu_mul_row(gate[i], up[i], out[i])
    else:
        for i in prange(n):
            _silu_mul_row(gate[i], up[i], out[i])


@_kernel(nt.void(_R2, _R2, _W2), parallel=True)
def add(a, b, out):
    """`out = a + b`, element-wise over `[n, d]`. `out` may alias `a` or `b` (residual add in place)."""
    _check_same_shape(a, out)
    _check_same_shape(b, out)
    n, d = a.shape
    if n * d < _PAR_MIN_WORK:
        for i in range(n):
            for j in range(d):
                out[i, j] = a[i, j] + b[i, j]
    else:
        for i in prange(n):
            for j in range(d):
                out[i, j] = a[i, j] + b[i, j]


# -------------------------------------------------------------------------------------------------- softmax


@_helper()
def _softmax_inplace(s, length):
    """Stable softmax of `s[:length]` in place; returns False (and leaves zeros) if `length` is 0."""
    if length == 0:
        return False
    mx = s[0]
    for t in range(1, length):
        mx = max(mx, s[t])
    denom = 0.0
    for t in range(length):
        e = math.exp(s[t] - mx)
        s[t] = e
        denom += e
    inv = 1.0 / denom
    for t in range(length):
        s[t] = s[t] * inv
    return True


@_helper()
def _softmax_row(x, out):
    m = x.shape[0]
    mx = x[0]
    for j in range(1, m):
        mx = max(mx, x[j])
    denom = 0.0
    for j in range(m):  # reads x[j] before writing out[j]: safe when out aliases x
        e = math.exp(x[j] - mx)
        out[j] = e
        denom += e
    inv = 1.0 / denom
    for j in range(m):
        out[j] = out[j] * inv


@_kernel(nt.void(_R2, _W2), parallel=True)
def softmax_rows(x, out):
    """Numerically stable softmax over each row of `x[n, m]` (m >= 1). `out` may alias `x`."""
    _check_same_shape(x, out)
    n, m = x.shape
    if m == 0:
        return
    if n * m < _PAR_MIN_WORK:
        for i in range(n):
            _softmax_row(x[i], out[i])
    else:
        for i in prange(n):
            _softmax_row(x[i], out[i])



# ------------------------------------------------------------------------------------------ argmax


@_kernel(nt.int64(_R1))
def argmax(x):
    """Index of the first maximum of `x[m]` (m >= 1); NaNs are never chosen."""
    if x.shape[0] == 0:
        raise ValueError("argmax: empty array")
    best = 0
    best_val = x[0]
    for j in range(1, x.shape[0]):
        if x[j] > best_val:
            best_val = x[j]
            best = j
    return best
