"""Group checksums: a check, on every read, that a streamed group's bytes are the bytes the compiler wrote.

A weights file on a device's SD card can rot after it was copied; a streamed plan rereads every group for
every token, so a bad sector would otherwise become wrong tokens. The compiler stores one checksum per
streamed group in the plan (`Group.checksum`); the streamer recomputes it after each read, before the slot
reaches the kernels (`weights.GroupStreamer`). It must cost little next to the read (page-cache reads run at
6-10 GB/s; `zlib.crc32` runs at ~1 GB/s), so it is two sums of 64-bit words, which vectorise.

The definition (`checksum_ref`, numpy; the compiler uses it): the bytes, zero-padded to whole little-endian
uint64 words, then one word holding the byte count: w_0 .. w_{N-1}. Then

    A = sum(w_i)             mod 2^64
    B = sum((N - i) * w_i)   mod 2^64        (Fletcher's two sums, over 64-bit words, modulus 2^64)

written as 32 hex digits, A then B. What it catches: any change confined to one word (a flipped bit, a
changed byte, a zeroed word) changes A for certain; swapping two different words i < j changes B by
(j - i)(w_j - w_i), never 0 when j - i is odd, and for j - i < 2^k only when the two words agree in their low
64 - k bits. A wider corruption (a zeroed or stale sector) passes only if both sums collide.

The kernel (`fletcher`) keeps four lanes of (a, b) over 32-byte rows, independent adds that LLVM vectorises
(measured 20-26 GB/s on one core of the 2-core x86-64 test machine from DRAM, 30-40 GB/s from L2;
`tests/test_weights_checksum.py` asserts >= 10 GB/s), then folds the lanes into the sequential sums and adds
the tail. Lane l of row k holds word 4k + l, so after m rows b_l = sum_k (m - k) w_{4k+l} and
B = sum_l (4 b_l - l a_l).
"""

from __future__ import annotations

import numpy as np

from .ops._jit import U8, U64, arr, kernel

MASK = (1 << 64) - 1
#: Length of a checksum string (two 64-bit sums in hex).
CHECKSUM_CHARS = 32


def checksum_ref(data: bytes | np.ndarray) -> str:
    """The definition, in numpy: `A` then `B` (module docstring) as 32 hex digits."""
    b = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)  # type: ignore[arg-type]  # little-endian only
    nbytes = b.size
    whole = nbytes - nbytes % 8
    tail = np.zeros(8, np.uint8)
    tail[:nbytes - whole] = b[whole:]
    w = [b[:whole].view("<u8"), *([tail.view("<u8")] if nbytes > whole else []), np.array([nbytes], "<u8")]
    n = sum(x.size for x in w)
    step = 1 << 18
    j = np.arange(step, dtype=np.uint64)
    a = bsum = i = 0
    for x in w:
        for s in range(0, x.size, step):  # bounded temporaries; sum((n - i - s - j) w_j) per chunk
            c = x[s:s + step]
            ca = int(c.sum(dtype=np.uint64))
            a += ca
            bsum += (n - i - s) * ca - int(np.dot(c, j[:c.size]))  # integer dot: wraps mod 2^64, no BLAS
        i += x.size
    return f"{a & MASK:016x}{bsum & MASK:016x}"


@kernel("void", arr(U8, 1, ro=True), arr(U64, 1))
def fletcher(data, out):
    """out[0], out[1] = A, B of `data` (`checksum_ref`). `data` need not be 8-byte aligned (x86-64 and aarch64
    load unaligned words). One call per group, so the reader thread takes the GIL once for it."""
    rows = data.size // 32
    w = data[:rows * 32].view(np.uint64)
    a0 = a1 = a2 = a3 = np.uint64(0)
    b0 = b1 = b2 = b3 = np.uint64(0)
    for k in range(rows):
        a0 += w[4 * k]
        a1 += w[4 * k + 1]
        a2 += w[4 * k + 2]
        a3 += w[4 * k + 3]
        b0 += a0
        b1 += a1
        b2 += a2
        b3 += a3
    # the lanes folded into the sequential sums: B = sum_l (4 b_l - l a_l)
    a = a0 + a1 + a2 + a3
    b = np.uint64(4) * (b0 + b1 + b2 + b3) - a1 - np.uint64(2) * a2 - np.uint64(3) * a3
    pos = rows * 32
    while pos < data.size:  # the tail: whole words, then the last bytes zero-padded into one word
        t = np.uint64(0)
        for i in range(min(8, data.size - pos)):
            t |= np.uint64(data[pos + i]) << np.uint64(8 * i)
        a += t
        b += a
        pos += 8
    a += np.uint64(data.size)  # the length word
    b += a
    out[0] = a
    out[1] = b


def to_words(checksum: str) -> tuple[int, int]:
    """(A, B) of a checksum string."""
    return int(checksum[:16], 16), int(checksum[16:], 16)


def checksum(data: np.ndarray) -> str:
    """`checksum_ref` of a contiguous uint8 array, with the kernel."""
    out = np.zeros(2, np.uint64)
    fletcher.load()(data, out)
    return f"{int(out[0]):016x}{int(out[1]):016x}"
