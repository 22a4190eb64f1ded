"""Validation passes over the IR. Each failure is one `UserError` line that names the node, tensor or file;
findings that do not stop compilation (unused weights) come back as warnings. Shapes are checked where they
are inferred (`passes.dims`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from edge_rt_exec.errors import UserError

from .families.base import TransformerConfig
from .frontends.base import ModelSource
from .ir import is_weight, nodes_in_order, weight_name


@dataclass
class ValidationReport:
    warnings: list[str] = field(default_factory=list)


def check_acyclic(g: nx.DiGraph) -> None:
    """A feed-forward graph (one line naming the cycle otherwise)."""
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        path = " -> ".join(str(u) for u, _ in cycle) + f" -> {cycle[0][0]}"
        raise UserError(f"model graph '{g.graph['name']}' has a cycle: {path}; a feed-forward graph is required")


def check_order(g: nx.DiGraph) -> None:
    """Every tensor is written before it is read, by exactly one op."""
    order = dict(g.nodes(data="order"))
    for u, v, t in g.edges(data="tensor"):
        if order[u] >= order[v]:
            raise UserError(f"op '{v}' consumes tensor '{t}' before op '{u}' produces it")
    written: dict[str, str] = {}
    available = {i["name"] for i in g.graph["inputs"]} | set(g.graph["state"]) | set(g.graph["constants"])
    for n, node in nodes_in_order(g):
        for t in node["inputs"]:
            if t and not is_weight(t) and t not in written and t not in available:
                raise UserError(f"op '{n}': input tensor '{t}' is not produced by any earlier op nor a graph input")
        for t in node["outputs"]:
            if t and t in written and t not in g.graph["state"]:
                raise UserError(f"op '{n}' writes tensor '{t}', which op '{written[t]}' already wrote")
            if t:
                written[t] = n


def check_config(c: TransformerConfig, g: nx.DiGraph, where: str) -> None:
    """A transformer config consistent with itself and its embedding table."""
    for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size"):
        if getattr(c, name) <= 0:
            raise UserError(f"{where}: {name}={getattr(c, name)} must be positive")
    if c.family in ("gpt2", "bert") and c.hidden_size % c.n_heads:
        raise UserError(f"{where}: {c.n_heads} heads do not divide hidden size {c.hidden_size}")
    if c.n_heads % c.n_kv_heads:
        raise UserError(f"{where}: {c.n_kv_heads} kv heads do not divide {c.n_heads} heads")
    emb = g.graph["weights"].get("tok_embed.weight")
    if emb is None:
        raise UserError(f"{where}: no token embedding weight; the checkpoint is incomplete")
    if emb.shape[0] != c.vocab_size:
        raise UserError(f"{where}: vocab_size {c.vocab_size} but the token embedding has {emb.shape[0]} rows")
    if emb.shape[1] != c.hidden_size:
        raise UserError(f"{where}: hidden size {c.hidden_size} but the token embedding is {emb.shape[1]} wide")
    if g.graph["kv"]["mode"] == "cache" and c.head_dim % 2:
        raise UserError(f"{where}: head_dim {c.head_dim} must be even for RoPE")


def unused_weights(g: nx.DiGraph, src: ModelSource) -> list[str]:
    """Weights no op reads and source tensors deliberately not used."""
    used = {weight_name(t) for _, node in g.nodes(data=True) for t in node["inputs"] if is_weight(t)}
    return sorted(set(g.graph["weights"]) - used) + list(src.ignored)


def validate(g: nx.DiGraph, src: ModelSource) -> ValidationReport:
    """Run every check; raise on the first error, return warnings."""
    if src.config is not None:
        check_config(src.config, g, f"model '{src.name}' ({src.origin or 'config'})")
    check_acyclic(g)
    check_order(g)
    report = ValidationReport()
    unused = unused_weights(g, src)
    if unused:
        what = "initializer(s)" if g.graph["family"] == "onnx" else "weight(s)"
        shown = ", ".join(unused[:6]) + (f" and {len(unused) - 6} more" if len(unused) > 6 else "")
        report.warnings.append(f"{len(unused)} {what} of '{src.name}' are not used by the graph: {shown}")
    if g.graph["kind"] == "decoder" and g.graph["kv"]["mode"] == "none":
        report.warnings.append(f"'{src.name}' is a decoder without past key/value inputs: generation recomputes the "
                               "whole sequence at every token")
    return report
