"""GGUF frontend: a llama.cpp GGUF file -> canonical config + weights in their own formats + tokenizer.

`load_gguf(path)` returns a `GGUFModel`:

- `config`: the canonical TransformerConfig fields (docs/architecture.md) read from the `llama.*` metadata;
- `tensors`: canonical weight name -> `GGUFTensor` (shape in numpy/HF order, linear weights `[out, in]`;
  `load_raw()` gives the stored rows in the file's own GGML type, `load()` dequantizes them with
  `gguf.quants` to a C-contiguous float32 array);
- `tokenizer_json`: a Hugging Face tokenizer.json rebuilt from the tokenizer metadata (`gguf_tokenizer.py`);
- `generation`: bos / eos / pad ids, whether BOS is added, the chat template and the model name.

Order of work: the header is walked first with a bounded parser of our own (every length, count and tensor
extent checked against the file size), so that a truncated or corrupt file is reported as one `UserError`
naming what is wrong, before `gguf.GGUFReader` (which trusts the header) parses it and before any tensor
data is touched.

Q/K layout: llama.cpp's converter permutes the rows of `attn_q` / `attn_k` within every head so that GGML's
interleaved RoPE (pairs `(2j, 2j+1)`) computes what HF's rotate_half RoPE (pairs `(j, j + hd/2)`) computes.
Here that permutation is undone (`unpermute_qk`) on the stored rows themselves (the rows of ggml blocks are
independent, so a quantized tensor is unpermuted without being dequantized), the same way transformers' GGUF
loader does on float weights (`LlamaTensorProcessor._reverse_permute_weights`).
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_rt_exec.errors import UserError

from ..chat_template import check_template_text
from .gguf_header import SUPPORTED_TYPES, walk_header
from .gguf_tokenizer import default_add_bos, tokenizer_json_from_gguf

__all__ = ["GGUFModel", "GGUFTensor", "load_gguf", "unpermute_qk", "SUPPORTED_TYPES", "CONFIG_KEYS"]


#: exactly the canonical TransformerConfig fields, in their declared order
CONFIG_KEYS = ("family", "vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
               "intermediate_size", "max_position", "norm_eps", "rope_theta", "rope_scaling", "tie_embeddings",
               "activation", "type_vocab_size")

SUPPORTED_ARCHITECTURES = ("llama",)
#: Largest count a GGUF's metadata may state (int32, as the executor's indices).
MAX_SIZE = (1 << 31) - 1

# GGUF tensor name (llama) -> canonical name; `{i}` = layer
_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embed.weight",
    "output_norm.weight": "final_norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q.weight",
    "attn_k.weight": "attn.k.weight",
    "attn_v.weight": "attn.v.weight",
    "attn_output.weight": "attn.o.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
}


@dataclass(frozen=True)
class GGUFTensor:
    """One canonical weight, known by shape before it is read."""

    shape: tuple[int, ...]  #: numpy / HF order (linear weights `[out, in]`)
    dtype: str  #: "float32" (what `load()` returns)
    source_type: str  #: the GGML type in the file ("Q4_1", "F32", ...)
    source_name: str  #: the tensor's name in the GGUF file
    _raw: Callable[[], np.ndarray] = field(repr=False, compare=False)
    _loader: Callable[[], np.ndarray] = field(repr=False, compare=False)

    def load_raw(self) -> np.ndarray:
        """The stored rows in the file's own type, q/k rows unpermuted: `[rows, row_bytes]` uint8 for block
        types, the float array for F32/F16 (a fresh copy, never a view of the file)."""
        return self._raw()

    def load(self) -> np.ndarray:
        """Dequantize now; a fresh C-contiguous float32 array of `shape`."""
        return self._loader()


@dataclass
class GGUFModel:
    config: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    tokenizer_json: str
    generation: dict[str, Any]
    path: Path | None = None


# --------------------------------------------------------------------------------------------------------
# Q/K un-permutation
# --------------------------------------------------------------------------------------------------------


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` on the rows of a q (n_heads) or k (n_kv_heads) weight.

    llama.cpp: `w.reshape(n, 2, hd//2, in).swapaxes(1, 2)` -> GGUF row `h*hd + 2j + s` is HF row
    `h*hd + s*hd/2 + j`. The inverse views the GGUF rows as `(n, hd//2, 2)` and swaps back.
    """
    rows = w.shape[0]
    hd = rows // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# --------------------------------------------------------------------------------------------------------
