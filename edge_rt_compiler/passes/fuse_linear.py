"""fuse_linear: MatMul(x, W) [+ Add(bias)] and Gemm(x, W[, bias]) with a constant float32 2-D weight become one
`Linear(x, W', bias)`: the weight stored `[out, in]` (transposed here when the graph holds it `[in, out]`), the
op the transformer families use too, so it takes every weight format and tiles along its output rows when a
weight slot is smaller than the weight."""

from __future__ import annotations

import networkx as nx
import numpy as np

from ..ir import Data, consumers, nodes_in_order, relink


def _transposed(g: nx.DiGraph, name: str) -> str:
    tname = f"{name}::T"
    consts = g.graph["constants"]
    if tname not in consts:
        c = consts[name]

        def load(c: Data = c) -> np.ndarray:
            return np.array(c.load().T, order="C")

        consts[tname] = Data((c.shape[1], c.shape[0]), "float32", load, c.source + " (transposed)")
        g.graph["hints"]["dtypes"][tname] = "float32"
    return tname


def _bias_of(g: nx.DiGraph, name: str, n_out: int) -> str | None:
    """`name` as a `[n_out]` bias (a `[1, n_out]` one flattened), or None when it is not one."""
    consts = g.graph["constants"]
    c = consts.get(name)
    if c is None or c.dtype != "float32" or c.numel != n_out or (c.shape and c.shape[-1] != n_out):
        return None
    if len(c.shape) == 1:
        return name
    if len(c.shape) == 2:
        flat_name = f"{name}::flat"
        if flat_name not in consts:
            def flat(c: Data = c) -> np.ndarray:
                return c.load().reshape(-1)

            consts[flat_name] = Data((n_out,), "float32", flat, c.source)
            g.graph["hints"]["dtypes"][flat_name] = "float32"
        return flat_name
    return None


def fuse_linear(g: nx.DiGraph) -> nx.DiGraph:
    """MatMul/Gemm (+ Add) with a constant weight -> `Linear`."""
    consts = g.graph["constants"]
    dtypes = g.graph["hints"]["dtypes"]
    cons = consumers(g)
    outputs = set(g.graph["outputs"])
    rewired = False  # an Add fused (its readers now read the Linear); the weights and biases are no edges
    for n, node in nodes_in_order(g):
        if n not in g:  # an Add already fused into the MatMul before it
            continue
        op, ins, a = node["op"], node["inputs"], node["attrs"]
        weight = x = None
        m = 0
        if op == "MatMul" and ins[1] in consts and ins[0] not in consts:
            c = consts[ins[1]]
            if c.dtype == "float32" and len(c.shape) == 2 and dtypes.get(ins[0], "float32") == "float32":
                x, m = ins[0], c.shape[1]
                weight = _transposed(g, ins[1])
        elif op == "Gemm" and ins[1] in consts and not a.get("transA", 0) and a.get("alpha", 1.0) == 1.0 \
                and consts[ins[1]].dtype == "float32":
            c = consts[ins[1]]
            bias_in = ins[2] if len(ins) > 2 else ""
            if len(c.shape) == 2 and (not bias_in or a.get("beta", 1.0) == 1.0):
                if a.get("transB", 0):
                    m, weight = c.shape[0], ins[1]
                else:
                    m, weight = c.shape[1], _transposed(g, ins[1])
                x = ins[0]
                if bias_in and _bias_of(g, bias_in, m) is None:
                    weight = None  # a matrix bias: keep the Gemm
        if weight is None or x is None:
            continue
        out = node["outputs"][0]
        new_ins = [x, weight]
        if op == "Gemm" and len(ins) > 2 and ins[2]:
            new_ins.append(_bias_of(g, ins[2], m))  # type: ignore[arg-type]
        elif op == "MatMul" and out not in outputs and len(cons[out]) == 1 and g.nodes[cons[out][0]]["op"] == "Add":
            add = g.nodes[cons[out][0]]
            other = add["inputs"][1] if add["inputs"][0] == out else add["inputs"][0]
            bias = _bias_of(g, other, m) if other != out else None
            if bias is not None and len(consts[other].shape) == 1:
                new_ins.append(bias)
                out = add["outputs"][0]
                g.remove_node(cons[node["outputs"][0]][0])
                rewired = True
        node.update(op="Linear", inputs=new_ins, outputs=[out], attrs={"out_features": int(m)})
        dtypes[out] = "float32"
    if rewired:
        relink(g)
    return g
