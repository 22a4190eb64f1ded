"""fuse_gelu: the decomposed GELU subgraphs exporters emit (erf and tanh forms, any operand order) become one
`Gelu` op (approximate="none" / "tanh"): recognised by their structure (an elementwise region from one source
through Erf or Tanh), confirmed numerically on sample points with the twins."""

from __future__ import annotations

import networkx as nx
import numpy as np

from edge_rt_exec import ops

from ..interpret import run_ops
from ..ir import consumers, nodes_in_order, producers, relink, replace_ops

ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sqrt", "Neg", "Cast"}
_PROBE = np.linspace(-4.0, 4.0, 33, dtype=np.float32)


def fuse_gelu(g: nx.DiGraph) -> nx.DiGraph:
    """Decomposed GELU subgraphs -> one `Gelu` op each."""
    fused = False
    for anchor_op, approx in (("Erf", "none"), ("Tanh", "tanh")):
        prod, cons = producers(g), consumers(g)  # kept up to date by replace_ops
        anchors = [n for n, node in nodes_in_order(g) if node["op"] == anchor_op]
        changed = True
        while changed:  # after each fusion, every anchor is tried again from the first
            changed = False
            for e in anchors:
                match = _match(g, e, prod, cons, approx)
                if match is None:
                    continue
                region, x, out = match
                replace_ops(g, region, region[-1], "Gelu", [x], [out], {"approximate": approx}, prod, cons)
                gone = set(region)  # (the Gelu that takes the last one's name is no anchor)
                anchors = [a for a in anchors if a not in gone]
                changed = fused = True
                break
    if fused:
        relink(g)
    return g


def _small(g: nx.DiGraph, t: str) -> bool:
    c = g.graph["constants"].get(t)
    return c is not None and c.numel <= 16


def _match(g: nx.DiGraph, e: str, prod: dict, cons: dict, approx: str) -> tuple[list[str], str, str] | None:
    consts = g.graph["constants"]
    dtypes = g.graph["hints"]["dtypes"]
    outputs = set(g.graph["outputs"])
    # Backward: the elementwise subgraph feeding the anchor, and its candidate sources (nearest first).
    back: list[str] = []
    candidates: list[str] = []
    frontier = [g.nodes[e]["inputs"][0]]
    seen: set[str] = set()
    while frontier and len(back) < 8:
        t = frontier.pop(0)
        if t in seen or t in consts:
            continue
        seen.add(t)
        candidates.append(t)
        p = prod.get(t)
        if p is not None and g.nodes[p]["op"] in ELEMENTWISE and len(back) < 6:
            back.append(p)
            frontier.extend(i for i in g.nodes[p]["inputs"] if i)
    for x in candidates:
        if dtypes.get(x) != "float32":
            continue
        inner = _between(g, x, e, prod)
        if inner is None:
            continue
        chain = inner + [e]
        cur = e
        for _ in range(4):
            nxt = cons.get(g.nodes[cur]["outputs"][0], [])
            if len(nxt) != 1 or g.nodes[nxt[0]]["op"] not in ELEMENTWISE:
                break
            cur = nxt[0]
            known = {x} | {t for n in chain for t in g.nodes[n]["outputs"]}
            for t in g.nodes[cur]["inputs"]:  # a side branch computed from x alone (GPT-2's `0.5 * x`)
                p = prod.get(t)
                if t and t not in known and t not in consts and p is not None and \
                        g.nodes[p]["op"] in ELEMENTWISE and \
                        all(i == x or _small(g, i) for i in g.nodes[p]["inputs"] if i):
                    chain.append(p)
            chain.append(cur)
            out = g.nodes[cur]["outputs"][0]
            env = run_ops(g, chain, {x: _PROBE})
            got = env.get(out) if env is not None else None
            if got is None or got.shape != _PROBE.shape:
                continue
            want = ops.run_twin("Gelu", [_PROBE], {"approximate": approx})[0]
            if np.allclose(got, want, rtol=1e-5, atol=1e-6):
                members = set(chain)
                for n in chain[:-1]:
                    for t in g.nodes[n]["outputs"]:
                        if t in outputs or any(c not in members for c in cons.get(t, [])):
                            return None
                return chain, x, out
    return None


def _between(g: nx.DiGraph, x: str, e: str, prod: dict) -> list[str] | None:
    """Ops strictly between tensor `x` and op `e`, in execution order, if every leaf is `x` or a small constant."""
    region: set[str] = set()
    stack = [t for t in g.nodes[e]["inputs"] if t]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t == x or t in seen:
            continue
        seen.add(t)
        if t in g.graph["constants"]:
            if not _small(g, t):
                return None
            continue
        p = prod.get(t)
        if p is None or g.nodes[p]["op"] not in ELEMENTWISE or len(region) > 6:
            return None
        region.add(p)
        stack.extend(i for i in g.nodes[p]["inputs"] if i)
    return sorted(region, key=lambda n: g.nodes[n]["order"])
