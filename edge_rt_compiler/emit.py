"""Emit: the plan (schema 2, `edge_rt_exec.plan`), its name, the weights repacked in execution order and in
their formats (shared by every plan of a model and format), the tokenizer and the generation settings.

Every file is written atomically; the weights file is written once per model and format (under a lock, so a
parallel sweep writes it once) and reused while its header matches byte for byte (the header holds every
tensor's name, format, shape and offset and the source's identity)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import networkx as nx

from edge_rt_exec.binfile import SafetensorsFile
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import (
    ALIGNMENT,
    PLAN_FORMAT,
    PLAN_SUFFIX,
    SCHEMA_VERSION,
    Group,
    Op,
    Plan,
    WeightInfo,
    atomic_file,
    atomic_write,
)

from . import __version__
from .chat_template import render_chat
from .frontends.base import ModelSource
from .memory_layout import Arena
from .partition import Cost, PartitionResult
from .passes.quantize import KV_DTYPES
from .sizes import fmt_bytes
from .weights_layout import WeightsLayout

SHA_PLACEHOLDER = "0" * 64


# ---- names --------------------------------------------------------------------------------------------------

def weights_file_name(tag: str) -> str:
    """One weights file per model and format tag ("weights-q4_1+q8_0.safetensors")."""
    return f"weights-{tag}.safetensors"


def plan_name(strategy: str, budget: int, max_context: int, tag: str, kv_dtype: str) -> str:
    """`greedy_grouping-512M-ctx2048-q4_1+q8_0.plan.json` (`-kvf16` when the KV cache is f16)."""
    kv = "" if kv_dtype == "f32" else f"-kv{kv_dtype}"
    return f"{strategy}-{fmt_bytes(budget)}-ctx{max_context}-{tag}{kv}{PLAN_SUFFIX}"


# ---- the plan -----------------------------------------------------------------------------------------------

def graph_interface(g: nx.DiGraph) -> dict[str, Any]:
    """The plan's `graph`: inputs with their symbolic dims and maxima, outputs, inline constants, roles, KV."""
    tensors = g.graph["tensors"]
    symbols = {d for i in g.graph["inputs"] for d in i["dims"] if isinstance(d, str)}
    return {
        "inputs": [dict(i) for i in g.graph["inputs"]],
        "outputs": [{"name": o, "dtype": tensors[o].dtype} for o in g.graph["outputs"]],
        "bounds": {s: v for s, v in g.graph["dims"].bounds.items() if s in symbols},
        "constants": {n: {"dtype": c.dtype, "shape": list(c.shape), "data": c.load().reshape(-1).tolist()}
                      for n, c in g.graph["constants"].items()},
        "io": dict(g.graph["io"]),
        "kv": {"mode": g.graph["kv"]["mode"], "pairs": [list(p) for p in g.graph["kv"]["pairs"]]},
    }


def make_plan(src: ModelSource, g: nx.DiGraph, layout: WeightsLayout, part: PartitionResult, arena: Arena,
              cost: Cost, *, request: Any, max_context: int, max_batch_tokens: int, reserve: int) -> Plan:
    """The `Plan` of one compile (files are filled in once they are written)."""
    schedule: list[Op] = []
    groups: list[Group] = []
    for gi, grp in enumerate(part.groups):
        start = len(schedule)
        for o in grp.ops:
            schedule.append(Op(len(schedule), o.op, o.name, o.unit, gi, list(o.inputs), list(o.outputs),
                               dict(o.attrs), list(o.scratch)))
        streamed = part.weights_mode == "streamed" and grp.streamed
        groups.append(Group(gi, grp.units, start, len(schedule), grp.byte_start if streamed else 0,
                            grp.byte_end if streamed else 0, 0 if streamed else None, grp.flops))
    weights = {n: WeightInfo(w.offset, w.nbytes, w.format, list(w.shape), w.gather) for n, w in layout.weights.items()}
    resident = layout.file_size if part.weights_mode == "resident" else 0
    model = {"name": src.name, "family": g.graph["family"], "kind": g.graph["kind"], "config": dict(g.graph["config"]),
             "origin": src.origin}
    if "opset" in g.graph:
        model["opset"] = g.graph["opset"]
    return Plan(
        format=PLAN_FORMAT, schema_version=SCHEMA_VERSION, byte_order="little", compiler_version=__version__,
        model=model, graph=graph_interface(g), files={}, target=dict(request.target), strategy=part.strategy,
        requested_strategy=request.strategy, budget=request.budget, max_context=max_context,
        max_batch_tokens=max_batch_tokens, quant=request.quant, kv_dtype=KV_DTYPES[request.kv_dtype]
        if g.graph["kv"]["mode"] == "cache" else "float32", weights_mode=part.weights_mode, alignment=ALIGNMENT,
        weights=weights, groups=groups, schedule=schedule, buffers=arena.buffers,
        arena={"size": arena.size, "slots": arena.slots, "state": arena.state, "activations": arena.activations,
               "reserve": reserve, "resident_weights": resident},
        predicted={"decode_ms_per_token": round(cost.decode_ms_per_token, 3), "prefill_ms": round(cost.prefill_ms, 3),
                   "prefill_tokens": cost.prompt_tokens, "read_bytes_per_token": cost.read_bytes_per_token,
                   "peak_bytes": resident + arena.size + reserve, "notes": list(part.notes)},
    )


