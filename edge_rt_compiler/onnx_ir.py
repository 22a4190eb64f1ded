"""ONNX graph -> the IR: symbolic dims bound to the plan's maximum, units as contiguous segments.

Symbolic dims of the graph inputs are classified (batch, sequence, past, total, other) by where they appear
and by name, and bounded by the compile request: sequence by `max_context` (by `max_batch_tokens` for a
decoder fed past keys/values, whose past is bounded by `max_context`), batch by
`max(1, max_batch_tokens // max_context)` (1 for decoders); `onnx_dims` overrides any symbol. Every tensor's
shape is then inferred (`edge_rt_exec.onnx_shapes`, the rule the engine applies at run time) at one or more
bindings of those maxima, and its buffer is planned for the largest element count seen; small integer
tensors (shape vectors) are evaluated along the way so Reshape targets are known.

Units are contiguous segments of the execution order holding about `1/SEGMENTS` of the weights each (an op
is never split across units; a `linear` larger than a segment is tiled by the partitioner), so every
strategy and budget works as for the other frontends.
"""

from __future__ import annotations

import re
from typing import Any

import networkx as nx
import numpy as np

from edge_rt_exec import onnx_reference as ref
from edge_rt_exec import onnx_shapes as S
from edge_rt_exec.errors import UserError

from .frontends.onnx import OnnxGraph, OnnxSource
from .ir import GraphBuilder, TensorSpec
from .validate import ValidationReport, check_acyclic, check_order

#: Units per model (about): more means smaller minimum slots and more groups for `sequential`.
SEGMENTS = 32
#: Integer tensors up to this many elements are evaluated at compile time (shape vectors, axes).
VALUE_LIMIT = 64
#: Inline constants (written into the plan) may hold at most this many elements in total.
INLINE_LIMIT = 1 << 20


# ---- decoder roles and symbols ----------------------------------------------------------------------------------

def decoder_io(og: OnnxGraph) -> dict[str, Any] | None:
    """The roles of a decoder graph's inputs and outputs (HF/optimum and torch export names), or None."""
    ins = {n for n, _, _ in og.inputs}
    outs = [o for o, _ in og.outputs]
    ids = next((n for n in ("input_ids", "ids", "tokens") if n in ins), None)
    logits = next((o for o in outs if o == "logits"), None)
    if ids is None or logits is None:
        return None
    kv: list[list[str]] = []
    for name in sorted(ins):
        m = re.match(r"^past[_.a-z]*?[._](\d+)[._](key|value)$", name)
        if not m:
            continue
        layer, kind = m.group(1), m.group(2)
        cands = [o for o in outs if re.match(rf"^present[_.a-z]*?[._]{layer}[._]{kind}$", o)]
        if len(cands) != 1:
            raise UserError(f"{og.path}: past input '{name}' has no matching present output (expected "
                            f"present.{layer}.{kind}); cannot feed the cache back")
        kv.append([name, cands[0]])
    kv.sort(key=lambda p: (int(re.findall(r"\d+", p[0])[-1]), p[0]))
    return {"ids": ids, "logits": logits, "mask": "attention_mask" if "attention_mask" in ins else None,
            "positions": "position_ids" if "position_ids" in ins else None, "kv": kv}


def classify_symbols(og: OnnxGraph, dec: dict[str, Any] | None) -> dict[str, str]:
    cls: dict[str, str] = {}
    past_inputs = {p for p, _ in dec["kv"]} if dec else set()
    for name, _, dims in og.inputs:
        for ax, d in enumerate(dims):
            if isinstance(d, int) or d in cls:
                continue
            low = d.lower()
            if name in past_inputs and ax == len(dims) - 2:
                cls[d] = "past"
            elif dec and name in (dec["ids"], dec["positions"]) and ax == len(dims) - 1:
                cls[d] = "seq"
            elif "past" in low and "+" in low:
                cls[d] = "total"
            elif "past" in low or "cache" in low:
                cls[d] = "past"
            elif "total" in low or "all" in low or "key" in low:
                cls[d] = "total"
            elif "batch" in low or low in ("n", "b", "bs") or (ax == 0 and len(dims) > 1 and
                                                             re.fullmatch(r".*:0", d) is not None):
                cls[d] = "batch"
            elif any(k in low for k in ("seq", "len", "token", "step", "time")) or low in ("s", "t", "l"):
                cls[d] = "seq"
            else:
                cls[d] = "other"
    if dec and dec["kv"]:
        # Without a separate past symbol the mask spans past + new tokens: call its length 'total'.
        mask = dec.get("mask")
        for name, _, dims in og.inputs:
            if name == mask and len(dims) == 2 and isinstance(dims[1], str) and cls.get(dims[1]) == "seq":
                seq_syms = {d for n, _, ds in og.inputs if n == dec["ids"] for d in ds[-1:]}
                if dims[1] not in seq_syms:
                    cls[dims[1]] = "total"
    return cls


