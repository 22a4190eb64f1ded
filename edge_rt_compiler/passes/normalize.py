"""normalize: attributes to plain JSON values the registry's ops take. ONNX's Cast `to` (a TensorProto code)
and ConstantOfShape's `value` (a one-element tensor) become a numpy dtype name and a scalar; any other
tensor-valued attribute is refused (only Constant may carry one, and `fold` consumes it). An ONNX attribute the
registry's op does not take is dropped when it holds the ONNX default (LayerNormalization's `stash_type=1`) and
refused otherwise: the executor would silently compute something else."""

from __future__ import annotations

import networkx as nx
import numpy as np

from edge_rt_exec import ops
from edge_rt_exec.errors import UserError

from ..frontends.onnx import onnx_dtype
from ..ir import nodes_in_order


def where(g: nx.DiGraph, n: str) -> str:
    """How messages name an op: the model's origin, the op and its type."""
    origin = g.graph.get("origin") or g.graph["name"]
    return f"{origin}: node '{n}' ({g.nodes[n]['op']})"


def normalize(g: nx.DiGraph) -> nx.DiGraph:
    """Attributes as the registry takes them (see the module docstring)."""
    for n, node in nodes_in_order(g):
        a = node["attrs"]
        if node["op"] == "Cast" and isinstance(a.get("to"), int):
            a["to"] = onnx_dtype(int(a["to"]), where(g, n) + " casts to an element type that")
            a.pop("saturate", None)
        elif node["op"] == "ConstantOfShape" and "dtype" not in a:
            v = a.pop("value", None)
            if v is None:
                a["dtype"], a["value"] = "float32", 0.0
            else:
                arr = np.asarray(v).reshape(-1)
                a["dtype"] = arr.dtype.name
                a["value"] = arr[0].item() if arr.size else 0
        for k, v in list(a.items()):
            if isinstance(v, np.ndarray) and node["op"] != "Constant":
                raise UserError(f"{where(g, n)}: tensor attribute '{k}' is not supported")
        if node["op"] in ops.REGISTRY and g.graph["family"] == "onnx":
            known = ops.get(node["op"]).attrs
            for k in [k for k in a if k not in known]:
                if a[k] != _onnx_default(node["op"], k):
                    raise UserError(f"{where(g, n)}: attribute {k}={a[k]!r} is not supported (edge-rt's "
                                    f"{node['op']} takes {', '.join(known) or 'no attributes'})")
                del a[k]
    return g


def _onnx_default(op: str, attr: str) -> object:
    """The ONNX schema's default of an attribute (a sentinel when it has none)."""
    import onnx
    from onnx import helper

    try:
        a = onnx.defs.get_schema(op).attributes[attr]
    except (onnx.defs.SchemaError, KeyError):
        return _NO_DEFAULT
    if not a.default_value.name:
        return _NO_DEFAULT
    v = helper.get_attribute_value(a.default_value)
    return v.decode() if isinstance(v, bytes) else v


_NO_DEFAULT = object()
