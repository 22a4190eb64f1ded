"""Numba kernels of the executor. `reference.py` holds the plain-numpy twin (the definition) of each one.

Contract shared by every kernel:

* Arrays are C-contiguous; floats are float32, token ids / positions / masks are int64. Each kernel has an
  explicit signature, so a wrong dtype, a non-contiguous view (e.g. a column slice) or a wrong rank raises
  `TypeError` at the call instead of compiling a slow variant. Inputs are typed read-only, so read-only
  mmap'd weights and writable arena views are both accepted.
* Results go into caller-owned `out` buffers (arena views); scratch buffers are passed in; nothing allocates.
  `out` may alias an input only where a docstring says so.
* Shapes are checked on entry (O(1)) and a mismatch raises ValueError: numba does no bounds checking, so a
  bad shape would otherwise corrupt memory.
* Signatures are compiled eagerly at import and cached on disk (`cache=True`), so the first import on a new
  machine takes a while and later ones load in about a second.

Threading: kernels release the GIL (`nogil=True`). Heavy kernels run `prange` loops on numba's thread pool
(size: `numba.set_num_threads`). Light kernels switch to a serial loop below `_PAR_MIN_WORK` elements, because
launching a parallel region costs a few microseconds under the omp/tbb threading layers and ~100 us under
`workqueue`. Do not call kernels from two Python threads at once: the workqueue layer is not thread-safe.

Numerics: dot products (linear, attention scores) are compiled with `fastmath={"reassoc", "contract"}` so LLVM
can vectorise the reduction and use FMA. torch's BLAS does not sum in sequential order either, so this costs
no fidelity and is what makes the decode matvec run at memory bandwidth. The other flags (no-NaN, no-inf,
approximate functions) stay off: masking uses -inf and exp/erf must stay exact. Element-wise maps compute in
float64 and round once, like the reference; norm statistics and softmax denominators accumulate in float64;
mean pooling sums in float32 like sentence-transformers.
"""


from __future__ import annotations

from .attention import attention_bidir, attention_causal, kv_write, mean_pool_l2, rope_inplace
from .elementwise import add, argmax, gelu_erf, gelu_tanh, layernorm, rmsnorm, silu_mul, softmax_rows
from .linear import embedding_add, embedding_gather, linear, linear_rows

__all__ = [
    "add", "argmax", "attention_bidir", "attention_causal", "embedding_add", "embedding_gather", "gelu_erf",
    "gelu_tanh", "kv_write", "layernorm", "linear", "linear_rows", "mean_pool_l2", "rmsnorm", "rope_inplace",
    "silu_mul", "softmax_rows",
]
