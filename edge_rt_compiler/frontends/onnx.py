"""ONNX frontend: an `.onnx` file -> `ModelSource` whose IR holds the graph as the file has it.

Reading follows the binary-reader pattern (STYLE.md #9): the protobuf is parsed without external data; every
external-data reference is checked (inside the model's folder, inside its file, the right length) before any
tensor byte is read, and tensors are read lazily through one bounded helper. The graph is checked (opset >= 13,
every node input produced by a node, a graph input or an initializer, acyclic: a topological order is computed,
so unsorted files are accepted, every op type supported), `onnx.shape_inference` (with data propagation) gives
dtypes and which shapes are static (`graph["hints"]`), and the ops go into the IR through the same
`GraphBuilder` as every other frontend, initializers as constants. Decoder graphs (input ids, logits out) get
their roles and past/present pairs; symbolic input dims get a class for `passes.dims`.

Folding, fusions, dead-code removal and the split of constants into weights and inline values are the passes
of `passes/`, run by the pipeline on this IR like on any other.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from edge_rt_exec import ops
from edge_rt_exec.errors import UserError

from ..ir import Data, GraphBuilder
from .base import ModelSource, read_tokenizer, token_id, token_ids

MIN_OPSET = 13
#: Op types the compiler removes itself (never reach the executor).
COMPILE_ONLY = frozenset({"Constant"})
#: Every standard ONNX op the executor's registry runs, and the compile-only ones.
SUPPORTED_OPS = frozenset(n for n, d in ops.REGISTRY.items() if d.domain == "onnx") | COMPILE_ONLY
#: ONNX graphs carry no trained context length: the default maximum of their sequence dims.
DEFAULT_CONTEXT = 256
#: ONNX element types edge-rt runs (TensorProto codes -> numpy dtype names).
ONNX_DTYPES: dict[int, str] = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
                               9: "bool", 11: "float64", 12: "uint32", 13: "uint64"}
#: Names of the element types it does not run, for messages.
ONNX_DTYPE_NAMES: dict[int, str] = {0: "UNDEFINED", 8: "STRING", 10: "FLOAT16", 14: "COMPLEX64", 15: "COMPLEX128",
                                    16: "BFLOAT16", 17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2",
                                    20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1",
                                    24: "FLOAT8E8M0", 25: "UINT2", 26: "INT2"}


@dataclass
class _Node:
    """A node as read from the file (before it enters the IR)."""

    name: str
    op: str
    inputs: list[str]  #: "" for an absent optional input
    outputs: list[str]  #: "" for an absent optional output
    attrs: dict[str, Any]


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


def onnx_dtype(elem: int, where: str) -> str:
    """The numpy dtype name of an ONNX element type the executor runs, or a one-line error."""
    d = ONNX_DTYPES.get(elem)
    if d is None:
        name = ONNX_DTYPE_NAMES.get(elem, str(elem))
        raise UserError(f"{where} has element type {name}, which edge-rt does not run (supported: "
                        f"{', '.join(sorted(set(ONNX_DTYPES.values())))}); convert the model to float32")
    return d


def _initializer(t: Any, model_dir: Path, path: Path) -> Data:
    from onnx import numpy_helper

    where = f"initializer '{t.name}'"
    dtype = onnx_dtype(t.data_type, f"{path}: {where}")
    shape = tuple(int(d) for d in t.dims)
    if any(d < 0 for d in shape):
        raise UserError(f"{path}: {where} has negative dims {list(shape)}")
    n = 1
    for d in shape:
        n *= d
    if t.data_location == 1:  # EXTERNAL
        full, offset, length = _external(model_dir, t, where, path)
        need = n * np.dtype(dtype).itemsize
        if length != need:
            raise UserError(f"{path}: {where} {list(shape)} {dtype} needs {need} bytes but its external data has "
                            f"{length}")
        read = _bounded_reader(full, offset, length, where)
        return Data(shape, dtype, lambda: np.frombuffer(read(), dtype=np.dtype(dtype).newbyteorder("<"))
                    .reshape(shape), f"{path}: {where}")

    def load() -> np.ndarray:
        try:
            return numpy_helper.to_array(t)
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: {where} data does not match its shape {list(shape)} ({e}); the file is "
                            "corrupt") from None
    return Data(shape, dtype, load, f"{path}: {where}")


def _attrs(node: Any, path: Path, name: str) -> dict[str, Any]:
    from onnx import AttributeProto, helper, numpy_helper

    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            out[a.name] = "<subgraph>"  # control flow: reported as an unsupported op type
            continue
        if a.type == AttributeProto.TENSOR:
            onnx_dtype(a.t.data_type, f"{path}: node '{name}' attribute '{a.name}'")
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


def topo_order(nodes: list[_Node], available: set[str], path: Path) -> list[_Node]:
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


def check_supported(nodes: list[_Node], path: Path) -> None:
    """Every op type is one the registry runs (the unsupported ones listed in one line)."""
    bad: Counter[str] = Counter()
    first: dict[str, str] = {}
    for n in nodes:
        special = any(isinstance(v, str) and v in ("<subgraph>", "<sparse>") for v in n.attrs.values())
        if n.op not in SUPPORTED_OPS or special:
            bad[n.op] += 1
            first.setdefault(n.op, n.name)
    if bad:
        parts = ", ".join(f"{op} ({k} node{'s' if k > 1 else ''}, first '{first[op]}')"
                          for op, k in sorted(bad.items()))
        raise UserError(f"{path}: {sum(bad.values())} node(s) of op types edge-rt does not support: {parts}; "
                        f"supported: {', '.join(sorted(SUPPORTED_OPS))}")


def _check_opset(opset: int, nodes: list[_Node], path: Path) -> None:
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


def read_graph(path: Path, name: str) -> tuple[nx.DiGraph, list[str]]:
    """Parse and check the file (no weights read) into the IR; also the initializers no node reads."""
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
    consts = {t.name: _initializer(t, path.parent, path) for t in g.initializer}
    nodes: list[_Node] = []
    used_names: Counter[str] = Counter()
    for i, n in enumerate(g.node):
        nname = n.name or f"{n.op_type}_{i}"
        used_names[nname] += 1
        if used_names[nname] > 1:
            nname = f"{nname}#{used_names[nname] - 1}"
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        nodes.append(_Node(nname, op, list(n.input), list(n.output), _attrs(n, path, nname)))
    _check_opset(opset, nodes, path)
    inputs: list[tuple[str, str, list[int | str]]] = []
    for vi in g.input:
        if vi.name in consts:
            continue  # old exporters list initializers as inputs too
        d = _dims(vi)
        if d is None:
            raise UserError(f"{path}: graph input '{vi.name}' is not a tensor (sequence/map/optional inputs are not "
                            "supported)")
        inputs.append((vi.name, onnx_dtype(int(d[0]), f"{path}: graph input '{vi.name}'"), d[1]))
    available = {i[0] for i in inputs} | set(consts)
    check_supported(nodes, path)
    nodes = topo_order(nodes, available, path)
    produced = {t for n in nodes for t in n.outputs if t} | available
    outputs = []
    for vo in g.output:
        if vo.name not in produced:
            raise UserError(f"{path}: graph output '{vo.name}' is not produced by any node; re-export the model")
        d = _dims(vo)
        if d and d[0] != "0":
            onnx_dtype(int(d[0]), f"{path}: graph output '{vo.name}'")
        outputs.append(vo.name)
    if not outputs:
        raise UserError(f"{path}: the graph has no outputs")

    dec = decoder_io(path, [n for n, _, _ in inputs], outputs)
    b = GraphBuilder(name, "onnx", "decoder" if dec else "graph", {})
    g_ir = b.g
    g_ir.graph["opset"] = opset
    g_ir.graph["origin"] = str(path)
    for iname, dt, dims in inputs:
        b.input(iname, dt, dims)
    for cname, c in consts.items():
        b.constant(cname, c)
    for n in nodes:
        b.op(n.op, n.name, n.inputs, n.outputs, n.attrs)
    for o in outputs:
        b.output(o)
    if dec:
        g_ir.graph["io"].update({role: t for role, t in dec.items() if role != "kv" and t})
        g_ir.graph["kv"] = {"mode": "past_present" if dec["kv"] else "none", "pairs": dec["kv"]}
    b.symbols(classify_symbols(inputs, dec))
    _shape_inference(model, g_ir)
    referenced = {t for n in nodes for t in n.inputs if t}
    return b.finish(), sorted(c for c in consts if c not in referenced)


def _shape_inference(model: Any, g: nx.DiGraph) -> None:
    """dtypes of every value and the fully static shapes (onnx.shape_inference with data propagation)."""
    import onnx

    hints = g.graph["hints"]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        infos = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    except Exception:  # noqa: BLE001 - inference is advisory; passes.dims is authoritative
        infos = list(model.graph.output) + list(model.graph.input)
    for vi in infos:
        if not vi.type.HasField("tensor_type") or vi.name in g.graph["constants"]:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type in ONNX_DTYPES:
            hints["dtypes"][vi.name] = ONNX_DTYPES[tt.elem_type]
        if tt.HasField("shape"):
            dims = tt.shape.dim
            known = [int(d.dim_value) for d in dims if d.HasField("dim_value")]
            if len(known) == len(dims):
                hints["static"][vi.name] = tuple(known)
    for i in g.graph["inputs"]:  # the file's declaration wins over inference
        hints["dtypes"][i["name"]] = i["dtype"]


# ---- decoder roles and symbols ---------------------------------------------------------------------------------

def decoder_io(path: Path, ins: list[str], outs: list[str]) -> dict[str, Any] | None:
    """The roles of a decoder graph's inputs and outputs (HF/optimum and torch export names), or None."""
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
            raise UserError(f"{path}: past input '{name}' has no matching present output (expected "
                            f"present.{layer}.{kind}); cannot feed the cache back")
        kv.append([name, cands[0]])
    kv.sort(key=lambda p: (int(re.findall(r"\d+", p[0])[-1]), p[0]))
    return {"ids": ids, "logits": logits, "mask": "attention_mask" if "attention_mask" in ins else None,
            "positions": "position_ids" if "position_ids" in ins else None, "kv": kv}


