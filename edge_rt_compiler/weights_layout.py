"""Where each weight lies in the repacked weights file: execution order, 64-byte aligned, in its format.

One layout per model and format (it does not depend on the strategy or budget), so every plan of a model in
one format shares one weights file. Tables read row by row on demand (embedding tables only gathers read)
come first; every other weight sits at its first use, so the weights of consecutive units are consecutive
bytes and any group of units is one contiguous read. Sizes come from the weight-format registry.

The file is a safetensors file our own bounded reader (`edge_rt_exec.binfile`) opens: f32 / f16 weights as
F32 / F16 tensors of their logical shape, block formats as U8 byte strings (`formats.<fmt>.stored_shape`);
the header's `__metadata__` names every non-f32 tensor's format (`edge_rt_formats`) beside the plan's
`WeightInfo.format`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import networkx as nx

from edge_rt_exec import formats
from edge_rt_exec.plan import ALIGNMENT

from .ir import gather_only, is_row_gather, is_weight, nodes_in_order, weight_name, weight_users
from .sizes import align

LAYOUT_VERSION = "2"


@dataclass(frozen=True)
class WeightLocation:
    """One weight's bytes in the weights file (not an arena slot: those are `Plan.arena["slots"]`)."""

    name: str
    offset: int  #: absolute in the file
    nbytes: int
    format: str
    shape: tuple[int, ...]  #: logical
    gather: bool  #: only row gathers read it

    def row_bytes(self) -> int:
        """Bytes of one row (`shape[0]` rows; a 1-D tensor's rows are its elements)."""
        return formats.get(self.format).nbytes(self.shape[1:] or (1,))


@dataclass(frozen=True)
class WeightsLayout:
    order: list[str]
    weights: dict[str, WeightLocation]
    header: bytes  #: the safetensors header (length prefix included), padded to ALIGNMENT
    file_size: int

    @property
    def data_start(self) -> int:
        return len(self.header)


def weights_order(g: nx.DiGraph) -> tuple[list[str], set[str]]:
    """(weight names in file order, the gather-only ones)."""
    users = weight_users(g)
    only = gather_only(g, users)
    first: list[str] = []
    seen: set[str] = set()
    for _, node in nodes_in_order(g):
        for i, t in enumerate(node["inputs"]):
            if not is_weight(t):
                continue
            w = weight_name(t)
            if w in seen or w in only:
                continue
            if not is_row_gather(node["op"], node["attrs"], i, len(g.graph["weights"][w].shape)):
                first.append(w)
                seen.add(w)
    gathered = [w for w in users if w in only]
    return gathered + first, only


def compute_layout(g: nx.DiGraph, metadata: dict[str, str]) -> WeightsLayout:
    """The file layout: header bytes and every weight's absolute offset and format."""
    order, only = weights_order(g)
    weights = g.graph["weights"]
    rel: dict[str, tuple[int, int]] = {}
    fmts = {n: weights[n].format for n in order if weights[n].format != "f32"}
    meta = dict(metadata, edge_rt_layout=LAYOUT_VERSION, edge_rt_formats=json.dumps(fmts, sort_keys=True))
    entries: dict[str, dict] = {"__metadata__": meta}
    off = 0
    pad_i = 0
    for name in order:
        w = weights[name]
        f = formats.get(w.format)
        nbytes = f.nbytes(w.shape)
        if off % ALIGNMENT:
            # safetensors forbids holes, so alignment padding is a named uint8 tensor.
            pad = ALIGNMENT - off % ALIGNMENT
            entries[f"__pad__.{pad_i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [off, off + pad]}
            pad_i += 1
            off += pad
        rel[name] = (off, nbytes)
        entries[name] = {"dtype": f.safetensors_dtype, "shape": f.stored_shape(w.shape),
                         "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(entries, separators=(",", ":"), sort_keys=False).encode()
    h += b" " * (align(8 + len(h)) - 8 - len(h))
    header = len(h).to_bytes(8, "little") + h
    start = len(header)
    placed = {n: WeightLocation(n, start + o, nb, weights[n].format, tuple(weights[n].shape), n in only)
              for n, (o, nb) in rel.items()}
    return WeightsLayout(order, placed, header, start + off)
