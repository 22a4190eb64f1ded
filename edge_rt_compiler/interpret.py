"""The IR's reference interpreter: ops evaluated with the registry's numpy twins (`ops.run_twin`).

The fusions confirm a matched subgraph numerically with `run_ops`; tests run whole graphs with `evaluate`
(weights as the executor sees them: stored in their format, then dequantized by the format's twin) and
compare them to the reference implementations, independently of the engine."""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np

from edge_rt_exec import ops

from .ir import is_weight, ops_in_order, weight_name


def run_ops(g: nx.DiGraph, nodes: list[str], env: dict[str, np.ndarray],
            const_limit: int = 16) -> dict[str, np.ndarray] | None:
    """Evaluate `nodes` in order on `env` (constants of up to `const_limit` elements allowed); the extended
    env, or None when a node reads something else or cannot run on these values."""
    env = dict(env)
    consts = g.graph["constants"]
    try:
        for n in nodes:
            node = g.nodes[n]
            ins: list[Any] = []
            for t in node["inputs"]:
                if not t:
                    ins.append(None)
                elif t in env:
                    ins.append(env[t])
                elif t in consts and consts[t].numel <= const_limit:
                    ins.append(consts[t].load())
                else:
                    return None
            for t, v in zip(node["outputs"], ops.run_twin(node["op"], ins, node["attrs"], len(node["outputs"]))):
                if t:
                    env[t] = v
    except (ops.ShapeError, ValueError, IndexError, TypeError, KeyError):
        return None
    return env


def evaluate(g: nx.DiGraph, feeds: dict[str, np.ndarray], bindings: dict[str, int] | None = None,
             weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run the whole graph once on `feeds` (graph inputs by name); state (KV caches) starts at zero with its
    symbolic dims bound by `bindings` (e.g. {"C": 64}). Returns every graph output. `weights` caches the
    dequantized weights across calls (pass the same dict)."""
    bindings = bindings or {}
    env: dict[str, Any] = dict(feeds)
    for name, spec in g.graph["state"].items():
        env[name] = np.zeros([bindings[d] if isinstance(d, str) else d for d in spec.shape], spec.dtype)
    for name, c in g.graph["constants"].items():
        env[name] = c.load()
    weights = {} if weights is None else weights
    for n in ops_in_order(g):
        node = g.nodes[n]
        ins: list[Any] = []
        for t in node["inputs"]:
            if is_weight(t):
                w = weight_name(t)
                if w not in weights:
                    weights[w] = g.graph["weights"][w].dequantized()
                ins.append(weights[w])
            else:
                ins.append(env[t] if t else None)
        attrs = {k: v for k, v in node["attrs"].items() if k != "rows"}
        for t, v in zip(node["outputs"], ops.run_twin(node["op"], ins, attrs, len(node["outputs"]))):
            if t:
                env[t] = v
    return {t: env[t] for t in g.graph["outputs"]}
