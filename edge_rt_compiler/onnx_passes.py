"""Passes over a checked `OnnxGraph` (frontends/onnx.py), in order:

1. `normalize`: attributes to plain JSON values (Cast's `to` and ConstantOfShape's `value` become numpy dtype
   names and scalars).
2. `fold`: Constant nodes, every node whose inputs are all constants, and Shape/Size of tensors whose shape
   is static (so torch's Shape -> Gather -> Concat -> Reshape chains fold wherever they do not depend on a
   symbolic dim). Evaluated with the executor's numpy twins (`onnx_reference`), so folding and running agree.
3. `drop_identities`: Identity nodes and Casts to the dtype a tensor already has are bypassed.
4. `fuse_linear`: MatMul(x, W) [+ Add(bias)] and Gemm with constant weights -> `linear` (weight stored
   `[out, in]`, the transformer kernel; tiles along its output rows when a weight slot is smaller).
5. `fuse_gelu`: the decomposed GELU patterns exporters emit (erf and tanh forms, any operand order),
   recognised by their structure and confirmed numerically on sample points.
6. `fuse_norms`: decomposed LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) and RMSNorm
   (Pow, ReduceMean, Add, Sqrt, Div/Reciprocal, Mul, Mul) over the last axis -> one LayerNormalization /
   RMSNormalization node, confirmed numerically like the GELU fusion.
7. `dce`: nodes nothing needs are removed; unused optional outputs become absent; a graph output that folded
   to a constant gets an explicit copy (`outputs_from_constants`).
8. `classify`: constants the remaining nodes read become weights (float32, >= WEIGHT_MIN elements: the
   weights file) or inline constants (written into the plan).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edge_rt_exec import onnx_reference as ref
from edge_rt_exec import onnx_shapes as S
from edge_rt_exec.errors import UserError

from .frontends.onnx import LazyTensor, OnnxGraph, ONode, _dtype

#: float32 constants with at least this many elements go to the weights file; smaller ones inline.
WEIGHT_MIN = 64
#: Constant folding skips outputs larger than this (elements).
FOLD_LIMIT = 1 << 26
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sqrt", "Neg", "Cast"}


def optimize(og: OnnxGraph) -> None:
    normalize(og)
    fold(og)
    drop_identities(og)
    fuse_linear(og)
    fuse_gelu(og)
    fuse_norms(og)
    dce(og)
    outputs_from_constants(og)
    classify(og)


def _where(og: OnnxGraph, n: ONode) -> str:
    return f"{og.path}: node '{n.name}' ({n.op})"


def _const(value: np.ndarray, source: str) -> LazyTensor:
    v = np.array(value, order="C")  # (np.ascontiguousarray would make a 0-d value 1-d)
    return LazyTensor(tuple(int(d) for d in v.shape), v.dtype.name, lambda: v, source, v)


def normalize(og: OnnxGraph) -> None:
    for n in og.nodes:
        a = n.attrs
        if n.op == "Cast" and "to" in a:
            a["to"] = _dtype(int(a["to"]), _where(og, n) + " casts to an element type that")
            a.pop("saturate", None)
        elif n.op == "ConstantOfShape":
            v = a.pop("value", None)
            if v is None:
                a["dtype"], a["value"] = "float32", 0.0
            else:
                arr = np.asarray(v).reshape(-1)
                a["dtype"] = arr.dtype.name
                a["value"] = arr[0].item() if arr.size else 0
        for k, v in list(a.items()):
            if isinstance(v, np.ndarray) and n.op != "Constant":
                raise UserError(f"{_where(og, n)}: tensor attribute '{k}' is not supported")


def _constant_value(og: OnnxGraph, n: ONode) -> np.ndarray:
    a = n.attrs
    if "value" in a:
        return np.asarray(a["value"])
    if "value_float" in a:
        return np.array(a["value_float"], np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], np.int64)
    raise UserError(f"{_where(og, n)}: only tensor, float(s) and int(s) constants are supported (string and sparse "
                    "constants are not)")


def _fake(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A zero-memory array of any shape (for Shape/Size of a static tensor)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.dtype(dtype)), shape, [0] * len(shape))


def fold(og: OnnxGraph) -> None:
    kept: list[ONode] = []
    for n in og.nodes:
        if n.op == "Constant":
            v = _constant_value(og, n)
            _dtype_ok = v.dtype.name in S.FLOATS + S.INTS + ("bool",)
            if not _dtype_ok:
                raise UserError(f"{_where(og, n)}: constant of dtype {v.dtype} is not supported")
            og.consts[n.outputs[0]] = _const(v, _where(og, n))
            og.dtypes[n.outputs[0]] = v.dtype.name
            og.static[n.outputs[0]] = tuple(v.shape)
            continue
        present = [t for t in n.inputs if t]
        vals: list[np.ndarray | None] | None = None
        if n.op in ("Shape", "Size") and n.inputs[0] in og.static and n.inputs[0] not in og.consts:
            shape = og.static[n.inputs[0]]
            og.assumed_static[n.inputs[0]] = shape
            vals = [_fake(shape, og.dtypes.get(n.inputs[0], "float32"))]
        elif present and all(t in og.consts for t in present) and n.op in ref.REF:
            if sum(og.consts[t].numel for t in present) > FOLD_LIMIT:
                kept.append(n)
                continue
            vals = [og.consts[t].load() if t else None for t in n.inputs]
        if vals is None:
            kept.append(n)
            continue
        try:
            outs = ref.run(n.op, vals, n.attrs, len(n.outputs))
        except (S.ShapeError, ValueError, IndexError, TypeError) as e:
            raise UserError(f"{_where(og, n)}: cannot evaluate on its constant inputs ({e}); the model is "
                            "inconsistent") from None
        for t, v in zip(n.outputs, outs):
            if t:
                og.consts[t] = _const(v, _where(og, n))
                og.dtypes[t] = v.dtype.name
                og.static[t] = tuple(v.shape)
    og.nodes = kept


def _consumers(og: OnnxGraph) -> dict[str, list[ONode]]:
    cons: dict[str, list[ONode]] = defaultdict(list)
    for n in og.nodes:
        for t in n.inputs:
            if t:
                cons[t].append(n)
    return cons


def _transposed(og: OnnxGraph, name: str) -> str:
    tname = f"{name}::T"
    if tname not in og.consts:
        c = og.consts[name]
        og.consts[tname] = LazyTensor((c.shape[1], c.shape[0]), "float32",
                                      lambda c=c: np.array(c.load().T, order="C"), c.source + " (transposed)")
        og.dtypes[tname] = "float32"
    return tname


def _bias_of(og: OnnxGraph, name: str, n_out: int) -> str | None:
    c = og.consts.get(name)
    if c is None or c.dtype != "float32" or c.numel != n_out or (c.shape and c.shape[-1] != n_out):
        return None
    if len(c.shape) == 1:
        return name
    if len(c.shape) == 2:
        flat_name = f"{name}::flat"
        if flat_name not in og.consts:
            og.consts[flat_name] = LazyTensor((n_out,), "float32", lambda c=c: c.load().reshape(-1), c.source)
            og.dtypes[flat_name] = "float32"
        return flat_name
    return None


def fuse_linear(og: OnnxGraph) -> None:
    cons = _consumers(og)
    outputs = {o for o, _ in og.outputs}
    dropped: set[int] = set()
    new_nodes: list[ONode] = []
    for n in og.nodes:
        if id(n) in dropped:
            continue
        weight = x = None
        if n.op == "MatMul" and n.inputs[1] in og.consts and n.inputs[0] not in og.consts:
            c = og.consts[n.inputs[1]]
            if c.dtype == "float32" and len(c.shape) == 2 and og.dtypes.get(n.inputs[0], "float32") == "float32":
                x, (k, m) = n.inputs[0], c.shape
                weight = _transposed(og, n.inputs[1])
        elif n.op == "Gemm" and n.inputs[1] in og.consts and not n.attrs.get("transA", 0) \
                and n.attrs.get("alpha", 1.0) == 1.0 and og.consts[n.inputs[1]].dtype == "float32":
            c = og.consts[n.inputs[1]]
            bias_in = n.inputs[2] if len(n.inputs) > 2 else ""
            if len(c.shape) == 2 and (not bias_in or n.attrs.get("beta", 1.0) == 1.0):
                if n.attrs.get("transB", 0):
                    m, k = c.shape
                    weight = n.inputs[1]
                else:
                    k, m = c.shape
                    weight = _transposed(og, n.inputs[1])
                x = n.inputs[0]
                if bias_in and _bias_of(og, bias_in, m) is None:
                    weight = None  # a matrix bias: keep the Gemm
        if weight is None or x is None:
            new_nodes.append(n)
            continue
        out = n.outputs[0]
        ins = [x, weight]
        if n.op == "Gemm" and len(n.inputs) > 2 and n.inputs[2]:
            ins.append(_bias_of(og, n.inputs[2], m))  # type: ignore[arg-type]
        elif n.op == "MatMul" and out not in outputs and len(cons[out]) == 1 and cons[out][0].op == "Add":
            add = cons[out][0]
            other = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
            b = _bias_of(og, other, m) if other != out else None
            if b is not None and len(og.consts[other].shape) == 1:
                ins.append(b)
                out = add.outputs[0]
                dropped.add(id(add))
        new_nodes.append(ONode(n.name, "linear", ins, [out], {"in_features": int(k), "out_features": int(m)}))
        og.dtypes[out] = "float32"
    og.nodes = new_nodes


# ---- GELU ---------------------------------------------------------------------------------------------------------

_PROBE = np.linspace(-4.0, 4.0, 33, dtype=np.float32)


def _eval_region(og: OnnxGraph, nodes: list[ONode], x: str, x_val: np.ndarray, want: str,
                 limit: int = 16) -> np.ndarray | None:
    """Evaluate `nodes` on `x = x_val` (constants of up to `limit` elements allowed) and return `want`."""
    env: dict[str, np.ndarray] = {x: x_val}
    try:
        for n in nodes:
            ins = []
            for t in n.inputs:
                if t in env:
                    ins.append(env[t])
                elif t in og.consts and og.consts[t].numel <= limit:
                    ins.append(og.consts[t].load())
                else:
                    return None
            for t, v in zip(n.outputs, ref.run(n.op, ins, n.attrs, len(n.outputs))):
                env[t] = v
    except (S.ShapeError, ValueError, IndexError, TypeError, KeyError):
        return None
    return env.get(want)


def fuse_gelu(og: OnnxGraph) -> None:
    """Replace decomposed GELU subgraphs by one Gelu node (approximate="none" for the erf form, "tanh")."""
    for anchor_op, approx in (("Erf", "none"), ("Tanh", "tanh")):
        changed = True
        while changed:
            changed = False
            prod = {t: n for n in og.nodes for t in n.outputs if t}
            cons = _consumers(og)
            outputs = {o for o, _ in og.outputs}
            for e in [n for n in og.nodes if n.op == anchor_op]:
                match = _match_gelu(og, e, prod, cons, outputs, approx)
                if match is None:
                    continue
                region, x, out = match
                ids = {id(n) for n in region}
                idx = min(i for i, n in enumerate(og.nodes) if id(n) in ids)
                gelu = ONode(region[-1].name, "Gelu", [x], [out], {"approximate": approx})
                og.nodes = [n for n in og.nodes if id(n) not in ids]
                og.nodes.insert(idx, gelu)
                changed = True
                break


def _match_gelu(og: OnnxGraph, e: ONode, prod: dict, cons: dict, outputs: set, approx: str) \
        -> tuple[list[ONode], str, str] | None:
    # Backward: the elementwise subgraph feeding the anchor, and its candidate sources (nearest first).
    back: list[ONode] = []
    candidates: list[str] = []
    frontier = [e.inputs[0]]
    seen: set[str] = set()
    while frontier and len(back) < 8:
        t = frontier.pop(0)
        if t in seen or t in og.consts:
            continue
        seen.add(t)
        candidates.append(t)
        p = prod.get(t)
        if p is not None and p.op in ELEMENTWISE and len(back) < 6:
            back.append(p)
            frontier.extend(i for i in p.inputs if i)
    for x in candidates:
        if x not in og.dtypes or og.dtypes.get(x) != "float32":
            continue
        inner = _between(x, e, prod, og)
        if inner is None:
            continue
        chain = inner + [e]
        cur = e
        for _ in range(4):
            nxt = cons.get(cur.outputs[0], [])
            if len(nxt) != 1 or nxt[0].op not in ELEMENTWISE:
                break
            cur = nxt[0]
            known = {x} | {t for n in chain for t in n.outputs}
            for t in cur.inputs:  # a side branch computed from x alone (GPT-2's `0.5 * x`)
                p = prod.get(t)
                if t and t not in known and t not in og.consts and p is not None and p.op in ELEMENTWISE and \
                        all(i == x or (i in og.consts and og.consts[i].numel <= 16) for i in p.inputs if i):
                    chain.append(p)
            chain.append(cur)
            out = cur.outputs[0]
            got = _eval_region(og, chain, x, _PROBE, out)
            if got is None or got.shape != _PROBE.shape:
                continue
            exp = ref.gelu(_PROBE, approx)
            if np.allclose(got, exp, rtol=1e-5, atol=1e-6):
                members = {id(n) for n in chain}
                for n in chain[:-1]:
                    for t in n.outputs:
                        if t in outputs or any(id(c) not in members for c in cons.get(t, [])):
                            return None
                return chain, x, out
    return None


def _between(x: str, e: ONode, prod: dict, og: OnnxGraph) -> list[ONode] | None:
    """Nodes strictly between tensor `x` and node `e` (exclusive), in topological order, if every leaf is `x`
    or a small constant."""
    region: list[ONode] = []
    stack = [t for t in e.inputs if t]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t == x or t in seen:
            continue
        seen.add(t)
        if t in og.consts:
            if og.consts[t].numel > 16:
                return None
            continue
        p = prod.get(t)
        if p is None or p.op not in ELEMENTWISE or len(region) > 6:
            return None
        region.append(p)
        stack.extend(i for i in p.inputs if i)
    order = {id(n): i for i, n in enumerate(og.nodes)}
    return sorted({id(n): n for n in region}.values(), key=lambda n: order[id(n)])


# ---- LayerNorm / RMSNorm ------------------------------------------------------------------------------------------

_NORM_CHAIN = {"Add", "Sqrt", "Div", "Reciprocal", "Mul", "Cast"}


def _last_axis_mean(og: OnnxGraph, n: ONode) -> bool:
    if n.op != "ReduceMean" or not n.attrs.get("keepdims", 1):
        return False
    axes = n.attrs.get("axes")
    if axes is None and len(n.inputs) > 1 and n.inputs[1] in og.consts:
        axes = [int(v) for v in og.consts[n.inputs[1]].load().reshape(-1)]
    return axes == [-1]


def _is_square(og: OnnxGraph, n: ONode | None) -> str | None:
    """The tensor `n` squares (Pow(q, 2) or Mul(q, q)), or None."""
    if n is None:
        return None
    if n.op == "Pow" and n.inputs[1] in og.consts and og.consts[n.inputs[1]].numel == 1 \
            and float(og.consts[n.inputs[1]].load().reshape(-1)[0]) == 2.0:
        return n.inputs[0]
    if n.op == "Mul" and n.inputs[0] == n.inputs[1]:
        return n.inputs[0]
    return None


def fuse_norms(og: OnnxGraph) -> None:
    changed = True
    while changed:
        changed = False
        prod = {t: n for n in og.nodes for t in n.outputs if t}
        cons = _consumers(og)
        outputs = {o for o, _ in og.outputs}
        for r2 in [n for n in og.nodes if _last_axis_mean(og, n)]:
            match = _match_norm(og, r2, prod, cons, outputs)
            if match is None:
                continue
            region, node = match
            ids = {id(n) for n in region}
            idx = min(i for i, n in enumerate(og.nodes) if id(n) in ids)
            og.nodes = [n for n in og.nodes if id(n) not in ids]
            og.nodes.insert(idx, node)
            changed = True
            break


def _match_norm(og: OnnxGraph, r2: ONode, prod: dict, cons: dict, outputs: set) -> tuple[list[ONode], ONode] | None:
    sq = prod.get(r2.inputs[0])
    q = _is_square(og, sq)
    if q is None or sq is None:
        return None
    sub = prod.get(q)
    r1 = prod.get(sub.inputs[1]) if sub is not None and sub.op == "Sub" else None
    if sub is not None and r1 is not None and _last_axis_mean(og, r1) and r1.inputs[0] == sub.inputs[0]:
        kind, x, chain = "LayerNormalization", sub.inputs[0], [r1, sub, sq, r2]
    else:
        kind, x, chain = "RMSNormalization", q, [sq, r2]
    if og.dtypes.get(x, "float32") != "float32":
        return None
    inside = {x} | {t for n in chain for t in n.outputs}
    best = None
    cur = r2
    for _ in range(8):
        nxt = [c for c in cons.get(cur.outputs[0], []) if id(c) not in {id(n) for n in chain}]
        if len(nxt) != 1 or nxt[0].op not in _NORM_CHAIN:
            break
        n = nxt[0]
        if n.op == "Cast" and n.attrs.get("to") != "float32":
            break
        if any(t and t not in inside and not (t in og.consts and og.consts[t].dtype == "float32")
               for t in n.inputs):
            break
        chain.append(n)
        inside.update(n.outputs)
        cur = n
        found = _norm_params(og, chain, kind, x)
        if found is not None:
            best = (list(chain), found)
    if best is None:
        return None
    chain, node = best
    members = {id(n) for n in chain}
    for n in chain[:-1]:
        for t in n.outputs:
            if t in outputs or any(id(c) not in members for c in cons.get(t, [])):
                return None
    node.name = chain[-1].name
    return chain, node


def _norm_params(og: OnnxGraph, chain: list[ONode], kind: str, x: str) -> ONode | None:
    """The fused node if `chain` (ending at its last node) computes `kind`(x) * weight (+ bias)."""
    vecs = [t for n in chain for t in n.inputs if t in og.consts and og.consts[t].numel > 1]
    scal = [t for n in chain for t in n.inputs if t in og.consts and og.consts[t].numel == 1]
    if not vecs or len(vecs) > 2 or any(len(og.consts[v].shape) != 1 for v in vecs):
        return None
    d = og.consts[vecs[0]].numel
    if any(og.consts[v].numel != d for v in vecs):
        return None
    eps_cands = [float(og.consts[t].load().reshape(-1)[0]) for t in scal]
    eps_cands = [e for e in eps_cands if 0 < e < 1e-2] or [0.0]
    rng = np.random.default_rng(0)
    probe = (rng.standard_normal((3, d)) * 2.0 + 0.5).astype(np.float32)
    got = _eval_region(og, chain, x, probe, chain[-1].outputs[0], limit=d)
    if got is None or got.shape != probe.shape:
        return None
    w = og.consts[vecs[0]].load()
    b = og.consts[vecs[1]].load() if len(vecs) > 1 else None
    for eps in eps_cands:
        for weight, bias in ((w, b), (b, w)) if b is not None else ((w, None),):
            attrs = {"axis": -1, "epsilon": eps}
            ins = [probe, weight] + ([bias] if bias is not None else [])
            if kind == "RMSNormalization" and bias is not None:
                continue
            want = ref.run(kind, ins, attrs)[0]
            if np.allclose(got, want, rtol=1e-4, atol=1e-5):
                names = vecs if weight is w else vecs[::-1]
                return ONode("", kind, [x] + names[:len(ins) - 1], [chain[-1].outputs[0]], attrs)
    return None


# ---- cleanup ------------------------------------------------------------------------------------------------------

def drop_identities(og: OnnxGraph) -> None:
    outputs = {o for o, _ in og.outputs}
    alias: dict[str, str] = {}
    kept = []
    for n in og.nodes:
        n.inputs = [alias.get(t, t) for t in n.inputs]
        same_cast = n.op == "Cast" and og.dtypes.get(n.inputs[0]) == n.attrs.get("to")
        if (n.op == "Identity" or same_cast) and n.outputs[0] not in outputs:
            alias[n.outputs[0]] = n.inputs[0]
            continue
        kept.append(n)
    og.nodes = kept


def dce(og: OnnxGraph) -> None:
    needed = {o for o, _ in og.outputs}
    kept = []
    for n in reversed(og.nodes):
        if any(t and t in needed for t in n.outputs):
            kept.append(n)
            needed.update(t for t in n.inputs if t)
    kept.reverse()
    for n in kept:
        n.outputs = [t if t in needed else "" for t in n.outputs]
    og.nodes = kept


def outputs_from_constants(og: OnnxGraph) -> None:
    """A graph output that folded to a constant (or is a graph input) is produced by an explicit copy."""
    produced = {t for n in og.nodes for t in n.outputs if t}
    inputs = {i[0] for i in og.inputs}
    for name, _ in og.outputs:
        if name in produced:
            continue
        if name in inputs:
            raise UserError(f"{og.path}: graph output '{name}' is a graph input passed straight through; edge-rt "
                            "needs outputs computed by the graph")
        src = f"{name}::const"
        og.consts[src] = og.consts.pop(name)
        og.dtypes[src] = og.consts[src].dtype
        og.nodes.append(ONode(f"{name}::copy", "Identity", [src], [name], {}))
        og.dtypes[name] = og.consts[src].dtype


def classify(og: OnnxGraph) -> None:
    used_as: dict[str, set[bool]] = defaultdict(set)  # const -> {is a value input}
    for n in og.nodes:
        vin = S.VALUE_INPUTS.get(n.op, ())
        for i, t in enumerate(n.inputs):
            if t in og.consts:
                used_as[t].add(i in vin)
    for name in list(og.consts):
        if name not in used_as:
            if name not in og.referenced and og.consts[name]._value is None:
                og.unused.append(name)
            del og.consts[name]
            continue
        c = og.consts[name]
        if c.dtype == "float32" and c.numel >= WEIGHT_MIN and True not in used_as[name]:
            og.weights.add(name)
    og.unused.sort()
