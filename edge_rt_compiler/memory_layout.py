"""Static placement of activations in the arena.

Each buffer has a size and an op-level lifetime `[first, last]` (inclusive). Algorithms share one signature
and return a `LayoutResult`; `plan_activations` runs the suite and keeps the smallest (as ExecuTorch's
`MemoryPlanningAlgorithmSuite` does). The peak-live lower bound is the largest sum of sizes of buffers live
at one op: no placement can beat it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge_rt_exec.plan import ALIGNMENT


@dataclass(frozen=True)
class BufferRequest:
    name: str
    size: int
    first: int
    last: int


@dataclass(frozen=True)
class LayoutResult:
    algorithm: str
    offsets: dict[str, int]
    total: int


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def overlaps_in_time(a: BufferRequest, b: BufferRequest) -> bool:
    return a.first <= b.last and b.first <= a.last


def peak_live_lower_bound(reqs: list[BufferRequest], alignment: int = ALIGNMENT) -> int:
    if not reqs:
        return 0
    events: dict[int, int] = {}
    for r in reqs:
        events[r.first] = events.get(r.first, 0) + _align(r.size, alignment)
        events[r.last + 1] = events.get(r.last + 1, 0) - _align(r.size, alignment)
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
        off += _align(r.size, alignment)
    return LayoutResult("naive", offsets, off)


def greedy_by_size_best_fit(reqs: list[BufferRequest], alignment: int = ALIGNMENT) -> LayoutResult:
    """Largest first; each buffer goes into the smallest gap between already-placed buffers that are live at
    the same time, or on top of them when no gap fits."""
    placed: list[tuple[int, int, BufferRequest]] = []  # (offset, aligned size, request)
    offsets: dict[str, int] = {}
    total = 0
    for r in sorted(reqs, key=lambda r: (-r.size, r.first, r.name)):
        size = _align(r.size, alignment)
        busy = sorted((o, o + s) for o, s, q in placed if overlaps_in_time(q, r))
        best: tuple[int, int] | None = None  # (gap size, offset)
        cursor = 0
        for start, end in busy:
            gap = start - cursor
            if gap >= size and (best is None or gap < best[0]):
                best = (gap, cursor)
            cursor = max(cursor, end)
        off = best[1] if best is not None else cursor
        placed.append((off, size, r))
        offsets[r.name] = off
        total = max(total, off + size)
    return LayoutResult("greedy_by_size_best_fit", offsets, total)


def greedy_by_first_use(reqs: list[BufferRequest], alignment: int = ALIGNMENT) -> LayoutResult:
    """In order of first use, the lowest offset that fits (first fit)."""
    placed: list[tuple[int, int, BufferRequest]] = []
    offsets: dict[str, int] = {}
    total = 0
    for r in sorted(reqs, key=lambda r: (r.first, -r.size, r.name)):
        size = _align(r.size, alignment)
        busy = sorted((o, o + s) for o, s, q in placed if overlaps_in_time(q, r))
        cursor = 0
        for start, end in busy:
            if start - cursor >= size:
                break
            cursor = max(cursor, end)
        placed.append((cursor, size, r))
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
    """The first pair of buffers live at the same time whose bytes overlap, or None."""
    items = sorted(reqs, key=lambda r: offsets[r.name])
    for i, a in enumerate(items):
        a_end = offsets[a.name] + a.size
        for b in items[i + 1:]:
            if offsets[b.name] >= a_end:
                break
            if overlaps_in_time(a, b) and a.size > 0 and b.size > 0:
                return a.name, b.name
    return None
