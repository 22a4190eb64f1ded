"""The graph IR: a `networkx.DiGraph` of op nodes joined by tensor edges.

Node attributes: `op` (type), `unit` (index into `graph.graph["units"]`), `order` (position in the
execution order), `inputs` / `outputs` (tensor names, ordered), `weights` (role -> canonical weight
name), `attrs`, `scratch` (op-local temporaries: name -> shape), `flops` (per row of the step) and
`weight_bytes`. Edge attributes: `tensor`, `shape`, `dtype`.

Shapes are symbolic in their leading (row) dimension: "T" is the rows of a step (tokens), "B" the
sentences of an encoder batch and "S" their padded length; `concrete_shape` binds them for the memory plan.
Graph attributes: `name`, `config`, `tensors` (name -> TensorSpec of every activation), `inputs`, `outputs`,
`state` (persistent tensors such as the KV cache: name -> TensorSpec), `units` and `weight_shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx

from edge_rt_exec.errors import UserError

from .frontends.base import ModelSource, TransformerConfig

Shape = tuple[Any, ...]  # ints or the symbols "T", "B", "S", "C" (max_context)


@dataclass(frozen=True)
class TensorSpec:
    shape: Shape
    dtype: str = "float32"


@dataclass(frozen=True)
class Dims:
    """Bindings of the symbolic dims for one plan."""

    T: int  #: rows in one step (prefill chunk / encoder batch tokens)
    C: int  #: max_context (KV cache length)
    B: int  #: max sentences in an encoder batch
    S: int  #: max padded sentence length


#: Bytes per element of the dtypes tensors may have (ONNX graphs carry more than float32 and int64).
_ITEMSIZE = {"float32": 4, "int64": 8, "int32": 4, "float64": 8, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2,
             "uint32": 4, "uint64": 8, "bool": 1}


def concrete_shape(shape: Shape, dims: Dims) -> tuple[int, ...]:
    return tuple(getattr(dims, d) if isinstance(d, str) else int(d) for d in shape)


def nbytes_of(spec: TensorSpec, dims: Dims) -> int:
    n = _ITEMSIZE[spec.dtype]
    for d in concrete_shape(spec.shape, dims):
        n *= d
    return n


class GraphBuilder:
    """Appends op nodes in execution order and records tensor specs."""

    def __init__(self, name: str, config: TransformerConfig, weight_shapes: dict[str, tuple[int, ...]]):
        self.g = nx.DiGraph(name=name, config=config, tensors={}, inputs=[], outputs=[], state={}, units=[],
                            weight_shapes=dict(weight_shapes))
        self.producer: dict[str, str] = {}
        self.unit = -1

    def begin_unit(self, name: str) -> None:
        self.g.graph["units"].append(name)
        self.unit = len(self.g.graph["units"]) - 1

    def input(self, name: str, shape: Shape, dtype: str = "float32") -> str:
        self.g.graph["tensors"][name] = TensorSpec(shape, dtype)
        self.g.graph["inputs"].append(name)
        return name

    def state(self, name: str, shape: Shape) -> str:
        self.g.graph["state"][name] = TensorSpec(shape)
        return name

    def op(self, op: str, name: str, inputs: list[str], outputs: dict[str, TensorSpec],
           weights: dict[str, str] | None = None, attrs: dict[str, Any] | None = None,
           scratch: dict[str, Shape] | None = None, flops: int = 0) -> list[str]:
        if name in self.g:
            raise ValueError(f"duplicate op name {name}")
        weights = weights or {}
        wb = sum(4 * _prod(self.g.graph["weight_shapes"][w]) for w in weights.values()
                 if w in self.g.graph["weight_shapes"])
        self.g.add_node(name, op=op, unit=self.unit, order=self.g.number_of_nodes(), inputs=list(inputs),
                        outputs=list(outputs), weights=weights, attrs=attrs or {}, scratch=scratch or {},
                        flops=flops, weight_bytes=wb)
        for t in inputs:
            src = self.producer.get(t)
            if src is not None:
                spec = self.g.graph["tensors"][t]
                self.g.add_edge(src, name, tensor=t, shape=spec.shape, dtype=spec.dtype)
        for t, spec in outputs.items():
            self.g.graph["tensors"][t] = spec
            self.producer[t] = name
        return list(outputs)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def ops_in_order(g: nx.DiGraph) -> list[str]:
    return sorted(g.nodes, key=lambda n: g.nodes[n]["order"])


def build_ir(src: ModelSource) -> nx.DiGraph:
    """ModelSource -> IR. The op sequence per family follows the reference implementations."""
    c = src.config
    shapes = {k: tuple(v.shape) for k, v in src.weights.items()}
    b = GraphBuilder(src.name, c, shapes)
    d, hd, H, Hkv, F = c.hidden_size, c.head_dim, c.n_heads, c.n_kv_heads, c.intermediate_size
    f32 = TensorSpec
    has = shapes.__contains__

    def linear(name: str, x: str, w: str, out: str, n_out: int, n_in: int) -> str:
        weights = {"weight": f"{w}.weight"}
        if has(f"{w}.bias"):
            weights["bias"] = f"{w}.bias"
        return b.op("linear", name, [x], {out: f32(("T", n_out))}, weights, flops=2 * n_in * n_out)[0]

    def norm(name: str, x: str, w: str, out: str) -> str:
        if c.family == "llama":
            return b.op("rmsnorm", name, [x], {out: f32(("T", d))}, {"weight": f"{w}.weight"},
                        {"eps": c.norm_eps}, flops=4 * d)[0]
        return b.op("layernorm", name, [x], {out: f32(("T", d))}, {"weight": f"{w}.weight", "bias": f"{w}.bias"},
                    {"eps": c.norm_eps}, flops=8 * d)[0]

    decoder = c.kind == "decoder"
    ids = b.input("ids", ("T",), "int64")
    pos = b.input("positions", ("T",), "int64")
    b.begin_unit("embed")
    ew = {"tok": "tok_embed.weight"}
    if has("pos_embed.weight"):
        ew["pos"] = "pos_embed.weight"
    ins = [ids, pos]
    if c.family == "bert":
        ins.append(b.input("type_ids", ("T",), "int64"))
        b.input("mask", ("B", "S"), "int64")
        ew["type"] = "type_embed.weight"
    x = b.op("embed", "embed", ins, {"x.embed": f32(("T", d))}, ew, {"gather": sorted(ew)}, flops=d * len(ew))[0]
    if c.family == "bert":
        x = norm("embed_norm", x, "embed_norm", "x.embed_norm")
    rope = None
    if c.family == "llama":
        rope = {"theta": c.rope_theta, "scaling": c.rope_scaling}
    scale = 1.0 / (hd ** 0.5)
    for i in range(c.n_layers):
        b.begin_unit(f"layer.{i}")
        L, p = f"layers.{i}", f"l{i}."
        h = x if c.family == "bert" else norm(f"{L}.attn_norm", x, f"{L}.attn_norm", p + "h_attn")
        q = linear(f"{L}.attn.q", h, f"{L}.attn.q", p + "q", H * hd, d)
        k = linear(f"{L}.attn.k", h, f"{L}.attn.k", p + "k", Hkv * hd, d)
        v = linear(f"{L}.attn.v", h, f"{L}.attn.v", p + "v", Hkv * hd, d)
        attrs = {"layer": i, "n_heads": H, "n_kv_heads": Hkv, "head_dim": hd, "scale": scale, "rope": rope}
        if decoder:
            kc = b.state(f"kv.{i}.k", (Hkv, "C", hd))
            vc = b.state(f"kv.{i}.v", (Hkv, "C", hd))
            a = b.op("attention", f"{L}.attn", [q, k, v, kc, vc, pos], {p + "attn": f32(("T", H * hd))}, attrs=attrs,
                     scratch={p + "attn.scratch": (H, "C")}, flops=4 * H * hd * 256)[0]
        else:
            a = b.op("attention_bidir", f"{L}.attn", [q, k, v, "mask"], {p + "attn": f32(("T", H * hd))},
                     attrs=attrs, scratch={p + "attn.scratch": ("T", H)}, flops=4 * H * hd * 128)[0]
        o = linear(f"{L}.attn.o", a, f"{L}.attn.o", p + "attn_out", d, H * hd)
        x = b.op("add", f"{L}.attn_residual", [x, o], {p + "x_attn": f32(("T", d))}, flops=d)[0]
        if c.family == "bert":
            x = norm(f"{L}.attn_norm", x, f"{L}.attn_norm", p + "x_attn_norm")
            h = x
        else:
            h = norm(f"{L}.mlp_norm", x, f"{L}.mlp_norm", p + "h_mlp")
        if c.family == "llama":
            g_ = linear(f"{L}.mlp.gate", h, f"{L}.mlp.gate", p + "gate", F, d)
            u = linear(f"{L}.mlp.up", h, f"{L}.mlp.up", p + "up", F, d)
            m = b.op("silu_mul", f"{L}.mlp.act", [g_, u], {p + "act": f32(("T", F))}, flops=5 * F)[0]
        else:
            u = linear(f"{L}.mlp.up", h, f"{L}.mlp.up", p + "up", F, d)
            m = b.op(c.activation, f"{L}.mlp.act", [u], {p + "act": f32(("T", F))}, flops=8 * F)[0]
        dn = linear(f"{L}.mlp.down", m, f"{L}.mlp.down", p + "down", d, F)
        x = b.op("add", f"{L}.mlp_residual", [x, dn], {p + "x_mlp": f32(("T", d))}, flops=d)[0]
        if c.family == "bert":
            x = norm(f"{L}.mlp_norm", x, f"{L}.mlp_norm", p + "x_mlp_norm")
    if decoder:
        b.begin_unit("head")
        xf = norm("final_norm", x, "final_norm", "x.final")
        head = "lm_head.weight" if has("lm_head.weight") else "tok_embed.weight"
        out = b.op("lm_head", "lm_head", [xf], {"logits": f32((1, c.vocab_size))}, {"weight": head},
                   {"rows": [0, c.vocab_size]}, flops=2 * d * c.vocab_size)[0]
    else:
        b.begin_unit("pool")
        out = b.op("mean_pool_l2", "pool", [x, "mask"], {"embeddings": f32(("B", d))}, flops=2 * d)[0]
    b.g.graph["outputs"].append(out)
    infer_shapes(b.g)
    return b.g


# ---- shape inference --------------------------------------------------------------------------------

def _w(g: nx.DiGraph, node: str, role: str) -> tuple[int, ...]:
    name = g.nodes[node]["weights"].get(role)
    shapes = g.graph["weight_shapes"]
    if name is None:
        raise UserError(f"op '{node}': needs a '{role}' weight")
    if name not in shapes:
        raise UserError(f"op '{node}': weight '{name}' does not exist in the model; the checkpoint is incomplete")
    return shapes[name]


def _expect(cond: bool, node: str, msg: str) -> None:
    if not cond:
        raise UserError(f"op '{node}': {msg}")


def infer_op(g: nx.DiGraph, node: str, ins: list[TensorSpec]) -> list[TensorSpec]:
    """Output specs of one op from its input specs and weights (raises on any disagreement)."""
    n = g.nodes[node]
    op, a = n["op"], n["attrs"]

    def width(s: TensorSpec) -> Any:
        return s.shape[-1]

    if op == "embed":
        tok = _w(g, node, "tok")
        _expect(all(s.dtype == "int64" and len(s.shape) == 1 for s in ins), node, "ids must be int64 [T]")
        for role in ("pos", "type"):
            if role in n["weights"]:
                _expect(_w(g, node, role)[1] == tok[1], node,
                        f"{role} embedding width {_w(g, node, role)[1]} != token embedding width {tok[1]}")
        return [TensorSpec((ins[0].shape[0], tok[1]))]
    if op in ("layernorm", "rmsnorm"):
        w = _w(g, node, "weight")
        _expect(w == (width(ins[0]),), node, f"norm weight shape {list(w)} does not match input width {width(ins[0])}")
        if op == "layernorm":
            _expect(_w(g, node, "bias") == w, node, "norm bias shape differs from its weight")
        return [ins[0]]
    if op in ("linear", "lm_head"):
        w = _w(g, node, "weight")
        _expect(len(w) == 2 and w[1] == width(ins[0]), node,
                f"weight {n['weights']['weight']} is {list(w)}; expected [*, {width(ins[0])}] for input "
                f"{list(ins[0].shape)}")
        if "bias" in n["weights"]:
            _expect(_w(g, node, "bias") == (w[0],), node, f"bias shape {list(_w(g, node, 'bias'))} != [{w[0]}]")
        if op == "lm_head":
            return [TensorSpec((1, w[0]))]
        return [TensorSpec((ins[0].shape[0], w[0]))]
    if op in ("attention", "attention_bidir"):
        H, Hkv, hd = a["n_heads"], a["n_kv_heads"], a["head_dim"]
        _expect(H % Hkv == 0, node, f"{H} heads are not a multiple of {Hkv} kv heads")
        q, k, v = ins[:3]
        _expect(width(q) == H * hd, node, f"q width {width(q)} != heads*head_dim {H * hd}")
        _expect(width(k) == Hkv * hd and width(v) == Hkv * hd, node,
                f"k/v width {width(k)}/{width(v)} != kv_heads*head_dim {Hkv * hd}")
        return [TensorSpec((q.shape[0], H * hd))]
    if op in ("add", "silu_mul"):
        _expect(ins[0].shape == ins[1].shape, node, f"operand shapes {list(ins[0].shape)} and "
                f"{list(ins[1].shape)} differ")
        return [ins[0]]
    if op in ("gelu_tanh", "gelu_erf"):
        return [ins[0]]
    if op == "mean_pool_l2":
        return [TensorSpec(("B", width(ins[0])))]
    raise UserError(f"op '{node}': unknown op type '{op}'")


def infer_shapes(g: nx.DiGraph) -> None:
    """Recompute every activation's spec from the graph inputs and check it against the recorded one."""
    tensors: dict[str, TensorSpec] = g.graph["tensors"]
    known = {t: tensors[t] for t in g.graph["inputs"]}
    known.update(g.graph["state"])
    for node in ops_in_order(g):
        n = g.nodes[node]
        ins = []
        for t in n["inputs"]:
            if t not in known:
                raise UserError(f"op '{node}': input tensor '{t}' is not produced by any earlier op nor a graph "
                                "input")
            ins.append(known[t])
        outs = infer_op(g, node, ins)
        for t, spec in zip(n["outputs"], outs):
            rec = tensors.get(t)
            if rec is not None and rec != spec:
                raise UserError(f"op '{node}': output '{t}' is recorded as {list(rec.shape)} {rec.dtype} but "
                                f"infers to {list(spec.shape)} {spec.dtype}")
            known[t] = spec
