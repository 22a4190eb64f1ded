"""The graph IR: one `networkx.DiGraph` for every frontend (HF, GGUF, synthetic, ONNX), built through one
`GraphBuilder` and rewritten by the passes in `passes/`.

Nodes are ops of the executor's registry (`edge_rt_exec.ops`), keyed by a unique op name:

| node attribute | meaning |
|---|---|
| `op` | registry name ("Linear", "Gather", "CausalAttention", ...; ONNX's own "Constant" until `passes.fold`) |
| `inputs` | positional: a tensor name, `"@" + weight name` (`WEIGHT_REF`), or `""` for an absent input |
| `outputs` | positional: tensor names, `""` for an absent optional output |
| `attrs` | JSON-valued attributes (the registry's defaults are not filled in) |
| `unit` | index into `graph["units"]` (-1 until `passes.segments` for graphs without units of their own) |
| `order` | position in the execution order |
| `scratch`, `flops` | set by `passes.dims`: op-local scratch buffer names; FLOPs per token row |

Edges run from the producer of a tensor to each of its consumers (`tensor` attribute); a pass that rewires ops
calls `relink` to bring them in line.

Graph attributes:

| key | meaning |
|---|---|
| `name`, `family`, `kind` | model name; "llama" / "gpt2" / "bert" / "qwen2" / "onnx"; "decoder" / "encoder" / "graph" |
| `config` | the family's config as a dict ({} for ONNX graphs) |
| `inputs` | `[{name, dtype, dims}]`, dims ints or symbol names |
| `outputs` | graph output tensor names |
| `io`, `kv` | roles -> tensor (ids, positions, type_ids, mask, logits, embeddings); `{mode, pairs}` |
| `symbols` | symbol -> class (tokens, context, batch, seq, past, total, other), for `passes.dims.plan_dims` |
| `state` | persistent tensors (KV caches): name -> `TensorSpec` (symbolic dims allowed) |
| `constants` | name -> `Data`: small values (initializers, folded results); inline in the plan after `classify` |
| `weights` | name -> `Weight` (logical shape, data, storage format set by `passes.quantize`) |
| `units` | unit names ("embed", "layer.0", ..., "head"; "segment.N" for ONNX graphs) |
| `hints` | what the frontend knows before shapes are bound: `dtypes`, `static` shapes, `assumed_static` |
| `tensors`, `dims` | set by `passes.dims`: every buffer's planned `TensorSpec` (largest over the bindings); `Dims` |
| `notes` | one-line facts passes report (format choices, repacks) for the compile output |
"""

from __future__ import annotations

import bisect
import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from edge_rt_exec import formats
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import WEIGHT_REF

Shape = tuple[Any, ...]  #: ints, or symbol names before `passes.dims` binds them


@functools.cache
def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize  # (np.dtype() costs a microsecond; specs are sized 100k times per compile)


@dataclass(frozen=True)
class TensorSpec:
    shape: Shape
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        """Bytes of a concrete spec (Python ints: never wraps)."""
        n = _itemsize(self.dtype)
        for d in self.shape:
            n *= int(d)
        return n


@dataclass
class Data:
    """A tensor known by shape and dtype before it is read: a weight, an initializer, a folded value.

    `load()` gives the values (float32 for weights, whatever the source stored); GGUF tensors also carry
    `ggml` (the file's GGML type) and `load_raw()`, their stored rows (unpermuted where needed) in that type's
    own bytes, so a tensor kept in its format is copied without ever being dequantized."""

    shape: tuple[int, ...]
    dtype: str
    loader: Callable[[], np.ndarray]
    source: str  #: where it comes from, for messages (file and original name)
    ggml: str | None = None
    raw_loader: Callable[[], np.ndarray] | None = None
    _value: np.ndarray | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def load(self) -> np.ndarray:
        if self._value is not None:
            return self._value
        a = np.asarray(self.loader())
        if tuple(a.shape) != tuple(self.shape):
            raise UserError(f"{self.source}: holds shape {list(a.shape)} but declares {list(self.shape)}")
        a = np.ascontiguousarray(a, dtype=np.dtype(self.dtype))
        if self.numel <= 1 << 16:  # small values (shape vectors, folded constants) are read again and again
            self._value = a
        return a

    def load_raw(self) -> np.ndarray:
        assert self.raw_loader is not None, f"{self.source} has no stored rows"
        return self.raw_loader()


def value(v: np.ndarray, source: str) -> Data:
    """A `Data` holding an array already in memory."""
    a = np.array(v, order="C")  # (np.ascontiguousarray would make a 0-d value 1-d)
    return Data(tuple(int(d) for d in a.shape), a.dtype.name, lambda: a, source, _value=a)


