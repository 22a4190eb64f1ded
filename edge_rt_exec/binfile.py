"""The one bounded binary reader used for every file edge-rt reads (safetensors, plans' weights).

The pattern (STYLE.md #9): map the file once, validate the whole header before touching tensor data, keep
size arithmetic in Python ints, and create views only through `BoundedFile.view`, which checks
`offset + nbytes <= file_size` first.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

#: safetensors dtype codes -> numpy dtypes (little-endian). BF16 is widened by the caller.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "u1",
}
NUMPY_TO_SAFETENSORS = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "uint8": "U8",
                        "int8": "I8", "float64": "F64"}
MAX_HEADER_BYTES = 100 * 1024 * 1024


PAGE = mmap.PAGESIZE


def page_aligned_empty(nbytes: int, phase: int = 0) -> np.ndarray:
    """`nbytes` of uninitialized memory whose first byte sits `phase` bytes past a page boundary.

    A buffer that file reads land in is placed like this, not where the allocator puts it (numpy's large
    arrays start 16 bytes past a page): the kernel's copy from the page cache slows down several times on some
    x86-64 CPUs (seen on AMD EPYC: 2.7 against 11 GB/s) when the destination sits at certain small offsets from
    the source page's alignment, 16 bytes among them. A page-aligned slot, or a destination in the same phase as
    its file offset, reads at full speed (benchmarks/bench_calibration.py; edge-rt-exec calibrate measures
    the same way)."""
    raw = np.empty(nbytes + 2 * PAGE, np.uint8)
    start = (-raw.ctypes.data) % PAGE + phase % PAGE
    return raw[start:start + nbytes]


def _prod(dims: list[int]) -> int:
    """Product in Python ints: file-supplied dims must never wrap."""
    n = 1
    for d in dims:
        n *= int(d)
    return n


class BoundedFile:
    """A read-only file with bounds-checked views (mmap) and reads (pread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise UserError(f"{self.path}: file not found; check the path") from None
        except IsADirectoryError:
            raise UserError(f"{self.path}: is a folder, expected a file") from None
        except PermissionError:
            raise UserError(f"{self.path}: permission denied; check the file's permissions") from None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            self._fd = -1
            raise UserError(f"{self.path}: not a regular file (a FIFO, device or socket); pass the file itself")
        self.size = st.st_size
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  #: what `unchanged` compares
        self._mm: mmap.mmap | None = None

    def check(self, offset: int, nbytes: int, what: str) -> None:
        """Raise a UserError unless [offset, offset + nbytes) lies inside the file."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise UserError(
                f"{self.path}: {what} spans bytes [{offset}, {offset + nbytes}) but the file has "
                f"{self.size} bytes; the file is truncated or corrupt, re-create it"
            )

    def unchanged(self, what: str) -> None:
        """Raise a UserError if the open file was truncated or rewritten in place since it was opened (one
        `fstat`). A map of a truncated file raises SIGBUS when a page past the new end is touched, which
        Python cannot turn into an error, so callers check before each run. A file replaced by a new one
        (renamed over the path) leaves the open one, and its map, intact: that is not a change here."""
        try:
            st = os.fstat(self._fd)
        except OSError as e:
            raise UserError(f"{self.path}: cannot check the {what} ({e.strerror or e})") from None
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
            raise UserError(f"{self.path}: the {what} changed while it was in use ({self._identity[2]} bytes when "
                            f"loaded, {st.st_size} now): it was truncated or overwritten in place; restart with a "
                            "complete copy of the artifact (copy it again or recompile), and replace files by "
                            "renaming, never by writing over a file in use")

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:
            if self.size == 0:
                raise UserError(f"{self.path}: file is empty")
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        return self._mm

    def view(self, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
        """A zero-copy read-only view of the file bytes [offset, offset + nbytes)."""
        self.check(offset, nbytes, what)
        dt = np.dtype(dtype)
        count = _prod(list(shape))
        if count * dt.itemsize != nbytes:
            raise UserError(f"{self.path}: {what} has shape {list(shape)} ({count * dt.itemsize} bytes) "
                            f"but {nbytes} bytes are stored; the file is corrupt")
        return np.frombuffer(self.mm, dtype=dt, count=count, offset=offset).reshape(shape)

    def read(self, offset: int, nbytes: int, what: str) -> bytes:
        self.check(offset, nbytes, what)
        return os.pread(self._fd, nbytes, offset)

    def read_into(self, offset: int, out: np.ndarray, what: str) -> None:
        """Fill `out` (contiguous) with file bytes starting at `offset` (pread; releases the GIL)."""
        buf = memoryview(out).cast("B")  # type: ignore[arg-type]
        self.check(offset, buf.nbytes, what)
        done = 0
        while done < buf.nbytes:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise UserError(f"{self.path}: short read at byte {offset + done}; the file changed or is "
                                "truncated")
            done += n

    def advise_dontneed(self, offset: int, nbytes: int) -> None:
        """Tell the kernel we will not need these pages soon (page cache of a finished group)."""
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views still alive; the mapping goes with them
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if getattr(self, "_fd", -1) >= 0:
                os.close(self._fd)
        except OSError:
            pass


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; `offset` is absolute in the file."""

    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SafetensorsFile:
    """A safetensors file read through `BoundedFile`: the header is validated whole on open."""

    def __init__(self, path: str | Path) -> None:
        self.file = BoundedFile(path)
        self.path = self.file.path
        self.metadata, self.tensors, self.data_start = self._parse_header()

    def _parse_header(self) -> tuple[dict[str, str], dict[str, TensorEntry], int]:
        f = self.file
        if f.size < 8:
            raise UserError(f"{self.path}: not a safetensors file (only {f.size} bytes); re-export it")
        (hlen,) = struct.unpack("<Q", f.read(0, 8, "header length"))
        if hlen > MAX_HEADER_BYTES or 8 + hlen > f.size:
            raise UserError(f"{self.path}: safetensors header claims {hlen} bytes but the file has {f.size}; "
                            "the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(8, hlen, "header").decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{self.path}: safetensors header is not valid JSON ({e}); re-export the file") \
                from None
        if not isinstance(header, dict):
            raise UserError(f"{self.path}: safetensors header is not a JSON object; re-export the file")
        data_start = 8 + hlen
        data_size = f.size - data_start
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise UserError(f"{self.path}: safetensors __metadata__ is not an object")
        tensors: dict[str, TensorEntry] = {}
        for name, ent in header.items():
            where = f"{self.path}: tensor '{name}'"
            if not isinstance(ent, dict):
                raise UserError(f"{where}: header entry is not an object")
            dtype = ent.get("dtype")
            if dtype not in SAFETENSORS_DTYPES:
                raise UserError(f"{where}: unsupported dtype {dtype!r}; supported: "
                                f"{', '.join(SAFETENSORS_DTYPES)}")
            shape = ent.get("shape")
            offs = ent.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)):
                raise UserError(f"{where}: bad shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                    or not 0 <= offs[0] <= offs[1] <= data_size):
                raise UserError(f"{where}: data_offsets {offs!r} fall outside the {data_size}-byte data "
                                "section; the file is truncated or corrupt")
            nbytes = offs[1] - offs[0]
            itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
            if _prod(shape) * itemsize != nbytes:
                raise UserError(f"{where}: shape {shape} x {dtype} needs {_prod(shape) * itemsize} bytes but "
                                f"the header gives {nbytes}; the file is corrupt")
            tensors[name] = TensorEntry(name, dtype, tuple(shape), data_start + offs[0], nbytes)
        return {str(k): str(v) for k, v in metadata.items()}, tensors, data_start

    def view(self, name: str) -> np.ndarray:
        """Zero-copy view in the stored dtype (BF16 as uint16)."""
        t = self.tensor_entry(name)
        return self.file.view(t.offset, t.nbytes, SAFETENSORS_DTYPES[t.dtype], t.shape, f"tensor '{name}'")

    def tensor_entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"{self.path}: no tensor named '{name}'") from None

    def load_f32(self, name: str) -> np.ndarray:
        """A float32 copy (widening F16/BF16/F64)."""
        t = self.tensor_entry(name)
        v = self.view(name)
        if t.dtype == "BF16":
            return (v.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(v, dtype=np.float32)

    def close(self) -> None:
        self.file.close()
