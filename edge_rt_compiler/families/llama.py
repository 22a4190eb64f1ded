"""Llama (SmolLM2, TinyLlama, Llama 2/3): RMSNorm, GQA attention with RoPE, SwiGLU MLP, optionally tied head.

q/k weights are in the HF layout (RoPE "rotate_half" pairs `(j, j + hd/2)`); the GGUF frontend undoes
llama.cpp's interleaving permutation before they get here."""

from __future__ import annotations

from pathlib import Path

from ..ir import GraphBuilder
from . import blocks as B
from .base import (
    Checkpoint,
    Family,
    Mapping,
    TransformerConfig,
    attention_heads,
    cfg_bool,
    cfg_float,
    cfg_int,
    cfg_str,
    find_prefix,
    rope_params,
    same,
)


def from_hf(cfg: dict, t: Checkpoint, folder: Path, family: str = "llama",
            biases: tuple[str, ...] = ()) -> tuple[TransformerConfig, Mapping]:
    """config.json + tensor names of LlamaForCausalLM. `biases`: projections that must have a bias (qwen2's
    q, k, v); others take one when the checkpoint has it (`attention_bias`)."""
    d = cfg_int(cfg, "hidden_size", folder)
    n_head, n_kv, head_dim = attention_heads(cfg, folder, d, ("num_attention_heads", None), "num_key_value_heads",
                                             "head_dim")
    act = cfg_str(cfg, "hidden_act", folder, "silu", ("silu",))
    tie = cfg_bool(cfg, "tie_word_embeddings", folder, False)
    if not tie and not t.has("lm_head.weight"):
        tie = True  # some exports drop the tied copy
    theta, scaling = rope_params(cfg, folder)
    config = TransformerConfig(
        family=family, vocab_size=cfg_int(cfg, "vocab_size", folder), hidden_size=d,
        n_layers=cfg_int(cfg, "num_hidden_layers", folder), n_heads=n_head, n_kv_heads=n_kv, head_dim=head_dim,
        intermediate_size=cfg_int(cfg, "intermediate_size", folder),
        max_position=cfg_int(cfg, "max_position_embeddings", folder, default=2048),
        norm_eps=cfg_float(cfg, "rms_norm_eps", folder, 1e-6),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=tie, activation=act,
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
