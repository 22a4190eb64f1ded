"""What every frontend produces: a canonical model description with lazily loaded weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from edge_rt_exec.errors import UserError

FAMILIES = ("gpt2", "llama", "bert")


@dataclass(frozen=True)
class TransformerConfig:
    """The architecture of a transformer in the IR's own terms (no HF or GGUF names)."""

    family: str  #: "gpt2" | "llama" | "bert"
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
    rope_scaling: dict | None = None
    tie_embeddings: bool = True
    activation: str = "gelu_tanh"  #: "gelu_tanh" | "gelu_erf" | "silu"
    type_vocab_size: int = 0

    @property
    def kind(self) -> str:
        return "encoder" if self.family == "bert" else "decoder"

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


@dataclass
class WeightRef:
    """A weight known by shape before it is loaded; `load()` returns C-contiguous float32."""

    shape: tuple[int, ...]
    loader: Callable[[], np.ndarray]
    source: str  #: where it comes from, for messages (file and original name)
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        n = 4
        for d in self.shape:
            n *= int(d)
        return n

    def load(self) -> np.ndarray:
        a = np.ascontiguousarray(self.loader(), dtype=np.float32)
        if tuple(a.shape) != tuple(self.shape):
            raise UserError(f"{self.source}: loaded shape {list(a.shape)} but the header said {list(self.shape)}")
        return a


@dataclass
class ModelSource:
    """A frontend's output: everything the IR builder and the emitter need."""

    name: str
    config: TransformerConfig
    weights: dict[str, WeightRef]
    source_key: str  #: identifies the source bytes; equal keys mean the repacked weights can be reused
    tokenizer_json: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  #: source tensors deliberately not used (buffers)
    origin: str = ""  #: the file or folder it was read from
