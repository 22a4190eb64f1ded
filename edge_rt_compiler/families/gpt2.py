"""GPT-2: learned positions, LayerNorm before attention and MLP, GELU (tanh) MLP, head tied to the embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}


def from_hf(cfg: dict, t: Checkpoint, folder: Path) -> tuple[TransformerConfig, Mapping]:
    """config.json + tensor names of GPT2LMHeadModel (Conv1D weights as `[out, in]`)."""
    d = cfg_int(cfg, "n_embd", folder, "hidden_size")
    n_layer = cfg_int(cfg, "n_layer", folder, "num_hidden_layers")
    n_head, _, head_dim = attention_heads(cfg, folder, d, ("n_head", "num_attention_heads"))
    act = cfg_str(cfg, "activation_function", folder, "gelu_new", ACTIVATIONS)
    config = TransformerConfig(
        family="gpt2", vocab_size=cfg_int(cfg, "vocab_size", folder), hidden_size=d, n_layers=n_layer,
        n_heads=n_head, n_kv_heads=n_head, head_dim=head_dim,
        intermediate_size=cfg_int(cfg, "n_inner", folder, default=4 * d, null_is_default=True),
        max_position=cfg_int(cfg, "n_positions", folder, "n_ctx"),
        norm_eps=cfg_float(cfg, "layer_norm_epsilon", folder, 1e-5), tie_embeddings=True,
        activation=ACTIVATIONS[act],
    )
    p = find_prefix(t, ["transformer.", ""], "wte.weight", folder)
    m: Mapping = {"tok_embed.weight": same(t, p + "wte.weight", folder),
                  "pos_embed.weight": same(t, p + "wpe.weight", folder),
                  "final_norm.weight": same(t, p + "ln_f.weight", folder),
                  "final_norm.bias": same(t, p + "ln_f.bias", folder)}

    def conv1d(name: str, cols: slice | None = None):  # noqa: ANN202
        # GPT-2's Conv1D stores [in, out]; the IR wants [out, in] (c_attn: q, k, v side by side in `out`).
        if not t.has(name):
            raise UserError(f"{folder}: missing tensor '{name}'; the checkpoint is incomplete")
        shape = t.shape(name)
        if cols is None:
            return name, (lambda a: np.ascontiguousarray(a.T)), tuple(shape[::-1])
        n_out = cols.stop - cols.start
        if len(shape) == 2:
            return name, (lambda a: np.ascontiguousarray(a[:, cols].T)), (n_out, shape[0])
        return name, (lambda a: np.ascontiguousarray(a[cols])), (n_out,)

    for i in range(n_layer):
        h, c = f"{p}h.{i}.", f"layers.{i}."
        for j, role in enumerate("qkv"):
            sl = slice(j * d, (j + 1) * d)
            m[c + f"attn.{role}.weight"] = conv1d(h + "attn.c_attn.weight", sl)
            m[c + f"attn.{role}.bias"] = conv1d(h + "attn.c_attn.bias", sl)
        m[c + "attn.o.weight"] = conv1d(h + "attn.c_proj.weight")
        m[c + "attn.o.bias"] = same(t, h + "attn.c_proj.bias", folder)
        m[c + "mlp.up.weight"] = conv1d(h + "mlp.c_fc.weight")
        m[c + "mlp.up.bias"] = same(t, h + "mlp.c_fc.bias", folder)
        m[c + "mlp.down.weight"] = conv1d(h + "mlp.c_proj.weight")
        m[c + "mlp.down.bias"] = same(t, h + "mlp.c_proj.bias", folder)
        for ln, role in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            m[c + f"{role}.weight"] = same(t, h + f"{ln}.weight", folder)
            m[c + f"{role}.bias"] = same(t, h + f"{ln}.bias", folder)
    return config, m


def build(b: GraphBuilder, c: TransformerConfig, where: str) -> None:
    """Token + position embeddings, pre-norm blocks, the tied head."""
    ids, pos = B.decoder_inputs(b)
    b.begin_unit("embed")
    tok = B.embedding(b, "embed.tok", "tok_embed.weight", ids, "x.tok", where)
    x = B.add(b, "embed", tok, B.embedding(b, "embed.pos", "pos_embed.weight", pos, "x.pos", where), "x.embed")
    for i in range(c.n_layers):
        b.begin_unit(f"layer.{i}")
        L, p = f"layers.{i}", f"l{i}."
        h = B.norm(b, "layer", c.norm_eps, f"{L}.attn_norm", x, f"{L}.attn_norm", p + "h_attn", where)
        x = B.add(b, f"{L}.attn_residual", x, B.causal_attention(b, c, i, h, None, where), p + "x_attn")
        h = B.norm(b, "layer", c.norm_eps, f"{L}.mlp_norm", x, f"{L}.mlp_norm", p + "h_mlp", where)
        x = B.add(b, f"{L}.mlp_residual", x, B.gelu_mlp(b, c, i, h, where), p + "x_mlp")
    B.lm_head(b, c, "layer", x, where)


FAMILY = Family("gpt2", "decoder", ("gpt2",), from_hf, build)
