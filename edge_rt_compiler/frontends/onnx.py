"""ONNX frontend: an `.onnx` file -> `OnnxSource` (a `ModelSource` carrying a checked, folded op graph).

Reading follows the binary-reader pattern (STYLE.md #9): the protobuf is parsed without external data; every
external-data reference is checked (inside the model's folder, inside its file, the right length) before any
tensor byte is read, and tensors are read lazily through one bounded helper. Then:

1. structure: opset >= 13, every node input produced by a node, a graph input or an initializer, acyclic
   (a topological order is computed, so unsorted files are accepted), every op type supported;
2. `onnx.shape_inference` (with data propagation) gives dtypes and which dims are static;
3. `onnx_passes`: constant folding (Shape -> Gather -> Concat chains over static dims included), fusions
   (MatMul+Add -> linear, GELU), dead-code removal, and the split of constants into weights (float32 tensors
   in the weights file) and small inline constants (shape vectors, scalars).

Symbolic dims stay symbolic here; `onnx_ir` binds them to the plan's maximum.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_rt_exec.errors import UserError
from edge_rt_exec.onnx_ops import SUPPORTED
from edge_rt_exec.onnx_shapes import ONNX_DTYPE_NAMES, ONNX_DTYPES

from .base import ModelSource, TransformerConfig

MIN_OPSET = 13
#: Op types the frontend removes itself (never reach the executor).
COMPILE_ONLY = frozenset({"Constant"})
SUPPORTED_OPS = frozenset(SUPPORTED - {"linear"}) | COMPILE_ONLY


@dataclass
class ONode:
    name: str
    op: str
    inputs: list[str]  #: "" for an absent optional input
    outputs: list[str]  #: "" for an absent optional output
    attrs: dict[str, Any]


@dataclass
class LazyTensor:
    """A constant known by shape and dtype before it is read."""

    shape: tuple[int, ...]
    dtype: str
    loader: Any  #: () -> np.ndarray
    source: str
    _value: np.ndarray | None = None

    def load(self) -> np.ndarray:
        if self._value is None:
            a = np.asarray(self.loader())
            if tuple(a.shape) != self.shape:
                raise UserError(f"{self.source}: holds shape {list(a.shape)} but declares {list(self.shape)}")
            self._value = a.astype(np.dtype(self.dtype), copy=False)
        return self._value

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


@dataclass
class OnnxGraph:
    """A checked ONNX graph in topological order, in the frontend's own terms."""

    path: Path
    opset: int
    nodes: list[ONode]
    inputs: list[tuple[str, str, list[int | str]]]  #: (name, dtype, dims: ints or symbol names)
    outputs: list[tuple[str, str]]  #: (name, dtype)
    consts: dict[str, LazyTensor]  #: initializers and folded values
    dtypes: dict[str, str] = field(default_factory=dict)  #: every tensor's dtype (shape inference)
    static: dict[str, tuple[int, ...]] = field(default_factory=dict)  #: tensors whose shape is fully static
    weights: set[str] = field(default_factory=set)  #: consts placed in the weights file (set by the passes)
    #: shapes that constant folding relied on (Shape of a static tensor); onnx_ir checks them at every binding
    assumed_static: dict[str, tuple[int, ...]] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)  #: tensors the file's nodes read (before any pass)
    unused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OnnxConfig(TransformerConfig):
    """The config of a graph model: no transformer fields, the graph's role instead."""

    graph_kind: str = "graph"  #: "graph" | "decoder" (see onnx_ir.decoder_io)

    @property
    def kind(self) -> str:
        return self.graph_kind


@dataclass
class OnnxSource(ModelSource):
    graph: OnnxGraph | None = None


# ---- reading ---------------------------------------------------------------------------------------------------

def _bounded_reader(path: Path, offset: int, length: int, where: str):  # noqa: ANN202
    def read() -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise UserError(f"{path}: {where} needs bytes [{offset}, {offset + length}) but the file ended at "
                            f"{offset + len(data)}; the external data file is truncated")
        return data
    return read


