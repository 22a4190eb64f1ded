"""An independent verifier for finished plans (STYLE.md #5).

It trusts nothing the planner computed: it re-derives every buffer's lifetime from the schedule itself and
checks that no two buffers live at the same time share arena bytes, that offsets are aligned, that the plan
fits its budget, that groups tile the schedule and that every streamed op's weights lie inside its group's
byte range, which fits a slot.
"""

from __future__ import annotations

from edge_rt_exec.errors import InternalError
from edge_rt_exec.plan import Plan


def derived_lifetimes(plan: Plan) -> dict[str, tuple[int, int]]:
    life: dict[str, tuple[int, int]] = {}
    n = len(plan.schedule)
    for op in plan.schedule:
        names = list(op.inputs) + list(op.outputs) + list(op.attrs.get("scratch", []))
        for t in names:
            a, b = life.get(t, (op.index, op.index))
            life[t] = (min(a, op.index), max(b, op.index))
    for name, buf in plan.buffers.items():
        if buf.kind in ("slot", "kv"):
            life[name] = (0, n)  # persistent
        elif buf.kind == "input":
            life[name] = (0, life.get(name, (0, 0))[1])
    if plan.schedule:
        last = plan.schedule[-1]
        for t in last.outputs:
            life[t] = (life[t][0], n)
    return life


def verify_plan(plan: Plan) -> None:
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
    placed = sorted((b.offset, b.offset + b.nbytes, b.name) for b in plan.buffers.values()
                    if b.nbytes > 0 and b.name in life)
    for i, (s0, e0, n0) in enumerate(placed):
        for s1, e1, n1 in placed[i + 1:]:
            if s1 >= e0:
                break
            la, lb = life[n0], life[n1]
            if la[0] <= lb[1] and lb[0] <= la[1]:
                problems.append(f"buffers {n0} [{s0},{e0}) and {n1} [{s1},{e1}) are live together at op "
                                f"{max(la[0], lb[0])} and overlap")
    peak = plan.arena["size"] + plan.arena.get("reserve", 0) + plan.arena.get("resident_weights", 0)
    if peak > plan.budget:
        problems.append(f"planned peak {peak} exceeds the budget {plan.budget}")
    if plan.predicted.get("peak_bytes") != peak:
        problems.append(f"predicted peak {plan.predicted.get('peak_bytes')} != arena + reserve + resident {peak}")
    # Groups tile the schedule; streamed groups fit a slot and hold their ops' weights.
    pos = 0
    slot_bytes = min((s["nbytes"] for s in plan.arena["slots"]), default=0)
    size = plan.files.get("weights_size", 0)
    for gr in plan.groups:
        if gr.op_start != pos:
            problems.append(f"group {gr.index} starts at op {gr.op_start}, expected {pos}")
        pos = gr.op_end
        if gr.slot is not None:
            if gr.byte_end - gr.byte_start > slot_bytes:
                problems.append(f"group {gr.index} needs {gr.byte_end - gr.byte_start} bytes but slots hold "
                                f"{slot_bytes}")
            if size and gr.byte_end > size:
                problems.append(f"group {gr.index} ends past the weights file")
            for op in plan.schedule[gr.op_start:gr.op_end]:
                if op.group != gr.index:
                    problems.append(f"op {op.name} is in group {gr.index}'s range but names group {op.group}")
                for role, w in op.weights.items():
                    t = plan.tensors[w]
                    if role in op.attrs.get("gather", ()):
                        continue
                    rows = op.attrs.get("rows")
                    lo, hi = t.offset, t.offset + t.nbytes
                    if rows is not None and t.shape:
                        row = t.nbytes // t.shape[0] if role == "weight" else 4
                        lo, hi = t.offset + rows[0] * row, t.offset + rows[1] * row
                    if lo < gr.byte_start or hi > gr.byte_end:
                        problems.append(f"op {op.name} weight {w} [{lo},{hi}) lies outside group {gr.index}'s "
                                        f"bytes [{gr.byte_start},{gr.byte_end})")
        elif plan.weights_mode == "streamed":
            for op in plan.schedule[gr.op_start:gr.op_end]:
                if any(r not in op.attrs.get("gather", ()) for r in op.weights):
                    problems.append(f"op {op.name} has weights but its group {gr.index} is not streamed")
    if pos != len(plan.schedule):
        problems.append(f"groups cover {pos} of {len(plan.schedule)} ops")
    if problems:
        raise InternalError(f"plan for {plan.model.get('name')} fails verification: " + "; ".join(problems[:5]))
