"""The compiler pipeline: frontend -> IR -> validate -> passes -> weights layout -> partition -> memory layout
-> emit -> verify. `compile_model(request)` is a plain function (the Hydra app and the tests call it); each
stage is a function from IR to IR or to a result dataclass, defined in its own module."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_rt_exec.errors import InternalError, UserError
from edge_rt_exec.plan import Plan

from . import passes
from .cost import predict
from .emit import (
    SHA_PLACEHOLDER,
    check_folder,
    checksum_groups,
    generation_settings,
    locked,
    make_plan,
    plan_name,
    record_source,
    remove_stale_temps,
    weights_file_name,
    write_companions,
    write_error,
    write_plan,
    write_weights,
)
from .frontends import ModelRequest, ModelSource, folder_name, load_source
from .memory_layout import RUNTIME_RESERVE, lay_out, persistent_bytes, plan_activations, tensor_requests
from .partition import Context, minimum_slot, partition, sched_ops
from .passes.act_quant import act_quant, check_act_quant, plan_suffix
from .passes.quantize import check_settings
from .validate import validate
from .verify import verify_plan
from .weights_layout import compute_layout

__all__ = ["RUNTIME_RESERVE", "CompileRequest", "CompileResult", "ModelRequest", "compile_model", "load_source"]


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
    quant: str = "keep"  #: "keep" or a weight format (passes/quantize.py)
    kv_dtype: str = "f32"  #: "f32" | "f16"
    act_quant: str = "none"  #: "none" | "q8_0" (passes/act_quant.py)


@dataclass
class CompileResult:
    plan_path: Path
    plan: Plan
    weights_reused: bool
    warnings: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)  #: format choices and repacks, for the compile output


def context_limits(req: CompileRequest, src: ModelSource) -> tuple[int, int]:
    """(max_context, max_batch_tokens) of the request, checked against what the model supports (a step of a
    model with a KV cache holds at most max_context rows)."""
    ctx = req.max_context if req.max_context is not None else \
        req.model.max_context or src.default_context or src.max_position
    if ctx <= 0:
        raise UserError(f"max_context={ctx} must be a positive number of tokens")
    if ctx > src.max_position:
        raise UserError(f"max_context={ctx} exceeds what {src.name} supports ({src.max_position}); "
                        f"use max_context<={src.max_position}")
    mbt = req.max_batch_tokens if req.max_batch_tokens is not None else min(ctx, 512)
    if mbt <= 0:
        raise UserError(f"max_batch_tokens={mbt} must be positive")
    return ctx, min(mbt, ctx) if src.graph.graph["kv"]["mode"] == "cache" else mbt


@contextmanager
def cycle_collector_paused() -> Iterator[None]:
    """Python's cycle collector off for the duration. A compile builds millions of long-lived objects (the IR's
    dicts and lists, the schedule, the buffers) and next to no cyclic garbage; the collector re-scanning them
    over and over took a third of the CPU time of a 100k-op compile. Reference counting still frees what a
    compile drops; the collector is back on afterwards (if it was on)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def compile_model(req: CompileRequest) -> CompileResult:
    """The whole compile of one request: the plan (and the weights file, once) written."""
    with cycle_collector_paused():
        return _compile(req)


def _compile(req: CompileRequest) -> CompileResult:
    t0 = time.perf_counter()
    check_settings(req.quant, req.kv_dtype)
    check_act_quant(req.act_quant)
    try:
        src = load_source(req.model, Path(req.out_dir))
    except OSError as e:  # a model that cannot be read, or the synthetic model's folder that cannot be written
        if req.model.source == "synthetic":
            raise write_error(e, Path(req.out_dir)) from None
        where = e.filename or req.model.path or req.model.name
        raise UserError(f"{where}: cannot read the model ({e.strerror or e})") from None
    report = validate(src.graph, src)
    ctx, mbt = context_limits(req, src)
    dims = passes.plan_dims(src.graph, ctx, mbt, req.onnx_dims)
    g = act_quant(passes.run(src.graph, dims, req.quant, req.kv_dtype), req.act_quant)
    tag = passes.format_tag(g)
    layout = compute_layout(g, {"edge_rt_source": src.source_key, "edge_rt_data_sha256": SHA_PLACEHOLDER,
                                "edge_rt_model": src.name})

    ops = sched_ops(g, layout)
    reqs0 = tensor_requests(g, ops)
    acts0 = plan_activations(reqs0)
    act0 = acts0.total
    state = persistent_bytes(g)
    min_slot, min_unit = minimum_slot(g, ops)
    fixed = {"KV cache" if g.graph["kv"]["mode"] == "cache" else "constants": state, "activations": act0,
             "runtime reserve": RUNTIME_RESERVE}
    pctx = Context(budget=req.budget, fixed_bytes=sum(fixed.values()), fixed_parts=fixed,
                   total_weight_bytes=layout.file_size, min_slot=min_slot, min_slot_unit=min_unit,
                   prefetch_headroom=float(req.target.get("prefetch_headroom", 0.0)), model_name=src.name,
                   max_context=ctx, unit_names=list(g.graph["units"]), target=req.target)
    part = partition(ops, layout, pctx, req.strategy)
    scheduled = [o for grp in part.groups for o in grp.ops]
    # Unless the partition tiled ops, the schedule is the one planned above: its layout is reused (the planners
    # are deterministic; they are the largest part of a compile after the passes).
    reqs = reqs0 if scheduled == ops else tensor_requests(g, scheduled)
    arena = lay_out(g, part.n_slots, part.slot_bytes, reqs, acts0 if reqs == reqs0 else None)
    if arena.activations["size"] > act0:
        raise InternalError(f"activation arena grew from {act0} to {arena.activations['size']} after partitioning")
    plan = make_plan(src, g, layout, part, arena, predict(part, req.target, layout.file_size), request=req,
                     max_context=ctx, max_batch_tokens=mbt, reserve=RUNTIME_RESERVE)

    folder = Path(req.out_dir) / folder_name(src.name)
    weights = folder / weights_file_name(tag)
    path = folder / (req.plan_name or plan_name(req.strategy, req.budget, ctx, tag + plan_suffix(req.act_quant),
                                                       req.kv_dtype))
    try:
        with locked(folder):  # every write into the folder happens under its lock (emit.py)
            for name in remove_stale_temps(folder):
                print(f"{folder}: removed {name}, left by a killed compile", file=sys.stderr)
            identity = check_folder(folder, src)
            sha, reused = write_weights(weights, g, layout)
            checksum_groups(plan, weights)
            record_source(folder, identity)
            files = write_companions(folder, src, generation_settings(src))
            plan.files = {"weights": weights.name, "weights_sha256": sha, "weights_size": layout.file_size, **files}
            verify_plan(plan)
            write_plan(path, plan)
    except OSError as e:
        raise write_error(e, folder) from None
    plan.path = path
    return CompileResult(path, plan, reused, report.warnings, time.perf_counter() - t0, list(g.graph["notes"]))
