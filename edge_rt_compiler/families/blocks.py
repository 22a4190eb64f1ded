"""Shared block builders of the transformer families: inputs, embedding, norm, attention, MLP, head, pooling.

Each appends a few registry ops to a `GraphBuilder` whose weights are already registered under their
canonical names (docs/architecture.md). Activations are `[T, width]` (T: the token rows of one step); a
family file composes these and differs from another only where the model really does (llama.cpp's
`src/models/*.cpp` are the model)."""

from __future__ import annotations

from typing import Any

from edge_rt_exec.errors import UserError
from edge_rt_exec.ops.attention import ROPE_TYPES

from ..ir import WEIGHT_REF, GraphBuilder
from .base import TransformerConfig

# ---- weights -----------------------------------------------------------------------------------------------


def has(b: GraphBuilder, name: str) -> bool:
    return name in b.g.graph["weights"]


def w(b: GraphBuilder, name: str, where: str) -> str:
    """The input reference of a required weight."""
    if not has(b, name):
        raise UserError(f"{where}: weight '{name}' does not exist in the model; the checkpoint is incomplete")
    return WEIGHT_REF + name


# ---- inputs ------------------------------------------------------------------------------------------------


def decoder_inputs(b: GraphBuilder) -> tuple[str, str]:
    """ids and positions `[T]`; the KV cache (state) is added per layer by `causal_attention`."""
    b.symbols({"T": "tokens", "C": "context"})
    b.g.graph["kv"] = {"mode": "cache", "pairs": []}
    return b.input("ids", "int64", ["T"], "ids"), b.input("positions", "int64", ["T"], "positions")


def encoder_inputs(b: GraphBuilder) -> tuple[str, str, str, str]:
    """ids, positions, type_ids `[T]` and the padding mask `[B, S]` of B sentences padded to S (T = B * S)."""
    b.symbols({"T": "tokens", "B": "batch", "S": "seq"})
    ids = b.input("ids", "int64", ["T"], "ids")
    pos = b.input("positions", "int64", ["T"], "positions")
    types = b.input("type_ids", "int64", ["T"], "type_ids")
    return ids, pos, types, b.input("mask", "int64", ["B", "S"], "mask")


# ---- blocks ------------------------------------------------------------------------------------------------


def embedding(b: GraphBuilder, name: str, table: str, ids: str, out: str, where: str) -> str:
    """`Gather` rows of a table (any weight format; never loaded whole in streamed plans)."""
    return b.op("Gather", name, [w(b, table, where), ids], [out], {"axis": 0})


def add(b: GraphBuilder, name: str, x: str, y: str, out: str) -> str:
    return b.op("Add", name, [x, y], [out])


#: The norm each family uses.
NORMS = {"rms": "RMSNormalization", "layer": "LayerNormalization"}


def norm(b: GraphBuilder, kind: str, eps: float, name: str, x: str, prefix: str, out: str, where: str) -> str:
    """RMSNorm (`prefix.weight`) or LayerNorm (`prefix.weight`, `prefix.bias`) over the last axis."""
    ins = [x, w(b, f"{prefix}.weight", where)] + ([w(b, f"{prefix}.bias", where)] if kind == "layer" else [])
    return b.op(NORMS[kind], name, ins, [out], {"axis": -1, "epsilon": eps})


def linear(b: GraphBuilder, name: str, x: str, prefix: str, out_features: int, out: str, where: str,
           last_row: bool = False) -> str:
    """`Linear(x, @weight[, @bias])`; weight `[out_features, in]`."""
    ins = [x, w(b, f"{prefix}.weight", where)]
    if has(b, f"{prefix}.bias"):
        ins.append(w(b, f"{prefix}.bias", where))
    attrs: dict[str, Any] = {"out_features": out_features}
    if last_row:
        attrs["last_row"] = 1
    return b.op("Linear", name, ins, [out], attrs)


