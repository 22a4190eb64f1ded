"""Symbolic dims: their maxima for one plan (`plan_dims`), and every tensor's shape inferred at those maxima
with the registry's shape rules (`bind_dims`).

Symbols carry a class (`graph["symbols"]`): the transformer families use "tokens" (T, the rows of one step,
bounded by `max_batch_tokens`), "context" (C, the KV cache length = `max_context`) and for encoders "batch" /
"seq" (B sentences padded to S tokens, T = B * S). ONNX graphs' input dims are classified by the frontend
(batch, seq, past, total, other) and bounded by the request: sequence by `max_context` (by
`max_batch_tokens` for a decoder fed past keys/values, whose past is bounded by `max_context`), batch by
`max(1, max_batch_tokens // max_context)` (1 for decoders); `onnx_dims` overrides any of them by name.

Shapes are inferred at one or more *bindings* (points satisfying the graph's constraints: T = B * S, past +
seq = total, ...) and each tensor's buffer is planned for the largest size seen; small integer tensors (shape
vectors) are evaluated along the way with the twins, so Reshape targets are known. A tensor whose shape depends
on runtime values is planned at the size of its input when the op never grows it (`NON_GROWING`, `SAME_SIZE`).
FLOPs per token row (the cost model's) are the largest over the bindings, a T = 1 decode step included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from edge_rt_exec import ops
from edge_rt_exec.errors import UserError

from ..ir import WEIGHT_REF, TensorSpec, is_weight, nodes_in_order, weight_name
from .fold import fake
from .normalize import where

#: Integer tensors up to this many elements are evaluated at compile time (shape vectors, axes).
VALUE_LIMIT = 64
#: Ops whose output never holds more elements than their first input, whatever their shape inputs say: when
#: those inputs are runtime values (graph inputs), the output is planned at the input's size.
NON_GROWING = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "ReduceSum", "ReduceMean",
               "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd", "ReduceSumSquare"}
#: Ops whose output has as many elements as their first input.
SAME_SIZE = {"Sqrt", "Reciprocal", "Neg", "Exp", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "Cos", "Sin", "Log",
             "Abs", "Floor", "Ceil", "Softplus", "Identity", "Softmax", "LogSoftmax", "Trilu", "Cast", "CastLike",
             "Not", "IsNaN", "IsInf"}

Spec = tuple[tuple[int, ...] | None, str, int]  #: (shape, or None when it depends on runtime values; dtype; numel)


@dataclass(frozen=True)
class Dims:
    """The symbolic dims of one plan."""

    bounds: dict[str, int]  #: every input symbol's maximum (the plan's `graph.bounds`)
    bindings: list[dict[str, int]]  #: the points shapes are inferred at (every symbol bound)
    rows: list[int]  #: token rows of each binding (FLOPs per token = FLOPs / rows)


# ---- maxima -----------------------------------------------------------------------------------------------------

def plan_dims(g: nx.DiGraph, max_context: int, max_batch_tokens: int,
              overrides: dict[str, int] | None = None) -> Dims:
    """The maxima and bindings of the graph's symbols for one plan."""
    cls: dict[str, str] = g.graph["symbols"]
    if "tokens" in cls.values():
        if overrides:
            raise UserError(f"onnx_dims bounds the symbolic dims of ONNX graphs; {g.graph['name']} is a "
                            f"{g.graph['family']} model: use max_context= and max_batch_tokens=")
        return _transformer_dims(g, max_context, max_batch_tokens)
    return _onnx_dims(g, cls, max_context, max_batch_tokens, overrides)


def _transformer_dims(g: nx.DiGraph, ctx: int, mbt: int) -> Dims:
    if g.graph["kind"] == "encoder":
        s = min(mbt, ctx)
        bindings = [{"T": mbt, "B": mbt, "S": 1}, {"T": s, "B": 1, "S": s}]
        return Dims({"T": mbt, "B": mbt, "S": s}, bindings, [mbt, s])
    steps = sorted({mbt, 1}, reverse=True)  # a prefill chunk, and one decode step (its FLOPs per token)
    return Dims({"T": mbt}, [{"T": t, "C": ctx} for t in steps], steps)


