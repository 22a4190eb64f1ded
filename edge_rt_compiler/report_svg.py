"""The drawings of the HTML report, as geometry for its templates (no markup here): the arena's lifetime x offset
picture, the weights file's byte ranges, the budget bar and the tokens/s-against-budget chart.

Every length is to scale: a drawing records its `scale` (pixels per byte) and origin, so a rectangle's `y` is
`top + (offset - base) * scale` and its height `nbytes * scale` (tests check exactly that).
"""

from __future__ import annotations

import math
from typing import Any

from edge_rt_exec.plan import Plan

from .sizes import fmt_bytes

#: Fill per buffer kind; activations alternate two shades by the group of their first op, so groups read apart.
KIND_COLORS: dict[str, str | tuple[str, str]] = {
    "slot": "#4e79a7", "state": "#f28e2b", "const": "#bab0ac", "input": "#59a14f",
    "activation": ("#76b7b2", "#b07aa1"), "scratch": "#e15759"}
KIND_LABELS = {"slot": "weight slot", "state": "KV cache / state", "const": "inline constants", "input": "input",
               "activation": "activation (shade alternates by group)", "scratch": "op scratch"}
#: Weights coloured by the group that first uses them (cycled).
GROUP_COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                "#9c755f", "#86bcb6"]
STRATEGY_COLORS = {"sequential": "#4e79a7", "greedy_grouping": "#f28e2b", "speculative_prefetch": "#59a14f",
                   "auto": "#e15759"}

LEFT, RIGHT, TOP, BOTTOM = 84, 24, 34, 44  #: margins around a plot, px
PLOT_W = 1080


