"""dce: ops nothing needs are removed and unused optional outputs become absent (""); a graph output that
folded to a constant gets an explicit copy (`Identity` of the constant), so every output is an op's."""

from __future__ import annotations

import networkx as nx

from edge_rt_exec.errors import UserError

from ..ir import add_op, nodes_in_order


def dce(g: nx.DiGraph) -> nx.DiGraph:
    """Remove what no graph output needs; outputs folded to constants get a copy op."""
    needed = set(g.graph["outputs"])
    for n, node in reversed(nodes_in_order(g)):
        if any(t and t in needed for t in node["outputs"]):
            needed.update(t for t in node["inputs"] if t)
        else:
            g.remove_node(n)
    for _, node in g.nodes(data=True):
        node["outputs"] = [t if t in needed else "" for t in node["outputs"]]
    _outputs_from_constants(g)
    return g  # (only ops removed, and copies of constants added: the remaining edges are right)


def _outputs_from_constants(g: nx.DiGraph) -> None:
    produced = {t for _, node in g.nodes(data=True) for t in node["outputs"] if t}
    inputs = {i["name"] for i in g.graph["inputs"]}
    consts = g.graph["constants"]
    last = max((order for _, order in g.nodes(data="order")), default=0)
    for k, name in enumerate(g.graph["outputs"]):
        if name in produced:
            continue
        if name in inputs or name not in consts:
            raise UserError(f"{g.graph.get('origin') or g.graph['name']}: graph output '{name}' is a graph input "
                            "passed straight through; edge-rt needs outputs computed by the graph")
        src = f"{name}::const"
        consts[src] = consts.pop(name)
        g.graph["hints"]["dtypes"][src] = consts[src].dtype
        add_op(g, f"{name}::copy", "Identity", [src], [name], {}, -1, last + 1 + k)
