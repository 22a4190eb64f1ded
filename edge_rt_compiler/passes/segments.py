"""segments: units for a graph that has none of its own (ONNX): contiguous segments of the execution order
holding about `1/SEGMENTS` of the weight bytes each (as stored, so after `quantize`). An op is never split
across segments; a `Linear` larger than a segment is tiled by the partitioner, so every strategy and budget
works as for the transformer families. Records `graph["min_slot"]`: the smallest weight slot that works (the
segment size, or the largest op that cannot be tiled)."""

from __future__ import annotations

import networkx as nx

from ..ir import is_row_gather, is_weight, nodes_in_order, weight_name

#: Units per graph (about): more means smaller minimum slots and more groups for `sequential`.
SEGMENTS = 32
#: Ops the partitioner can split along their output rows.
TILEABLE = ("Linear",)


def op_weight_bytes(g: nx.DiGraph, n: str) -> int:
    """Bytes of the weights an op loads (row-gathered tables excluded)."""
    node = g.nodes[n]
    total = 0
    for i, t in enumerate(node["inputs"]):
        if is_weight(t):
            w = g.graph["weights"][weight_name(t)]
            if not is_row_gather(node["op"], node["attrs"], i, len(w.shape)):
                total += w.nbytes
    return total


def segments(g: nx.DiGraph) -> nx.DiGraph:
    """Units of about equal weight bytes for a graph without units of its own."""
    order = nodes_in_order(g)
    if g.graph["units"] and all(node["unit"] >= 0 for _, node in order):
        return g
    sizes = [op_weight_bytes(g, n) for n, _ in order]
    fixed = [(b, n) for (n, node), b in zip(order, sizes) if node["op"] not in TILEABLE]
    largest = max(fixed, default=(0, ""))
    target = max(largest[0], -(-sum(sizes) // SEGMENTS), 1)
    g.graph["units"] = []
    seg_bytes = 0
    for (_, node), b in zip(order, sizes):
        if not g.graph["units"] or (b > 0 and seg_bytes > 0 and seg_bytes + b > target):
            g.graph["units"].append(f"segment.{len(g.graph['units'])}")
            seg_bytes = 0
        seg_bytes += b
        node["unit"] = len(g.graph["units"]) - 1
    g.graph["min_slot"] = (target, "a segment" if target > largest[0] else largest[1])
    return g
