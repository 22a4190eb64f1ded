"""Shared pieces of the kernels: array types of the explicit signatures, decorators, tuning constants."""

from __future__ import annotations

import numba
import numpy as np
from numba import types as nt

_F32 = np.float32

# Below this many elements of work a kernel runs serially (see the module docstring).
_PAR_MIN_WORK = 1 << 15
# Tokens per tile of the n > 1 linear kernel and weight rows per parallel task.
_TOKENS_PER_TILE = 4
_ROWS_PER_TASK = 16

_DOT_FLAGS = {"reassoc", "contract"}

_R1 = nt.Array(nt.float32, 1, "C", readonly=True)
_R2 = nt.Array(nt.float32, 2, "C", readonly=True)
_R3 = nt.Array(nt.float32, 3, "C", readonly=True)
_W2 = nt.Array(nt.float32, 2, "C")
_W3 = nt.Array(nt.float32, 3, "C")
_IDS = nt.Array(nt.int64, 1, "C", readonly=True)
_MASK = nt.Array(nt.int64, 2, "C", readonly=True)
_i64 = nt.int64
_f64 = nt.float64


def _kernel(signature, parallel: bool = False, fastmath=False):
    """The one decorator of every public kernel (eager, cached, GIL-free)."""
    return numba.njit(signature, cache=True, nogil=True, parallel=parallel, fastmath=fastmath)


def _helper():
    """Decorator of helpers: inlined into the calling kernel at numba-IR level, so the kernel's fastmath flags
    and `prange` loops apply to the helper's body too."""
    return numba.njit(inline="always", nogil=True)
