"""What every model family shares: the canonical config, the `Family` interface, and the helpers its HF
reader uses to map checkpoint tensors to canonical weight names (docs/architecture.md lists them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_rt_exec.errors import UserError

from ..ir import GraphBuilder


@dataclass(frozen=True)
class TransformerConfig:
    """The architecture of a transformer in the IR's own terms (no HF or GGUF names)."""

    family: str  #: a key of `families.FAMILIES` ("gpt2", "llama", "qwen2", "bert")
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int  #: the longest sequence the model was trained for
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  #: HF `rope_scaling` (rope_type + its parameters); None: plain RoPE
    tie_embeddings: bool = True
    activation: str = "gelu_tanh"  #: "gelu_tanh" | "gelu_erf" | "silu"
    type_vocab_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> TransformerConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"{where}: unknown config keys {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"{where}: incomplete model config ({e})") from None


class Checkpoint(Protocol):
    """The tensors of an HF checkpoint by name (frontends/hf.py), as a family's reader sees them."""

    def has(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


#: canonical name -> (checkpoint tensor, transform of the loaded float32 array or None, canonical shape)
Mapping = dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None, tuple[int, ...]]]


@dataclass(frozen=True)
class Family:
    """A model family: how to read its HF checkpoints and how to build its graph.

    `from_hf(config_json, checkpoint, folder)` -> (config, weight mapping); `build(builder, config, where)`
    appends the family's ops (weights are already registered in the builder under canonical names)."""

    name: str
    kind: str  #: "decoder" | "encoder"
    hf_model_types: tuple[str, ...]
    from_hf: Callable[[dict, Checkpoint, Path], tuple[TransformerConfig, Mapping]]
    build: Callable[[GraphBuilder, TransformerConfig, str], None]


# ---- HF reading helpers ------------------------------------------------------------------------------------

def need(cfg: dict, key: str, folder: Path, alt: str | None = None) -> Any:
    """A required config.json key (or its older alias)."""
    if key in cfg:
        return cfg[key]
    if alt and alt in cfg:
        return cfg[alt]
    raise UserError(f"{folder / 'config.json'}: missing '{key}'; the config is incomplete")


def find_prefix(t: Checkpoint, candidates: list[str], probe: str, folder: Path) -> str:
    """The name prefix of the checkpoint's tensors ("model.", "transformer.", "")."""
    for p in candidates:
        if t.has(p + probe):
            return p
    raise UserError(f"{folder}: no tensor '{probe}' (tried prefixes {candidates}); is this checkpoint the "
                    "model_type its config.json says?")


def same(t: Checkpoint, name: str, folder: Path) -> tuple[str, None, tuple[int, ...]]:
    """A tensor used as stored."""
    if not t.has(name):
        raise UserError(f"{folder}: missing tensor '{name}'; the checkpoint is incomplete")
    return name, None, tuple(t.shape(name))


def rope_params(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 4.x (`rope_theta` / `rope_scaling`) or 5.x (`rope_parameters`)."""
    rp_raw = cfg.get("rope_parameters")
    rp: dict[str, Any] = rp_raw if isinstance(rp_raw, dict) else {}
    theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rp.items() if k != "rope_theta"} if rp else None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling
