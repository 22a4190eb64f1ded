"""The bounded walk of a GGUF header (STYLE.md #9), before `gguf.GGUFReader` (which trusts the header) parses
the file: every length, count and tensor extent is checked against the file size, so a truncated or corrupt
file is one `UserError` naming what is wrong, in bounded time and memory, before any tensor data is touched."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from edge_rt_exec import formats
from edge_rt_exec.errors import UserError

#: GGML tensor types edge-rt takes: the ones it runs natively (kept as stored) and the ones repacked at compile
#: time to the nearest native format (`formats.REPACK_GGML`); `gguf.quants.dequantize` reads them all.
SUPPORTED_TYPES = tuple(formats.NATIVE_GGML) + tuple(formats.REPACK_GGML)

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32

# GGUF value types: id -> (name, fixed byte size or None)
_VT_STRING = 8
_VT_ARRAY = 9
_VT_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


# --------------------------------------------------------------------------------------------------------
# bounded header walk (validation before GGUFReader)
# --------------------------------------------------------------------------------------------------------


@dataclass
class _RawTensor:
    name: str
    dims: tuple[int, ...]  # GGML order (ne0 = innermost)
    type_id: int
    offset: int  # relative to the data section


class _Walker:
    """Reads the GGUF header with every read bounds-checked against the file size."""

    def __init__(self, buf: Any, size: int, where: str) -> None:
        self.buf, self.size, self.where, self.pos = buf, size, where, 0

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.where}: {what}; the GGUF file is truncated or corrupt, re-download or re-convert it")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size}")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str, decode: bool = True) -> str | None:
        n = self.unpack("Q", f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n]) if decode else None
        self.pos += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - n} is not valid UTF-8") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """Skip one value; returns it when it is a scalar (for general.alignment)."""
        if vtype in _VT_SIZES:
            fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}[vtype]
            return self.unpack(fmt, what)
        if vtype == _VT_STRING:
            self.string(what, decode=False)
            return None
        if vtype == _VT_ARRAY:
            if depth > 4:
                raise self.fail(f"{what}: arrays nested more than 4 deep")
            itype = self.unpack("I", f"element type of {what}")
            count = self.unpack("Q", f"length of {what}")
            if itype in _VT_SIZES:
                self.need(count * _VT_SIZES[itype], f"{count} elements of {what}")
                self.pos += count * _VT_SIZES[itype]
            elif itype in (_VT_STRING, _VT_ARRAY):
                # every element takes at least 8 bytes: refuse absurd counts before looping
                self.need(count * 8, f"{count} elements of {what}")
                for _ in range(count):
                    self.skip_value(itype, what, depth + 1)
            else:
                raise self.fail(f"{what}: unknown GGUF array element type {itype}")
            return None
        raise self.fail(f"{what}: unknown GGUF value type {vtype}")


def walk_header(buf: Any, size: int, where: str) -> list[_RawTensor]:
    """Validate the whole header and every tensor's extent; returns the tensor directory."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    w = _Walker(buf, size, where)
    if size < 4 or bytes(buf[:4]) != _GGUF_MAGIC:
        raise UserError(f"{where}: not a GGUF file (the first bytes are not 'GGUF'); pass a .gguf model file")
    w.pos = 4
    version = w.unpack("I", "GGUF version")
    if version & 0xFFFF == 0 and version != 0:
        raise UserError(f"{where}: big-endian GGUF files are not supported; convert the model on a little-endian "
                        "machine (llama.cpp's convert_hf_to_gguf.py)")
    if version not in _GGUF_VERSIONS:
        raise UserError(f"{where}: GGUF version {version} is not supported (supported: {list(_GGUF_VERSIONS)}); "
                        "re-convert the model with a current llama.cpp")
    n_tensors = w.unpack("Q", "tensor count")
    n_kv = w.unpack("Q", "metadata count")
    # each KV takes >= 8 (key length) + 4 (type) + 1 bytes; each tensor info >= 8 + 4 + 8 + 4 + 8
    if n_kv * 13 > size or n_tensors * 32 > size:
        raise w.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the "
                     f"{size}-byte file can hold")
    alignment = _DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for i in range(n_kv):
        key = w.string(f"metadata key #{i}")
        assert key is not None
        if key in keys:
            raise w.fail(f"metadata key '{key}' appears twice")
        keys.add(key)
        vtype = w.unpack("I", f"type of metadata '{key}'")
        v = w.skip_value(vtype, f"metadata '{key}'")
        if key == "general.alignment":
            if vtype != 4 or not v or v & (v - 1):
                raise w.fail(f"general.alignment = {v!r} (type {vtype}) is not a power-of-two uint32")
            alignment = int(v)

    tensors: list[_RawTensor] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = w.string(f"name of tensor #{i}")
        assert name is not None
        if name in names:
            raise w.fail(f"tensor '{name}' appears twice")
        names.add(name)
        n_dims = w.unpack("I", f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise w.fail(f"tensor '{name}' has {n_dims} dimensions (GGML allows 1..{_MAX_DIMS})")
        dims = tuple(w.unpack("Q", f"dimensions of tensor '{name}'") for _ in range(n_dims))
        type_id = w.unpack("I", f"type of tensor '{name}'")
        offset = w.unpack("Q", f"data offset of tensor '{name}'")
        tensors.append(_RawTensor(name, dims, type_id, offset))

    data_start = -(-w.pos // alignment) * alignment
    if data_start > size:
        raise w.fail(f"the tensor data section would start at byte {data_start}, past the end of the file")

    extents = []
    for t in tensors:
        try:
            qtype = GGMLQuantizationType(t.type_id)
        except ValueError:
            raise UserError(f"{where}: tensor '{t.name}' has unknown GGML type id {t.type_id}; supported types: "
                            f"{', '.join(SUPPORTED_TYPES)} - re-quantize the model to one of them") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 for d in t.dims) or math.prod(t.dims) >= 2**62:
            raise w.fail(f"tensor '{t.name}' has dimensions {list(t.dims)}")
        if t.dims[0] % block:
            raise w.fail(f"tensor '{t.name}' ({qtype.name}) has a row of {t.dims[0]} elements, not a multiple of "
                         f"the {block}-element block")
        n_bytes = math.prod(t.dims) // block * type_size
        if t.offset % alignment:
            raise w.fail(f"tensor '{t.name}' data offset {t.offset} is not a multiple of the alignment {alignment}")
        start = data_start + t.offset
        if start + n_bytes > size:
            raise w.fail(f"tensor '{t.name}' ({qtype.name} {list(t.dims)} = {n_bytes} bytes) needs bytes "
                         f"{start}..{start + n_bytes} but the file has {size}")
        extents.append((start, start + n_bytes, t.name))
    extents.sort()
    for (s0, e0, n0), (s1, _e1, n1) in zip(extents, extents[1:]):
        if s1 < e0:
            raise w.fail(f"tensors '{n0}' and '{n1}' overlap (bytes {s0}..{e0} and {s1}..): the header's element "
                         "counts do not match the data layout")
    return tensors