def bounds_and_bindings(cls: dict[str, str], kv: bool, max_context: int, mbt: int,
                        overrides: dict[str, int] | None) -> tuple[dict[str, int], list[dict[str, int]]]:
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
    if not kv:
        return bounds, [dict(bounds)]
    bindings = []
    s_max = max((bounds[s] for s, c in cls.items() if c == "seq"), default=seq)
    for s_len in sorted({s_max, 1, max(1, min(s_max, max_context // 2))}):
        for past in sorted({0, max(0, max_context - s_len)}):
            b = {}
            for sym, c in cls.items():
                b[sym] = {"seq": s_len, "past": past, "total": past + s_len}.get(c, bounds[sym])
            bindings.append(b)
    return bounds, bindings


# ---- inference at a binding ---------------------------------------------------------------------------------------

#: Ops whose output never holds more elements than their first input, whatever their shape inputs say: when
#: those inputs are runtime values (graph inputs), the output is planned at the input's size.
NON_GROWING = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "ReduceSum", "ReduceMean",
               "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd", "ReduceSumSquare"}
#: Ops whose output has as many elements as their first input.
SAME_SIZE = (S.UNARY_SAME | {"Cast", "CastLike", "Not", "IsNaN", "IsInf"}) - {"Clip"}

Spec = tuple[tuple[int, ...] | None, str, int]  #: (shape, or None when it depends on runtime values; dtype; numel)


def _unknown(og: OnnxGraph, n: Any, specs: dict[str, Spec], shape_err: str | None) -> list[Spec]:
    """Output specs of a node whose shape cannot be known at compile time (see NON_GROWING)."""
    x = specs[n.inputs[0]] if n.inputs and n.inputs[0] else None
    if x is None or not (n.op in NON_GROWING or n.op in SAME_SIZE):
        vin = S.VALUE_INPUTS.get(n.op, ())
        runtime = [t for i, t in enumerate(n.inputs) if t and (specs[t][0] is None or i in vin)]
        raise UserError(f"{og.path}: node '{n.name}' ({n.op}): its output size depends on the runtime values of "
                        f"{runtime} ({shape_err or 'unknown shape'}); edge-rt plans memory ahead of time and needs "
                        "these to be constants")
    dtype = {"Cast": n.attrs.get("to"), "Not": "bool", "IsNaN": "bool", "IsInf": "bool",
             "CastLike": specs[n.inputs[1]][1] if len(n.inputs) > 1 and n.inputs[1] else x[1]}.get(n.op, x[1])
    bound = x[2]
    if n.op.startswith("Reduce") and x[0] is not None:
        bound = S.numel([max(d, 1) for d in x[0]])  # reducing an empty axis with keepdims yields elements
    return [(None, dtype, bound) for t in n.outputs]


def infer_at(og: OnnxGraph, binding: dict[str, int]) -> dict[str, Spec]:
    specs: dict[str, Spec] = {}
    values: dict[str, np.ndarray] = {}
    for name, dt, dims in og.inputs:
        sh = tuple(d if isinstance(d, int) else binding[d] for d in dims)
        specs[name] = (sh, dt, S.numel(sh))
    for name, c in og.consts.items():
        specs[name] = (c.shape, c.dtype, c.numel)
        if c.numel <= VALUE_LIMIT:
            values[name] = c.load()
    for n in og.nodes:
        shapes, dtypes, vals = [], [], {}
        for i, t in enumerate(n.inputs):
            if not t:
                shapes.append(None)
                dtypes.append(None)
                continue
            sh, dt, _ = specs[t]
            shapes.append(sh)
            dtypes.append(dt)
            if t in values:
                vals[i] = values[t]
        if any(t and specs[t][0] is None for t in n.inputs):
            outs = _unknown(og, n, specs, None)
        else:
            try:
                outs = [(sh, dt, S.numel(sh)) for sh, dt in S.infer(n.op, shapes, dtypes, vals, n.attrs,
                                                                      len(n.outputs))]
            except S.ShapeError as e:
                if "needs the value of input" in str(e):
                    outs = _unknown(og, n, specs, str(e))
                else:
                    dims = ", ".join(f"{k}={v}" for k, v in binding.items())
                    shown = [list(s) if s else s for s in shapes]
                    raise UserError(f"{og.path}: node '{n.name}' ({n.op}): {e} (input shapes {shown}"
                                    f"{' at ' + dims if dims else ''})") from None
        for t, spec in zip(n.outputs, outs):
            if t:
                specs[t] = spec
        small = all(sh is not None and S.numel(sh) <= VALUE_LIMIT and dt != "float64" for sh, dt, _ in outs)
        if small and (n.op in ("Shape", "Size") or all(t in values for t in n.inputs if t)):
            ins = []
            for t in n.inputs:
                if not t:
                    ins.append(None)
                elif t in values:
                    ins.append(values[t])
                else:
                    sh = specs[t][0] or ()
                    ins.append(np.lib.stride_tricks.as_strided(np.zeros(1, np.dtype(specs[t][1])), sh, [0] * len(sh)))
            try:
                for t, v in zip(n.outputs, ref.run(n.op, ins, n.attrs, len(n.outputs))):
                    if t:
                        values[t] = v
            except (S.ShapeError, ValueError, IndexError, TypeError):
                pass
    for t, shape in og.assumed_static.items():
        if t in specs and specs[t][0] != shape:
            raise UserError(f"{og.path}: shape inference recorded '{t}' as static {list(shape)}, but it is "
                            f"{specs[t][0]} when the symbolic dims are {binding}; the model's value_info is "
                            "stale, re-export it")
    return specs


# ---- the IR -------------------------------------------------------------------------------------------------------

def _flops(op: str, ins: list[tuple[int, ...] | None], outs: list[tuple[int, ...]], attrs: dict[str, Any]) -> int:
    if not outs:
        return 0
    n_out = S.numel(outs[0])
    if op == "linear":
        return 2 * n_out * int(attrs["in_features"])
    if op in ("MatMul", "Gemm") and ins[0]:
        return 2 * n_out * int(ins[0][-1])
    return n_out


def build_onnx_ir(src: OnnxSource, max_context: int, max_batch_tokens: int,
                  onnx_dims: dict[str, int] | None = None) -> nx.DiGraph:
    og = src.graph
    assert og is not None
    dec = decoder_io(og)
    cls = classify_symbols(og, dec)
    kv = bool(dec and dec["kv"])
    bounds, bindings = bounds_and_bindings(cls, kv, max_context, max_batch_tokens, onnx_dims)
    all_specs = [infer_at(og, b) for b in bindings]
    first = all_specs[0]
    cap: dict[str, int] = {}
    for specs in all_specs:
        for t, (_, _, k) in specs.items():
            cap[t] = max(cap.get(t, 0), k)

    # Weights: a weight read by several ops is duplicated per extra op so each op's bytes are contiguous.
    weight_of: dict[tuple[int, int], str] = {}
    aliases: dict[str, str] = {}
    first_user: dict[str, int] = {}
    for k, n in enumerate(og.nodes):
        for i, t in enumerate(n.inputs):
            if t not in og.weights:
                continue
            if n.op == "Gather" and i == 0:
                weight_of[(k, i)] = t
                continue
            if first_user.setdefault(t, k) == k:
                weight_of[(k, i)] = t
            else:
                alias = f"{t}@{k}"
                aliases[alias] = t
                weight_of[(k, i)] = alias
    shapes = {w: og.consts[w].shape for w in og.weights}
    shapes.update({a: og.consts[o].shape for a, o in aliases.items()})

    def nbytes(w: str) -> int:
        return 4 * S.numel(shapes[w])

    op_bytes = []
    for k, n in enumerate(og.nodes):
        op_bytes.append(sum(nbytes(w) for (kk, i), w in weight_of.items() if kk == k and not (n.op == "Gather"
                                                                                              and i == 0)))
    total = sum(op_bytes)
    fixed = [b for n, b in zip(og.nodes, op_bytes) if n.op != "linear"]
    target = max(max(fixed, default=0), -(-total // SEGMENTS), 1)

    rows = max(1, max((bounds[s] for s, c in cls.items() if c == "batch"), default=1)) * \
        max(1, max((bounds[s] for s, c in cls.items() if c in ("seq",)), default=1))
    b = GraphBuilder(src.name, src.config, shapes)
    g = b.g
    for name, dt, _ in og.inputs:
        b.input(name, (cap[name],), dt)
    inline: dict[str, Any] = {}
    n_inline = 0
    for name, c in og.consts.items():
        if name in og.weights:
            continue
        v = c.load()
        n_inline += v.size
        g.graph["state"][name] = TensorSpec((max(1, v.size),), v.dtype.name)
        inline[name] = {"dtype": v.dtype.name, "shape": list(v.shape), "data": v.reshape(-1).tolist()}
    if n_inline > INLINE_LIMIT:
        raise UserError(f"{og.path}: {n_inline} elements of non-float32 or small constants would have to be written "
                        f"into the plan (limit {INLINE_LIMIT}); the model is not supported")
    seg_bytes = 0
    seg = -1
    names: list[str] = []
    for k, n in enumerate(og.nodes):
        if seg < 0 or (op_bytes[k] > 0 and seg_bytes > 0 and seg_bytes + op_bytes[k] > target):
            seg += 1
            seg_bytes = 0
            b.begin_unit(f"segment.{seg}")
        seg_bytes += op_bytes[k]
        args: list[str] = []
        ins: list[str] = []
        weights: dict[str, str] = {}
        attrs = dict(n.attrs)
        for i, t in enumerate(n.inputs):
            if not t:
                args.append("")
            elif (k, i) in weight_of:
                role = ("weight" if i == 1 else "bias") if n.op == "linear" else f"in{i}"
                weights[role] = weight_of[(k, i)]
                args.append("@" + role)
                if n.op == "Gather" and i == 0:
                    attrs["gather"] = [role]
            else:
                args.append(t)
                ins.append(t)
        attrs["args"] = args
        attrs["outs"] = list(n.outputs)
        outs = {t: TensorSpec((max(1, cap[t]),), first[t][1]) for t in n.outputs if t}
        in_shapes = [first[t][0] if t else None for t in n.inputs]
        flops = _flops(n.op, in_shapes, [first[t][0] or (first[t][2],) for t in n.outputs if t], n.attrs) // rows
        b.op("onnx." + n.op, n.name, ins, outs, weights, attrs, flops=max(1, flops))
        names.append(n.name)
    g.graph["outputs"] = [o for o, _ in og.outputs]
    g.graph["weight_aliases"] = aliases
    # A decoder's past inputs live through the whole run: the engine copies each present into its past between
    # runs, which is safe only if no past shares bytes with a present (or anything else live at the end).
    g.graph["pinned"] = [p for p, _ in dec["kv"]] if dec else []
    largest = max(fixed, default=0)
    g.graph["min_slot"] = (target, "a segment" if target > largest else
                           next(n.name for n, bb in zip(og.nodes, op_bytes) if bb == largest and n.op != "linear"))
    g.graph["onnx"] = {
        "opset": og.opset,
        "inputs": [{"name": n, "dtype": dt, "dims": list(d)} for n, dt, d in og.inputs],
        "outputs": [{"name": o, "dtype": first[o][1]} for o, _ in og.outputs],
        "bounds": bounds, "symbols": cls, "constants": inline, "decoder": dec,
    }
    return g


def validate_onnx_ir(g: nx.DiGraph, src: OnnxSource) -> ValidationReport:
    check_acyclic(g)
    check_order(g)
    report = ValidationReport()
    if src.ignored:
        shown = ", ".join(src.ignored[:6]) + (f" and {len(src.ignored) - 6} more" if len(src.ignored) > 6 else "")
        report.warnings.append(f"{len(src.ignored)} initializer(s) of '{src.name}' are not used by the graph: "
                               f"{shown}")
    dec = g.graph["onnx"].get("decoder")
    if dec is not None and not dec["kv"]:
        report.warnings.append(f"'{src.name}' is a decoder without past key/value inputs: generation recomputes the "
                               "whole sequence at every token")
    return report