# metadata helpers
# --------------------------------------------------------------------------------------------------------


class _Meta:
    def __init__(self, reader: Any, where: str) -> None:
        self.reader, self.where = reader, where

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise UserError(f"{self.where}: GGUF metadata '{key}' cannot be decoded ({type(e).__name__}); "
                            "the file is corrupt, re-download or re-convert it") from None

    def need(self, key: str) -> Any:
        if not self.has(key):
            raise UserError(f"{self.where}: required GGUF metadata key '{key}' is missing; re-convert the model with "
                            "llama.cpp's convert_hf_to_gguf.py")
        return self.get(key)

    def int(self, key: str, default: int | None = None, *, required: bool = True, minimum: int = 1,
            maximum: int = MAX_SIZE) -> int:
        if not self.has(key) and not required:
            assert default is not None
            return default
        v = self.need(key)
        if isinstance(v, list) and v and all(x == v[0] for x in v):  # per-layer array with one value
            v = v[0]
        if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
            shown = repr(v) if not isinstance(v, list) else f"an array of {len(v)} different values"
            raise UserError(f"{self.where}: GGUF metadata '{key}' = {shown[:60]}, expected an integer in "
                            f"[{minimum}, {maximum}]; fix or re-convert the file")
        return int(v)

    def float(self, key: str, default: float | None = None) -> float:
        if not self.has(key) and default is not None:
            return default
        v = self.need(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{self.where}: GGUF metadata '{key}' = {v!r}, expected a positive number; "
                            "fix or re-convert the file")
        # stored as float32: keep the shortest decimal that round-trips (1e-05, not 9.99999974738e-06)
        return float(str(np.float32(v)))


def _rope_scaling(m: _Meta, arch: str) -> dict[str, Any] | None:
    kind = m.get(f"{arch}.rope.scaling.type")
    factor = m.get(f"{arch}.rope.scaling.factor")
    if kind is None:
        if m.has(f"{arch}.rope.scale_linear"):
            legacy = m.float(f"{arch}.rope.scale_linear")
            if legacy != 1.0:
                return {"rope_type": "linear", "factor": legacy}
        return None
    if kind == "none":
        return None
    if factor is None:
        raise UserError(f"{m.where}: GGUF metadata '{arch}.rope.scaling.type' = {kind!r} but "
                        f"'{arch}.rope.scaling.factor' is missing; fix or re-convert the file")
    if kind == "linear":
        return {"rope_type": "linear", "factor": m.float(f"{arch}.rope.scaling.factor")}
    if kind == "yarn":
        d: dict[str, Any] = {"rope_type": "yarn", "factor": m.float(f"{arch}.rope.scaling.factor")}
        if m.has(f"{arch}.rope.scaling.original_context_length"):
            d["original_max_position_embeddings"] = m.int(f"{arch}.rope.scaling.original_context_length")
        for gg, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                       ("yarn_ext_factor", "extrapolation_factor"), ("yarn_attn_factor", "attention_factor")):
            if m.has(f"{arch}.rope.scaling.{gg}"):
                d[hf] = m.float(f"{arch}.rope.scaling.{gg}")
        return d
    raise UserError(f"{m.where}: RoPE scaling type {kind!r} ('{arch}.rope.scaling.type') is not supported; "
                    "supported: none, linear")


def _blocks(names: Iterable[str]) -> set[int]:
    """The N of every `blk.N.*` tensor."""
    return {int(p[1]) for p in (n.split(".", 2) for n in names) if len(p) == 3 and p[0] == "blk" and p[1].isdigit()}


def _bounded(m: _Meta, key: str, value: int, found: int | None, what: str) -> int:
    """A metadata count checked against the tensors present (`found`, None when that tensor is missing: the
    missing tensor is reported later), before anything is sized from it. `what` says where `{found}` comes from."""
    if found is not None and value != found:
        raise UserError(f"{m.where}: GGUF metadata '{key}' = {value} but {what.format(found=found)}; the header does "
                        "not match the tensors, fix or re-convert the file")
    return value


