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

from ..chat_template import check_template_text
from ..families import build_graph, for_model_type
from ..ir import Data
from .base import ModelSource, read_tokenizer, token_id, token_ids

#: safetensors dtypes a weight may have (widened to float32 when read); integer and bool tensors are refused.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def read_any_json(path: Path) -> Any:
    """A JSON document from a model folder (one-line errors: missing, not UTF-8, not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; an HF model folder needs config.json and *.safetensors") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file (byte {e.start} is not UTF-8); fix or re-download the "
                        "file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: cannot parse JSON ({e}); fix or re-download the file") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: an integer too long to convert
        raise UserError(f"{path}: cannot read JSON ({type(e).__name__}: {str(e)[:120]}); fix or re-download the "
                        "file") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder (one-line errors)."""
    d = read_any_json(path)
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

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype code ("F32", "BF16", "I8", ...)."""
        return self.where[name].tensors[name].dtype

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
    for src, _, _ in mapping.values():
        dtype = tensors.dtype(src)
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"{tensors.where[src].path}: tensor '{src}' is {dtype}, but a float weight "
                            f"({', '.join(FLOAT_DTYPES)}) is expected there; re-export the checkpoint with float "
                            "weights")
    weights = {canon: Data(shape, "float32", tensors.loader(src, transform), f"{folder}: tensor '{src}'")
               for canon, (src, transform, shape) in mapping.items()}
    name = name or folder.name
    used = {src for src, _, _ in mapping.values()}
    generation = _generation(folder, cfg, config.vocab_size)
    ctx = config.max_position
    if generation.get("max_seq_length"):
        ctx = min(ctx, generation["max_seq_length"])  # sentence-transformers truncates there
    return ModelSource(
        name=name,
        graph=build_graph(name, config, weights, str(folder)),
        source_key=f"hf-{tensors.key}",
        max_position=config.max_position,
        config=config,
        tokenizer_json=read_tokenizer(folder / "tokenizer.json"),
        generation=generation,
        ignored=sorted(set(tensors.where) - used),
        origin=str(folder),
        default_context=ctx,
    )


def _generation(folder: Path, cfg: dict, vocab_size: int) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    gc = folder / "generation_config.json"
    src = read_json(gc) if gc.exists() else {}

    def setting(key: str) -> tuple[Any, Path]:  # generation_config.json first, as transformers reads them
        return (src[key], gc) if src.get(key) is not None else (cfg.get(key), folder / "config.json")

    eos, bos, (pad, pad_where) = setting("eos_token_id"), setting("bos_token_id"), setting("pad_token_id")
    gen["eos_token_ids"] = token_ids(eos[0], "eos_token_id", eos[1], vocab_size)
    gen["bos_token_id"] = token_id(bos[0], "bos_token_id", bos[1], vocab_size)
    # a negative pad id is how some exports (early Llama) say "no padding token"
    pad = None if isinstance(pad, int) and not isinstance(pad, bool) and pad < 0 else pad
    gen["pad_token_id"] = token_id(pad, "pad_token_id", pad_where, vocab_size)
    tc = folder / "tokenizer_config.json"
    tcfg = read_json(tc) if tc.exists() else {}
    gen["chat_template"] = _chat_template(folder, tcfg)
    st = folder / "sentence_bert_config.json"
    if st.exists():
        n = read_json(st).get("max_seq_length", 512)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"{st}: 'max_seq_length' = {repr(n)[:40]}, expected a whole number >= 1; fix the value "
                            "or re-download the model")
        gen["max_seq_length"] = n
    pool = folder / "1_Pooling" / "config.json"
    if pool.exists():
        pc = read_json(pool)
        if not pc.get("pooling_mode_mean_tokens", False):
            modes = [k for k, v in pc.items() if k.startswith("pooling_mode") and v]
            raise UserError(f"{pool}: pooling {modes} is not supported; supported: mean pooling")
    modules = folder / "modules.json"
    gen["normalize"] = modules.exists() and "Normalize" in json.dumps(read_any_json(modules))
    return gen


def _chat_template(folder: Path, tcfg: dict) -> str | None:
    """The chat template: tokenizer_config.json's `chat_template` (a string, or transformers' list of named
    templates, of which "default" is taken), else a chat_template.jinja file beside it (transformers >= 4.43)."""
    where = folder / "tokenizer_config.json"
    tmpl = tcfg.get("chat_template")
    if isinstance(tmpl, list):
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    if tmpl is None:
        jinja = folder / "chat_template.jinja"
        if not jinja.is_file():
            return None
        where = jinja
        try:
            tmpl = jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{jinja}: not a text file (byte {e.start} is not UTF-8); fix or re-download the chat "
                            "template") from None
        except OSError as e:
            raise UserError(f"{jinja}: cannot read the chat template ({e.strerror or e}); check the file") from None
    return check_template_text(tmpl, str(where))
