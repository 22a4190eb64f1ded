"""drop_identities: Identity ops and Casts to the dtype a tensor already has are bypassed (their readers read
the source tensor), unless they produce a graph output."""

from __future__ import annotations

import networkx as nx

from ..ir import nodes_in_order, relink


def drop_identities(g: nx.DiGraph) -> nx.DiGraph:
    """Identity ops and no-op Casts bypassed."""
    outputs = set(g.graph["outputs"])
    dtypes = g.graph["hints"]["dtypes"]
    alias: dict[str, str] = {}
    for n, node in nodes_in_order(g):
        node["inputs"] = [alias.get(t, t) for t in node["inputs"]]
        src = node["inputs"][0] if node["inputs"] else ""
        same_cast = node["op"] == "Cast" and dtypes.get(src) == node["attrs"].get("to")
        if (node["op"] == "Identity" or same_cast) and node["outputs"][0] not in outputs:
            alias[node["outputs"][0]] = src
            g.remove_node(n)
    if alias:  # readers rewired to the sources
        relink(g)
    return g