def _config(m: _Meta, dims: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The canonical config from the metadata; every count that sizes something (blocks, widths, heads, vocabulary)
    is checked against the tensors actually in the file (`dims`: GGML order, ne0 first) before it is used."""
    arch = m.need("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{m.where}: GGUF architecture {arch!r} (general.architecture) is not supported; "
                        f"supported: {list(SUPPORTED_ARCHITECTURES)} - use the HF folder of the model instead")
    if m.get(f"{arch}.expert_count", 0):
        raise UserError(f"{m.where}: mixture-of-experts GGUF ('{arch}.expert_count' = {m.get(f'{arch}.expert_count')})"
                        " is not supported; use a dense model")
    def ne(name: str, axis: int) -> int | None:
        d = dims.get(name)
        return d[axis] if d is not None and len(d) > axis else None

    blocks = _blocks(dims)
    n_layers = _bounded(m, f"{arch}.block_count", m.int(f"{arch}.block_count"), len(blocks),
                        "the file has tensors of {found} blocks (blk.N)")
    if blocks != set(range(n_layers)):
        odd = min(set(range(n_layers)) ^ blocks)
        raise UserError(f"{m.where}: the file's blocks are not numbered blk.0..blk.{n_layers - 1} (blk.{odd} is "
                        "missing or out of range); fix or re-convert the file")
    hidden = _bounded(m, f"{arch}.embedding_length", m.int(f"{arch}.embedding_length"), ne("token_embd.weight", 0),
                      "tensor 'token_embd.weight' is {found} wide")
    n_heads = m.int(f"{arch}.attention.head_count")
    n_kv = m.int(f"{arch}.attention.head_count_kv", n_heads, required=False)
    if n_heads % n_kv:
        raise UserError(f"{m.where}: GGUF metadata '{arch}.attention.head_count' = {n_heads} is not a multiple of "
                        f"'{arch}.attention.head_count_kv' = {n_kv}; fix or re-convert the file")
    if not m.has(f"{arch}.attention.key_length") and hidden % n_heads:
        raise UserError(f"{m.where}: GGUF metadata '{arch}.attention.head_count' = {n_heads} does not divide "
                        f"'{arch}.embedding_length' = {hidden}; fix or re-convert the file")
    head_dim = m.int(f"{arch}.attention.key_length", hidden // n_heads, required=False)
    q_rows, k_rows = ne("blk.0.attn_q.weight", 1), ne("blk.0.attn_k.weight", 1)
    _bounded(m, f"{arch}.attention.head_count", n_heads, None if q_rows is None else q_rows // head_dim,
             f"tensor 'blk.0.attn_q.weight' has {q_rows} rows: {{found}} heads of size {head_dim}")
    _bounded(m, f"{arch}.attention.head_count_kv", n_kv, None if k_rows is None else k_rows // head_dim,
             f"tensor 'blk.0.attn_k.weight' has {k_rows} rows: {{found}} heads of size {head_dim}")
    v_dim = m.int(f"{arch}.attention.value_length", head_dim, required=False)
    if v_dim != head_dim:
        raise UserError(f"{m.where}: attention.value_length {v_dim} != key_length {head_dim} is not supported; "
                        "use a model with equal key and value head sizes")
    if head_dim % 2:
        raise UserError(f"{m.where}: head size {head_dim} is odd, RoPE needs an even head size; "
                        "fix or re-convert the file")
    rope_dims = m.int(f"{arch}.rope.dimension_count", head_dim, required=False)
    if rope_dims != head_dim:
        raise UserError(f"{m.where}: partial rotary embeddings ('{arch}.rope.dimension_count' = {rope_dims}, "
                        f"head size {head_dim}) are not supported; use a model with full-width RoPE")
    rows = ne("token_embd.weight", 1)
    tokens = m.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and rows is not None and len(tokens) != rows:
        raise UserError(f"{m.where}: GGUF metadata 'tokenizer.ggml.tokens' has {len(tokens)} tokens but tensor "
                        f"'token_embd.weight' has {rows} rows; the header does not match the tensors, fix or "
                        "re-convert the file")
    vocab = m.int(f"{arch}.vocab_size", len(tokens) if isinstance(tokens, list) else 0,
                  required=not isinstance(tokens, list))
    vocab = _bounded(m, f"{arch}.vocab_size", vocab, rows, "tensor 'token_embd.weight' has {found} rows")
    return {
        "family": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": m.int(f"{arch}.feed_forward_length"),  # checked by every ffn tensor's shape
        "max_position": m.int(f"{arch}.context_length"),
        "norm_eps": m.float(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": m.float(f"{arch}.rope.freq_base", 10000.0),  # llama.cpp's default
        "rope_scaling": _rope_scaling(m, arch),
        "tie_embeddings": True,  # set from the tensors below
        "activation": "silu",
        "type_vocab_size": 0,
    }


def _generation(m: _Meta, vocab_size: int) -> dict[str, Any]:
    def tid(key: str) -> int | None:
        v = m.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
            raise UserError(f"{m.where}: GGUF metadata '{key}' = {v!r} is not a token id below {vocab_size}; "
                            "fix or re-convert the file")
        return int(v)

    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = tid(key)
        if v is not None and v not in eos_ids:
            eos_ids.append(v)
    add_bos = m.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = default_add_bos(str(m.get("tokenizer.ggml.model", "")), m.get("tokenizer.ggml.pre"))
    tmpl = m.get("tokenizer.chat_template")
    name = m.get("general.name")
    return {
        "bos_token_id": tid("tokenizer.ggml.bos_token_id"),
        "eos_token_ids": eos_ids,
        "pad_token_id": tid("tokenizer.ggml.padding_token_id"),
        "add_bos": bool(add_bos),
        "chat_template": check_template_text(tmpl, m.where) if isinstance(tmpl, str) else None,
        "name": name if isinstance(name, str) else None,
    }


# --------------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------------


def _canonical_name(gguf_name: str, n_layers: int) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        i = int(parts[1])
        if i < n_layers:
            return f"layers.{i}.{_LAYER_NAMES[parts[2]]}"
    return None


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, hd, inter, v = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    out: dict[str, tuple[int, ...]] = {"tok_embed.weight": (v, h)}
    per_layer: dict[str, tuple[int, ...]] = {
        "attn_norm.weight": (h,), "attn.q.weight": (q, h), "attn.k.weight": (kv, h), "attn.v.weight": (kv, h),
        "attn.o.weight": (h, q), "mlp_norm.weight": (h,), "mlp.gate.weight": (inter, h),
        "mlp.up.weight": (inter, h), "mlp.down.weight": (h, inter),
    }
    for i in range(cfg["n_layers"]):
        out.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    out["final_norm.weight"] = (h,)
    return out


def _make_loaders(reader_tensor: Any, shape: tuple[int, ...], unpermute_heads: int,
                  where: str) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
    """(raw rows, dequantized float32) loaders of one tensor; both undo the q/k row permutation."""
    from gguf.quants import dequantize

    rows = shape[0] if len(shape) > 1 else 1

    def raw() -> np.ndarray:
        a = np.asarray(reader_tensor.data)
        a = a.reshape(rows, -1) if len(shape) > 1 else a.reshape(-1)
        if unpermute_heads:
            return unpermute_qk(a, unpermute_heads)  # a copy
        return np.array(a, order="C", copy=True)  # never a view of the read-only file mapping

    def load() -> np.ndarray:
        try:
            a = dequantize(raw(), reader_tensor.tensor_type)
        except (ValueError, NotImplementedError, OSError) as e:
            raise UserError(f"{where}: tensor '{reader_tensor.name}' cannot be dequantized ({e}); "
                            "the file is corrupt, re-download or re-convert it") from None
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32).reshape(shape))

    return raw, load


def _open_reader(path: Path, where: str) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, struct.error,
            MemoryError) as e:
        raise UserError(f"{where}: cannot parse the GGUF file ({type(e).__name__}: {e}); "
                        "the file is corrupt, re-download or re-convert it") from None


def load_gguf(path: str | Path) -> GGUFModel:
    """Read a llama-architecture GGUF: config, lazily read canonical weights, tokenizer, generation."""
    p = Path(path).expanduser()
    where = str(p)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise UserError(f"{where}: not a file; pass the path of a .gguf model file")
        with open(p, "rb") as f:
            if size == 0:
                raise UserError(f"{where}: the file is empty; pass a .gguf model file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                raw_tensors = walk_header(buf, size, where)
    except FileNotFoundError:
        raise UserError(f"{where}: file not found; pass the path of a .gguf model file") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read the file ({e.strerror or e}); check the path and permissions") from None

    reader = _open_reader(p, where)
    if len(reader.tensors) != len(raw_tensors):  # the two parsers must agree
        raise UserError(f"{where}: the GGUF header is inconsistent ({len(reader.tensors)} vs {len(raw_tensors)} "
                        "tensors); re-download or re-convert the file")
    m = _Meta(reader, where)
    cfg = _config(m, {t.name: t.dims for t in raw_tensors})

    by_name = {t.name: t for t in reader.tensors}
    unknown = [n for n in by_name if _canonical_name(n, cfg["n_layers"]) is None]
    if unknown:
        hint = (" (llama3-style RoPE frequency factors are not supported)" if "rope_freqs.weight" in unknown else "")
        raise UserError(f"{where}: unexpected tensor '{unknown[0]}'{hint} ({len(unknown)} unexpected in all) for a "
                        f"{cfg['n_layers']}-layer llama; this variant is not supported, use the HF folder instead")
    cfg["tie_embeddings"] = "output.weight" not in by_name
    if "token_embd.weight" in by_name:
        rows = int(by_name["token_embd.weight"].shape[-1])  # GGML order: ne1 = vocab
        if rows != cfg["vocab_size"]:
            raise UserError(f"{where}: tensor 'token_embd.weight' has {rows} rows but the vocabulary has "
                            f"{cfg['vocab_size']} tokens (llama.vocab_size / tokenizer.ggml.tokens); "
                            "fix or re-convert the file")

    expected = _expected_shapes(cfg)
    if not cfg["tie_embeddings"]:
        expected["lm_head.weight"] = (cfg["vocab_size"], cfg["hidden_size"])
    gguf_of = {_canonical_name(n, cfg["n_layers"]): n for n in by_name}
    supported = set(SUPPORTED_TYPES)
    tensors: dict[str, GGUFTensor] = {}
    for cname, shape in expected.items():
        gname = gguf_of.get(cname)
        if gname is None:
            raise UserError(f"{where}: tensor for '{cname}' is missing (expected GGUF tensor "
                            f"'{_gguf_name_for(cname)}'); the file is incomplete, re-convert it")
        rt = by_name[gname]
        got = tuple(int(d) for d in reversed(rt.shape.tolist()))
        if got != shape:
            raise UserError(f"{where}: tensor '{gname}' has shape {list(got)} but the config implies {list(shape)} for "
                            f"'{cname}'; fix or re-convert the file")
        ttype = rt.tensor_type.name
        if ttype not in supported:
            raise UserError(f"{where}: tensor '{gname}' has GGML type {ttype}, which is not supported; supported: "
                            f"{', '.join(SUPPORTED_TYPES)} - re-quantize the model (e.g. Q8_0 or Q4_1)")
        heads = 0
        if cname.endswith(".attn.q.weight"):
            heads = cfg["n_heads"]
        elif cname.endswith(".attn.k.weight"):
            heads = cfg["n_kv_heads"]
        raw, load = _make_loaders(rt, shape, heads, where)
        tensors[cname] = GGUFTensor(shape=shape, dtype="float32", source_type=ttype, source_name=gname, _raw=raw,
                                    _loader=load)

    tokenizer_json = tokenizer_json_from_gguf(reader, where=where)
    generation = _generation(m, cfg["vocab_size"])
    config = {k: cfg[k] for k in CONFIG_KEYS}
    return GGUFModel(config=config, tensors=tensors, tokenizer_json=tokenizer_json, generation=generation, path=p)


def _gguf_name_for(cname: str) -> str:
    for g, c in _GLOBAL_NAMES.items():
        if c == cname:
            return g
    _, i, rest = cname.split(".", 2)
    for g, c in _LAYER_NAMES.items():
        if c == rest:
            return f"blk.{i}.{g}"
    return cname
