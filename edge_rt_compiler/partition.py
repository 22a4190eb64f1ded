"""Partitioning: IR units -> execution groups for a memory budget and a strategy.

A *unit* is a transformer block, the embedding, or the head (for ONNX graphs, a segment). A strategy decides
how many weight slots the arena has, how large they are, and how consecutive units are packed into groups; it
returns a `PartitionResult` and never mutates the IR. A unit larger than a slot is split at op boundaries, and
an op larger than a slot (the LM head of a large vocab) is tiled along its output rows. Every byte count is a
weight's stored size in its format (the layout's).

Strategies are registered in `STRATEGIES` under the names of `conf/strategy/*.yaml`; `auto` runs the others
and keeps the one with the lowest latency the cost model (`cost.predict`) gives for the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import networkx as nx

from edge_rt_exec.errors import InternalError, UserError
from edge_rt_exec.plan_check import FAULT_AROUND, mapped_bytes

from .cost import predict
from .groups import PartitionResult, PlannedGroup, SchedOp
from .ir import is_row_gather, is_weight, nodes_in_order, weight_name
from .passes.segments import TILEABLE
from .sizes import fmt_bytes, parse_bytes
from .weights_layout import WeightsLayout

__all__ = ["STRATEGIES", "Context", "PartitionResult", "PlannedGroup", "SchedOp", "fmt_bytes", "parse_bytes",
           "partition", "resident_bytes", "sched_ops",
           "units_of"]


@dataclass
class Piece:
    unit: int
    ops: list[SchedOp]

    @property
    def byte_start(self) -> int:
        spans = [o for o in self.ops if o.byte_end > o.byte_start]
        return min(o.byte_start for o in spans) if spans else -1

    @property
    def byte_end(self) -> int:
        spans = [o for o in self.ops if o.byte_end > o.byte_start]
        return max(o.byte_end for o in spans) if spans else -1


@dataclass(frozen=True)
class Context:
    """What a strategy needs to know besides the units."""

    budget: int
    fixed_bytes: int  #: state (KV cache, constants) + activations + runtime reserve
    fixed_parts: dict[str, int]  #: the same, by part, for the minimum-budget message
    total_weight_bytes: int  #: every weight in the weights file (resident mode maps them all)
    min_slot: int  #: the largest unit that may not be split (a transformer block)
    min_slot_unit: str
    prefetch_headroom: float
    model_name: str
    max_context: int
    unit_names: list[str]
    target: dict[str, Any]  #: the device (read / memory bandwidth, compute rate) for the cost model


# ---- units and tiling -----------------------------------------------------------------------------------------

def op_bytes(layout: WeightsLayout, op: str, inputs: tuple[str, ...], attrs: dict[str, Any]) -> tuple[int, int]:
    """The contiguous file range of an op's slot-loaded weights (tables it gathers rows from excluded); a row
    tile of a Linear loads rows r0..r1 of its weight (input 1) and bias (input 2)."""
    rows = attrs.get("rows")
    spans = []
    for i, t in enumerate(inputs):
        if not is_weight(t):
            continue
        w = layout.weights[weight_name(t)]
        if is_row_gather(op, attrs, i, len(w.shape)):
            continue
        if rows is not None and op in TILEABLE and i in (1, 2):
            spans.append((w.offset + rows[0] * w.row_bytes(), w.offset + rows[1] * w.row_bytes()))
        else:
            spans.append((w.offset, w.offset + w.nbytes))
    if not spans:
        return (0, 0)
    return (min(s for s, _ in spans), max(e for _, e in spans))


def sched_ops(g: nx.DiGraph, layout: WeightsLayout) -> list[SchedOp]:
    """The IR in execution order as scheduled ops, each with its weight byte range."""
    out = []
    for n, node in nodes_in_order(g):
        inputs = tuple(node["inputs"])
        bs, be = op_bytes(layout, node["op"], inputs, node["attrs"])
        fmt = layout.weights[weight_name(inputs[1])].format if len(inputs) > 1 and is_weight(inputs[1]) else ""
        out.append(SchedOp(n, n, node["op"], node["unit"], inputs, tuple(node["outputs"]),
                           tuple(node["attrs"].items()), tuple(node["scratch"]), node["flops"], bs, be, fmt))
    return out


def minimum_slot(g: nx.DiGraph, ops: list[SchedOp]) -> tuple[int, str]:
    """(bytes, what) of the smallest weight slot any strategy needs: the largest transformer block (a block is
    one group for `sequential`), or for segmented graphs what `passes.segments` recorded."""
    if "min_slot" in g.graph:
        return g.graph["min_slot"]
    spans: dict[int, tuple[int, int]] = {}
    for o in ops:
        if o.byte_end > o.byte_start and g.graph["units"][o.unit].startswith("layer."):
            lo, hi = spans.get(o.unit, (o.byte_start, o.byte_end))
            spans[o.unit] = (min(lo, o.byte_start), max(hi, o.byte_end))
    size, unit = max(((hi - lo, u) for u, (lo, hi) in spans.items()), default=(0, -1))
    return size, g.graph["units"][unit] if unit >= 0 else "none"


def units_of(ops: list[SchedOp]) -> list[Piece]:
    """Consecutive ops of one unit as pieces (a block, the embedding, the head, ...)."""
    pieces: list[Piece] = []
    for o in ops:
        if not pieces or pieces[-1].unit != o.unit:
            pieces.append(Piece(o.unit, []))
        pieces[-1].ops.append(o)
    return pieces


def tile_op(o: SchedOp, layout: WeightsLayout, slot: int) -> list[SchedOp]:
    """Split a Linear into row tiles whose weight bytes (weight rows + bias rows) fit `slot`."""
    attrs = dict(o.attrs)
    if o.op not in TILEABLE or len(o.inputs) < 2 or not is_weight(o.inputs[1]):
        raise InternalError(f"op {o.name} ({o.op}) cannot be tiled")
    w = layout.weights[weight_name(o.inputs[1])]
    r0, r1 = attrs.get("rows") or (0, w.shape[0])
    row = w.row_bytes()
    if len(o.inputs) > 2 and is_weight(o.inputs[2]):
        row += layout.weights[weight_name(o.inputs[2])].row_bytes()
    per = max(1, slot // row)
    # Keep tiles a multiple of 16 rows where possible so kernels see aligned tiles.
    if per > 16:
        per -= per % 16
    tiles = []
    for k, a in enumerate(range(r0, r1, per)):
        b = min(r1, a + per)
        t_attrs = dict(attrs, rows=[a, b])
        bs, be = op_bytes(layout, o.op, o.inputs, t_attrs)
        tiles.append(replace(o, name=f"{o.name}.tile{k}", attrs=tuple(t_attrs.items()),
                             flops=o.flops * (b - a) // max(1, r1 - r0), byte_start=bs, byte_end=be))
    return tiles


def split_piece(p: Piece, layout: WeightsLayout, slot: int) -> list[Piece]:
    """Pieces of at most `slot` bytes: op boundaries first, row tiles for an op that alone is too big."""
    if p.byte_start < 0 or p.byte_end - p.byte_start <= slot:
        return [p]
    out: list[Piece] = []
    for o in p.ops:
        parts = tile_op(o, layout, slot) if o.byte_end - o.byte_start > slot else [o]
        for part in parts:
            out.append(Piece(p.unit, [part]))
    return out


def pack(pieces: list[Piece], slot: int, unit_names: list[str], one_unit_per_group: bool) -> list[PlannedGroup]:
    """Consecutive pieces into groups whose byte range fits `slot`."""
    groups: list[PlannedGroup] = []
    cur: list[Piece] = []

    def flush() -> None:
        if not cur:
            return
        ops = [o for p in cur for o in p.ops]
        spans = [(o.byte_start, o.byte_end) for o in ops if o.byte_end > o.byte_start]
        bs = min(s for s, _ in spans) if spans else 0
        be = max(e for _, e in spans) if spans else 0
        units = []
        for p in cur:
            if unit_names[p.unit] not in units:
                units.append(unit_names[p.unit])
        groups.append(PlannedGroup(ops, units, bs, be, bool(spans)))
        cur.clear()

    for p in pieces:
        if cur:
            lo = min([q.byte_start for q in cur + [p] if q.byte_start >= 0], default=-1)
            hi = max([q.byte_end for q in cur + [p]], default=-1)
            too_big = lo >= 0 and hi - lo > slot
            new_unit = one_unit_per_group and p.unit != cur[-1].unit and p.byte_start >= 0 \
                and any(q.byte_start >= 0 for q in cur)
            if too_big or new_unit:
                flush()
        cur.append(p)
    flush()
    return groups


# ---- strategies -------------------------------------------------------------------------------------------------

def _minimum_error(ctx: Context, strategy: str, slots: int) -> UserError:
    need = ctx.fixed_bytes + slots * ctx.min_slot
    parts = ", ".join(f"{k} {fmt_bytes(v)}" + (f" at max_context={ctx.max_context}" if k == "KV cache" else "")
                      for k, v in ctx.fixed_parts.items() if v)
    slot_part = f"{slots} x largest unit {fmt_bytes(ctx.min_slot)} ({ctx.min_slot_unit})" if slots > 1 else \
        f"largest unit {fmt_bytes(ctx.min_slot)} ({ctx.min_slot_unit})"
    return UserError(
        f"budget {fmt_bytes(ctx.budget)} is too small for strategy '{strategy}' on {ctx.model_name}: needs at "
        f"least {fmt_bytes(need, round_up=True)} ({parts}, {slot_part}); raise budget= or lower max_context= "
        f"(now {ctx.max_context})")


def sequential(units: list[Piece], layout: WeightsLayout, ctx: Context) -> PartitionResult:
    """One unit per group, streamed through one slot sized for the largest block."""
    if ctx.fixed_bytes + ctx.min_slot > ctx.budget:
        raise _minimum_error(ctx, "sequential", 1)
    slot = ctx.min_slot
    pieces = [q for p in units for q in split_piece(p, layout, slot)]
    groups = pack(pieces, slot, ctx.unit_names, one_unit_per_group=True)
    return PartitionResult("sequential", "streamed", 1, _slot_size(groups), groups)


def greedy_grouping(units: list[Piece], layout: WeightsLayout, ctx: Context) -> PartitionResult:
    """As few groups as fit; the whole model resident (mmap, no slot) when it fits the budget."""
    if ctx.total_weight_bytes + ctx.fixed_bytes <= ctx.budget:
        ops = [o for p in units for o in p.ops]
        g = PlannedGroup(ops, [ctx.unit_names[p.unit] for p in units], 0, 0, False)
        return PartitionResult("greedy_grouping", "resident", 0, 0, [g], ["whole model resident"])
    slot = ctx.budget - ctx.fixed_bytes
    if slot < ctx.min_slot:
        raise _minimum_error(ctx, "greedy_grouping", 1)
    pieces = [q for p in units for q in split_piece(p, layout, slot)]
    groups = pack(pieces, slot, ctx.unit_names, one_unit_per_group=False)
    return PartitionResult("greedy_grouping", "streamed", 1, _slot_size(groups), groups)


def speculative_prefetch(units: list[Piece], layout: WeightsLayout, ctx: Context) -> PartitionResult:
    """Two slots: the group computing and the next one being read. `prefetch_headroom` of the budget is left
    unplanned for the reader's I/O."""
    usable = int(ctx.budget * (1.0 - ctx.prefetch_headroom)) - ctx.fixed_bytes
    slot = usable // 2
    if slot < ctx.min_slot:
        err = _minimum_error(ctx, "speculative_prefetch", 2)
        need = int((ctx.fixed_bytes + 2 * ctx.min_slot) / (1.0 - ctx.prefetch_headroom))
        msg = str(err).replace(f"needs at least {fmt_bytes(ctx.fixed_bytes + 2 * ctx.min_slot, round_up=True)}",
                               f"needs at least {fmt_bytes(need, round_up=True)}")
        if ctx.prefetch_headroom:
            msg = msg.replace("; raise", f", with prefetch headroom {ctx.prefetch_headroom:g}; raise")
        raise UserError(msg)
    # Groups of one block each (the slot limit is only a ceiling): the group being computed then stays in the
    # CPU caches right after its read, and the reader is never more than one block ahead, so the pipeline
    # fills quickly. Larger groups only add a second trip through DRAM (measured in benchmarks/bench_streaming.py).
    target = min(slot, ctx.min_slot)
    pieces = [q for p in units for q in split_piece(p, layout, target)]
    groups = pack(pieces, target, ctx.unit_names, one_unit_per_group=True)
    return PartitionResult("speculative_prefetch", "streamed", 2, _slot_size(groups), groups)