@dataclass
class Weight:
    """A tensor of the weights file: its logical shape, its data and the format it is stored in."""

    data: Data
    format: str = "f32"  #: a key of `edge_rt_exec.formats.FORMATS`; decided by `passes.quantize`

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return formats.get(self.format).nbytes(self.shape)

    def stored(self) -> np.ndarray:
        """The array whose bytes go into the weights file: the source's own rows when they already are in
        `format`, else the float32 values packed by `formats.<format>.quantize`."""
        f = formats.get(self.format)
        if self.data.ggml is not None and formats.NATIVE_GGML.get(self.data.ggml) == self.format:
            return np.ascontiguousarray(self.data.load_raw())
        return f.quantize(np.asarray(self.data.load(), dtype=np.float32))

    def dequantized(self) -> np.ndarray:
        """float32 values as the executor sees them (the format's numpy twin)."""
        f = formats.get(self.format)
        return f.dequantize(self.stored(), self.shape)


def is_row_gather(op: str, attrs: dict[str, Any], pos: int, rank: int) -> bool:
    """An op input that is read row by row and never loaded whole: the table of an axis-0 Gather (embedding
    lookups; in streamed plans the rows are read from the weights file)."""
    axis = int(attrs.get("axis", 0))
    return op == "Gather" and pos == 0 and (axis == 0 or axis == -rank)


def is_weight(name: str) -> bool:
    """An op input that names a weight ("@name")."""
    return name.startswith(WEIGHT_REF)


def weight_name(ref: str) -> str:
    """The weight an "@name" input names."""
    return ref[len(WEIGHT_REF):]


def new_graph(name: str, family: str, kind: str, config: dict[str, Any] | None = None) -> nx.DiGraph:
    """An empty IR with every graph attribute listed above."""
    return nx.DiGraph(name=name, family=family, kind=kind, config=dict(config or {}), inputs=[], outputs=[],
                      io={}, kv={"mode": "none", "pairs": []}, symbols={}, state={}, constants={}, weights={},
                      units=[], hints={"dtypes": {}, "static": {}, "assumed_static": {}}, notes=[])


class GraphBuilder:
    """Appends ops in execution order. Every frontend builds its graph through this."""

    def __init__(self, name: str, family: str, kind: str, config: dict[str, Any] | None = None):
        self.g = new_graph(name, family, kind, config)
        self.unit = -1

    # ---- the interface ----------------------------------------------------------------------------------
    def input(self, name: str, dtype: str, dims: list[int | str], role: str | None = None) -> str:
        self.g.graph["inputs"].append({"name": name, "dtype": dtype, "dims": list(dims)})
        self.g.graph["hints"]["dtypes"][name] = dtype
        if all(isinstance(d, int) for d in dims):
            self.g.graph["hints"]["static"][name] = tuple(int(d) for d in dims)
        if role:
            self.g.graph["io"][role] = name
        return name

    def output(self, name: str, role: str | None = None) -> str:
        self.g.graph["outputs"].append(name)
        if role:
            self.g.graph["io"][role] = name
        return name

    def symbols(self, classes: dict[str, str]) -> None:
        self.g.graph["symbols"].update(classes)

    def state(self, name: str, shape: Shape, dtype: str = "float32") -> str:
        self.g.graph["state"][name] = TensorSpec(tuple(shape), dtype)
        return name

    def constant(self, name: str, data: Data) -> str:
        self.g.graph["constants"][name] = data
        self.g.graph["hints"]["dtypes"][name] = data.dtype
        self.g.graph["hints"]["static"][name] = data.shape
        return name

    def weight(self, name: str, data: Data) -> str:
        """Register a weight; returns its reference for op inputs ("@name")."""
        self.g.graph["weights"][name] = Weight(data)
        return WEIGHT_REF + name

    def begin_unit(self, name: str) -> None:
        self.g.graph["units"].append(name)
        self.unit = len(self.g.graph["units"]) - 1

    def op(self, op: str, name: str, inputs: list[str], outputs: list[str],
           attrs: dict[str, Any] | None = None) -> str:
        """Append one op; returns its first output."""
        add_op(self.g, name, op, inputs, outputs, attrs or {}, self.unit, self.g.number_of_nodes())
        return outputs[0]

    def finish(self) -> nx.DiGraph:
        relink(self.g)
        return self.g


# ---- graph helpers (every pass uses these) -------------------------------------------------------------------

def add_op(g: nx.DiGraph, name: str, op: str, inputs: list[str], outputs: list[str], attrs: dict[str, Any],
           unit: int = -1, order: float = 0) -> None:
    """One op node (names are unique in a graph)."""
    if name in g:
        raise UserError(f"model graph '{g.graph['name']}': two ops are named '{name}'")
    g.add_node(name, op=op, inputs=list(inputs), outputs=list(outputs), attrs=dict(attrs), unit=unit, order=order)


