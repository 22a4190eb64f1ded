"""HF-format folders: `config.json` + `model.safetensors` (or a sharded index) for gpt2, llama and bert."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_rt_exec.binfile import SafetensorsFile
from edge_rt_exec.errors import UserError

from .base import ModelSource, TransformerConfig, WeightRef

SUPPORTED = ("gpt2", "llama", "bert")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; an HF model folder needs config.json and *.safetensors") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot parse JSON ({e}); fix or re-download the file") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


class _Tensors:
    """All safetensors shards of a folder, by tensor name."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
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

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].tensors[name].shape

    def loader(self, name: str, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        f = self.where[name]

        def load() -> np.ndarray:
            a = f.load_f32(name)
            return transform(a) if transform else a

        return load


def load_hf_folder(folder: str | Path) -> ModelSource:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; model.path must be an HF folder, a .gguf or an .onnx file")
    cfg = _read_json(folder / "config.json")
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED:
        raise UserError(f"{folder / 'config.json'}: model_type {mtype!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED)}")
    tensors = _Tensors(folder)
    build = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}[mtype]
    config, mapping = build(cfg, tensors, folder)
    used = {src for src, _ in mapping.values()}
    weights = {}
    for canon, (src, transform_shape) in mapping.items():
        transform, shape = transform_shape
        weights[canon] = WeightRef(shape, tensors.loader(src, transform), f"{folder}: tensor '{src}'")
    ignored = sorted(set(tensors.where) - used)
    return ModelSource(
        name=folder.name,
        config=config,
        weights=weights,
        source_key=f"hf-{tensors.key}",
        tokenizer_json=_tokenizer(folder),
        generation=_generation(folder, cfg),
        ignored=ignored,
        origin=str(folder),
    )


def _need(cfg: dict, key: str, folder: Path, alt: str | None = None) -> Any:
    if key in cfg:
        return cfg[key]
    if alt and alt in cfg:
        return cfg[alt]
    raise UserError(f"{folder / 'config.json'}: missing '{key}'; the config is incomplete")


def _find_prefix(tensors: _Tensors, candidates: list[str], probe: str, folder: Path) -> str:
    for p in candidates:
        if p + probe in tensors.where:
            return p
    raise UserError(f"{folder}: no tensor '{probe}' (tried prefixes {candidates}); is this checkpoint the "
                    "model_type its config.json says?")


def _same(tensors: _Tensors, name: str, folder: Path):
    if name not in tensors.where:
        raise UserError(f"{folder}: missing tensor '{name}'; the checkpoint is incomplete")
    return name, (None, tensors.shape(name))


def _gpt2(cfg: dict, t: _Tensors, folder: Path):
    d = int(_need(cfg, "n_embd", folder, "hidden_size"))
    n_layer = int(_need(cfg, "n_layer", folder, "num_hidden_layers"))
    n_head = int(_need(cfg, "n_head", folder, "num_attention_heads"))
    act = cfg.get("activation_function", "gelu_new")
    activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}.get(act)
    if activation is None:
        raise UserError(f"{folder / 'config.json'}: activation_function {act!r} is not supported; "
                        "supported: gelu_new, gelu_pytorch_tanh, gelu")
    inner = cfg.get("n_inner") or 4 * d
    config = TransformerConfig(
        family="gpt2", vocab_size=int(_need(cfg, "vocab_size", folder)), hidden_size=d, n_layers=n_layer,
        n_heads=n_head, n_kv_heads=n_head, head_dim=d // n_head if n_head else 0, intermediate_size=int(inner),
        max_position=int(_need(cfg, "n_positions", folder, "n_ctx")),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), tie_embeddings=True, activation=activation,
    )
    p = _find_prefix(t, ["transformer.", ""], "wte.weight", folder)
    m: dict[str, Any] = {
        "tok_embed.weight": _same(t, p + "wte.weight", folder),
        "pos_embed.weight": _same(t, p + "wpe.weight", folder),
        "final_norm.weight": _same(t, p + "ln_f.weight", folder),
        "final_norm.bias": _same(t, p + "ln_f.bias", folder),
    }

    def conv1d(name: str, cols: slice | None = None):
        # GPT-2's Conv1D stores [in, out]; the IR wants [out, in].
        if name not in t.where:
            raise UserError(f"{folder}: missing tensor '{name}'; the checkpoint is incomplete")
        shape = t.shape(name)
        if cols is None:
            return name, ((lambda a: np.ascontiguousarray(a.T)), tuple(shape[::-1]))
        n_out = cols.stop - cols.start
        out_shape = (n_out, shape[0]) if len(shape) == 2 else (n_out,)
        if len(shape) == 2:
            return name, ((lambda a: np.ascontiguousarray(a[:, cols].T)), out_shape)
        return name, ((lambda a: np.ascontiguousarray(a[cols])), out_shape)

    for i in range(n_layer):
        h, c = f"{p}h.{i}.", f"layers.{i}."
        qkv_w, qkv_b = h + "attn.c_attn.weight", h + "attn.c_attn.bias"
        for j, role in enumerate("qkv"):
            sl = slice(j * d, (j + 1) * d)
            m[c + f"attn.{role}.weight"] = conv1d(qkv_w, sl)
            m[c + f"attn.{role}.bias"] = conv1d(qkv_b, sl)
        m[c + "attn.o.weight"] = conv1d(h + "attn.c_proj.weight")
        m[c + "attn.o.bias"] = _same(t, h + "attn.c_proj.bias", folder)
        m[c + "mlp.up.weight"] = conv1d(h + "mlp.c_fc.weight")
        m[c + "mlp.up.bias"] = _same(t, h + "mlp.c_fc.bias", folder)
        m[c + "mlp.down.weight"] = conv1d(h + "mlp.c_proj.weight")
        m[c + "mlp.down.bias"] = _same(t, h + "mlp.c_proj.bias", folder)
        for ln, role in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            m[c + f"{role}.weight"] = _same(t, h + f"{ln}.weight", folder)
            m[c + f"{role}.bias"] = _same(t, h + f"{ln}.bias", folder)
    return config, m


