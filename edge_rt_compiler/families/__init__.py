"""Model families, one file each over the shared block builders of `blocks.py`. `FAMILIES` is keyed by the
family name the canonical config carries; `for_model_type` finds the family of an HF `model_type`.

Adding a family is one file (its HF reader and its `build`) plus a line here; see `qwen2.py`."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from edge_rt_exec.errors import UserError

from ..ir import Data, GraphBuilder
from . import bert, gpt2, llama, qwen2
from .base import Family, TransformerConfig

FAMILIES: dict[str, Family] = {f.name: f for f in (gpt2.FAMILY, llama.FAMILY, qwen2.FAMILY, bert.FAMILY)}

__all__ = ["FAMILIES", "Family", "TransformerConfig", "build_graph", "for_model_type"]


def for_model_type(model_type: object, where: Path) -> Family:
    """The family that reads an HF `model_type` (a one-line error lists them)."""
    for f in FAMILIES.values():
        if model_type in f.hf_model_types:
            return f
    supported = ", ".join(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise UserError(f"{where}: model_type {model_type!r} is not supported; supported: {supported}")


def build_graph(name: str, config: TransformerConfig, weights: dict[str, Data], where: str) -> nx.DiGraph:
    """The IR of a transformer: its canonical weights registered, then the family's ops."""
    family = FAMILIES.get(config.family)
    if family is None:
        raise UserError(f"{where}: model family {config.family!r} is not supported; supported: "
                        f"{', '.join(FAMILIES)}")
    b = GraphBuilder(name, family.name, family.kind, config.to_dict())
    b.g.graph["origin"] = where
    for canon, data in weights.items():
        b.weight(canon, data)
    family.build(b, config, where)
    return b.finish()