def classify_symbols(inputs: list[tuple[str, str, list[int | str]]], dec: dict[str, Any] | None) -> dict[str, str]:
    """Each symbolic input dim's class (batch, seq, past, total, other), by where it appears and its name."""
    cls: dict[str, str] = {}
    past_inputs = {p for p, _ in dec["kv"]} if dec else set()
    for name, _, dims in inputs:
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
        for name, _, dims in inputs:
            if name == mask and len(dims) == 2 and isinstance(dims[1], str) and cls.get(dims[1]) == "seq":
                seq_syms = {d for n, _, ds in inputs if n == dec["ids"] for d in ds[-1:]}
                if dims[1] not in seq_syms:
                    cls[dims[1]] = "total"
    return cls


# ---- the source ------------------------------------------------------------------------------------------------

def load_onnx(path: Path, name: str | None = None) -> ModelSource:
    """An .onnx file -> ModelSource holding its IR (not yet folded or fused: that is `passes/`)."""
    path = Path(path)
    g, unused = read_graph(path, name or path.stem)
    st = path.stat()
    key = hashlib.sha256(f"onnx:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    src = ModelSource(name=str(g.graph["name"]), graph=g, source_key=key, max_position=1 << 30, origin=str(path),
                      ignored=unused, default_context=DEFAULT_CONTEXT)
    src.tokenizer_json = read_tokenizer(path.parent / "tokenizer.json")
    src.generation.update(_generation_from_folder(path.parent))
    return src


def _generation_from_folder(folder: Path) -> dict[str, Any]:
    """EOS/BOS ids from a config.json / generation_config.json beside the model (as HF exports leave them)."""
    found: dict[str, Any] = {}
    where: dict[str, Path] = {}
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
                        found[k], where[k] = d[k], f
    gen: dict[str, Any] = {}
    if "eos_token_id" in found:
        gen["eos_token_ids"] = token_ids(found["eos_token_id"], "eos_token_id", where["eos_token_id"])
    if "bos_token_id" in found:
        gen["bos_token_id"] = token_id(found["bos_token_id"], "bos_token_id", where["bos_token_id"])
    return gen