def _mapped_span(start: int, end: int) -> tuple[int, int]:
    return start - start % FAULT_AROUND, -(-end // FAULT_AROUND) * FAULT_AROUND


def resident_bytes(groups: list[PlannedGroup]) -> int:
    """What the resident groups of a streamed plan hold (`plan_check.mapped_bytes`: whole 64 KiB windows, overlaps
    once): counted against the budget like the arena."""
    return mapped_bytes([(g.byte_start, g.byte_end) for g in groups if not g.streamed and g.nbytes])


def _spread(n: int) -> list[int]:
    """0..n-1 in van der Corput (bit-reversed) order: any prefix of it is spread evenly over the range."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def _keep_resident(pieces: list[Piece], room: int) -> set[int]:
    """Indices of the pieces to keep resident in `room` bytes. A piece kept saves its bytes of reads every token
    and costs its span in whole 64 KiB windows of budget: the best savings per byte go first (small pieces lose
    most to the rounding), and among equals, in van der Corput order over the schedule, so the pieces left to stream are
    spread evenly and each read can overlap the compute of the resident groups before it."""
    weighted = [i for i, p in enumerate(pieces) if p.byte_start >= 0]
    order = {i: k for k, i in enumerate(weighted[j] for j in _spread(len(weighted)))} if weighted else {}

    def cost(i: int) -> int:
        lo, hi = _mapped_span(pieces[i].byte_start, pieces[i].byte_end)
        return hi - lo

    def rank(i: int) -> tuple[bool, float, int]:
        saved = (pieces[i].byte_end - pieces[i].byte_start) / cost(i)  # reads saved per byte of budget
        return (saved < 0.9, 0.0 if saved >= 0.9 else -saved, order[i])  # within 10% of the best: equals

    ranked = sorted(weighted, key=rank)
    keep: set[int] = set()
    for i in ranked:
        if cost(i) <= room:
            keep.add(i)
            room -= cost(i)
    return keep


def _mixed_groups(pieces: list[Piece], keep: set[int], slot: int, unit_names: list[str]) -> list[PlannedGroup]:
    """Resident pieces as groups of their own (read once at load, never into a slot), runs of the others
    packed one unit per group into `slot`; a piece without slot-loaded weights joins the run it follows."""
    runs: list[tuple[bool, list[Piece]]] = []
    for i, p in enumerate(pieces):
        resident = i in keep
        if p.byte_start < 0 and runs:
            runs[-1][1].append(p)
        elif runs and not resident and not runs[-1][0]:
            runs[-1][1].append(p)
        else:
            runs.append((resident, [p]))
    groups: list[PlannedGroup] = []
    for resident, run in runs:
        packed = pack(run, slot, unit_names, one_unit_per_group=not resident)
        if resident:  # one piece (and the weightless ones after it): one group, whatever its size
            packed = [PlannedGroup([o for g in packed for o in g.ops], list(dict.fromkeys(
                u for g in packed for u in g.units)), run[0].byte_start, run[0].byte_end, False)]
        groups += packed
    return groups


def partial_residency(units: list[Piece], layout: WeightsLayout, ctx: Context) -> PartitionResult:
    """Keep resident (read once at load) as many weights as the budget holds beside the slots, and stream only
    the rest: through two slots with the reader prefetching (one block of residency less) or one; of the two, the
    one the cost model predicts faster. The whole model resident when it fits, as `greedy_grouping`."""
    if ctx.total_weight_bytes + ctx.fixed_bytes <= ctx.budget:
        return replace(greedy_grouping(units, layout, ctx), strategy="partial_residency")
    if ctx.fixed_bytes + ctx.min_slot > ctx.budget:
        raise _minimum_error(ctx, "partial_residency", 1)
    slot = ctx.min_slot
    pieces = [q for p in units for q in split_piece(p, layout, slot)]
    # a piece whose op's weights lie apart in the file (a segment's, a tile's weight and bias rows) may span more
    # than `slot`: a slot must hold the largest piece that may stream
    slot_need = max([slot] + [p.byte_end - p.byte_start for p in pieces if p.byte_start >= 0])
    best: tuple[float, PartitionResult] | None = None
    for n_slots in (1, 2):
        # No prefetch headroom held back (unlike speculative_prefetch): the reader preads into its slot, which
        # needs no memory of the process beyond the slot, and a fifth of the budget would be taken from residency.
        room = ctx.budget - ctx.fixed_bytes - n_slots * slot_need
        if room < 0:
            continue
        keep = _keep_resident(pieces, room)
        groups = _mixed_groups(pieces, keep, slot, ctx.unit_names)
        streamed = [g for g in groups if g.streamed]
        if not streamed:  # every group kept (only tables read by row stream): no slot is needed
            n_slots = 0
        r = PartitionResult("partial_residency", "streamed", n_slots, _slot_size(streamed), groups, [
            f"partial residency: {fmt_bytes(resident_bytes(groups))} of weights resident, "
            f"{fmt_bytes(sum(g.nbytes for g in streamed))} streamed per token through {n_slots} slot(s) of "
            f"{fmt_bytes(_slot_size(streamed))}"])
        ms = predict(r, ctx.target, ctx.total_weight_bytes).decode_ms_per_token
        if best is None or ms < best[0]:
            best = (ms, r)
    if best is None:
        raise _minimum_error(ctx, "partial_residency", 1)
    return best[1]


def auto(units: list[Piece], layout: WeightsLayout, ctx: Context) -> PartitionResult:
    """Every other strategy that fits the budget; the one with the lowest predicted decode latency."""
    tried: list[tuple[float, str, PartitionResult]] = []
    errors: dict[str, str] = {}
    for name, strategy in STRATEGIES.items():
        if strategy is auto:
            continue
        try:
            r = strategy(units, layout, ctx)
        except UserError as e:
            errors[name] = str(e)
            continue
        tried.append((predict(r, ctx.target, ctx.total_weight_bytes).decode_ms_per_token, name, r))
    if not tried:  # the smallest minimum (sequential's) is the one worth stating
        name, msg = next(iter(errors.items()))
        raise UserError(msg.replace(f"strategy '{name}'", "any strategy ('auto')"))
    tried.sort(key=lambda x: x[0])
    best = tried[0][2]
    notes = [f"auto: {n} predicted {ms:.1f} ms/token" for ms, n, _ in tried]
    return replace(best, notes=best.notes + notes)


def _slot_size(groups: list[PlannedGroup]) -> int:
    return max((g.nbytes for g in groups), default=0)


Strategy = Callable[[list[Piece], WeightsLayout, Context], PartitionResult]

#: Keyed like conf/strategy/*.yaml.
STRATEGIES: dict[str, Strategy] = {
    "sequential": sequential,
    "greedy_grouping": greedy_grouping,
    "speculative_prefetch": speculative_prefetch,
    "partial_residency": partial_residency,
    "auto": auto,
}


def partition(ops: list[SchedOp], layout: WeightsLayout, ctx: Context, strategy: str) -> PartitionResult:
    """Run one registered strategy on the schedule's units."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy](units_of(ops), layout, ctx)
