"""Graph passes, one per module, each a function over the IR of any frontend (`ir.py`), in the order the
pipeline runs them:

| pass | what it does |
|---|---|
| `normalize` | attributes to plain JSON values (Cast's `to` as a dtype name, ...) |
| `fold` | Constant ops, ops on constants, Shape/Size of static shapes -> constants (the twins evaluate them) |
| `drop_identities` | Identity and no-op Cast bypassed |
| `fuse_linear` | MatMul/Gemm (+ Add) with a constant weight -> `Linear` |
| `fuse_gelu`, `fuse_norms` | decomposed GELU / LayerNorm / RMSNorm -> one op, confirmed numerically |
| `dce` | dead ops and unused optional outputs removed |
| `classify` | constants -> weights ("@name", the weights file) or inline constants (the plan) |
| `kv_cache` | the KV cache's element type (`kv_dtype=`) |
| `bind_dims` | every buffer's shape at the plan's maximum dims (`plan_dims`), FLOPs and scratch per op |
| `quantize` | every weight's storage format (`quant=`) |
| `segments` | units for graphs without their own (ONNX: segments of about equal weight bytes) |

A pass rewrites the graph it is given (that is its whole point) and returns it.
"""

from __future__ import annotations

import networkx as nx

from ..ir import renumber
from .classify import classify
from .dce import dce
from .dims import Dims, bind_dims, plan_dims
from .fold import fold
from .fuse_gelu import fuse_gelu
from .fuse_linear import fuse_linear
from .fuse_norms import fuse_norms
from .identities import drop_identities
from .normalize import normalize
from .quantize import format_tag, kv_cache, quantize
from .segments import segments

__all__ = ["Dims", "GRAPH_PASSES", "bind_dims", "classify", "dce", "drop_identities", "fold", "format_tag",
           "fuse_gelu", "fuse_linear", "fuse_norms", "kv_cache", "normalize", "plan_dims", "quantize", "run",
           "segments", "simplify"]

#: The passes that only rewrite ops (no compile settings needed), in order.
GRAPH_PASSES = (normalize, fold, drop_identities, fuse_linear, fuse_gelu, fuse_norms, dce, classify)


def simplify(g: nx.DiGraph) -> nx.DiGraph:
    """Fold, fuse, clean up and classify constants (the settings-free passes)."""
    for p in GRAPH_PASSES:
        g = p(g)
    return renumber(g)


def run(g: nx.DiGraph, dims: Dims, quant: str, kv_dtype: str) -> nx.DiGraph:
    """Every pass, in order, for one compile."""
    g = simplify(g)
    g = kv_cache(g, kv_dtype)
    g = bind_dims(g, dims)
    g = quantize(g, quant)
    return renumber(segments(g))
