"""fold: Constant nodes, every op whose inputs are all constants, and Shape/Size of tensors whose shape is
static (so torch's Shape -> Gather -> Concat -> Reshape chains fold wherever they do not depend on a symbolic
dim) become constants. Evaluated with the executor's numpy twins (`ops.run_twin`), so folding and running
agree. A Shape folded on a static shape is recorded in `hints["assumed_static"]`; `passes.dims` checks it at
every binding."""

from __future__ import annotations

import networkx as nx
import numpy as np

from edge_rt_exec import ops
from edge_rt_exec.errors import UserError

from ..ir import Data, nodes_in_order, value
from .normalize import where

#: Constant folding skips ops whose constant inputs hold more elements than this.
FOLD_LIMIT = 1 << 26
#: Element types a constant may have.
CONST_DTYPES = ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "bool")


def _constant_value(g: nx.DiGraph, n: str) -> np.ndarray:
    a = g.nodes[n]["attrs"]
    if "value" in a:
        return np.asarray(a["value"])
    if "value_float" in a:
        return np.array(a["value_float"], np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], np.int64)
    raise UserError(f"{where(g, n)}: only tensor, float(s) and int(s) constants are supported (string and sparse "
                    "constants are not)")


def fake(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A zero-memory array of any shape (for Shape/Size of a static tensor)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.dtype(dtype)), shape, [0] * len(shape))


def _set(g: nx.DiGraph, t: str, d: Data) -> None:
    g.graph["constants"][t] = d
    g.graph["hints"]["dtypes"][t] = d.dtype
    g.graph["hints"]["static"][t] = d.shape


def fold(g: nx.DiGraph) -> nx.DiGraph:
    """Constant ops, ops on constants and Shape/Size of static shapes -> constants."""
    consts: dict[str, Data] = g.graph["constants"]
    hints = g.graph["hints"]
    for n, node in nodes_in_order(g):
        op, ins = node["op"], node["inputs"]
        if op == "Constant":
            v = _constant_value(g, n)
            if v.dtype.name not in CONST_DTYPES:
                raise UserError(f"{where(g, n)}: constant of dtype {v.dtype} is not supported")
            _set(g, node["outputs"][0], value(v, where(g, n)))
            g.remove_node(n)
            continue
        present = [t for t in ins if t]
        vals: list[np.ndarray | None] | None = None
        if op in ("Shape", "Size") and ins[0] in hints["static"] and ins[0] not in consts:
            shape = hints["static"][ins[0]]
            hints["assumed_static"][ins[0]] = shape
            vals = [fake(shape, hints["dtypes"].get(ins[0], "float32"))]
        elif present and all(t in consts for t in present) and op in ops.REGISTRY:
            if sum(consts[t].numel for t in present) > FOLD_LIMIT:
                continue
            vals = [consts[t].load() if t else None for t in ins]
        if vals is None:
            continue
        try:
            outs = ops.run_twin(op, vals, node["attrs"], len(node["outputs"]))
        except (ops.ShapeError, ValueError, IndexError, TypeError, KeyError) as e:
            raise UserError(f"{where(g, n)}: cannot evaluate on its constant inputs ({e}); the model is "
                            "inconsistent") from None
        for t, v in zip(node["outputs"], outs):
            if t:
                _set(g, t, value(v, where(g, n)))
        g.remove_node(n)
    return g  # (removing an op removes its edges; no op reads from another than before: no relink)
