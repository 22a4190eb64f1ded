"""Where each tensor lies in the repacked weights file: execution order, 64-byte aligned.

One layout per model (it does not depend on the strategy or budget), so every plan of a model shares one
weights file. Tensors read row-by-row on demand (embedding tables used only by gathers) come first; every
other tensor sits at its first use, so the weights of consecutive units are consecutive bytes and any group
of units is one contiguous read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import networkx as nx

from edge_rt_exec.binfile import NUMPY_TO_SAFETENSORS
from edge_rt_exec.plan import ALIGNMENT

from .ir import ops_in_order

LAYOUT_VERSION = "1"


@dataclass(frozen=True)
class WeightSlot:
    name: str
    offset: int  #: absolute in the file
    nbytes: int
    shape: tuple[int, ...]
    gather: bool


@dataclass(frozen=True)
class WeightsLayout:
    order: list[str]
    tensors: dict[str, WeightSlot]
    header: bytes  #: the safetensors header (length prefix included), padded to ALIGNMENT
    file_size: int

    @property
    def data_start(self) -> int:
        return len(self.header)


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def weights_order(g: nx.DiGraph) -> tuple[list[str], set[str]]:
    """(tensor names in file order, the gather-only ones)."""
    uses: dict[str, list[bool]] = {}
    first: list[str] = []
    for node in ops_in_order(g):
        n = g.nodes[node]
        gather_roles = set(n["attrs"].get("gather", []))
        for role, w in n["weights"].items():
            if w not in uses:
                uses[w] = []
            uses[w].append(role in gather_roles)
            if role not in gather_roles and w not in first:
                first.append(w)
    gather_only = {w for w, u in uses.items() if all(u)}
    gathered = [w for w in uses if w in gather_only]
    return gathered + first, gather_only


def compute_layout(g: nx.DiGraph, metadata: dict[str, str]) -> WeightsLayout:
    """The file layout: header bytes and every tensor's absolute offset (float32 only)."""
    order, gather_only = weights_order(g)
    shapes = g.graph["weight_shapes"]
    rel: dict[str, tuple[int, int]] = {}
    entries: dict[str, dict] = {"__metadata__": dict(metadata, edge_rt_layout=LAYOUT_VERSION)}
    off = 0
    pad_i = 0
    for name in order:
        nbytes = 4
        for d in shapes[name]:
            nbytes *= int(d)
        if off % ALIGNMENT:
            # safetensors forbids holes, so alignment padding is a named uint8 tensor.
            pad = ALIGNMENT - off % ALIGNMENT
            entries[f"__pad__.{pad_i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [off, off + pad]}
            pad_i += 1
            off += pad
        rel[name] = (off, nbytes)
        entries[name] = {"dtype": NUMPY_TO_SAFETENSORS["float32"], "shape": list(shapes[name]),
                         "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(entries, separators=(",", ":"), sort_keys=False).encode()
    h += b" " * (_align(8 + len(h)) - 8 - len(h))
    header = len(h).to_bytes(8, "little") + h
    start = len(header)
    tensors = {n: WeightSlot(n, start + o, nb, tuple(shapes[n]), n in gather_only) for n, (o, nb) in rel.items()}
    return WeightsLayout(order, tensors, header, start + off)