def generation_settings(src: ModelSource) -> dict[str, Any]:
    """generation.json: EOS / BOS ids, the chat template rendered into a prefix and suffix, pooling."""
    gen = dict(src.generation)
    tok = {"bos_token": "", "eos_token": ""}
    if src.tokenizer_json:
        try:
            vocab = {a["id"]: a["content"] for a in json.loads(src.tokenizer_json).get("added_tokens", [])}
        except (ValueError, TypeError, KeyError):
            vocab = {}
        if gen.get("bos_token_id") in vocab:
            tok["bos_token"] = vocab[gen["bos_token_id"]]
        eos = gen.get("eos_token_ids") or []
        if eos and eos[0] in vocab:
            tok["eos_token"] = vocab[eos[0]]
    gen.update(render_chat(gen.get("chat_template"), tok))
    gen["kind"] = src.kind
    gen.setdefault("add_bos", False)
    return gen


# ---- files --------------------------------------------------------------------------------------------------

@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the artifact folder (parallel sweeps write the weights once)."""
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


def write_weights(path: Path, g: nx.DiGraph, layout: WeightsLayout) -> tuple[str, bool]:
    """(data sha256, reused). Each weight is written as `Weight.stored()` gives it: raw source rows when they are
    already in its format, else quantized. The header carries the sha256 of the data section, so a reader can
    match a plan to its weights without hashing hundreds of MB."""
    with locked(path.parent):
        sha = _existing_sha(path, layout)
        if sha is not None:
            return sha, True
        weights = g.graph["weights"]
        total = sum(layout.weights[n].nbytes for n in layout.order)
        print(f"writing {path.name} ({total / 2**20:.1f} MB, {len(layout.order)} tensors)", file=sys.stderr,
              flush=True)
        with atomic_file(path) as f, _progress(total, path.name) as bar:
            f.write(layout.header)
            h = hashlib.sha256()
            pos = layout.data_start
            for name in layout.order:
                loc = layout.weights[name]
                if loc.offset > pos:
                    pad = b"\0" * (loc.offset - pos)
                    f.write(pad)
                    h.update(pad)
                b = weights[name].stored().tobytes()
                if len(b) != loc.nbytes:
                    raise UserError(f"{weights[name].data.source}: {len(b)} bytes as {loc.format}, {loc.nbytes} "
                                    "expected")
                f.write(b)
                h.update(b)
                bar.update(len(b))
                pos = loc.offset + loc.nbytes
            sha = h.hexdigest()
            f.seek(0)
            f.write(layout.header.replace(SHA_PLACEHOLDER.encode(), sha.encode(), 1))
        return sha, False


@contextmanager
def _progress(total: int, what: str) -> Iterator[Any]:
    """A byte progress bar on a terminal (tqdm; nothing when stderr is not a terminal, as in CI and tests)."""
    try:
        from tqdm import tqdm
    except ImportError:  # the compile extra brings it; without it, the one line above is all
        class _Null:
            def update(self, n: int) -> None:
                pass
        yield _Null()
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=None,
              leave=False, file=sys.stderr) as bar:
        yield bar


def write_companions(folder: Path, src: ModelSource, generation: dict[str, Any]) -> dict[str, str]:
    """tokenizer.json and generation.json beside the plan."""
    files = {}
    if src.tokenizer_json is not None:
        atomic_write(folder / "tokenizer.json", src.tokenizer_json)
        files["tokenizer"] = "tokenizer.json"
    atomic_write(folder / "generation.json", json.dumps(generation, indent=1, ensure_ascii=False) + "\n")
    files["generation"] = "generation.json"
    return files


def write_plan(path: Path, plan: Plan) -> None:
    """The plan JSON, atomically."""
    atomic_write(path, plan.to_json())