def _external(model_dir: Path, tensor: Any, where: str, path: Path) -> tuple[Path, int, int]:
    info = {e.key: e.value for e in tensor.external_data}
    loc = info.get("location", "")
    if not loc:
        raise UserError(f"{path}: {where} has external data without a location; re-export the model")
    rel = Path(loc)
    full = (model_dir / rel).resolve()
    root = model_dir.resolve()
    if rel.is_absolute() or not full.is_relative_to(root):
        raise UserError(f"{path}: {where} points at external data '{loc}', outside the model's folder {root}; "
                        "refused (keep external data files beside the .onnx file)")
    if not full.is_file():
        raise UserError(f"{path}: {where} needs external data file '{loc}', which does not exist beside the model")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else full.stat().st_size - offset
    except ValueError:
        raise UserError(f"{path}: {where} has a malformed external-data offset/length") from None
    size = full.stat().st_size
    if offset < 0 or length < 0 or offset + length > size:
        raise UserError(f"{path}: {where} reads [{offset}, {offset + length}) of '{loc}', which has {size} bytes; "
                        "the external data file is truncated or does not belong to this model")
    return full, offset, length


def _dtype(elem: int, where: str) -> str:
    d = ONNX_DTYPES.get(elem)
    if d is None:
        name = ONNX_DTYPE_NAMES.get(elem, str(elem))
        raise UserError(f"{where} has element type {name}, which edge-rt does not run (supported: "
                        f"{', '.join(sorted(set(ONNX_DTYPES.values())))}); convert the model to float32")
    return d


def _initializer(t: Any, model_dir: Path, path: Path) -> LazyTensor:
    from onnx import numpy_helper

    where = f"initializer '{t.name}'"
    dtype = _dtype(t.data_type, f"{path}: {where}")
    shape = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in shape):
        raise UserError(f"{path}: {where} has negative dims {list(shape)}")
    n = 1
    for d in shape:
        n *= d
    if t.data_location == 1:  # EXTERNAL
        full, offset, length = _external(model_dir, t, where, path)
        need = n * np.dtype(dtype).itemsize
        if dtype == "bool":
            need = n
        if length != need:
            raise UserError(f"{path}: {where} {list(shape)} {dtype} needs {need} bytes but its external data has "
                            f"{length}")
        read = _bounded_reader(full, offset, length, where)
        return LazyTensor(shape, dtype, lambda: np.frombuffer(read(), dtype=np.dtype(dtype).newbyteorder("<"))
                          .reshape(shape), f"{path}: {where}")

    def load() -> np.ndarray:
        try:
            return numpy_helper.to_array(t)
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: {where} data does not match its shape {list(shape)} ({e}); the file is "
                            "corrupt") from None
    return LazyTensor(shape, dtype, load, f"{path}: {where}")


def _attrs(node: Any, path: Path, name: str) -> dict[str, Any]:
    from onnx import AttributeProto, helper, numpy_helper

    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            out[a.name] = "<subgraph>"  # control flow: reported as an unsupported op type
            continue
        if a.type == AttributeProto.TENSOR:
            _dtype(a.t.data_type, f"{path}: node '{name}' attribute '{a.name}'")
            out[a.name] = numpy_helper.to_array(a.t)
            continue
        if a.type == AttributeProto.SPARSE_TENSOR:
            out[a.name] = "<sparse>"
            continue
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, list):
            v = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in v]
        out[a.name] = v
    return out