def _nice_step(span: float, n: int = 6) -> float:
    """A 1-2-5 step that cuts `span` into about `n` pieces."""
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _byte_ticks(lo: int, hi: int, scale: float, origin: float) -> list[dict[str, Any]]:
    """Axis ticks on a byte range in binary units (MiB or KiB), labelled as users type sizes."""
    unit = 1 << 20 if hi - lo >= 4 << 20 else 1 << 10
    step = max(1, round(_nice_step((hi - lo) / unit))) * unit
    first = -(-lo // step) * step
    letter = "M" if unit == 1 << 20 else "K"
    return [{"pos": round(origin + (v - lo) * scale, 2), "label": f"{v / unit:g}{letter}" if v else "0"}
            for v in range(first, hi + 1, step)]


def _group_of_op(plan: Plan) -> list[int]:
    return [op.group for op in plan.schedule]


def _kind_fill(kind: str, group: int) -> str:
    fill = KIND_COLORS.get(kind, "#888888")
    return fill[group % 2] if isinstance(fill, tuple) else fill


def arena_picture(plan: Plan, lo: int, hi: int, height: int = 420) -> dict[str, Any]:
    """The lifetime x offset picture of the arena bytes [lo, hi): x = op index (one column per op of the
    schedule), y = offset (growing downwards), one rectangle per buffer in that range over the ops it is live
    for; buffers live for the whole run (slots, KV cache, constants) span the width."""
    n_ops = max(len(plan.schedule), 1)
    span = max(hi - lo, 1)
    scale = height / span
    xs = PLOT_W / n_ops
    groups = _group_of_op(plan)
    rects: list[dict[str, Any]] = []
    for b in sorted(plan.buffers.values(), key=lambda b: (b.offset, b.first)):
        if b.offset >= hi or b.offset + b.nbytes <= lo or b.nbytes == 0:
            continue
        first, last = (0, n_ops - 1) if b.first < 0 else (b.first, b.last)
        fill = _kind_fill(b.kind, groups[first] if first < len(groups) else 0)
        life = "the whole run" if b.first < 0 else f"ops {b.first}-{b.last}"
        rects.append({
            "name": b.name, "kind": b.kind, "offset": b.offset, "nbytes": b.nbytes,
            "x": round(LEFT + first * xs, 3), "w": round((last - first + 1) * xs, 3),
            "y": round(TOP + (b.offset - lo) * scale, 3), "h": round(b.nbytes * scale, 3), "fill": fill,
            "title": f"{b.name} ({b.kind}) @{b.offset} {fmt_bytes(b.nbytes)} {b.dtype}{b.shape}, {life}",
        })
    bounds = [g.op_start for g in plan.groups] + [plan.groups[-1].op_end if plan.groups else n_ops]
    # a label only where the group is wide enough to hold it (a tiled LM head is many one-op groups)
    group_lines = [{"x": round(LEFT + s * xs, 2), "mid": round(LEFT + (s + e) / 2 * xs, 2),
                    "label": f"g{g.index}" if (e - s) * xs >= 7 * len(str(g.index)) + 10 else ""}
                   for g, s, e in zip(plan.groups, bounds, bounds[1:])]
    step = max(1, round(_nice_step(n_ops, 10)))
    order = list(KIND_COLORS)
    kinds = sorted({str(r["kind"]) for r in rects}, key=lambda k: order.index(k) if k in order else len(order))
    return {
        "width": LEFT + PLOT_W + RIGHT, "height": TOP + height + BOTTOM, "plot_w": PLOT_W, "plot_h": height,
        "left": LEFT, "top": TOP, "base": lo, "end": hi, "scale": scale, "n_ops": n_ops, "rects": rects,
        "yticks": _byte_ticks(lo, hi, scale, TOP),
        "xticks": [{"pos": round(LEFT + i * xs, 2), "label": str(i)} for i in range(0, n_ops + 1, step)],
        "groups": group_lines if len(group_lines) <= PLOT_W // 4 else [],
        "legend": [{"kind": k, "label": KIND_LABELS.get(k, k), "fill": _kind_fill(k, 0)} for k in kinds],
    }


def weight_groups(plan: Plan) -> dict[str, int]:
    """Weight name -> the group of the first op that reads it."""
    out: dict[str, int] = {}
    for op in plan.schedule:
        for _, w in op.weight_inputs():
            out.setdefault(w, op.group)
    return out


def weights_picture(plan: Plan, height: int = 36) -> dict[str, Any]:
    """The weights file to scale: one rectangle per weight tensor, coloured by the group that first reads it, and
    under it each streamed group's byte range (what one read into a slot covers)."""
    size = max(int(plan.files.get("weights_size") or 0),
               max((w.offset + w.nbytes for w in plan.weights.values()), default=1), 1)
    scale = PLOT_W / size
    of = weight_groups(plan)
    rects = [{"name": n, "offset": w.offset, "nbytes": w.nbytes, "x": round(LEFT + w.offset * scale, 3),
              "w": round(w.nbytes * scale, 3), "fill": GROUP_COLORS[of.get(n, 0) % len(GROUP_COLORS)],
              "title": f"{n} {w.format}{w.shape} @{w.offset} {fmt_bytes(w.nbytes)}, group {of.get(n, '-')}"
              + (" (rows gathered, never slot-loaded)" if w.gather else "")}
             for n, w in sorted(plan.weights.items(), key=lambda kv: kv[1].offset)]
    y_ranges = TOP + height + 8
    ranges = [{"index": g.index, "x": round(LEFT + g.byte_start * scale, 3),
               "w": round((g.byte_end - g.byte_start) * scale, 3), "y": y_ranges + (g.index % 2) * 12,
               "label": f"g{g.index}" if (g.byte_end - g.byte_start) * scale * 2 >= 7 * len(str(g.index)) + 10
               else ""} for g in plan.groups if g.slot is not None and g.byte_end > g.byte_start]
    return {"width": LEFT + PLOT_W + RIGHT, "height": y_ranges + 40, "left": LEFT, "top": TOP, "bar_h": height,
            "plot_w": PLOT_W, "scale": scale, "size": size, "rects": rects, "ranges": ranges,
            "ticks": _byte_ticks(0, size, scale, LEFT)}


def budget_picture(plan: Plan, height: int = 28) -> dict[str, Any]:
    """The budget as one bar to scale: the arena, the resident (mapped) weights, the runtime reserve, and what is
    left; a marker at the planned peak."""
    a = plan.arena
    parts = [("arena", a["size"], "#4e79a7"), ("resident weights", a.get("resident_weights") or 0, "#f28e2b"),
             ("runtime reserve", a.get("reserve") or 0, "#bab0ac")]
    used = sum(n for _, n, _ in parts)
    total = max(plan.budget, used, 1)
    scale = PLOT_W / total
    x, segs = float(LEFT), []
    for label, n, fill in [*parts, ("unused", max(plan.budget - used, 0), "#eeeeee")]:
        if n:
            segs.append({"label": label, "nbytes": n, "x": round(x, 3), "w": round(n * scale, 3), "fill": fill,
                         "title": f"{label} {fmt_bytes(n)}"})
            x += n * scale
    return {"width": LEFT + PLOT_W + RIGHT, "height": TOP + height + 24, "left": LEFT, "top": TOP, "bar_h": height,
            "scale": scale, "segments": segs, "budget_x": round(LEFT + plan.budget * scale, 3),
            "peak_x": round(LEFT + plan.predicted["peak_bytes"] * scale, 3)}


def line_chart(series: list[dict[str, Any]], height: int = 320, width: int = 760) -> dict[str, Any]:
    """Tokens/s against budget: `series` [{label, color, dashed, points: [(budget_bytes, tok_s, title)]}]. The
    budget axis is logarithmic (sweeps double it), tokens/s linear from 0."""
    pts = [p for s in series for p in s["points"]]
    if not pts:
        return {}
    bx = sorted({p[0] for p in pts})
    lo, hi = math.log2(bx[0]), math.log2(bx[-1])
    pad = 0.5 if hi == lo else 0.06 * (hi - lo)  # keep the end points off the frame
    ymax = max(p[1] for p in pts) * 1.1 or 1.0
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM

    def x(b: float) -> float:
        return round(LEFT + (math.log2(b) - lo + pad) / (hi - lo + 2 * pad) * pw, 2)

    def y(v: float) -> float:
        return round(TOP + ph - v / ymax * ph, 2)

    out = []
    for s in series:
        ps = sorted(s["points"])
        out.append({**s, "path": " ".join(f"{'M' if i == 0 else 'L'}{x(b)},{y(v)}" for i, (b, v, _) in
                                          enumerate(ps)),
                    "dots": [{"cx": x(b), "cy": y(v), "value": v, "title": t} for b, v, t in ps]})
    step = _nice_step(ymax, 5)
    return {"width": width, "height": height, "left": LEFT, "top": TOP, "plot_w": pw, "plot_h": ph, "series": out,
            "xticks": [{"pos": x(b), "label": fmt_bytes(b)} for b in bx],
            "yticks": [{"pos": y(v), "label": f"{v:g}"} for v in
                       (round(k * step, 6) for k in range(int(ymax / step) + 1))]}
