"""HF-format folders: `config.json` + `model.safetensors` (or a sharded index), any family of `families/`.

The folder's `model_type` picks the family; the family's reader maps checkpoint tensors to canonical names;
the family's `build` makes the IR. Tensors are read lazily through the bounded safetensors reader and
widened to float32 (F16/BF16 checkpoints included)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_rt_exec.binfile import SafetensorsFile
from edge_rt_exec.errors import UserError

from ..families import build_graph, for_model_type
from ..ir import Data
from .base import ModelSource


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder (one-line errors)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; an HF model folder needs config.json and *.safetensors") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot parse JSON ({e}); fix or re-download the file") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


class Tensors:
    """All safetensors shards of a folder, by tensor name (the `families.base.Checkpoint` protocol)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: no 'weight_map' object; re-export the sharded checkpoint")
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if "/" in s or "\\" in s or s.startswith("."):
                    raise UserError(f"{index}: shard name {s!r} leaves the model folder; refusing it")
        elif single.exists():
            shards = ["model.safetensors"]
        else:
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            if len(found) != 1:
                raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                f"(found {found or 'no *.safetensors'}); export the model with safetensors")
            shards = found
        self.files = [SafetensorsFile(folder / s) for s in shards]
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.tensors:
                self.where[name] = f
        self.key = hashlib.sha256(
            "|".join(f"{f.path.name}:{f.file.size}:{f.path.stat().st_mtime_ns}" for f in self.files).encode()
        ).hexdigest()[:16]

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].tensors[name].shape

    def loader(self, name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) \
            -> Callable[[], np.ndarray]:
        f = self.where[name]

        def load() -> np.ndarray:
            a = f.load_f32(name)
            return transform(a) if transform else a

        return load


def load_hf_folder(folder: str | Path, name: str | None = None) -> ModelSource:
    """An HF folder as a `ModelSource` (its family picked by `model_type`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; model.path must be an HF folder, a .gguf or an .onnx file")
    cfg = read_json(folder / "config.json")
    family = for_model_type(cfg.get("model_type"), folder / "config.json")
    tensors = Tensors(folder)
    config, mapping = family.from_hf(cfg, tensors, folder)
    weights = {canon: Data(shape, "float32", tensors.loader(src, transform), f"{folder}: tensor '{src}'")
               for canon, (src, transform, shape) in mapping.items()}
    name = name or folder.name
    used = {src for src, _, _ in mapping.values()}
    generation = _generation(folder, cfg)
    ctx = config.max_position
    if generation.get("max_seq_length"):
        ctx = min(ctx, int(generation["max_seq_length"]))  # sentence-transformers truncates there
    return ModelSource(
        name=name,
        graph=build_graph(name, config, weights, str(folder)),
        source_key=f"hf-{tensors.key}",
        max_position=config.max_position,
        config=config,
        tokenizer_json=_tokenizer(folder),
        generation=generation,
        ignored=sorted(set(tensors.where) - used),
        origin=str(folder),
        default_context=ctx,
    )


def _tokenizer(folder: Path) -> str | None:
    p = folder / "tokenizer.json"
    if p.exists():
        return p.read_text(encoding="utf-8")
    return None


def _generation(folder: Path, cfg: dict) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    gc = folder / "generation_config.json"
    src = read_json(gc) if gc.exists() else {}
    eos = src.get("eos_token_id", cfg.get("eos_token_id"))
    gen["eos_token_ids"] = [int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    bos = src.get("bos_token_id", cfg.get("bos_token_id"))
    gen["bos_token_id"] = int(bos) if bos is not None else None
    pad = src.get("pad_token_id", cfg.get("pad_token_id"))
    gen["pad_token_id"] = int(pad) if pad is not None else None
    tc = folder / "tokenizer_config.json"
    tcfg = read_json(tc) if tc.exists() else {}
    tmpl = tcfg.get("chat_template")
    gen["chat_template"] = tmpl if isinstance(tmpl, str) else None
    st = folder / "sentence_bert_config.json"
    if st.exists():
        gen["max_seq_length"] = int(read_json(st).get("max_seq_length", 512))
    pool = folder / "1_Pooling" / "config.json"
    if pool.exists():
        pc = read_json(pool)
        if not pc.get("pooling_mode_mean_tokens", False):
            modes = [k for k, v in pc.items() if k.startswith("pooling_mode") and v]
            raise UserError(f"{pool}: pooling {modes} is not supported; supported: mean pooling")
    gen["normalize"] = (folder / "modules.json").exists() and "Normalize" in (folder / "modules.json").read_text()
    return gen
