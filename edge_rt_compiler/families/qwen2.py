"""Qwen2 (Qwen2 / Qwen2.5): llama with biases on the q, k and v projections (llama.cpp `src/models/qwen2.cpp`)."""

from __future__ import annotations

from pathlib import Path

from edge_rt_exec.errors import UserError

from . import llama
from .base import Checkpoint, Family, Mapping, TransformerConfig, cfg_bool


def from_hf(cfg: dict, t: Checkpoint, folder: Path) -> tuple[TransformerConfig, Mapping]:
    """llama's reader with q, k, v biases required; sliding-window attention refused."""
    layer_types = cfg.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise UserError(f"{folder / 'config.json'}: 'layer_types' = {repr(layer_types)[:40]}, expected a list of "
                        "attention types; fix the value in config.json or re-download the model")
    if cfg_bool(cfg, "use_sliding_window", folder, False) or any(x != "full_attention" for x in layer_types):
        raise UserError(f"{folder / 'config.json'}: use_sliding_window=true (sliding-window attention) is not "
                        "supported; use a checkpoint with full attention (use_sliding_window=false)")
    return llama.from_hf(cfg, t, folder, family="qwen2", biases=("q", "k", "v"))


FAMILY = Family("qwen2", "decoder", ("qwen2",), from_hf, llama.build)
