"""The op registry of the executor (see `registry.py`): importing this package registers every op family.

Nothing here imports numba: kernels are built when a plan first needs them (`_jit.py`), so the compiler
reads op names, attributes, shape rules and twins for free.

Families, one module each: `elementwise` (unary maps, Cast, SiluMul), `binary` (broadcast maps, Where),
`movement` (reshapes, Transpose, Concat, Slice, ...), `shapes` (Shape, Size, ConstantOfShape, Range), `norm`,
`reduce` (reductions, Softmax, ArgMax, pooling), `gather`, `attention`, `linear` (Linear in every weight
format), `matmul` (MatMul, Gemm). Shared helpers: `_copy` (the strided copy), `_ir` (LLVM IR intrinsics),
`_quant` (ggml block decode), `_half` (float16 conversions).
"""

from __future__ import annotations

from . import attention, binary, elementwise, gather, linear, matmul, movement, norm, reduce, shapes  # noqa: F401
from .registry import REGISTRY, OpDef, Sample, ShapeError, Site, WarmSpec, flops, get, infer, run_twin

__all__ = ["REGISTRY", "OpDef", "Sample", "ShapeError", "Site", "WarmSpec", "flops", "get", "infer", "run_twin",
           "names"]


def names() -> frozenset[str]:
    """Every op name the executor runs."""
    return frozenset(REGISTRY)
