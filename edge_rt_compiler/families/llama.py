"""Llama (SmolLM2, TinyLlama, Llama 2/3): RMSNorm, GQA attention with RoPE, SwiGLU MLP, optionally tied head.

q/k weights are in the HF layout (RoPE "rotate_half" pairs `(j, j + hd/2)`); the GGUF frontend undoes
llama.cpp's interleaving permutation before they get here."""

from __future__ import annotations

from pathlib import Path

from edge_rt_exec.errors import UserError

from ..ir import GraphBuilder
from . import blocks as B
from .base import Checkpoint, Family, Mapping, TransformerConfig, find_prefix, need, rope_params, same


def from_hf(cfg: dict, t: Checkpoint, folder: Path, family: str = "llama",
            biases: tuple[str, ...] = ()) -> tuple[TransformerConfig, Mapping]:
    """config.json + tensor names of LlamaForCausalLM. `biases`: projections that must have a bias (qwen2's
    q, k, v); others take one when the checkpoint has it (`attention_bias`)."""
    d = int(need(cfg, "hidden_size", folder))
    n_head = int(need(cfg, "num_attention_heads", folder))
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{folder / 'config.json'}: hidden_act {act!r} is not supported for {family}; supported: silu")
    tie = bool(cfg.get("tie_word_embeddings", False))
    if not tie and not t.has("lm_head.weight"):
        tie = True  # some exports drop the tied copy
    theta, scaling = rope_params(cfg)
    config = TransformerConfig(
        family=family, vocab_size=int(need(cfg, "vocab_size", folder)), hidden_size=d,
        n_layers=int(need(cfg, "num_hidden_layers", folder)), n_heads=n_head, n_kv_heads=n_kv,
        head_dim=int(cfg.get("head_dim") or (d // n_head if n_head else 0)),
        intermediate_size=int(need(cfg, "intermediate_size", folder)),
        max_position=int(cfg.get("max_position_embeddings", 2048)), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=tie, activation="silu",
    )
    p = find_prefix(t, ["model.", ""], "embed_tokens.weight", folder)
    m: Mapping = {"tok_embed.weight": same(t, p + "embed_tokens.weight", folder),
                  "final_norm.weight": same(t, p + "norm.weight", folder)}
    if not tie:
        m["lm_head.weight"] = same(t, "lm_head.weight", folder)
    for i in range(config.n_layers):
        h, c = f"{p}layers.{i}.", f"layers.{i}."
        m[c + "attn_norm.weight"] = same(t, h + "input_layernorm.weight", folder)
        m[c + "mlp_norm.weight"] = same(t, h + "post_attention_layernorm.weight", folder)
        for role in "qkvo":
            m[c + f"attn.{role}.weight"] = same(t, h + f"self_attn.{role}_proj.weight", folder)
            if role in biases or t.has(h + f"self_attn.{role}_proj.bias"):
                m[c + f"attn.{role}.bias"] = same(t, h + f"self_attn.{role}_proj.bias", folder)
        for role in ("gate", "up", "down"):
            m[c + f"mlp.{role}.weight"] = same(t, h + f"mlp.{role}_proj.weight", folder)
    return config, m


def build(b: GraphBuilder, c: TransformerConfig, where: str) -> None:
    """Token embedding, pre-RMSNorm blocks with RoPE attention and SwiGLU, the head."""
    ids, _ = B.decoder_inputs(b)
    b.begin_unit("embed")
    x = B.embedding(b, "embed", "tok_embed.weight", ids, "x.embed", where)
    rope = B.rope(c, where)
    for i in range(c.n_layers):
        b.begin_unit(f"layer.{i}")
        L, p = f"layers.{i}", f"l{i}."
        h = B.norm(b, "rms", c.norm_eps, f"{L}.attn_norm", x, f"{L}.attn_norm", p + "h_attn", where)
        x = B.add(b, f"{L}.attn_residual", x, B.causal_attention(b, c, i, h, rope, where), p + "x_attn")
        h = B.norm(b, "rms", c.norm_eps, f"{L}.mlp_norm", x, f"{L}.mlp_norm", p + "h_mlp", where)
        x = B.add(b, f"{L}.mlp_residual", x, B.swiglu(b, c, i, h, where), p + "x_mlp")
    B.lm_head(b, c, "rms", x, where)


FAMILY = Family("llama", "decoder", ("llama",), from_hf, build)
