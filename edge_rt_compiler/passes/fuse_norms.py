"""fuse_norms: decomposed LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) and RMSNorm
(Pow, ReduceMean, Add, Sqrt, Div/Reciprocal, Mul, Mul) over the last axis become one `LayerNormalization` /
`RMSNormalization` op, confirmed numerically with the twins like the GELU fusion."""

from __future__ import annotations

import networkx as nx
import numpy as np

from edge_rt_exec import ops

from ..interpret import run_ops
from ..ir import consumers, ops_in_order, producers, relink, replace_ops

_NORM_CHAIN = {"Add", "Sqrt", "Div", "Reciprocal", "Mul", "Cast"}


def _last_axis_mean(g: nx.DiGraph, n: str) -> bool:
    node = g.nodes[n]
    if node["op"] != "ReduceMean" or not node["attrs"].get("keepdims", 1):
        return False
    axes = node["attrs"].get("axes")
    consts = g.graph["constants"]
    if axes is None and len(node["inputs"]) > 1 and node["inputs"][1] in consts:
        axes = [int(v) for v in consts[node["inputs"][1]].load().reshape(-1)]
    return axes == [-1]


def _is_square(g: nx.DiGraph, n: str | None) -> str | None:
    """The tensor op `n` squares (Pow(q, 2) or Mul(q, q)), or None."""
    if n is None:
        return None
    node, consts = g.nodes[n], g.graph["constants"]
    ins = node["inputs"]
    if node["op"] == "Pow" and ins[1] in consts and consts[ins[1]].numel == 1 \
            and float(consts[ins[1]].load().reshape(-1)[0]) == 2.0:
        return ins[0]
    if node["op"] == "Mul" and ins[0] == ins[1]:
        return ins[0]
    return None


def fuse_norms(g: nx.DiGraph) -> nx.DiGraph:
    """Decomposed LayerNorm / RMSNorm subgraphs -> one op each."""
    prod, cons = producers(g), consumers(g)  # kept up to date by replace_ops
    anchors = [n for n in ops_in_order(g) if _last_axis_mean(g, n)]
    changed = True
    fused = False
    while changed:  # after each fusion, every anchor is tried again from the first
        changed = False
        for r2 in anchors:
            match = _match(g, r2, prod, cons)
            if match is None:
                continue
            region, (op, ins, out, attrs) = match
            replace_ops(g, region, region[-1], op, ins, [out], attrs, prod, cons)
            gone = set(region)  # (the fused op that takes the last one's name is no anchor)
            anchors = [a for a in anchors if a not in gone]
            changed = fused = True
            break
    if fused:
        relink(g)
    return g


Fused = tuple[str, list[str], str, dict]  #: (op, inputs, output, attrs)


def _match(g: nx.DiGraph, r2: str, prod: dict, cons: dict) -> tuple[list[str], Fused] | None:
    consts = g.graph["constants"]
    sq = prod.get(g.nodes[r2]["inputs"][0])
    q = _is_square(g, sq)
    if q is None or sq is None:
        return None
    sub = prod.get(q)
    sub_ins = g.nodes[sub]["inputs"] if sub is not None else []
    r1 = prod.get(sub_ins[1]) if sub is not None and g.nodes[sub]["op"] == "Sub" else None
    if sub is not None and r1 is not None and _last_axis_mean(g, r1) and g.nodes[r1]["inputs"][0] == sub_ins[0]:
        kind, x, chain = "LayerNormalization", sub_ins[0], [r1, sub, sq, r2]
    else:
        kind, x, chain = "RMSNormalization", q, [sq, r2]
    if g.graph["hints"]["dtypes"].get(x, "float32") != "float32":
        return None
    inside = {x} | {t for n in chain for t in g.nodes[n]["outputs"]}
    best = None
    cur = r2
    for _ in range(8):
        nxt = [c for c in cons.get(g.nodes[cur]["outputs"][0], []) if c not in chain]
        if len(nxt) != 1 or g.nodes[nxt[0]]["op"] not in _NORM_CHAIN:
            break
        n = nxt[0]
        node = g.nodes[n]
        if node["op"] == "Cast" and node["attrs"].get("to") != "float32":
            break
        if any(t and t not in inside and not (t in consts and consts[t].dtype == "float32") for t in node["inputs"]):
            break
        chain.append(n)
        inside.update(node["outputs"])
        cur = n
        found = _norm_params(g, chain, kind, x)
        if found is not None:
            best = (list(chain), found)
    if best is None:
        return None
    chain, fused = best
    members = set(chain)
    outputs = set(g.graph["outputs"])
    for n in chain[:-1]:
        for t in g.nodes[n]["outputs"]:
            if t in outputs or any(c not in members for c in cons.get(t, [])):
                return None
    return chain, fused


def _norm_params(g: nx.DiGraph, chain: list[str], kind: str, x: str) -> Fused | None:
    """The fused op if `chain` (ending at its last op) computes `kind`(x) * weight (+ bias)."""
    consts = g.graph["constants"]
    read = [t for n in chain for t in g.nodes[n]["inputs"] if t in consts]
    vecs = [t for t in read if consts[t].numel > 1]
    scal = [t for t in read if consts[t].numel == 1]
    if not vecs or len(vecs) > 2 or any(len(consts[v].shape) != 1 for v in vecs):
        return None
    d = consts[vecs[0]].numel
    if any(consts[v].numel != d for v in vecs):
        return None
    eps_cands = [float(consts[t].load().reshape(-1)[0]) for t in scal]
    eps_cands = [e for e in eps_cands if 0 < e < 1e-2] or [0.0]
    rng = np.random.default_rng(0)
    probe = (rng.standard_normal((3, d)) * 2.0 + 0.5).astype(np.float32)
    out = g.nodes[chain[-1]]["outputs"][0]
    env = run_ops(g, chain, {x: probe}, const_limit=d)
    got = env.get(out) if env is not None else None
    if got is None or got.shape != probe.shape:
        return None
    w = consts[vecs[0]].load()
    b = consts[vecs[1]].load() if len(vecs) > 1 else None
    for eps in eps_cands:
        for weight, bias in ((w, b), (b, w)) if b is not None else ((w, None),):
            if kind == "RMSNormalization" and bias is not None:
                continue
            attrs = {"axis": -1, "epsilon": eps}
            ins = [probe, weight] + ([bias] if bias is not None else [])
            want = ops.run_twin(kind, ins, attrs)[0]
            if np.allclose(got, want, rtol=1e-4, atol=1e-5):
                names = vecs if weight is w else vecs[::-1]
                return kind, [x] + names[:len(ins) - 1], out, attrs
    return None
