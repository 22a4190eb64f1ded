"""An independent verifier for finished plans (STYLE.md #5).

It trusts nothing the planner computed: it re-derives every buffer's lifetime from the schedule's positional
inputs, outputs and scratch (weights, "@name", are not buffers) and checks that no two buffers live at the same
time share arena bytes, that offsets are aligned, that the plan fits its budget, that every weight's size is
what its format says, that groups tile the schedule and that every streamed op's weight bytes (row tiles by
their format's row size) lie inside its group's byte range, which fits a slot. Then the executor's own load-time
check (`edge_rt_exec.plan_check`) runs too: a plan the device would refuse is a compiler bug.
"""

from __future__ import annotations

import bisect
import heapq

from edge_rt_exec import formats
from edge_rt_exec.errors import InternalError
from edge_rt_exec.plan import Plan, WeightInfo
from edge_rt_exec.plan_check import PlanError, check_plan, mapped_bytes

from .ir import is_row_gather

#: Buffer kinds that live for the whole run.
PERSISTENT = ("slot", "state", "const")


def derived_lifetimes(plan: Plan) -> dict[str, tuple[int, int]]:
    """Every buffer's [first, last] op, from the schedule alone."""
    life: dict[str, tuple[int, int]] = {}
    n = len(plan.schedule)
    for op in plan.schedule:
        for t in op.buffer_inputs() + [o for o in op.outputs if o] + list(op.scratch):
            a, b = life.get(t, (op.index, op.index))
            life[t] = (min(a, op.index), max(b, op.index))
    for name, buf in plan.buffers.items():
        if buf.kind in PERSISTENT:
            life[name] = (0, n)
        elif buf.kind == "input":
            life[name] = (0, life.get(name, (0, 0))[1])
    ends = [o["name"] for o in plan.graph.get("outputs", [])]
    ends += [p for p, _ in plan.graph.get("kv", {}).get("pairs", [])]
    for t in ends:
        if t in life:
            life[t] = (life[t][0], n)
    return life


def _live_overlaps(plan: Plan, life: dict[str, tuple[int, int]]) -> list[str]:
    """Pairs of buffers live at one op that share bytes. A sweep over ops keeping the live byte ranges sorted by
    offset: they are disjoint (a colliding range is reported and left out), so a new range can only meet its
    neighbours. O(n log n) in the number of buffers, where comparing every pair was O(n^2)."""
    problems: list[str] = []
    order = sorted((life[b.name][0], b.offset, b.name) for b in plan.buffers.values()
                   if b.nbytes > 0 and b.name in life)
    starts: list[int] = []  # sorted offsets of the live ranges
    live: list[tuple[int, int, str]] = []  # (offset, end, name), in the same order
    expiry: list[tuple[int, int]] = []  # heap of (last op, offset)
    for t, s1, n1 in order:
        while expiry and expiry[0][0] < t:
            _, s0 = heapq.heappop(expiry)
            i = bisect.bisect_left(starts, s0)
            del starts[i], live[i]
        e1 = s1 + plan.buffers[n1].nbytes
        i = bisect.bisect_left(starts, s1)
        hit = [live[j] for j in (i - 1, i) if 0 <= j < len(live) and live[j][0] < e1 and s1 < live[j][1]]
        for s0, e0, n0 in hit:
            problems.append(f"buffers {n0} [{s0},{e0}) and {n1} [{s1},{e1}) are live together at op {t} and overlap")
        if not hit:
            starts.insert(i, s1)
            live.insert(i, (s1, e1, n1))
            heapq.heappush(expiry, (life[n1][1], s1))
    return problems


def _span(w: WeightInfo, pos: int, op: str, attrs: dict) -> tuple[int, int]:
    rows = attrs.get("rows")
    if rows is not None and op == "Linear" and pos in (1, 2):
        row = formats.get(w.format).nbytes(w.shape[1:] or [1])
        return w.offset + rows[0] * row, w.offset + rows[1] * row
    return w.offset, w.offset + w.nbytes


