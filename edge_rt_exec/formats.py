"""The weight-format registry: how a weight's bytes are laid out in the weights file and in memory.

Every size in the compiler and the executor (weights layout, partition, arena, verifier, budget) comes from
here, never from a literal bytes-per-weight (STYLE.md #20). A format registers itself by subclassing
`WeightFormat` (the gguf-py `quants.py` pattern) and carries its block geometry, `quantize` (float32 ->
the stored bytes, bit-identical to `gguf.quants.quantize` for the ggml formats), `dequantize` (its numpy twin:
stored bytes -> float32, exactly as `gguf.quants.dequantize`) and `view` (the array the kernels take).

Quantized formats are the ggml block layouts: a row of `k` weights is `k / 32` blocks, each block an fp16
scale `d` (and an fp16 minimum `m` for q4_1) followed by the packed values:

| format | bytes / 32 weights | value |
|---|---|---|
| `q8_0` | 2 + 32 | `d * int8` |
| `q4_0` | 2 + 16 | `d * (nibble - 8)`; byte j holds weight j (low nibble) and weight j + 16 (high) |
| `q4_1` | 2 + 2 + 16 | `d * nibble + m`; same nibble order |

Rows are independent, so a weight can be split (row tiles) or permuted (GGUF's q/k order) row by row.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

FORMATS: dict[str, type[WeightFormat]] = {}


class WeightFormat:
    """A weight format. Subclasses are never instantiated; every method is a classmethod."""

    name: ClassVar[str]
    block: ClassVar[int]  #: weights per block along a row (1: unblocked)
    block_bytes: ClassVar[int]  #: bytes per block
    ggml_type: ClassVar[str | None]  #: the GGML type whose bytes these are, bit for bit
    safetensors_dtype: ClassVar[str]  #: how the weights file's header declares the bytes
    view_dtype: ClassVar[str]  #: the dtype of the array `view` gives the kernels
    quantized: ClassVar[bool] = False

    def __init_subclass__(cls, name: str, block: int, block_bytes: int, ggml_type: str | None,
                          safetensors_dtype: str, quantized: bool = False, register: bool = True) -> None:
        cls.name, cls.block, cls.block_bytes, cls.ggml_type = name, block, block_bytes, ggml_type
        cls.safetensors_dtype, cls.quantized = safetensors_dtype, quantized
        cls.view_dtype = "uint8" if quantized else {"F32": "float32", "F16": "uint16"}[safetensors_dtype]
        if register:
            assert name not in FORMATS, f"weight format {name} registered twice"
            FORMATS[name] = cls

    # ---- geometry ----------------------------------------------------------------------------------------------
    @classmethod
    def supports(cls, shape: tuple[int, ...] | list[int]) -> bool:
        """Whether a tensor of this shape can be stored in this format (rows must be whole blocks)."""
        return len(shape) >= 1 and int(shape[-1]) % cls.block == 0

    @classmethod
    def row_bytes(cls, k: int) -> int:
        """Bytes of one row of `k` weights."""
        if k % cls.block:
            raise ValueError(f"{cls.name}: a row of {k} weights is not a whole number of {cls.block}-weight blocks")
        return k // cls.block * cls.block_bytes

    @classmethod
    def nbytes(cls, shape: tuple[int, ...] | list[int]) -> int:
        """Bytes of a tensor of logical shape `shape` (Python ints: never wraps)."""
        rows = 1
        for d in shape[:-1]:
            rows *= int(d)
        return rows * cls.row_bytes(int(shape[-1])) if shape else cls.block_bytes

    @classmethod
    def stored_shape(cls, shape: tuple[int, ...] | list[int]) -> list[int]:
        """The shape the weights file's header gives these bytes (in `safetensors_dtype` elements)."""
        return list(shape)

    # ---- data --------------------------------------------------------------------------------------------------
    @classmethod
    def quantize(cls, a: np.ndarray) -> np.ndarray:
        """float32 `[..., k]` -> the stored array (what `view` returns for these bytes)."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, v: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """The twin: a `view` array -> float32 of logical shape `shape`."""
        raise NotImplementedError

    @classmethod
    def view(cls, raw: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """The array the kernels take, over `raw` (a uint8 view of exactly `nbytes(shape)` bytes; no copy)."""
        raise NotImplementedError


def get(name: str) -> type[WeightFormat]:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}") from None


# ---- unblocked -------------------------------------------------------------------------------------------------

class F32(WeightFormat, name="f32", block=1, block_bytes=4, ggml_type="F32", safetensors_dtype="F32"):
    @classmethod
    def quantize(cls, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype="<f4")

    @classmethod
    def dequantize(cls, v: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        return np.asarray(v, dtype=np.float32).reshape(shape)

    @classmethod
    def view(cls, raw: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        return raw.view("<f4").reshape(shape)


class F16(WeightFormat, name="f16", block=1, block_bytes=2, ggml_type="F16", safetensors_dtype="F16"):
    """IEEE half precision. Kernels take the raw halves as uint16 and widen them through a table."""

    @classmethod
    def quantize(cls, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype="<f4").astype("<f2").view("<u2")

    @classmethod
    def dequantize(cls, v: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        return np.asarray(v).view("<f2").astype(np.float32).reshape(shape)

    @classmethod
    def view(cls, raw: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        return raw.view("<u2").reshape(shape)


# ---- ggml blocks -----------------------------------------------------------------------------------------------

QK = 32  #: weights per block of every ggml format here


def _blocks(a: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.shape[-1] % QK:
        raise ValueError(f"rows of {a.shape[-1]} weights are not whole {QK}-weight blocks")
    return a.reshape(-1, QK), a.shape


def _round_half_away(n: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero), as ggml and gguf-py round."""
    a = np.abs(n)
    floored = np.floor(a)
    return np.sign(n) * (floored + np.floor(2 * (a - floored)))


