"""The weight-format registry: every format's bytes are gguf-py's, bit for bit, and its geometry is consistent.

`quantize` / `dequantize` are compared with `gguf.quants` on random data and on the blocks that exercise the
rounding and scale edge cases (zero, constant, huge, tiny, negative maxima, exact .5 steps); the comparison is
on the stored bytes and on the float32 bit patterns, so NaN / inf / -0.0 must match too.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants

from edge_rt_exec import formats as F

NAMES = ["f32", "f16", "q8_0", "q4_0", "q4_1"]
SHAPES = [(1, 32), (3, 64), (2, 3, 96), (7, 4096)]


def edge_blocks() -> np.ndarray:
    """Rows of 32 weights (one block each) chosen to hit every branch of the quantizers."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(-1, 1, 32, dtype=np.float32)
    rows = [
        np.zeros(32), np.full(32, 0.75), np.full(32, -0.75), np.full(32, 3e4),  # zero, constant (+ / -), big
        ramp, -ramp, ramp * 1e-3, ramp * 1e-30, ramp * 6e4,  # ramps: subnormal fp16 scale, scale 0, huge
        np.where(np.arange(32) == 5, -9.0, 1.0),  # the largest magnitude is negative (q4_0 keeps its sign)
        np.where(np.arange(32) == 5, 9.0, -1.0),
        np.arange(32) - 15.5, (np.arange(32) % 16) * 0.5,  # exact halves: the round-half-away cases
        np.r_[np.zeros(31), 1e-3], np.r_[-0.0, np.zeros(31)], rng.standard_normal(32) * 100,
        np.r_[np.full(16, 1e38), np.full(16, -1e38)],  # the scale overflows fp16 (inf)
    ]
    return np.stack(rows).astype(np.float32)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))


def gguf_quantize(name: str, a: np.ndarray) -> np.ndarray:
    return quants.quantize(a, getattr(GT, F.get(name).ggml_type))


@pytest.mark.parametrize("name", NAMES)
def test_quantize_is_gguf_bit_for_bit(name: str) -> None:
    f = F.get(name)
    rng = np.random.default_rng(0)
    cases = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in SHAPES] + [edge_blocks()]
    for a in cases:
        with np.errstate(all="ignore"):
            ours = f.quantize(a)
            ref = gguf_quantize(name, a)
        ours_b = np.ascontiguousarray(ours).view(np.uint8).reshape(-1)
        ref_b = np.ascontiguousarray(ref).view(np.uint8).reshape(-1)
        assert ours_b.size == f.nbytes(a.shape) == ref_b.size, (name, a.shape)
        diff = np.flatnonzero(ours_b != ref_b)
        assert diff.size == 0, f"{name} {a.shape}: {diff.size} bytes differ from gguf, first at byte {diff[:1]}"


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_is_gguf_bit_for_bit(name: str) -> None:
    f = F.get(name)
    rng = np.random.default_rng(1)
    cases = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in SHAPES] + [edge_blocks()]
    for a in cases:
        with np.errstate(all="ignore"):
            raw = np.ascontiguousarray(f.quantize(a)).reshape(-1).view(np.uint8)
            ours = f.dequantize(f.view(raw, a.shape), a.shape)
            ref = quants.dequantize(gguf_quantize(name, a), getattr(GT, f.ggml_type)).reshape(a.shape)
        assert ours.dtype == np.float32 and ours.shape == a.shape
        assert bits_equal(ours, ref.astype(np.float32)), f"{name} {a.shape}: dequantize differs from gguf"
        if name == "f32":
            assert bits_equal(ours, a)


def test_edge_blocks_are_not_vacuous() -> None:
    """The edge cases really produce the special values they are meant to (else the test above proves less)."""
    with np.errstate(all="ignore"):
        q = F.Q8_0.quantize(edge_blocks()).reshape(-1, 34)
    d = q[:, :2].copy().view("<f2").astype(np.float32).reshape(-1)
    assert d[0] == 0 and np.isinf(d[-1]) and 0 < abs(d[6]) < 6.1e-5 and d[7] == 0  # zero, inf, subnormal scales
    with np.errstate(all="ignore"):
        q4 = F.Q4_0.quantize(edge_blocks()).reshape(-1, 18)
    d4 = q4[:, :2].copy().view("<f2").astype(np.float32).reshape(-1)
    assert d4[9] > 0 > d4[10]  # q4_0's scale carries the sign of the largest-magnitude weight


@pytest.mark.parametrize("name", NAMES)
def test_geometry_is_consistent(name: str) -> None:
    f = F.get(name)
    rng = np.random.default_rng(2)
    for shape in SHAPES:
        k = shape[-1]
        rows = int(np.prod(shape[:-1]))
        assert f.supports(shape)
        assert f.row_bytes(k) * rows == f.nbytes(shape)
        assert f.row_bytes(k) == k // f.block * f.block_bytes
        a = rng.standard_normal(shape).astype(np.float32)
        raw = np.ascontiguousarray(f.quantize(a)).reshape(-1).view(np.uint8)
        assert raw.size == f.nbytes(shape)
        v = f.view(raw, shape)
        assert np.shares_memory(v, raw), "view must not copy"
        assert v.dtype == np.dtype(f.view_dtype)
        if f.quantized:
            assert v.shape == (rows, f.row_bytes(k))
            assert f.stored_shape(shape) == [f.nbytes(shape)]
        else:
            assert v.shape == tuple(shape)
            assert f.stored_shape(shape) == list(shape)
        assert v.nbytes == f.nbytes(shape)


@pytest.mark.parametrize("name", [n for n in NAMES if F.get(n).block > 1])
def test_rows_must_be_whole_blocks(name: str) -> None:
    f = F.get(name)
    assert not f.supports((4, 48)) and not f.supports((4, 31))
    with pytest.raises(ValueError):
        f.row_bytes(48)
    with pytest.raises(ValueError):
        f.nbytes((2, 33))
    with pytest.raises(ValueError):
        f.quantize(np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError):
        f.view(np.zeros(100, np.uint8), (2, 40))


def test_registry() -> None:
    assert set(NAMES) <= set(F.FORMATS)
    with pytest.raises(ValueError, match="known"):
        F.get("q5_k")
    for name in NAMES:
        f = F.get(name)
        assert f.name == name and F.NATIVE_GGML[f.ggml_type] == name
