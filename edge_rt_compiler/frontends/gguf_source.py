"""Adapter: a GGUF file (read by `gguf.py`) -> `ModelSource` with the llama family's IR; every tensor carries
its stored rows (`Data.raw_loader`) and GGML type, so `passes.quantize` can keep it as it is."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..families import build_graph
from ..families.base import TransformerConfig
from ..ir import Data
from .base import ModelSource


def gguf_source(path: Path, name: str | None = None) -> ModelSource:
    """A GGUF file as a `ModelSource` (the llama family over its tensors)."""
    from .gguf import load_gguf

    g = load_gguf(path)
    config = TransformerConfig.from_dict(dict(g.config), str(path))
    weights = {
        cname: Data(tuple(int(d) for d in t.shape), "float32", t.load, f"{path}: tensor '{t.source_name}' "
                    f"({t.source_type})", ggml=t.source_type, raw_loader=t.load_raw)
        for cname, t in g.tensors.items()
    }
    st = path.stat()
    key = hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    gen = dict(g.generation)
    model_name = gen.pop("name", None)
    name = name or str(model_name or path.stem)
    return ModelSource(name=name, graph=build_graph(name, config, weights, str(path)), source_key=f"gguf-{key}",
                       max_position=config.max_position, config=config, tokenizer_json=g.tokenizer_json,
                       generation=gen, origin=str(path))