def rope(c: TransformerConfig, where: str) -> dict[str, Any]:
    """The CausalAttention `rope` attribute; scaling types the executor cannot run are refused here, once."""
    s = c.rope_scaling
    kind = (s or {}).get("rope_type", (s or {}).get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UserError(f"{where}: RoPE scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}); "
                        "use a model without it or with one of those")
    return {"theta": c.rope_theta, "scaling": s}


def causal_attention(b: GraphBuilder, c: TransformerConfig, i: int, h: str, rope_attr: dict | None,
                     where: str) -> str:
    """q, k, v projections, RoPE + KV cache + causal attention in one op, output projection."""
    L, p = f"layers.{i}", f"l{i}."
    H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    q = linear(b, f"{L}.attn.q", h, f"{L}.attn.q", H * hd, p + "q", where)
    k = linear(b, f"{L}.attn.k", h, f"{L}.attn.k", Hkv * hd, p + "k", where)
    v = linear(b, f"{L}.attn.v", h, f"{L}.attn.v", Hkv * hd, p + "v", where)
    kc = b.state(f"kv.{i}.k", (Hkv, "C", hd))
    vc = b.state(f"kv.{i}.v", (Hkv, "C", hd))
    attrs = {"n_heads": H, "n_kv_heads": Hkv, "head_dim": hd, "scale": 1.0 / hd ** 0.5, "rope": rope_attr}
    a = b.op("CausalAttention", f"{L}.attn", [q, k, v, kc, vc, b.g.graph["io"]["positions"]], [p + "attn"], attrs)
    return linear(b, f"{L}.attn.o", a, f"{L}.attn.o", c.hidden_size, p + "attn_out", where)


def bidir_attention(b: GraphBuilder, c: TransformerConfig, i: int, h: str, where: str) -> str:
    """q, k, v projections, attention within each sentence (padding masked), output projection."""
    L, p = f"layers.{i}", f"l{i}."
    H, hd = c.n_heads, c.head_dim
    q = linear(b, f"{L}.attn.q", h, f"{L}.attn.q", H * hd, p + "q", where)
    k = linear(b, f"{L}.attn.k", h, f"{L}.attn.k", H * hd, p + "k", where)
    v = linear(b, f"{L}.attn.v", h, f"{L}.attn.v", H * hd, p + "v", where)
    attrs = {"n_heads": H, "head_dim": hd, "scale": 1.0 / hd ** 0.5}
    a = b.op("BidirAttention", f"{L}.attn", [q, k, v, b.g.graph["io"]["mask"]], [p + "attn"], attrs)
    return linear(b, f"{L}.attn.o", a, f"{L}.attn.o", c.hidden_size, p + "attn_out", where)


def swiglu(b: GraphBuilder, c: TransformerConfig, i: int, h: str, where: str) -> str:
    """down(silu(gate(h)) * up(h))."""
    L, p, F = f"layers.{i}", f"l{i}.", c.intermediate_size
    gate = linear(b, f"{L}.mlp.gate", h, f"{L}.mlp.gate", F, p + "gate", where)
    up = linear(b, f"{L}.mlp.up", h, f"{L}.mlp.up", F, p + "up", where)
    m = b.op("SiluMul", f"{L}.mlp.act", [gate, up], [p + "act"])
    return linear(b, f"{L}.mlp.down", m, f"{L}.mlp.down", c.hidden_size, p + "down", where)


def gelu_mlp(b: GraphBuilder, c: TransformerConfig, i: int, h: str, where: str) -> str:
    """down(gelu(up(h))), GELU's tanh or erf form per the config."""
    L, p, F = f"layers.{i}", f"l{i}.", c.intermediate_size
    up = linear(b, f"{L}.mlp.up", h, f"{L}.mlp.up", F, p + "up", where)
    approximate = {"gelu_tanh": "tanh", "gelu_erf": "none"}[c.activation]
    m = b.op("Gelu", f"{L}.mlp.act", [up], [p + "act"], {"approximate": approximate})
    return linear(b, f"{L}.mlp.down", m, f"{L}.mlp.down", c.hidden_size, p + "down", where)


def lm_head(b: GraphBuilder, c: TransformerConfig, norm_kind: str, x: str, where: str) -> str:
    """The final norm, then the last row's logits `[1, vocab]`: from `lm_head.weight`, or the token
    embedding table itself when tied (the same table, in the same format, the embedding gathers from)."""
    b.begin_unit("head")
    xf = norm(b, norm_kind, c.norm_eps, "final_norm", x, "final_norm", "x.final", where)
    table = "lm_head" if has(b, "lm_head.weight") else "tok_embed"
    logits = linear(b, "lm_head", xf, table, c.vocab_size, "logits", where, last_row=True)
    return b.output(logits, "logits")


def mean_pool(b: GraphBuilder, x: str) -> str:
    """sentence-transformers mean pooling and L2 normalisation -> `[B, hidden]`."""
    b.begin_unit("pool")
    out = b.op("MeanPoolL2", "pool", [x, b.g.graph["io"]["mask"]], ["embeddings"])
    return b.output(out, "embeddings")
