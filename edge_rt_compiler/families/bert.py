"""BERT encoders (all-MiniLM-L6-v2): token + position + type embeddings and a LayerNorm, post-norm blocks with
GELU (erf) MLPs, then sentence-transformers mean pooling and L2 normalisation."""

from __future__ import annotations

from pathlib import Path

from edge_rt_exec.errors import UserError

from ..ir import GraphBuilder
from . import blocks as B
from .base import (
    Checkpoint,
    Family,
    Mapping,
    TransformerConfig,
    attention_heads,
    cfg_float,
    cfg_int,
    cfg_str,
    find_prefix,
    same,
)

ACTIVATIONS = {"gelu": "gelu_erf", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def from_hf(cfg: dict, t: Checkpoint, folder: Path) -> tuple[TransformerConfig, Mapping]:
    """config.json + tensor names of BertModel (sentence-transformers folders)."""
    d = cfg_int(cfg, "hidden_size", folder)
    n_head, _, head_dim = attention_heads(cfg, folder, d, ("num_attention_heads", None))
    act = cfg_str(cfg, "hidden_act", folder, "gelu", ACTIVATIONS)
    cfg_str(cfg, "position_embedding_type", folder, "absolute", ("absolute",))
    config = TransformerConfig(
        family="bert", vocab_size=cfg_int(cfg, "vocab_size", folder), hidden_size=d,
        n_layers=cfg_int(cfg, "num_hidden_layers", folder), n_heads=n_head, n_kv_heads=n_head, head_dim=head_dim,
        intermediate_size=cfg_int(cfg, "intermediate_size", folder),
        max_position=cfg_int(cfg, "max_position_embeddings", folder, default=512),
        norm_eps=cfg_float(cfg, "layer_norm_eps", folder, 1e-12), tie_embeddings=False,
        activation=ACTIVATIONS[act], type_vocab_size=cfg_int(cfg, "type_vocab_size", folder, default=2),
    )
    p = find_prefix(t, ["bert.", ""], "embeddings.word_embeddings.weight", folder)

    def ln(prefix: str, canon: str) -> None:
        for new, olds in (("weight", ("weight", "gamma")), ("bias", ("bias", "beta"))):
            old = next((o for o in olds if t.has(prefix + o)), None)
            if old is None:
                raise UserError(f"{folder}: missing tensor '{prefix}{new}'; the checkpoint is incomplete")
            m[f"{canon}.{new}"] = same(t, prefix + old, folder)

    e = p + "embeddings."
    m: Mapping = {"tok_embed.weight": same(t, e + "word_embeddings.weight", folder),
                  "pos_embed.weight": same(t, e + "position_embeddings.weight", folder),
                  "type_embed.weight": same(t, e + "token_type_embeddings.weight", folder)}
    ln(e + "LayerNorm.", "embed_norm")
    for i in range(config.n_layers):
        h, c = f"{p}encoder.layer.{i}.", f"layers.{i}."
        for role, name in (("q", "query"), ("k", "key"), ("v", "value")):
            m[c + f"attn.{role}.weight"] = same(t, h + f"attention.self.{name}.weight", folder)
            m[c + f"attn.{role}.bias"] = same(t, h + f"attention.self.{name}.bias", folder)
        m[c + "attn.o.weight"] = same(t, h + "attention.output.dense.weight", folder)
        m[c + "attn.o.bias"] = same(t, h + "attention.output.dense.bias", folder)
        ln(h + "attention.output.LayerNorm.", c + "attn_norm")
        m[c + "mlp.up.weight"] = same(t, h + "intermediate.dense.weight", folder)
        m[c + "mlp.up.bias"] = same(t, h + "intermediate.dense.bias", folder)
        m[c + "mlp.down.weight"] = same(t, h + "output.dense.weight", folder)
        m[c + "mlp.down.bias"] = same(t, h + "output.dense.bias", folder)
        ln(h + "output.LayerNorm.", c + "mlp_norm")
    return config, m


def build(b: GraphBuilder, c: TransformerConfig, where: str) -> None:
    """Embeddings + LayerNorm, post-norm encoder blocks, mean pooling."""
    ids, pos, types, _ = B.encoder_inputs(b)
    b.begin_unit("embed")
    x = B.embedding(b, "embed.tok", "tok_embed.weight", ids, "x.tok", where)
    x = B.add(b, "embed.add_pos", x, B.embedding(b, "embed.pos", "pos_embed.weight", pos, "x.pos", where), "x.tp")
    x = B.add(b, "embed", x, B.embedding(b, "embed.type", "type_embed.weight", types, "x.type", where), "x.sum")
    x = B.norm(b, "layer", c.norm_eps, "embed_norm", x, "embed_norm", "x.embed", where)
    for i in range(c.n_layers):
        b.begin_unit(f"layer.{i}")
        L, p = f"layers.{i}", f"l{i}."
        x = B.add(b, f"{L}.attn_residual", x, B.bidir_attention(b, c, i, x, where), p + "x_attn")
        x = B.norm(b, "layer", c.norm_eps, f"{L}.attn_norm", x, f"{L}.attn_norm", p + "x_attn_norm", where)
        x = B.add(b, f"{L}.mlp_residual", x, B.gelu_mlp(b, c, i, x, where), p + "x_mlp")
        x = B.norm(b, "layer", c.norm_eps, f"{L}.mlp_norm", x, f"{L}.mlp_norm", p + "x_mlp_norm", where)
    B.mean_pool(b, x)


FAMILY = Family("bert", "encoder", ("bert",), from_hf, build)
