"""Validation passes over the IR. Each failure is one `UserError` line that names the node, tensor or file;
findings that do not stop compilation (unused weights) come back as warnings."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from edge_rt_exec.errors import UserError

from .frontends.base import ModelSource
from .ir import infer_shapes, ops_in_order


@dataclass
class ValidationReport:
    warnings: list[str] = field(default_factory=list)


def check_acyclic(g: nx.DiGraph) -> None:
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        path = " -> ".join(str(u) for u, _ in cycle) + f" -> {cycle[0][0]}"
        raise UserError(f"model graph '{g.graph['name']}' has a cycle: {path}; a feed-forward graph is required")


def check_order(g: nx.DiGraph) -> None:
    for u, v, data in g.edges(data=True):
        if g.nodes[u]["order"] >= g.nodes[v]["order"]:
            raise UserError(f"op '{v}' consumes tensor '{data['tensor']}' before op '{u}' produces it")


def check_config(src: ModelSource) -> None:
    c, where = src.config, f"model '{src.name}' ({src.origin or 'config'})"
    for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size"):
        if getattr(c, name) <= 0:
            raise UserError(f"{where}: {name}={getattr(c, name)} must be positive")
    if c.family != "llama" and c.hidden_size % c.n_heads:
        raise UserError(f"{where}: {c.n_heads} heads do not divide hidden size {c.hidden_size}")
    if c.n_heads % c.n_kv_heads:
        raise UserError(f"{where}: {c.n_kv_heads} kv heads do not divide {c.n_heads} heads")
    emb = src.weights.get("tok_embed.weight")
    if emb is None:
        raise UserError(f"{where}: no token embedding weight; the checkpoint is incomplete")
    if emb.shape[0] != c.vocab_size:
        raise UserError(f"{where}: vocab_size {c.vocab_size} but the token embedding has {emb.shape[0]} rows")
    if emb.shape[1] != c.hidden_size:
        raise UserError(f"{where}: hidden size {c.hidden_size} but the token embedding is {emb.shape[1]} wide")
    if c.family == "llama" and c.head_dim % 2:
        raise UserError(f"{where}: head_dim {c.head_dim} must be even for RoPE")


def unused_weights(g: nx.DiGraph, src: ModelSource) -> list[str]:
    used = {w for n in g.nodes for w in g.nodes[n]["weights"].values()}
    return sorted(set(src.weights) - used) + list(src.ignored)


def validate(g: nx.DiGraph, src: ModelSource) -> ValidationReport:
    """Run every pass; raise on the first error, return warnings."""
    check_config(src)
    check_acyclic(g)
    check_order(g)
    infer_shapes(g)
    for node in ops_in_order(g):
        for t in g.nodes[node]["inputs"]:
            if t not in g.graph["tensors"] and t not in g.graph["state"]:
                raise UserError(f"op '{node}': input '{t}' is neither produced by an op nor a graph input")
    report = ValidationReport()
    unused = unused_weights(g, src)
    if unused:
        shown = ", ".join(unused[:6]) + (f" and {len(unused) - 6} more" if len(unused) > 6 else "")
        report.warnings.append(f"{len(unused)} weight(s) of '{src.name}' are not used by the graph: {shown}")
    return report
