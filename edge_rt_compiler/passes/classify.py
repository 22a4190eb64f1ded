"""classify: constants the ops read become weights (float32, at least WEIGHT_MIN elements, never a value input:
they go to the weights file and ops read them as "@name") or stay inline constants (shape vectors, scalars,
masks: written into the plan). Constants nothing reads are dropped.

A weight read by several ops gets one copy per extra reader (`name::N`, N the reader's position), so that the
weights of every op are contiguous in the file and any run of ops is one read; row gathers (embedding lookups)
do not count, as they never load the table (a tied LM head and its embedding share one table)."""

from __future__ import annotations

import networkx as nx

from edge_rt_exec import ops
from edge_rt_exec.errors import UserError

from ..ir import WEIGHT_REF, Weight, is_row_gather, nodes_in_order, weight_users

#: float32 constants with at least this many elements go to the weights file; smaller ones inline.
WEIGHT_MIN = 64
#: Inline constants (written into the plan) may hold at most this many elements in total.
INLINE_LIMIT = 1 << 20


def classify(g: nx.DiGraph) -> nx.DiGraph:
    """Constants -> weights ("@name") or inline constants; per-reader weight copies."""
    consts = g.graph["constants"]
    as_value: dict[str, set[bool]] = {}
    for _, node in nodes_in_order(g):
        vin = ops.get(node["op"]).value_inputs if node["op"] in ops.REGISTRY else ()
        for i, t in enumerate(node["inputs"]):
            if t in consts:
                as_value.setdefault(t, set()).add(i in vin)
    for name in list(consts):
        if name not in as_value:
            del consts[name]
            continue
        c = consts[name]
        if c.dtype == "float32" and c.numel >= WEIGHT_MIN and True not in as_value[name]:
            g.graph["weights"][name] = Weight(consts.pop(name))
    weights = g.graph["weights"]
    for _, node in g.nodes(data=True):
        node["inputs"] = [WEIGHT_REF + t if t in weights else t for t in node["inputs"]]
    _one_copy_per_reader(g)
    inline = sum(c.numel for c in consts.values())
    if inline > INLINE_LIMIT:
        raise UserError(f"{g.graph.get('origin') or g.graph['name']}: {inline} elements of non-float32 or small "
                        f"constants would have to be written into the plan (limit {INLINE_LIMIT}); the model is "
                        "not supported")
    return g


def _one_copy_per_reader(g: nx.DiGraph) -> None:
    weights = g.graph["weights"]
    for w, uses in weight_users(g).items():
        rank = len(weights[w].shape)
        loading = [(n, i) for n, i in uses if not is_row_gather(g.nodes[n]["op"], g.nodes[n]["attrs"], i, rank)]
        for n, i in loading[1:]:
            alias = f"{w}::{g.nodes[n]['order']}"
            weights[alias] = Weight(weights[w].data)
            g.nodes[n]["inputs"][i] = WEIGHT_REF + alias
