"""The compiler pipeline: frontend -> IR -> validate -> partition -> memory layout -> verify -> emit.

`compile_model(request)` is a plain function (the Hydra app and the tests call it); each stage is a function
from IR to IR or to a result dataclass.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from edge_rt_exec.errors import InternalError, UserError
from edge_rt_exec.plan import ALIGNMENT, PLAN_FORMAT, PLAN_SUFFIX, SCHEMA_VERSION, Buffer, Group, Op, Plan, TensorInfo

from . import __version__
from .emit import SHA_PLACEHOLDER, render_chat, write_companions, write_plan, write_weights
from .frontends import ModelSource, load_path, package_file
from .ir import Dims, TensorSpec, build_ir, concrete_shape, nbytes_of
from .memory_layout import BufferRequest, LayoutResult, peak_live_lower_bound, plan_activations
from .partition import STRATEGIES, Context, PartitionResult, predict, sched_ops, units_of
from .validate import validate
from .verify import verify_plan
from .weights_layout import WeightsLayout, compute_layout

#: Per-plan runtime overhead beyond the arena (Python objects for views, the reader thread's stack pages,
#: the tokenizer's per-call buffers). Measured by benchmarks/bench_memory.py; kept with margin.
RUNTIME_RESERVE = 6 * 1024 * 1024
#: ONNX graphs carry no trained context length: the default maximum of their sequence dims.
ONNX_DEFAULT_CONTEXT = 256


@dataclass
class ModelRequest:
    name: str
    source: str  #: "synthetic" | "package" | "local"
    package: str | None = None
    file: str | None = None
    path: str | None = None
    max_context: int | None = None
    synthetic: dict[str, int] = field(default_factory=dict)


@dataclass
class CompileRequest:
    model: ModelRequest
    strategy: str
    budget: int
    target: dict[str, Any]
    max_context: int | None = None
    max_batch_tokens: int | None = None
    out_dir: Path = Path("artifacts")
    plan_name: str | None = None
    onnx_dims: dict[str, int] | None = None  #: ONNX graphs: maximum of a symbolic input dim, by name


@dataclass
class CompileResult:
    plan_path: Path
    plan: Plan
    weights_reused: bool
    warnings: list[str]
    seconds: float


# ---- stages ---------------------------------------------------------------------------------------

def load_source(m: ModelRequest, out_dir: Path) -> ModelSource:
    if m.source == "synthetic":
        from .frontends.synthetic import SyntheticSpec, make_synthetic

        spec = SyntheticSpec(**m.synthetic)
        folder = make_synthetic(out_dir / "_sources" / f"{m.name}-{_slug(spec)}", spec)
        src = load_path(folder)
    elif m.source == "package":
        if not m.package or not m.file:
            raise UserError(f"model '{m.name}': source=package needs model.package and model.file")
        src = load_path(package_file(m.package, m.file))
    elif m.source == "local":
        if not m.path:
            raise UserError("model=local needs model.path=PATH (an HF folder, a .gguf or an .onnx file)")
        src = load_path(m.path)
    else:
        raise UserError(f"model '{m.name}': unknown source {m.source!r}; use synthetic, package or local")
    src.name = m.name if m.source != "local" or m.name != "local" else _local_name(Path(str(m.path)))
    return src


def _local_name(p: Path) -> str:
    """An artifact folder name for model=local: the folder's or file's name (with its folder for generic
    names such as model.onnx), so two local models never share (and overwrite) one weights file."""
    p = p.expanduser().resolve()
    if p.is_dir():
        return p.name
    return p.stem if p.stem.lower() not in ("model", "weights", "pytorch_model") else f"{p.parent.name}-{p.stem}"


def _slug(spec: Any) -> str:
    return "-".join(f"{v}" for v in vars(spec).values())


def tensor_requests(g: nx.DiGraph, ops: list[Any], dims: Dims) -> tuple[list[BufferRequest], dict[str, Any]]:
    """Op-level lifetimes of every activation, graph input and op-local scratch over the schedule."""
    tensors: dict[str, TensorSpec] = g.graph["tensors"]
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    kinds: dict[str, str] = {}
    specs: dict[str, TensorSpec] = {}
    for t in g.graph["inputs"]:
        first[t], last[t], kinds[t], specs[t] = 0, 0, "input", tensors[t]
    for i, o in enumerate(ops):
        for t in o.inputs:
            if t in g.graph["state"]:
                continue
            last[t] = max(last.get(t, i), i)
        for t in o.outputs:
            first.setdefault(t, i)
            last[t] = max(last.get(t, i), i)
            kinds.setdefault(t, "activation")
            specs[t] = tensors[t]
        for s, shape in g.nodes[o.node]["scratch"].items():
            first.setdefault(s, i)
            last[s] = i
            kinds[s] = "scratch"
            specs[s] = TensorSpec(shape)
    for t in g.graph["outputs"]:
        last[t] = len(ops) - 1
    for t in g.graph.get("pinned", ()):  # ONNX decoders: pasts are refilled from the presents between runs
        last[t] = len(ops) - 1
    reqs = [BufferRequest(t, nbytes_of(specs[t], dims), first[t], last[t]) for t in first]
    return reqs, {"kinds": kinds, "specs": specs}


def plan_dims(src: ModelSource, max_context: int, max_batch_tokens: int) -> Dims:
    if src.config.kind == "encoder":
        return Dims(T=max_batch_tokens, C=max_context, B=max_batch_tokens, S=1)
    return Dims(T=max_batch_tokens, C=max_context, B=1, S=max_batch_tokens)


def kv_bytes(g: nx.DiGraph, dims: Dims) -> int:
    """The persistent region as build_plan lays it out (each buffer aligned; ONNX constants are small)."""
    return sum(_align(nbytes_of(s, dims)) for s in g.graph["state"].values())


def choose(units: list[Any], layout: WeightsLayout, ctx: Context, names: list[str], strategy: str,
           target: dict[str, Any]) -> tuple[PartitionResult, list[str]]:
    """Run the requested strategy, or for `auto` every feasible one, keeping the lowest predicted latency."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    fn = STRATEGIES[strategy]
    if fn is not None:
        return fn(units, layout, ctx, names), []
    tried, errors = [], []
    for name, cand in STRATEGIES.items():
        if cand is None:
            continue
        try:
            r = cand(units, layout, ctx, names)
        except UserError as e:
            errors.append(str(e))
            continue
        tried.append((predict(r, target, ctx.total_weight_bytes).decode_ms_per_token, name, r))
    if not tried:
        raise UserError(errors[0].replace(f"strategy '{next(iter(STRATEGIES))}'", "any strategy ('auto')"))
    tried.sort(key=lambda x: x[0])
    notes = [f"auto: {n} predicted {ms:.1f} ms/token" for ms, n, _ in tried]
    return tried[0][2], notes


