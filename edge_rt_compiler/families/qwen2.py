"""Qwen2 (Qwen2 / Qwen2.5): llama with biases on the q, k and v projections (llama.cpp `src/models/qwen2.cpp`)."""

from __future__ import annotations

from pathlib import Path

from edge_rt_exec.errors import UserError

from . import llama
from .base import Checkpoint, Family, Mapping, TransformerConfig


def from_hf(cfg: dict, t: Checkpoint, folder: Path) -> tuple[TransformerConfig, Mapping]:
    """llama's reader with q, k, v biases required; sliding-window attention refused."""
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise UserError(f"{folder / 'config.json'}: use_sliding_window=true (sliding-window attention) is not "
                        "supported; use a checkpoint with full attention (use_sliding_window=false)")
    return llama.from_hf(cfg, t, folder, family="qwen2", biases=("q", "k", "v"))


FAMILY = Family("qwen2", "decoder", ("qwen2",), from_hf, llama.build)
