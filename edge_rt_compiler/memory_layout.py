"""The arena: `[weight slots][state: KV cache, inline constants][activations]`, every buffer at a fixed offset.

`tensor_requests` derives each activation's, graph input's and scratch buffer's size and op-level lifetime
`[first, last]` (inclusive) from the schedule; the activation algorithms share one signature and return a
`LayoutResult`, and `plan_activations` runs the suite and keeps the smallest (as ExecuTorch's
`MemoryPlanningAlgorithmSuite` does). The peak-live lower bound is the largest sum of sizes of buffers live
at one op: no placement can beat it. `lay_out` places slots, state and activations into one `Arena`.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

from edge_rt_exec.plan import ALIGNMENT, Buffer

from .ir import TensorSpec, is_weight
from .sizes import align

#: Per-plan runtime overhead beyond the arena (Python objects for views, the reader thread's stack pages,
#: the tokenizer's per-call buffers), counted against the budget: peak RSS minus baseline minus arena as
#: `edge-rt-exec run --json` reports them, with margin.
RUNTIME_RESERVE = 6 * 1024 * 1024


@dataclass(frozen=True)
class BufferRequest:
    name: str
    size: int
    first: int
    last: int
    kind: str = "activation"  #: "input" | "activation" | "scratch"


@dataclass(frozen=True)
class LayoutResult:
    algorithm: str
    offsets: dict[str, int]
    total: int


def overlaps_in_time(a: BufferRequest, b: BufferRequest) -> bool:
    """Two requests live at some common op."""
    return a.first <= b.last and b.first <= a.last


def peak_live_lower_bound(reqs: list[BufferRequest], alignment: int = ALIGNMENT) -> int:
    """The largest total (aligned) size live at one op: no placement uses less."""
    if not reqs:
        return 0
    events: dict[int, int] = {}
    for r in reqs:
        events[r.first] = events.get(r.first, 0) + align(r.size, alignment)
        events[r.last + 1] = events.get(r.last + 1, 0) - align(r.size, alignment)
    live = peak = 0
    for t in sorted(events):
        live += events[t]
        peak = max(peak, live)
    return peak


def naive(reqs: list[BufferRequest], alignment: int = ALIGNMENT) -> LayoutResult:
    """Every buffer its own bytes (the baseline the others must beat)."""
    off, offsets = 0, {}
    for r in reqs:
        offsets[r.name] = off
        off += align(r.size, alignment)
    return LayoutResult("naive", offsets, off)


class _TimeIndex:
    """Placed buffers by lifetime, to enumerate those live at some op of `[first, last]` without looking at the
    others (an interval index over op positions, two iterative segment trees): a buffer is stored at the
    O(log T) nodes that cover its lifetime (tree `cover`) and at the O(log T) nodes on its first op's path
    (tree `starts`). A buffer meets `[first, last]` iff its lifetime holds `first` (the nodes on `first`'s
    path in `cover`) or it starts in `(first, last]` (the nodes covering that range in `starts`), never both.
    Adding costs O(log T); a query O(log T + k) for the k buffers it returns."""

    def __init__(self, n_times: int) -> None:
        self.size = 1 << max(0, n_times - 1).bit_length()
        self.cover: list[list[tuple[int, int]] | None] = [None] * (2 * self.size)
        self.starts: list[list[tuple[int, int]] | None] = [None] * (2 * self.size)

    def add(self, first: int, last: int, item: tuple[int, int]) -> None:
        cover, starts = self.cover, self.starts
        lo, hi = first + self.size, last + self.size + 1
        while lo < hi:
            if lo & 1:
                node = cover[lo]
                if node is None:
                    cover[lo] = [item]
                else:
                    node.append(item)
                lo += 1
            if hi & 1:
                hi -= 1
                node = cover[hi]
                if node is None:
                    cover[hi] = [item]
                else:
                    node.append(item)
            lo >>= 1
            hi >>= 1
        i = first + self.size
        while i:
            node = starts[i]
            if node is None:
                starts[i] = [item]
            else:
                node.append(item)
            i >>= 1

    def meeting(self, first: int, last: int) -> list[tuple[int, int]]:
        cover, starts = self.cover, self.starts
        out: list[tuple[int, int]] = []
        i = first + self.size
        while i:
            node = cover[i]
            if node is not None:
                out += node
            i >>= 1
        lo, hi = first + 1 + self.size, last + self.size + 1
        while lo < hi:
            if lo & 1:
                node = starts[lo]
                if node is not None:
                    out += node
                lo += 1
            if hi & 1:
                hi -= 1
                node = starts[hi]
                if node is not None:
                    out += node
            lo >>= 1
            hi >>= 1
        return out


def greedy_by_size_best_fit(reqs: list[BufferRequest], alignment: int = ALIGNMENT) -> LayoutResult:
    """Largest first; each buffer goes into the smallest gap between already-placed buffers that are live at
    the same time, or on top of them when no gap fits. Only those buffers are looked at (`_TimeIndex`): the
    cost is O(n log n + K log K) for K pairs of buffers live together, not O(n^2)."""
    index = _TimeIndex(max((r.last for r in reqs), default=0) + 1)
    offsets: dict[str, int] = {}
    total = 0
    for r in sorted(reqs, key=lambda r: (-r.size, r.first, r.name)):
        size = align(r.size, alignment)
        busy = index.meeting(r.first, r.last)
        busy.sort()
        best: tuple[int, int] | None = None  # (gap size, offset)
        cursor = 0
        for start, end in busy:
            gap = start - cursor
            if gap >= size and (best is None or gap < best[0]):
                best = (gap, cursor)
            if end > cursor:
                cursor = end
        off = best[1] if best is not None else cursor
        index.add(r.first, r.last, (off, off + size))
        offsets[r.name] = off
        total = max(total, off + size)
    return LayoutResult("greedy_by_size_best_fit", offsets, total)


def greedy_by_first_use(reqs: list[BufferRequest], alignment: int = ALIGNMENT) -> LayoutResult:
    """In order of first use, the lowest offset that fits (first fit). A sweep over time: the placed buffers
    that meet a request are exactly those still live at its first op, kept sorted by offset (expired from a
    heap by last op), so each step looks only at the buffers live then."""
    live: list[tuple[int, int, int]] = []  # (offset, end, k) of placed buffers live now, sorted
    expiry: list[tuple[int, int, int, int]] = []  # heap of (last op, offset, end, k)
    offsets: dict[str, int] = {}
    total = 0
    for k, r in enumerate(sorted(reqs, key=lambda r: (r.first, -r.size, r.name))):
        while expiry and expiry[0][0] < r.first:
            _, o, e, j = heapq.heappop(expiry)
            del live[bisect.bisect_left(live, (o, e, j))]
        size = align(r.size, alignment)
        cursor = 0
        for start, end, _ in live:
            if start - cursor >= size:
                break
            cursor = max(cursor, end)
        bisect.insort(live, (cursor, cursor + size, k))
        heapq.heappush(expiry, (r.last, cursor, cursor + size, k))
        offsets[r.name] = cursor
        total = max(total, cursor + size)
    return LayoutResult("greedy_by_first_use", offsets, total)


ALGORITHMS: dict[str, Callable[[list[BufferRequest], int], LayoutResult]] = {
    "greedy_by_size_best_fit": greedy_by_size_best_fit,
    "greedy_by_first_use": greedy_by_first_use,
    "naive": naive,
}


def plan_activations(reqs: list[BufferRequest], alignment: int = ALIGNMENT) -> LayoutResult:
    """Run every algorithm; keep the smallest arena (ties go to the first listed)."""
    results = [algo(reqs, alignment) for algo in ALGORITHMS.values()]
    return min(results, key=lambda r: r.total)


def find_overlap(reqs: list[BufferRequest], offsets: dict[str, int]) -> tuple[str, str] | None:
    """A pair of buffers live at the same time whose bytes overlap, or None. A sweep over time keeping the live
    byte ranges sorted by offset: they are disjoint until a collision, so a new range can only meet its
    neighbours. O(n log n) (plus list shifts)."""
    order = sorted((r for r in reqs if r.size > 0), key=lambda r: (r.first, offsets[r.name], r.name))
    starts: list[int] = []  # sorted offsets of the live ranges
    live: list[tuple[int, int, str]] = []  # (offset, end, name), in the same order
    expiry: list[tuple[int, int]] = []  # heap of (last op, offset)
    for r in order:
        while expiry and expiry[0][0] < r.first:
            _, o = heapq.heappop(expiry)
            i = bisect.bisect_left(starts, o)
            del starts[i], live[i]
        o = offsets[r.name]
        i = bisect.bisect_left(starts, o)
        for j in (i - 1, i):
            if 0 <= j < len(live) and live[j][0] < o + r.size and o < live[j][1]:
                return live[j][2], r.name
        starts.insert(i, o)
        live.insert(i, (o, o + r.size, r.name))
        heapq.heappush(expiry, (r.last, o))
    return None


# ---- requests from the IR ---------------------------------------------------------------------------------------

def tensor_requests(g: nx.DiGraph, ops: list[Any]) -> list[BufferRequest]:
    """Op-level lifetimes of every graph input, activation and op-local scratch over the schedule `ops`
    (scheduled ops: `.inputs`, `.outputs`, `.scratch`). Graph outputs live to the end, and so do the pasts of
    an ONNX decoder (the executor refills them from the presents between runs)."""
    tensors: dict[str, TensorSpec] = g.graph["tensors"]
    persistent = set(g.graph["state"]) | set(g.graph["constants"])
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for i in g.graph["inputs"]:
        t = i["name"]
        first[t], last[t], kinds[t] = 0, 0, "input"
    for k, o in enumerate(ops):
        for t in o.inputs:
            if t and not is_weight(t) and t not in persistent:
                last[t] = max(last.get(t, k), k)
        for t in o.outputs:
            if t:
                first.setdefault(t, k)
                last[t] = max(last.get(t, k), k)
                kinds.setdefault(t, "activation")
        for s in o.scratch:
            first.setdefault(s, k)
            last[s] = k
            kinds[s] = "scratch"
    end = len(ops) - 1
    for t in list(g.graph["outputs"]) + [p for p, _ in g.graph["kv"]["pairs"]]:
        last[t] = end
    return [BufferRequest(t, tensors[t].nbytes, first[t], last[t], kinds[t]) for t in first]


def persistent_buffers(g: nx.DiGraph) -> list[tuple[str, str, TensorSpec]]:
    """(name, kind, spec) of what lives for the whole run: the KV cache ("state") and inline constants."""
    out = [(n, "state", g.graph["tensors"].get(n, s)) for n, s in g.graph["state"].items()]
    out += [(n, "const", TensorSpec(c.shape, c.dtype)) for n, c in g.graph["constants"].items()]
    return out


def persistent_bytes(g: nx.DiGraph) -> int:
    """The state region as `lay_out` lays it out (each buffer aligned)."""
    return sum(align(s.nbytes) for _, _, s in persistent_buffers(g))


@dataclass(frozen=True)
class Arena:
    size: int
    buffers: dict[str, Buffer]
    slots: list[dict[str, int]]  #: [{offset, nbytes}] per weight slot
    state: dict[str, int]  #: {offset, size} of the persistent region
    activations: dict[str, Any]  #: {offset, size, lower_bound, algorithm}


def lay_out(g: nx.DiGraph, n_slots: int, slot_bytes: int, reqs: list[BufferRequest],
            acts: LayoutResult | None = None) -> Arena:
    """Slots, then the persistent region, then the activations placed by the smallest algorithm (`acts`: its
    result for these very `reqs`, when the caller already has it)."""
    acts = acts if acts is not None else plan_activations(reqs)
    off = 0
    buffers: dict[str, Buffer] = {}
    slots = []
    for s in range(n_slots):
        slots.append({"offset": off, "nbytes": slot_bytes})
        buffers[f"slot.{s}"] = Buffer(f"slot.{s}", "slot", off, slot_bytes, "uint8", [slot_bytes])
        off += align(slot_bytes)
    state_off = off
    for name, kind, spec in persistent_buffers(g):
        buffers[name] = Buffer(name, kind, off, spec.nbytes, spec.dtype, [int(d) for d in spec.shape])
        off += align(spec.nbytes)
    act_off = off
    tensors = g.graph["tensors"]
    for r in reqs:
        spec = tensors[r.name]
        buffers[r.name] = Buffer(r.name, r.kind, act_off + acts.offsets[r.name], r.size, spec.dtype,
                                 [int(d) for d in spec.shape], r.first, r.last)
    return Arena(act_off + acts.total, buffers, slots, {"offset": state_off, "size": act_off - state_off},
                 {"offset": act_off, "size": acts.total, "lower_bound": peak_live_lower_bound(reqs),
                  "algorithm": acts.algorithm})