def build_plan(src: ModelSource, g: nx.DiGraph, layout: WeightsLayout, req: CompileRequest,
               max_context: int, max_batch_tokens: int) -> tuple[Plan, list[str]]:
    dims = plan_dims(src, max_context, max_batch_tokens)
    all_ops = sched_ops(g, layout)
    reqs0, _ = tensor_requests(g, all_ops, dims)
    act0 = plan_activations(reqs0).total
    kv = kv_bytes(g, dims)
    units = units_of(all_ops)
    names = g.graph["units"]
    layer_bytes = [(u.byte_end - u.byte_start, names[u.unit]) for u in units
                   if names[u.unit].startswith("layer.") and u.byte_start >= 0]
    min_slot, min_unit = max(layer_bytes) if layer_bytes else (0, "none")
    if "min_slot" in g.graph:  # ONNX graphs: segments split freely; the floor is the largest unsplittable op
        min_slot, min_unit = g.graph["min_slot"]
    fixed_parts = {"constants" if "onnx" in g.graph else "KV cache": kv, "activations": act0, "runtime reserve":
                   RUNTIME_RESERVE}
    ctx = Context(budget=req.budget, fixed_bytes=kv + act0 + RUNTIME_RESERVE, fixed_parts=fixed_parts,
                  total_weight_bytes=layout.file_size, min_slot=min_slot, min_slot_unit=min_unit,
                  prefetch_headroom=float(req.target.get("prefetch_headroom", 0.0)), model_name=src.name,
                  max_context=max_context)
    part, notes = choose(units, layout, ctx, names, req.strategy, req.target)
    ops = [o for grp in part.groups for o in grp.ops]
    reqs, info = tensor_requests(g, ops, dims)
    acts: LayoutResult = plan_activations(reqs)
    lower = peak_live_lower_bound(reqs)
    if acts.total > act0:
        raise InternalError(f"activation arena grew from {act0} to {acts.total} after partitioning")

    # Arena: [weight slots][KV cache][activations]
    off = 0
    buffers: dict[str, Buffer] = {}
    slots = []
    for s in range(part.n_slots):
        slots.append({"offset": off, "nbytes": part.slot_bytes})
        buffers[f"slot.{s}"] = Buffer(f"slot.{s}", "slot", off, part.slot_bytes, "uint8", [part.slot_bytes])
        off += _align(part.slot_bytes)
    kv_off = off
    for name, spec in g.graph["state"].items():
        n = nbytes_of(spec, dims)
        buffers[name] = Buffer(name, "kv", off, n, spec.dtype, list(concrete_shape(spec.shape, dims)))
        off += _align(n)
    act_off = off
    for r in reqs:
        spec = info["specs"][r.name]
        buffers[r.name] = Buffer(r.name, info["kinds"][r.name], act_off + acts.offsets[r.name], r.size, spec.dtype,
                                 list(concrete_shape(spec.shape, dims)), r.first, r.last)
    arena_size = act_off + acts.total

    schedule: list[Op] = []
    groups: list[Group] = []
    for gi, grp in enumerate(part.groups):
        start = len(schedule)
        for o in grp.ops:
            attrs = dict(o.attrs)
            attrs.update({k: v for k, v in (("scratch", sorted(g.nodes[o.node]["scratch"])),) if v})
            schedule.append(Op(len(schedule), o.op, o.name, o.unit, gi, list(o.inputs), list(o.outputs),
                               dict(o.weights), attrs))
        streamed = part.weights_mode == "streamed" and grp.streamed
        groups.append(Group(gi, grp.units, start, len(schedule), grp.byte_start if streamed else 0,
                            grp.byte_end if streamed else 0, 0 if streamed else None, grp.flops))
    tensors = {n: TensorInfo(t.offset, t.nbytes, "float32", list(t.shape), t.gather) for n, t in layout.tensors.items()}
    resident = layout.file_size if part.weights_mode == "resident" else 0
    cost = predict(part, req.target, layout.file_size)
    planned_peak = resident + arena_size + RUNTIME_RESERVE
    plan = Plan(
        format=PLAN_FORMAT, schema_version=SCHEMA_VERSION, byte_order="little", compiler_version=__version__,
        model={"name": src.name, "family": src.config.family, "kind": src.config.kind,
               "config": src.config.to_dict(), "origin": src.origin,
               **({"onnx": g.graph["onnx"]} if "onnx" in g.graph else {})},
        files={}, target=dict(req.target), strategy=part.strategy, requested_strategy=req.strategy,
        budget=req.budget, max_context=max_context, max_batch_tokens=max_batch_tokens,
        weights_mode=part.weights_mode, alignment=ALIGNMENT, tensors=tensors, groups=groups, schedule=schedule,
        buffers=buffers,
        arena={"size": arena_size, "slots": slots, "kv": {"offset": kv_off, "size": act_off - kv_off},
               "activations": {"offset": act_off, "size": acts.total, "lower_bound": lower,
                               "algorithm": acts.algorithm},
               "reserve": RUNTIME_RESERVE, "resident_weights": resident},
        predicted={"decode_ms_per_token": round(cost.decode_ms_per_token, 3),
                   "prefill_ms": round(cost.prefill_ms, 3), "prefill_tokens": cost.prompt_tokens,
                   "read_bytes_per_token": cost.read_bytes_per_token, "peak_bytes": planned_peak,
                   "notes": part.notes + notes},
    )
    return plan, notes


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def default_plan_name(req: CompileRequest, max_context: int) -> str:
    from .partition import fmt_bytes

    return f"{req.strategy}-{fmt_bytes(req.budget)}-ctx{max_context}{PLAN_SUFFIX}"


