"""quantize: the storage format of every weight (`quant=`), and the KV cache's element type (`kv_dtype=`).

Only weights that `Linear` ops read as their weight (input 1) or that only row gathers read (embedding tables,
a tied LM head's table being both) are quantized, and only when their rows are whole blocks of the format;
everything else (norms, biases, ONNX MatMul/Gemm operands) stays f32. Per `quant`:

- `keep`: each tensor stays in the format the source stores it in: a GGUF tensor in a format the executor runs
  (`formats.NATIVE_GGML`) is copied raw, never dequantized; K-quants and the 5-bit types are repacked to the
  nearest native format (`formats.REPACK_GGML`, stated in the compile output). HF, ONNX and synthetic sources
  are float32 (bf16/f16 checkpoints are widened when read), so `keep` is `f32` for them.
- `f32`, `f16`, `q8_0`, `q4_0`, `q4_1`: that format, quantized at compile time by `formats.<fmt>.quantize`
  (bit-identical to `gguf.quants.quantize`); a GGUF tensor already in that format is copied raw.
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx

from edge_rt_exec import formats
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan_check import KV_DTYPES as KV_BUFFER_DTYPES

from ..ir import TensorSpec, Weight, is_row_gather, weight_users
from ..sizes import fmt_bytes

#: quant= values
QUANTS = ("keep",) + tuple(formats.FORMATS)
#: kv_dtype= values -> the plan's `kv_dtype` (the cache buffers hold float16 as its raw uint16 bits, as the
#: executor's plan check wants them: `plan_check.KV_DTYPES`)
KV_DTYPES = {"f32": "float32", "f16": "float16"}


def check_settings(quant: str, kv_dtype: str) -> None:
    """Refuse an unknown quant= or kv_dtype= with one line."""
    if quant not in QUANTS:
        raise UserError(f"quant={quant} is not a weight format; choose one of {', '.join(QUANTS)}")
    if kv_dtype not in KV_DTYPES:
        raise UserError(f"kv_dtype={kv_dtype} is not a KV-cache type; choose one of {', '.join(KV_DTYPES)}")


def quantizable(g: nx.DiGraph) -> set[str]:
    """Weights every reader of which is a Linear (as its weight) or a row gather of a `[rows, d]` table."""
    out = set()
    for w, uses in weight_users(g).items():
        rank = len(g.graph["weights"][w].shape)
        if rank == 2 and all((g.nodes[n]["op"] == "Linear" and i == 1) or
                             is_row_gather(g.nodes[n]["op"], g.nodes[n]["attrs"], i, rank) for n, i in uses):
            out.add(w)
    return out


def source_format(w: Weight) -> str:
    """The native format a weight's source bytes are in, or would be repacked to."""
    if w.data.ggml is None:
        return "f32"
    return formats.NATIVE_GGML.get(w.data.ggml) or formats.REPACK_GGML[w.data.ggml]


def quantize(g: nx.DiGraph, quant: str) -> nx.DiGraph:
    """Every weight's storage format for `quant` (rules above); the notes say what was chosen."""
    check_settings(quant, "f32")
    q = quantizable(g)
    weights: dict[str, Weight] = g.graph["weights"]
    not_linear: list[str] = []
    partial: list[str] = []
    widened: list[str] = []
    repacked: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, w in weights.items():
        want = source_format(w) if quant == "keep" else quant
        if name not in q:
            w.format = "f32"
            if want != "f32":
                (widened if quant == "keep" else not_linear).append(name)
        elif not formats.get(want).supports(w.shape):
            w.format = "f32"
            partial.append(name)
        else:
            w.format = want
        if quant == "keep" and w.data.ggml in formats.REPACK_GGML and w.format == source_format(w):
            repacked[(w.data.ggml, w.format)].append(name)
    notes = g.graph["notes"]
    by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for w in weights.values():
        by[w.format][0] += 1
        by[w.format][1] += w.nbytes
    parts = [f"{f} {k} tensor{'s' if k > 1 else ''} {fmt_bytes(nb)}" for f, (k, nb) in
             sorted(by.items(), key=lambda kv: -kv[1][1])]
    notes.append(f"weights (quant={quant}): " + ", ".join(parts))
    for (ggml, fmt), names in sorted(repacked.items()):
        notes.append(f"repacked {len(names)} {ggml} tensor(s) to {fmt} (no native {ggml} kernels; "
                     f"formats.REPACK_GGML): {_shown(names)}")
    if not_linear:
        notes.append(f"kept f32: {len(not_linear)} tensor(s) read by ops other than Linear weights and embedding "
                     f"gathers (norms, biases, ...): {_shown(not_linear)}")
    if widened:
        notes.append(f"widened to f32: {len(widened)} tensor(s) read by ops other than Linear weights and embedding "
                     f"gathers: {_shown(widened)}")
    if partial:
        blk = formats.get(quant).block if quant != "keep" else formats.QK
        notes.append(f"kept f32: {len(partial)} tensor(s) whose rows are not whole {blk}-weight blocks: "
                     f"{_shown([f'{n} {list(weights[n].shape)}' for n in partial])}")
    return g


def _shown(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def format_tag(g: nx.DiGraph) -> str:
    """The formats of the quantizable weights, most bytes first ("q4_1+q8_0", "f32"): what artifact names say."""
    by: dict[str, int] = defaultdict(int)
    for name in quantizable(g):
        w = g.graph["weights"][name]
        by[w.format] += w.nbytes
    return "+".join(sorted(by, key=lambda f: (-by[f], f))) or "f32"


def kv_cache(g: nx.DiGraph, kv_dtype: str) -> nx.DiGraph:
    """The KV cache state in `kv_dtype` (graphs with a KV cache; ONNX pasts keep the graph's own type)."""
    check_settings("keep", kv_dtype)
    dtype = KV_BUFFER_DTYPES[KV_DTYPES[kv_dtype]]
    if g.graph["kv"]["mode"] == "cache":
        g.graph["state"] = {n: TensorSpec(s.shape, dtype) for n, s in g.graph["state"].items()}
    elif kv_dtype != "f32":
        g.graph["notes"].append(f"kv_dtype={kv_dtype} ignored: {g.graph['name']} has no KV cache of its own")
    return g
