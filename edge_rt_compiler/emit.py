"""Emit: the weights repacked in execution order (shared by every plan of a model), the tokenizer, the
generation settings and the plan itself. Every file is written atomically; the weights file is written
once per model (under a lock, so a parallel sweep writes it once) and reused while its header matches."""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edge_rt_exec.binfile import SafetensorsFile
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import Plan, atomic_file, atomic_write

from .frontends.base import ModelSource
from .weights_layout import WeightsLayout

WEIGHTS_FILE = "weights.safetensors"
SHA_PLACEHOLDER = "0" * 64


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _existing_sha(path: Path, layout: WeightsLayout) -> str | None:
    """The data fingerprint of an existing weights file if it was written for this exact layout."""
    if not path.exists() or path.stat().st_size != layout.file_size:
        return None
    try:
        st = SafetensorsFile(path)
    except UserError:
        return None
    try:
        sha = st.metadata.get("edge_rt_data_sha256", "")
        with open(path, "rb") as f:
            head = f.read(layout.data_start)
        if len(sha) == 64 and head.replace(sha.encode(), SHA_PLACEHOLDER.encode(), 1) == layout.header:
            return sha
        return None
    finally:
        st.close()


def write_weights(folder: Path, src: ModelSource, layout: WeightsLayout) -> tuple[Path, str, bool]:
    """(path, data sha256, reused). The header carries the sha256 of the data section, so a reader can match
    a plan to its weights without hashing hundreds of MB."""
    path = folder / WEIGHTS_FILE
    with locked(folder):
        sha = _existing_sha(path, layout)
        if sha is not None:
            return path, sha, True
        with atomic_file(path) as f:
            f.write(layout.header)
            h = hashlib.sha256()
            pos = layout.data_start
            for name in layout.order:
                t = layout.tensors[name]
                if t.offset > pos:
                    pad = b"\0" * (t.offset - pos)
                    f.write(pad)
                    h.update(pad)
                a = src.weights[name].load()
                if a.nbytes != t.nbytes:
                    raise UserError(f"{src.weights[name].source}: {a.nbytes} bytes loaded, {t.nbytes} expected")
                b = np.ascontiguousarray(a, dtype="<f4").tobytes()
                f.write(b)
                h.update(b)
                pos = t.offset + t.nbytes
            sha = h.hexdigest()
            f.seek(0)
            f.write(layout.header.replace(SHA_PLACEHOLDER.encode(), sha.encode(), 1))
        return path, sha, False


def render_chat(template: str | None, generation: dict[str, Any], tokens: dict[str, str]) -> dict[str, Any]:
    """Render the model's jinja chat template once, at compile time, into a prefix and a suffix around the
    user's message, so the executor needs no template engine."""
    if not template:
        return {"chat_prefix": None, "chat_suffix": None}
    import jinja2.sandbox

    sentinel = "\x00EDGE_RT_USER\x00"
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(template).render(
            messages=[{"role": "user", "content": sentinel}], add_generation_prompt=True, **tokens)
    except Exception as e:  # a template is user input; any failure is reported, not raised
        return {"chat_prefix": None, "chat_suffix": None, "chat_error": f"{e.__class__.__name__}: {e}"}
    if text.count(sentinel) != 1:
        return {"chat_prefix": None, "chat_suffix": None, "chat_error": "template does not echo the message once"}
    pre, suf = text.split(sentinel)
    return {"chat_prefix": pre, "chat_suffix": suf}


def write_companions(folder: Path, src: ModelSource, generation: dict[str, Any]) -> dict[str, str]:
    files = {}
    if src.tokenizer_json is not None:
        atomic_write(folder / "tokenizer.json", src.tokenizer_json)
        files["tokenizer"] = "tokenizer.json"
    atomic_write(folder / "generation.json", json.dumps(generation, indent=1, ensure_ascii=False) + "\n")
    files["generation"] = "generation.json"
    return files


def write_plan(path: Path, plan: Plan) -> None:
    atomic_write(path, plan.to_json())