def nodes_in_order(g: nx.DiGraph) -> list[tuple[str, dict[str, Any]]]:
    """(op name, its attribute dict) in execution order. Loops over every op take the dict from here: a
    `g.nodes[n]` look-up costs more than the work most passes do per op."""
    return sorted(g.nodes(data=True), key=_order)


def _order(item: tuple[str, dict[str, Any]]) -> float:
    return item[1]["order"]


def ops_in_order(g: nx.DiGraph) -> list[str]:
    """Op names in execution order."""
    return [n for n, _ in nodes_in_order(g)]


def producers(g: nx.DiGraph) -> dict[str, str]:
    """tensor -> the op that writes it."""
    return {t: n for n, node in g.nodes(data=True) for t in node["outputs"] if t}


def consumers(g: nx.DiGraph) -> dict[str, list[str]]:
    """tensor (or "@weight") -> the ops that read it, in execution order."""
    cons: dict[str, list[str]] = defaultdict(list)
    for n, node in nodes_in_order(g):
        for t in node["inputs"]:
            if t:
                cons[t].append(n)
    return cons


def replace_ops(g: nx.DiGraph, region: Iterable[str], name: str, op: str, inputs: list[str], outputs: list[str],
                attrs: dict[str, Any], prod: dict[str, str] | None = None,
                cons: dict[str, list[str]] | None = None) -> None:
    """Replace the ops of `region` by one op placed where the first of them was. `prod` and `cons` (maps made by
    `producers` and `consumers`), when given, are brought up to date: `.get` on them answers what the functions
    would now return (a fusion pass then costs O(region), not O(graph), per fusion)."""
    region = list(region)
    order = min(g.nodes[n]["order"] for n in region)
    unit = g.nodes[region[0]]["unit"]
    track = prod is not None and cons is not None
    state = g.graph["state"]
    # A tensor several ops write (a KV cache) has its last writer in `prod`: rebuild both maps then.
    rebuild = track and any(t in state for n in region for t in g.nodes[n]["outputs"])
    if track and not rebuild:
        for n in region:
            node = g.nodes[n]
            for t in node["outputs"]:
                if t and prod.get(t) == n:
                    del prod[t]
            for t in node["inputs"]:
                if t:
                    cons[t].remove(n)  # (once per position: `consumers` lists an op once per input reading t)
    g.remove_nodes_from(region)
    add_op(g, name, op, inputs, outputs, attrs, unit, order)
    if rebuild:
        prod.clear()
        prod.update(producers(g))
        cons.clear()
        cons.update(consumers(g))
    elif track:
        for t in outputs:
            if t:
                prod[t] = name
        for t in inputs:
            if t:
                bisect.insort(cons.setdefault(t, []), name, key=lambda c: g.nodes[c]["order"])


def renumber(g: nx.DiGraph) -> nx.DiGraph:
    """Orders 0..n-1 in the current execution order (the edges do not depend on it: every pass that rewires
    ops relinks them itself; tests/test_ir_edges.py checks that they are right after the passes)."""
    for i, (_, node) in enumerate(nodes_in_order(g)):
        node["order"] = i
    return g


def relink(g: nx.DiGraph) -> None:
    """Bring the tensor edges in line with the ops' inputs and outputs (one edge per producer and consumer; its
    `tensor` is the consumer's last input from that producer). Only the edges that differ are touched: most
    passes change few of them, and rebuilding every edge of a 100k-op graph cost a second each time."""
    prod = producers(g)
    want: dict[tuple[str, str], str] = {}
    for n, node in g.nodes(data=True):
        for t in node["inputs"]:
            src = prod.get(t)
            if src is not None and src != n:
                want[(src, n)] = t
    have = {(u, v): t for u, v, t in g.edges(data="tensor")}
    if have == want:
        return
    g.remove_edges_from([e for e in have if e not in want])
    g.add_edges_from((u, v, {"tensor": t}) for (u, v), t in want.items() if have.get((u, v)) != t)


def weight_users(g: nx.DiGraph) -> dict[str, list[tuple[str, int]]]:
    """weight name -> [(op, input position)] in execution order."""
    users: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for n, node in nodes_in_order(g):
        for i, t in enumerate(node["inputs"]):
            if is_weight(t):
                users[weight_name(t)].append((n, i))
    return users


def gather_only(g: nx.DiGraph, users: dict[str, list[tuple[str, int]]] | None = None) -> set[str]:
    """Weights only row gathers read (never loaded into a slot); `users`: `weight_users(g)` if the caller has it."""
    out = set()
    nodes = g.nodes
    for w, uses in (users if users is not None else weight_users(g)).items():
        rank = len(g.graph["weights"][w].shape)
        if all(is_row_gather(nodes[n]["op"], nodes[n]["attrs"], i, rank) for n, i in uses):
            out.add(w)
    return out