def verify_plan(plan: Plan) -> None:
    """Raise InternalError (a compiler bug) unless the finished plan is safe and consistent."""
    problems: list[str] = []
    life = derived_lifetimes(plan)
    align = plan.alignment
    for name in life:
        if name not in plan.buffers:
            problems.append(f"buffer {name} used by the schedule has no placement")
    for b in plan.buffers.values():
        if b.offset % align:
            problems.append(f"buffer {b.name} at offset {b.offset} is not {align}-byte aligned")
        if b.offset + b.nbytes > plan.arena["size"]:
            problems.append(f"buffer {b.name} ends past the arena")
        if b.kind in ("activation", "scratch", "input") and b.name not in life:
            problems.append(f"buffer {b.name} is placed but never used")
    problems += _live_overlaps(plan, life)
    peak = plan.arena["size"] + plan.arena.get("reserve", 0) + plan.arena.get("resident_weights", 0)
    if peak > plan.budget:
        problems.append(f"planned peak {peak} exceeds the budget {plan.budget}")
    if plan.predicted.get("peak_bytes") != peak:
        problems.append(f"predicted peak {plan.predicted.get('peak_bytes')} != arena + reserve + resident {peak}")
    size = plan.files.get("weights_size", 0)
    for name, w in plan.weights.items():
        if w.format not in formats.FORMATS or formats.get(w.format).nbytes(w.shape) != w.nbytes:
            problems.append(f"weight {name} ({w.format} {w.shape}) holds {w.nbytes} bytes, not its format's size")
        if w.offset % align or (size and w.offset + w.nbytes > size):
            problems.append(f"weight {name} [{w.offset},{w.offset + w.nbytes}) is misaligned or past the file")
    # Groups tile the schedule; streamed groups fit a slot and hold their ops' weights.
    pos = 0
    slot_bytes = min((s["nbytes"] for s in plan.arena["slots"]), default=0)
    for gr in plan.groups:
        if gr.op_start != pos:
            problems.append(f"group {gr.index} starts at op {gr.op_start}, expected {pos}")
        pos = gr.op_end
        ops = plan.schedule[gr.op_start:gr.op_end]
        for op in ops:
            if op.group != gr.index:
                problems.append(f"op {op.name} is in group {gr.index}'s range but names group {op.group}")
        for op in ops:
            for i, name in op.weight_inputs():
                w = plan.weights[name]
                if is_row_gather(op.op, op.attrs, i, len(w.shape)):
                    continue
                if gr.slot is None and plan.weights_mode != "streamed":
                    continue  # the whole file is mapped
                lo, hi = _span(w, i, op.op, op.attrs)
                if lo < gr.byte_start or hi > gr.byte_end:  # a slot's bytes, or those a resident group maps
                    problems.append(f"op {op.name} weight {name} [{lo},{hi}) lies outside group {gr.index}'s "
                                    f"bytes [{gr.byte_start},{gr.byte_end})")
        if gr.slot is not None:
            if gr.byte_end - gr.byte_start > slot_bytes:
                problems.append(f"group {gr.index} needs {gr.byte_end - gr.byte_start} bytes but slots hold "
                                f"{slot_bytes}")
            if size and gr.byte_end > size:
                problems.append(f"group {gr.index} ends past the weights file")
    if pos != len(plan.schedule):
        problems.append(f"groups cover {pos} of {len(plan.schedule)} ops")
    if plan.weights_mode == "streamed":  # partial residency: what resident groups map is in the budget
        mapped = mapped_bytes([(g.byte_start, g.byte_end) for g in plan.groups if g.slot is None])
        if plan.arena.get("resident_weights", 0) < mapped:
            problems.append(f"resident groups map {mapped} bytes but the plan counts "
                            f"{plan.arena.get('resident_weights', 0)}")
    if problems:
        raise InternalError(f"plan for {plan.model.get('name')} fails verification: " + "; ".join(problems[:5]))
    try:  # and what the executor checks when it loads the plan
        check_plan(plan, f"plan for {plan.model.get('name')}")
    except PlanError as e:
        raise InternalError(f"{e} (the compiler wrote it: this is a bug)") from None