def _onnx_dims(g: nx.DiGraph, cls: dict[str, str], max_context: int, mbt: int,
               overrides: dict[str, int] | None) -> Dims:
    kv = g.graph["kv"]["mode"] == "past_present"
    batch = 1 if kv else max(1, mbt // max_context)
    seq = min(mbt, max_context) if kv else max_context
    base = {"batch": batch, "seq": seq, "past": max_context - 1 if kv else max_context, "total": max_context,
            "other": max_context}
    bounds = {s: base[c] for s, c in cls.items()}
    for s, v in (overrides or {}).items():
        if s not in bounds:
            raise UserError(f"onnx_dims names '{s}', which is not a symbolic dim of the graph inputs "
                            f"({', '.join(sorted(bounds)) or 'none'})")
        if int(v) < 1:
            raise UserError(f"onnx_dims {s}={v} must be at least 1")
        bounds[s] = int(v)

    def rows(b: dict[str, int]) -> int:
        n = 1
        for s, c in cls.items():
            if c in ("batch", "seq"):
                n *= max(1, b[s])
        return n

    if not kv:
        return Dims(bounds, [dict(bounds)], [rows(bounds)])
    bindings = []
    s_max = max((bounds[s] for s, c in cls.items() if c == "seq"), default=seq)
    for s_len in sorted({s_max, 1, max(1, min(s_max, max_context // 2))}):
        for past in sorted({0, max(0, max_context - s_len)}):
            bindings.append({sym: {"seq": s_len, "past": past, "total": past + s_len}.get(c, bounds[sym])
                             for sym, c in cls.items()})
    return Dims(bounds, bindings, [rows(b) for b in bindings])


# ---- inference at one binding -------------------------------------------------------------------------------------

def _bind(shape: tuple[Any, ...], binding: dict[str, int], what: str) -> tuple[int, ...]:
    try:
        return tuple(binding[d] if isinstance(d, str) else int(d) for d in shape)
    except KeyError as e:
        raise UserError(f"{what}: symbolic dim {e} has no maximum") from None


def _unknown(g: nx.DiGraph, n: str, specs: dict[str, Spec], shape_err: str | None) -> list[Spec]:
    """Output specs of an op whose shape cannot be known at compile time (see NON_GROWING)."""
    node = g.nodes[n]
    op, ins = node["op"], node["inputs"]
    x = specs[ins[0]] if ins and ins[0] else None
    if x is None or not (op in NON_GROWING or op in SAME_SIZE):
        vin = ops.get(op).value_inputs
        runtime = [t for i, t in enumerate(ins) if t and (specs[t][0] is None or i in vin)]
        raise UserError(f"{where(g, n)}: its output size depends on the runtime values of {runtime} "
                        f"({shape_err or 'unknown shape'}); edge-rt plans memory ahead of time and needs these to be "
                        "constants")
    dtype = {"Cast": node["attrs"].get("to"), "Not": "bool", "IsNaN": "bool", "IsInf": "bool",
             "CastLike": specs[ins[1]][1] if len(ins) > 1 and ins[1] else x[1]}.get(op, x[1])
    bound = x[2]
    if op.startswith("Reduce") and x[0] is not None:
        bound = int(np.prod([max(d, 1) for d in x[0]], dtype=object))  # an empty axis with keepdims yields elements
    return [(None, dtype, bound) for _ in node["outputs"]]


def infer_at(g: nx.DiGraph, binding: dict[str, int]) -> dict[str, Spec]:
    """Every tensor's (shape, dtype, numel) with the symbols bound as `binding` says."""
    specs: dict[str, Spec] = {}
    values: dict[str, np.ndarray] = {}
    for i in g.graph["inputs"]:
        sh = _bind(tuple(i["dims"]), binding, f"graph input '{i['name']}'")
        specs[i["name"]] = (sh, i["dtype"], ops.registry.numel(sh))
    for name, spec in g.graph["state"].items():
        sh = _bind(spec.shape, binding, f"state '{name}'")
        specs[name] = (sh, spec.dtype, ops.registry.numel(sh))
    for name, c in g.graph["constants"].items():
        specs[name] = (c.shape, c.dtype, c.numel)
        if c.numel <= VALUE_LIMIT:
            values[name] = c.load()
    for name, w in g.graph["weights"].items():
        specs[WEIGHT_REF + name] = (w.shape, "float32", w.data.numel)
    for n, node in nodes_in_order(g):
        op, ins, outs = node["op"], node["inputs"], node["outputs"]
        if op not in ops.REGISTRY:
            raise UserError(f"{where(g, n)}: the executor has no op {op!r}")
        shapes: list[tuple[int, ...] | None] = []
        dtypes: list[str | None] = []
        vals: dict[int, np.ndarray] = {}
        for i, t in enumerate(ins):
            if not t:
                shapes.append(None)
                dtypes.append(None)
                continue
            if t not in specs:
                if is_weight(t):
                    raise UserError(f"{where(g, n)}: weight '{weight_name(t)}' does not exist in the model; the "
                                    "checkpoint is incomplete")
                raise UserError(f"{where(g, n)}: input tensor '{t}' is not produced by any earlier op nor a graph "
                                "input")
            shapes.append(specs[t][0])
            dtypes.append(specs[t][1])
            if t in values:
                vals[i] = values[t]
        if any(t and specs[t][0] is None for t in ins):
            got = _unknown(g, n, specs, None)
        else:
            try:
                got = [(sh, dt, ops.registry.numel(sh)) for sh, dt in
                       ops.infer(op, shapes, dtypes, vals, node["attrs"], len(outs))]
            except ops.ShapeError as e:
                if "needs the value of input" in str(e):
                    got = _unknown(g, n, specs, str(e))
                else:
                    at = ", ".join(f"{k}={v}" for k, v in binding.items())
                    shown = ", ".join(f"{t or '-'} {list(s) if s is not None else s}" for t, s in zip(ins, shapes))
                    raise UserError(f"{where(g, n)}: {e} (inputs {shown}{' at ' + at if at else ''})") from None
        for t, spec in zip(outs, got):
            if t:
                specs[t] = spec
        small = all(sh is not None and ops.registry.numel(sh) <= VALUE_LIMIT and dt != "float64"
                    for sh, dt, _ in got)
        if small and (op in ("Shape", "Size") or all(t in values for t in ins if t)):
            args: list[Any] = [None if not t else values[t] if t in values else fake(specs[t][0] or (), specs[t][1])
                               for t in ins]
            try:
                for t, v in zip(outs, ops.run_twin(op, args, node["attrs"], len(outs))):
                    if t:
                        values[t] = v
            except (ops.ShapeError, ValueError, IndexError, TypeError):
                pass
    for t, shape in g.graph["hints"]["assumed_static"].items():
        if t in specs and specs[t][0] != shape:
            raise UserError(f"{g.graph.get('origin') or g.graph['name']}: shape inference recorded '{t}' as static "
                            f"{list(shape)}, but it is {specs[t][0]} when the symbolic dims are {binding}; the "
                            "model's value_info is stale, re-export it")
    return specs


# ---- the pass ----------------------------------------------------------------------------------------------------

def bind_dims(g: nx.DiGraph, dims: Dims) -> nx.DiGraph:
    """Planned specs of every input, state, activation and scratch buffer (`graph["tensors"]`), and each op's
    `scratch` names and `flops` per token row."""
    per = [infer_at(g, b) for b in dims.bindings]
    best: dict[str, tuple[int, TensorSpec]] = {}

    def keep(name: str, shape: tuple[int, ...] | None, dtype: str, numel: int) -> None:
        spec = TensorSpec(tuple(shape) if shape is not None else (numel,), dtype)
        if name not in best or spec.nbytes > best[name][0]:
            best[name] = (spec.nbytes, spec)

    flops: dict[str, int] = {}
    scratch: dict[str, list[int]] = {}
    order = nodes_in_order(g)
    for specs, rows in zip(per, dims.rows):
        for name in [i["name"] for i in g.graph["inputs"]] + list(g.graph["state"]):
            keep(name, *specs[name])
        for n, node in order:
            for t in node["outputs"]:
                if t:
                    keep(t, *specs[t])
            ins = [specs[t][0] if t else None for t in node["inputs"]]
            outs = [specs[t][0] for t in node["outputs"] if t]
            d = ops.get(node["op"])
            if all(s is not None for s, t in zip(ins, node["inputs"]) if t) and all(s is not None for s in outs):
                f = -(-ops.flops(node["op"], ins, outs, node["attrs"]) // max(1, rows))
            else:
                f = -(-sum(specs[t][2] for t in node["outputs"] if t) // max(1, rows))
            flops[n] = max(flops.get(n, 0), f)
            if d.scratch is not None:
                counts = d.scratch(ins, ops.registry.with_defaults(d, node["attrs"]))
                scratch[n] = [max(a, b) for a, b in zip(counts, scratch.get(n, [0] * len(counts)))]
    for n, node in g.nodes(data=True):
        counts = scratch.get(n, [])
        names = [f"{n}.scratch"] if len(counts) == 1 else [f"{n}.scratch{i}" for i in range(len(counts))]
        for s, k in zip(names, counts):
            keep(s, (max(1, int(k)),), "float32", max(1, int(k)))
        node["scratch"] = names
        node["flops"] = max(1, int(flops.get(n, 1)))
    g.graph["tensors"] = {name: spec for name, (_, spec) in best.items()}
    g.graph["dims"] = dims
    return g
