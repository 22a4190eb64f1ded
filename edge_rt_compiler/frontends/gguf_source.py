"""Adapter: a GGUF file (via `gguf.py`) -> `ModelSource`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .base import ModelSource, TransformerConfig, WeightRef


def gguf_source(path: Path) -> ModelSource:
    from .gguf import load_gguf

    g = load_gguf(path)
    config = TransformerConfig.from_dict(dict(g.config), str(path))
    weights = {
        name: WeightRef(tuple(int(d) for d in t.shape), t.load, f"{path}: tensor '{name}' ({t.source_type})")
        for name, t in g.tensors.items()
    }
    st = path.stat()
    key = hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    gen = dict(g.generation)
    name = gen.pop("name", None) or path.stem
    return ModelSource(name=str(name), config=config, weights=weights, source_key=f"gguf-{key}",
                       tokenizer_json=g.tokenizer_json, generation=gen, origin=str(path))