def generation_settings(src: ModelSource) -> dict[str, Any]:
    gen = dict(src.generation)
    tok = {"bos_token": "", "eos_token": ""}
    if src.tokenizer_json:
        import json

        try:
            vocab = {a["id"]: a["content"] for a in json.loads(src.tokenizer_json).get("added_tokens", [])}
        except (ValueError, TypeError, KeyError):
            vocab = {}
        if gen.get("bos_token_id") in vocab:
            tok["bos_token"] = vocab[gen["bos_token_id"]]
        eos = gen.get("eos_token_ids") or []
        if eos and eos[0] in vocab:
            tok["eos_token"] = vocab[eos[0]]
    gen.update(render_chat(gen.get("chat_template"), gen, tok))
    gen["kind"] = src.config.kind
    gen.setdefault("add_bos", False)
    return gen


def compile_model(req: CompileRequest) -> CompileResult:
    t0 = time.perf_counter()
    out_root = Path(req.out_dir)
    src = load_source(req.model, out_root)
    cfg = src.config
    is_onnx = cfg.family == "onnx"
    model_ctx = req.model.max_context or (ONNX_DEFAULT_CONTEXT if is_onnx else cfg.max_position)
    if cfg.kind == "encoder" and src.generation.get("max_seq_length"):
        model_ctx = min(model_ctx, int(src.generation["max_seq_length"]))
    max_context = req.max_context if req.max_context is not None else model_ctx
    if max_context <= 0:
        raise UserError(f"max_context={max_context} must be a positive number of tokens")
    if max_context > cfg.max_position:
        raise UserError(f"max_context={max_context} exceeds what {src.name} supports ({cfg.max_position}); "
                        f"use max_context<={cfg.max_position}")
    mbt = req.max_batch_tokens if req.max_batch_tokens is not None else min(max_context, 512)
    if mbt <= 0:
        raise UserError(f"max_batch_tokens={mbt} must be positive")
    if cfg.kind == "decoder" and not is_onnx:  # ONNX graphs bound batch x sequence with it (onnx_ir)
        mbt = min(mbt, max_context)
    if is_onnx:
        from .onnx_ir import build_onnx_ir, validate_onnx_ir

        g = build_onnx_ir(src, max_context, mbt, req.onnx_dims)  # type: ignore[arg-type]
        for alias, orig in g.graph["weight_aliases"].items():
            src.weights[alias] = src.weights[orig]
        report = validate_onnx_ir(g, src)  # type: ignore[arg-type]
    else:
        g = build_ir(src)
        report = validate(g, src)
    folder = out_root / _safe(src.name)
    layout = compute_layout(g, {"edge_rt_source": src.source_key, "edge_rt_data_sha256": SHA_PLACEHOLDER,
                                "edge_rt_model": src.name})
    plan, _ = build_plan(src, g, layout, req, max_context, mbt)
    weights_path, sha, reused = write_weights(folder, src, layout)
    files = write_companions(folder, src, generation_settings(src))
    plan.files = {"weights": weights_path.name, "weights_sha256": sha, "weights_size": layout.file_size, **files}
    verify_plan(plan)
    name = req.plan_name or default_plan_name(req, max_context)
    path = folder / name
    write_plan(path, plan)
    plan.path = path
    return CompileResult(path, plan, reused, report.warnings, time.perf_counter() - t0)


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return s or "model"
