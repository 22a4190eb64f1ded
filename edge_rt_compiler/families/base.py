"""What every model family shares: the canonical config, the `Family` interface, and the helpers its HF
reader uses to map checkpoint tensors to canonical weight names (docs/architecture.md lists them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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


#: Largest size a config.json may state (vocabulary, widths, layers, context): int32, as the executor's indices.
MAX_SIZE = (1 << 31) - 1
_REQUIRED: Any = object()


def _shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _bad(folder: Path, key: str, v: Any, expected: str) -> UserError:
    return UserError(f"{folder / 'config.json'}: '{key}' = {_shown(v)}, expected {expected}; fix the value in "
                     "config.json or re-download the model")


def _value(cfg: dict, key: str, folder: Path, alt: str | None, default: Any) -> tuple[str, Any]:
    """(the key found, its value); a missing key is its default, or a one-line error when it is required."""
    if key not in cfg and alt and alt in cfg:
        key = alt
    if key not in cfg:
        if default is _REQUIRED:
            need(cfg, key, folder, alt)
        return key, default
    return key, cfg[key]


def cfg_int(cfg: dict, key: str, folder: Path, alt: str | None = None, *, default: Any = _REQUIRED,
            minimum: int = 1, maximum: int = MAX_SIZE, null_is_default: bool = False) -> int:
    """A whole-number config.json value in [minimum, maximum]. Bools, strings, fractions and nulls are one line
    naming the file and key, except a null where HF itself reads it as "not set" (`null_is_default`:
    num_key_value_heads, head_dim, n_inner)."""
    key, v = _value(cfg, key, folder, alt, default)
    if v is None and null_is_default and default is not _REQUIRED:
        v = default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
        raise _bad(folder, key, v, f"a whole number in [{minimum}, {maximum}]")
    return v


def cfg_float(cfg: dict, key: str, folder: Path, default: Any = _REQUIRED) -> float:
    """A finite, positive config.json number (epsilons, RoPE theta and factors)."""
    key, v = _value(cfg, key, folder, None, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise _bad(folder, key, v, "a positive number")
    return float(v)


def cfg_bool(cfg: dict, key: str, folder: Path, default: bool) -> bool:
    """A true/false config.json value."""
    key, v = _value(cfg, key, folder, None, default)
    if not isinstance(v, bool):
        raise _bad(folder, key, v, "true or false")
    return v


def cfg_str(cfg: dict, key: str, folder: Path, default: str, choices: Iterable[str]) -> str:
    """A config.json string among `choices` (an activation, an embedding type)."""
    key, v = _value(cfg, key, folder, None, default)
    options = list(choices)
    if not isinstance(v, str) or v not in options:
        raise UserError(f"{folder / 'config.json'}: '{key}' = {_shown(v)} is not supported; supported: "
                        f"{', '.join(options)}")
    return v


def attention_heads(cfg: dict, folder: Path, hidden: int, heads: tuple[str, str | None],
                    kv_key: str | None = None, head_dim_key: str | None = None) -> tuple[int, int, int]:
    """(heads, kv heads, head size) from config.json, consistent with each other and the hidden size: the heads
    divide the hidden size unless `head_dim_key` states the head size, and the kv heads divide the heads.
    `heads`: the key of the head count and its older alias."""
    n_head = cfg_int(cfg, heads[0], folder, heads[1])
    n_kv = cfg_int(cfg, kv_key, folder, default=n_head, null_is_default=True) if kv_key else n_head
    if n_head % n_kv:
        raise UserError(f"{folder / 'config.json'}: {heads[0]} = {n_head} is not a multiple of {kv_key} = {n_kv}; "
                        "fix the values in config.json or re-download the model")
    if head_dim_key and cfg.get(head_dim_key) is not None:
        return n_head, n_kv, cfg_int(cfg, head_dim_key, folder)
    if hidden % n_head:
        raise UserError(f"{folder / 'config.json'}: hidden size {hidden} is not divisible by {heads[0]} = {n_head}; "
                        "fix the values in config.json or re-download the model")
    return n_head, n_kv, hidden // n_head


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



#: The numbers each RoPE scaling type reads (`edge_rt_exec.ops.attention.rope_inv_freq`).
ROPE_SCALING_PARAMS = {"linear": ("factor",),
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_params(cfg: dict, folder: Path) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 4.x (`rope_theta` / `rope_scaling`) or 5.x (`rope_parameters`); every
    number a scaling type uses is checked finite and positive (a factor of 0 would turn every token into zeros)."""
    rp_raw = cfg.get("rope_parameters")
    if rp_raw is not None and not isinstance(rp_raw, dict):
        raise _bad(folder, "rope_parameters", rp_raw, "an object")
    rp: dict[str, Any] = rp_raw or {}
    theta = cfg_float(rp, "rope_theta", folder, 10000.0) if "rope_theta" in rp else \
        cfg_float(cfg, "rope_theta", folder, 10000.0)
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rp.items() if k != "rope_theta"} if rp else None)
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise _bad(folder, "rope_scaling", scaling, "an object with a rope_type, or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    for name in ROPE_SCALING_PARAMS.get(kind, ()) if isinstance(kind, str) else ():
        v = scaling.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise _bad(folder, f"rope_scaling.{name}", v, f"a positive number (RoPE scaling {kind!r} needs it)")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise _bad(folder, "rope_scaling.high_freq_factor", scaling["high_freq_factor"],
                   f"a number above low_freq_factor = {scaling['low_freq_factor']}")
    return theta, scaling