def _dims(vi: Any) -> tuple[str, list[int | str]] | None:
    t = vi.type
    if not t.HasField("tensor_type"):
        return None
    dims: list[int | str] = []
    for i, d in enumerate(t.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(str(d.dim_param))
        else:
            dims.append(f"{vi.name}:{i}")
    return str(t.tensor_type.elem_type), dims


def topo_order(nodes: list[ONode], available: set[str], path: Path) -> list[ONode]:
    """Kahn's algorithm, stable (file order among ready nodes); a cycle is reported by its nodes."""
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.outputs:
            if not t:
                continue
            if t in producer or t in available:
                raise UserError(f"{path}: tensor '{t}' is produced twice (node '{n.name}'); ONNX graphs are SSA")
            producer[t] = i
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        d = set()
        for t in n.inputs:
            if not t or t in available:
                continue
            if t not in producer:
                raise UserError(f"{path}: node '{n.name}' ({n.op}) reads '{t}', which no node produces and which is "
                                "neither a graph input nor an initializer (a dangling input or a missing "
                                "initializer); re-export the model")
            d.add(producer[t])
        deps.append(d)
        for j in d:
            users[j].append(i)
    import heapq

    indeg = [len(d) for d in deps]
    ready = [i for i, k in enumerate(indeg) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        stuck = {i for i in range(len(nodes)) if indeg[i] > 0}
        # Walk back along unresolved dependencies until a node repeats: that is a cycle.
        cur = min(stuck)
        seen: list[int] = []
        while cur not in seen:
            seen.append(cur)
            cur = min(j for j in deps[cur] if j in stuck)
        cyc = seen[seen.index(cur):] + [cur]
        names = " -> ".join(nodes[i].name for i in reversed(cyc))
        raise UserError(f"{path}: the graph has a cycle ({names}); ONNX graphs must be acyclic, re-export the model")
    return [nodes[i] for i in order]


def check_supported(nodes: list[ONode], path: Path) -> None:
    bad: Counter[str] = Counter()
    first: dict[str, str] = {}
    for n in nodes:
        key = n.op
        special = any(isinstance(v, str) and v in ("<subgraph>", "<sparse>") for v in n.attrs.values())
        if key not in SUPPORTED_OPS or special:
            bad[key] += 1
            first.setdefault(key, n.name)
    if bad:
        parts = ", ".join(f"{op} ({k} node{'s' if k > 1 else ''}, first '{first[op]}')"
                          for op, k in sorted(bad.items()))
        raise UserError(f"{path}: {sum(bad.values())} node(s) of op types edge-rt does not support: {parts}; "
                        f"supported: {', '.join(sorted(SUPPORTED_OPS))}")


def _check_opset(opset: int, nodes: list[ONode], path: Path) -> None:
    """Opset 13 or later; an older model is accepted when every op it uses means the same at opset 13."""
    if opset >= MIN_OPSET:
        return
    import onnx

    changed = []
    for op in sorted({n.op for n in nodes}):
        try:
            same = onnx.defs.get_schema(op, max(opset, 1)).since_version == \
                onnx.defs.get_schema(op, MIN_OPSET).since_version
        except onnx.defs.SchemaError:
            same = False
        if not same:
            changed.append(op)
    if opset == 0 or changed:
        raise UserError(f"{path}: opset {opset or 'none'} is older than {MIN_OPSET}"
                        f"{' and ' + ', '.join(changed) + ' changed since' if changed else ''}; convert it with "
                        "onnx.version_converter.convert_version(model, 17) or re-export with opset_version>=13")


def read_graph(path: Path) -> OnnxGraph:
    """Parse and check the file (no weights read)."""
    import onnx
    from google.protobuf.message import DecodeError

    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: empty file; expected an ONNX model")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise UserError(f"{path}: not a readable ONNX model ({msg}); the file is truncated or corrupt") from None
    g = model.graph
    if not g.node and not g.output:
        raise UserError(f"{path}: the ONNX model has no graph (no nodes, no outputs); the file is truncated or "
                        "corrupt")
    opset = 0
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            opset = int(o.version)
    model_dir = path.parent
    consts = {t.name: _initializer(t, model_dir, path) for t in g.initializer}
    nodes: list[ONode] = []
    used_names: Counter[str] = Counter()
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        used_names[name] += 1
        if used_names[name] > 1:
            name = f"{name}#{used_names[name] - 1}"
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        nodes.append(ONode(name, op, list(n.input), list(n.output), _attrs(n, path, name)))
    _check_opset(opset, nodes, path)
    inputs: list[tuple[str, str, list[int | str]]] = []
    for vi in g.input:
        if vi.name in consts:
            continue  # old exporters list initializers as inputs too
        d = _dims(vi)
        if d is None:
            raise UserError(f"{path}: graph input '{vi.name}' is not a tensor (sequence/map/optional inputs are not "
                            "supported)")
        inputs.append((vi.name, _dtype(int(d[0]), f"{path}: graph input '{vi.name}'"), d[1]))
    available = {i[0] for i in inputs} | set(consts)
    check_supported(nodes, path)
    nodes = topo_order(nodes, available, path)
    produced = {t for n in nodes for t in n.outputs if t} | available
    outputs = []
    for vo in g.output:
        if vo.name not in produced:
            raise UserError(f"{path}: graph output '{vo.name}' is not produced by any node; re-export the model")
        d = _dims(vo)
        outputs.append((vo.name, _dtype(int(d[0]), f"{path}: graph output '{vo.name}'") if d and d[0] != "0" else ""))
    if not outputs:
        raise UserError(f"{path}: the graph has no outputs")
    og = OnnxGraph(path, opset, nodes, inputs, outputs, consts)
    og.referenced = {t for n in nodes for t in n.inputs if t}
    _shape_inference(model, og)
    return og


def _shape_inference(model: Any, og: OnnxGraph) -> None:
    """dtypes of every value and the fully static shapes (onnx.shape_inference with data propagation)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        infos = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    except Exception:  # noqa: BLE001 - inference is advisory; our own pass in onnx_ir is authoritative
        infos = list(model.graph.output) + list(model.graph.input)
    for vi in infos:
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.elem_type in ONNX_DTYPES:
            og.dtypes[vi.name] = ONNX_DTYPES[tt.elem_type]
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            og.static[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    for name, c in og.consts.items():
        og.dtypes[name] = c.dtype
        og.static[name] = c.shape
    for name, dt, dims in og.inputs:
        og.dtypes[name] = dt
        if all(isinstance(d, int) for d in dims):
            og.static[name] = tuple(int(d) for d in dims)


def load_onnx(path: Path) -> OnnxSource:
    """An .onnx file -> OnnxSource with the weights the graph keeps after folding and fusion."""
    from ..onnx_passes import optimize

    path = Path(path)
    og = read_graph(path)
    optimize(og)
    weights = {}
    from .base import WeightRef

    for name in og.weights:
        c = og.consts[name]
        weights[name] = WeightRef(c.shape, c.load, c.source)
    st = path.stat()
    key = hashlib.sha256(f"onnx:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    from ..onnx_ir import decoder_io

    cfg = OnnxConfig(family="onnx", vocab_size=0, hidden_size=0, n_layers=0, n_heads=1, n_kv_heads=1, head_dim=0,
                     intermediate_size=0, max_position=1 << 30, norm_eps=0.0,
                     graph_kind="decoder" if decoder_io(og) is not None else "graph")
    src = OnnxSource(name=path.stem, config=cfg, weights=weights, source_key=key, origin=str(path), graph=og,
                     ignored=list(og.unused))
    tok = path.parent / "tokenizer.json"
    if tok.is_file():
        src.tokenizer_json = tok.read_text(encoding="utf-8")
    _generation_from_folder(path.parent, src)
    return src


def _generation_from_folder(folder: Path, src: OnnxSource) -> None:
    """EOS/BOS ids from a config.json / generation_config.json beside the model (as HF exports leave them)."""
    import json

    gen: dict[str, Any] = {}
    for fname in ("config.json", "generation_config.json"):
        f = folder / fname
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(d, dict):
                for k in ("bos_token_id", "eos_token_id"):
                    if d.get(k) is not None:
                        gen[k] = d[k]
    eos = gen.pop("eos_token_id", None)
    if eos is not None:
        src.generation["eos_token_ids"] = eos if isinstance(eos, list) else [eos]
    if "bos_token_id" in gen:
        src.generation["bos_token_id"] = gen["bos_token_id"]