def _llama(cfg: dict, t: _Tensors, folder: Path):
    d = int(_need(cfg, "hidden_size", folder))
    n_head = int(_need(cfg, "num_attention_heads", folder))
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{folder / 'config.json'}: hidden_act {act!r} is not supported for llama; supported: silu")
    tie = bool(cfg.get("tie_word_embeddings", False))
    if not tie and "lm_head.weight" not in t.where:
        tie = True  # some exports drop the tied copy
    # transformers 4.x writes rope_theta / rope_scaling; 5.x writes one rope_parameters dict.
    rp_raw = cfg.get("rope_parameters")
    rp: dict[str, Any] = rp_raw if isinstance(rp_raw, dict) else {}
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rp.items() if k != "rope_theta"} if rp else None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    config = TransformerConfig(
        family="llama", vocab_size=int(_need(cfg, "vocab_size", folder)), hidden_size=d,
        n_layers=int(_need(cfg, "num_hidden_layers", folder)), n_heads=n_head, n_kv_heads=n_kv,
        head_dim=int(cfg.get("head_dim") or (d // n_head if n_head else 0)),
        intermediate_size=int(_need(cfg, "intermediate_size", folder)),
        max_position=int(cfg.get("max_position_embeddings", 2048)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=tie, activation="silu",
    )
    p = _find_prefix(t, ["model.", ""], "embed_tokens.weight", folder)
    m: dict[str, Any] = {
        "tok_embed.weight": _same(t, p + "embed_tokens.weight", folder),
        "final_norm.weight": _same(t, p + "norm.weight", folder),
    }
    if not tie:
        m["lm_head.weight"] = _same(t, "lm_head.weight", folder)
    for i in range(config.n_layers):
        h, c = f"{p}layers.{i}.", f"layers.{i}."
        m[c + "attn_norm.weight"] = _same(t, h + "input_layernorm.weight", folder)
        m[c + "mlp_norm.weight"] = _same(t, h + "post_attention_layernorm.weight", folder)
        for role in "qkvo":
            m[c + f"attn.{role}.weight"] = _same(t, h + f"self_attn.{role}_proj.weight", folder)
            if h + f"self_attn.{role}_proj.bias" in t.where:
                m[c + f"attn.{role}.bias"] = _same(t, h + f"self_attn.{role}_proj.bias", folder)
        for role in ("gate", "up", "down"):
            m[c + f"mlp.{role}.weight"] = _same(t, h + f"mlp.{role}_proj.weight", folder)
    return config, m


def _bert(cfg: dict, t: _Tensors, folder: Path):
    d = int(_need(cfg, "hidden_size", folder))
    n_head = int(_need(cfg, "num_attention_heads", folder))
    act = cfg.get("hidden_act", "gelu")
    activation = {"gelu": "gelu_erf", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if activation is None:
        raise UserError(f"{folder / 'config.json'}: hidden_act {act!r} is not supported for bert; "
                        "supported: gelu, gelu_new")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{folder / 'config.json'}: position_embedding_type "
                        f"{cfg.get('position_embedding_type')!r} is not supported; supported: absolute")
    config = TransformerConfig(
        family="bert", vocab_size=int(_need(cfg, "vocab_size", folder)), hidden_size=d,
        n_layers=int(_need(cfg, "num_hidden_layers", folder)), n_heads=n_head, n_kv_heads=n_head,
        head_dim=d // n_head if n_head else 0, intermediate_size=int(_need(cfg, "intermediate_size", folder)),
        max_position=int(cfg.get("max_position_embeddings", 512)), norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        tie_embeddings=False, activation=activation, type_vocab_size=int(cfg.get("type_vocab_size", 2)),
    )
    p = _find_prefix(t, ["bert.", ""], "embeddings.word_embeddings.weight", folder)

    def ln(prefix: str, canon: str, m: dict) -> None:
        for new, olds in (("weight", ("weight", "gamma")), ("bias", ("bias", "beta"))):
            for old in olds:
                if prefix + old in t.where:
                    m[f"{canon}.{new}"] = _same(t, prefix + old, folder)
                    break
            else:
                raise UserError(f"{folder}: missing tensor '{prefix}weight'; the checkpoint is incomplete")

    e = p + "embeddings."
    m: dict[str, Any] = {
        "tok_embed.weight": _same(t, e + "word_embeddings.weight", folder),
        "pos_embed.weight": _same(t, e + "position_embeddings.weight", folder),
        "type_embed.weight": _same(t, e + "token_type_embeddings.weight", folder),
    }
    ln(e + "LayerNorm.", "embed_norm", m)
    for i in range(config.n_layers):
        h, c = f"{p}encoder.layer.{i}.", f"layers.{i}."
        for role, name in (("q", "query"), ("k", "key"), ("v", "value")):
            m[c + f"attn.{role}.weight"] = _same(t, h + f"attention.self.{name}.weight", folder)
            m[c + f"attn.{role}.bias"] = _same(t, h + f"attention.self.{name}.bias", folder)
        m[c + "attn.o.weight"] = _same(t, h + "attention.output.dense.weight", folder)
        m[c + "attn.o.bias"] = _same(t, h + "attention.output.dense.bias", folder)
        ln(h + "attention.output.LayerNorm.", c + "attn_norm", m)
        m[c + "mlp.up.weight"] = _same(t, h + "intermediate.dense.weight", folder)
        m[c + "mlp.up.bias"] = _same(t, h + "intermediate.dense.bias", folder)
        m[c + "mlp.down.weight"] = _same(t, h + "output.dense.weight", folder)
        m[c + "mlp.down.bias"] = _same(t, h + "output.dense.bias", folder)
        ln(h + "output.LayerNorm.", c + "mlp_norm", m)
    return config, m


def _tokenizer(folder: Path) -> str | None:
    p = folder / "tokenizer.json"
    if p.exists():
        return p.read_text(encoding="utf-8")
    return None


def _generation(folder: Path, cfg: dict) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    gc = folder / "generation_config.json"
    src = _read_json(gc) if gc.exists() else {}
    eos = src.get("eos_token_id", cfg.get("eos_token_id"))
    gen["eos_token_ids"] = [int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    bos = src.get("bos_token_id", cfg.get("bos_token_id"))
    gen["bos_token_id"] = int(bos) if bos is not None else None
    pad = src.get("pad_token_id", cfg.get("pad_token_id"))
    gen["pad_token_id"] = int(pad) if pad is not None else None
    tc = folder / "tokenizer_config.json"
    tcfg = _read_json(tc) if tc.exists() else {}
    tmpl = tcfg.get("chat_template")
    gen["chat_template"] = tmpl if isinstance(tmpl, str) else None
    st = folder / "sentence_bert_config.json"
    if st.exists():
        gen["max_seq_length"] = int(_read_json(st).get("max_seq_length", 512))
    pool = folder / "1_Pooling" / "config.json"
    if pool.exists():
        pc = _read_json(pool)
        if not pc.get("pooling_mode_mean_tokens", False):
            modes = [k for k, v in pc.items() if k.startswith("pooling_mode") and v]
            raise UserError(f"{pool}: pooling {modes} is not supported; supported: mean pooling")
    gen["normalize"] = (folder / "modules.json").exists() and "Normalize" in (folder / "modules.json").read_text()
    return gen


def looks_like_hf(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").exists()