class _Blocked(WeightFormat, name="_blocked", block=QK, block_bytes=0, ggml_type=None, safetensors_dtype="U8",
               quantized=True, register=False):
    """Shared view and shape code of the block formats (not a format itself)."""

    @classmethod
    def stored_shape(cls, shape: tuple[int, ...] | list[int]) -> list[int]:
        return [cls.nbytes(shape)]

    @classmethod
    def view(cls, raw: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        rows = 1
        for d in shape[:-1]:
            rows *= int(d)
        return raw.view(np.uint8).reshape(rows, cls.row_bytes(int(shape[-1])))



class Q8_0(_Blocked, name="q8_0", block=QK, block_bytes=2 + QK, ggml_type="Q8_0", safetensors_dtype="U8",
           quantized=True):
    @classmethod
    def quantize(cls, a: np.ndarray) -> np.ndarray:
        b, shape = _blocks(a)
        d = np.abs(b).max(axis=1, keepdims=True) / 127
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        qs = _round_half_away(b * inv).astype(np.int8).view(np.uint8)  # [n, 32]
        out = np.concatenate([d.astype("<f2").view(np.uint8), qs], axis=1)  # [n, 34]
        return out.reshape(-1, cls.row_bytes(shape[-1]))

    @classmethod
    def dequantize(cls, v: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        b = np.ascontiguousarray(v).view(np.uint8).reshape(-1, cls.block_bytes)  # [n, 34]
        d = b[:, :2].copy().view("<f2").astype(np.float32)  # [n, 1]
        x = b[:, 2:].view(np.int8).astype(np.float32)  # [n, 32]
        return (x * d).reshape(shape)


class Q4_0(_Blocked, name="q4_0", block=QK, block_bytes=2 + QK // 2, ggml_type="Q4_0", safetensors_dtype="U8",
           quantized=True):
    @classmethod
    def quantize(cls, a: np.ndarray) -> np.ndarray:
        b, shape = _blocks(a)
        n = b.shape[0]
        imax = np.abs(b).argmax(axis=-1, keepdims=True)
        d = np.take_along_axis(b, imax, axis=-1) / -8  # [n, 1]
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        qs = np.trunc((b * inv) + np.float32(8.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
        qs = qs.reshape(n, 2, QK // 2)
        qs = qs[:, 0, :] | (qs[:, 1, :] << np.uint8(4))  # [n, 16]
        out = np.concatenate([d.astype("<f2").view(np.uint8), qs], axis=-1)  # [n, 18]
        return out.reshape(-1, cls.row_bytes(shape[-1]))

    @classmethod
    def dequantize(cls, v: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        b = np.ascontiguousarray(v).view(np.uint8).reshape(-1, cls.block_bytes)  # [n, 18]
        d = b[:, :2].copy().view("<f2").astype(np.float32)  # [n, 1]
        qs = b[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)  # [n, 32]
        return (d * q.astype(np.float32)).reshape(shape)


class Q4_1(_Blocked, name="q4_1", block=QK, block_bytes=4 + QK // 2, ggml_type="Q4_1", safetensors_dtype="U8",
           quantized=True):
    @classmethod
    def quantize(cls, a: np.ndarray) -> np.ndarray:
        b, shape = _blocks(a)
        n = b.shape[0]
        hi = b.max(axis=-1, keepdims=True)
        lo = b.min(axis=-1, keepdims=True)
        d = (hi - lo) / 15
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        qs = np.trunc((b - lo) * inv + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
        qs = qs.reshape(n, 2, QK // 2)
        qs = qs[:, 0, :] | (qs[:, 1, :] << np.uint8(4))  # [n, 16]
        out = np.concatenate([d.astype("<f2").view(np.uint8), lo.astype("<f2").view(np.uint8), qs], axis=-1)
        return out.reshape(-1, cls.row_bytes(shape[-1]))  # [n, 20] per block

    @classmethod
    def dequantize(cls, v: np.ndarray, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        b = np.ascontiguousarray(v).view(np.uint8).reshape(-1, cls.block_bytes)  # [n, 20]
        d = b[:, 0:2].copy().view("<f2").astype(np.float32)  # [n, 1]
        m = b[:, 2:4].copy().view("<f2").astype(np.float32)  # [n, 1]
        qs = b[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # [n, 32]
        return ((d * q) + m).reshape(shape)


#: GGML types edge-rt runs natively, by GGML name.
NATIVE_GGML = {f.ggml_type: name for name, f in FORMATS.items() if f.ggml_type}
#: GGML types repacked at compile time to the nearest native format (same or more bits per weight, so no
#: precision is lost beyond one requantization): K-quants and the 5-bit formats.
REPACK_GGML = {"Q4_K": "q4_1", "Q5_0": "q8_0", "Q5_1": "q8_0", "Q5_K": "q8_0", "Q6_K": "q8_0", "Q2_K": "q4_1",
               "Q3_K": "q4_1", "BF16": "f32"}
