"""`edge-rt-exec calibrate`'s measurement of the decode loop itself: groups of one block of the plan's Linear
weights, resident and streamed (read + checksum into a page-aligned slot, then computed from it), as the engine
runs them. The loop is slower than its parts measured alone (a read after resident compute finds the caches
swept; a just-read group is not all in the cache; a block's mix of shapes reads DRAM slower than one shape
cycled), and the cost model predicts plans from these figures (edge_rt_compiler/cost.py)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import formats as F
from .binfile import page_aligned_empty
from .plan import PLAN_SUFFIX, load_plan

FORMATS = ("f32", "f16", "q8_0", "q4_0", "q4_1")  #: the weight formats calibrate measures


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest of `repeat` runs of `fn` (timeit's rule: slower runs are other processes' doing, and a profile
    describes the device, not its load at one moment)."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


#: A SmolLM2-135M block's Linear weights in schedule order (q, k, v, o, gate, up, down): the block measured when
#: the folder holds no plan.
DEFAULT_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def plan_layer(folder: Path) -> list[tuple[int, int]]:
    """The Linear weight shapes of one block of the first plan in `folder`, in schedule order (the unit in the
    middle of those that have Linear weights), or `DEFAULT_LAYER`."""
    plans = sorted(folder.glob(f"*{PLAN_SUFFIX}"))
    if not plans:
        return DEFAULT_LAYER
    plan = load_plan(plans[0])
    by_unit: dict[int, list[tuple[int, int]]] = {}
    for op in plan.schedule:
        w = plan.weights.get(op.inputs[1].lstrip("@")) if op.op == "Linear" and len(op.inputs) > 1 else None
        if w is not None and len(w.shape) == 2 and w.shape[1] % F.QK == 0 and "rows" not in op.attrs:
            by_unit.setdefault(op.unit, []).append((int(w.shape[0]), int(w.shape[1])))
    units = sorted(by_unit)
    return by_unit[units[len(units) // 2]] if units else DEFAULT_LAYER


def _group(fmt: str, layer: list[tuple[int, int]], nbytes: int,
           rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, tuple[int, int]]]]:
    """One streamed group's bytes: blocks of `layer` in `fmt` (random weights), as many as fit `nbytes` (at
    least one), each weight at a 64-byte boundary as in the weights file; and (offset, shape) per weight."""
    f = F.get(fmt)
    block = [np.ascontiguousarray(f.quantize(rng.standard_normal(s, dtype=np.float32) * 0.05)).view(np.uint8)
             .reshape(-1) for s in layer]
    block_bytes = sum(-(-b.nbytes // 64) * 64 for b in block)
    layout, off = [], 0
    for _ in range(max(1, nbytes // block_bytes)):
        for s, b in zip(layer, block):
            layout.append((off, s))
            off += -(-b.nbytes // 64) * 64
    out = np.zeros(off, np.uint8)
    for (o, _s), b in zip(layout, block * (len(layout) // len(block))):
        out[o:o + b.nbytes] = b
    return out, layout


def measure_groups(folder: Path, layer: list[tuple[int, int]], slot_bytes: int, cache: int, cycle_bytes: int,
                   repeat: int, rng: np.random.Generator, fmts: tuple[str, ...] = FORMATS) -> dict[str, Any]:
    """The engine's decode loop on groups of real Linear kernels over `layer` blocks (the plan's own block):

    - resident: groups held in process memory, cycled over more bytes than the caches hold (decode GB/s by
      format: weight bytes from DRAM, with the layer's mix of shapes);
    - streamed: each group pread from the page cache into a page-aligned slot, checksummed (as the streamer
      does), then computed from the slot (decode from the slot GB/s by format; read + checksum GB/s) — right
      after the previous streamed group (a one-slot plan streaming everything), and right after resident groups'
      compute swept the caches (partial residency: `stream_read_swept_gbs`).
    Each cycles over at least `cycle_bytes` of groups (more than the caches hold)."""
    from .checksum import fletcher

    check = fletcher.load()
    out: dict[str, Any] = {"decode_gbs": {}, "decode_streamed_gbs": {}}
    for fmt in fmts:
        res, read, comp, swept = _measure_format(folder, fmt, layer, slot_bytes, cache, cycle_bytes, repeat, rng,
                                                 check)
        out["decode_gbs"][fmt], out["decode_streamed_gbs"][fmt] = res, comp
        if fmt == fmts[0]:  # the read does not depend on the format
            out["stream_read_gbs"], out["stream_read_swept_gbs"] = read, swept
    return out


def _measure_format(folder: Path, fmt: str, layer: list[tuple[int, int]], slot_bytes: int, cache: int,
                    cycle_bytes: int, repeat: int, rng: np.random.Generator,
                    check: Any) -> tuple[float, float, float, float]:
    """`measure_groups` for one format: GB/s of (resident decode, read + checksum, decode from the slot, read +
    checksum after a sweep)."""
    from .ops.linear import VEC

    f, vec = F.get(fmt), VEC[fmt].load()
    empty = np.zeros(0, np.float32)
    empty.setflags(write=False)
    group, layout = _group(fmt, layer, slot_bytes, rng)
    n = max(4, -(-cycle_bytes // group.nbytes))
    xs = {k: rng.standard_normal(k, dtype=np.float32) for _m, k in layer}
    ys = {m: np.zeros(m, np.float32) for m, _k in layer}
    for x in xs.values():
        x.setflags(write=False)

    def calls(buf: np.ndarray) -> list[tuple]:
        ro = buf.view()
        ro.setflags(write=False)
        return [(xs[s[1]], f.view(ro[o:o + f.nbytes(s)], s), empty, ys[s[0]], 0) for o, s in layout]

    def compute(cs: list[tuple]) -> None:
        for c in cs:
            vec(*c)

    resident = []
    for _ in range(n):
        copy = page_aligned_empty(group.nbytes)
        copy[:] = group
        resident.append(calls(copy))
    compute(resident[0])
    t_res = best_time(lambda: [compute(cs) for cs in resident], repeat)
    read_s, comp_s, swept_s = _stream(folder, group, n, repeat, compute, calls, check, resident,
                                      max(1, -(-2 * cache // group.nbytes)))
    gb = group.nbytes / 1e9
    return n * gb / t_res, gb / read_s, gb / comp_s, gb / swept_s


def _stream(folder: Path, group: np.ndarray, n: int, repeat: int, compute: Callable[[list[tuple]], Any],
            calls: Callable[[np.ndarray], list[tuple]], check: Any, resident: list[list[tuple]],
            sweep_groups: int) -> tuple[float, float, float]:
    """(read + checksum s, compute s, read + checksum s after a sweep) per group: the fastest pass of `repeat`
    over `n` copies of `group` in a temporary file in `folder`."""
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=".edge-rt-calibrate-", suffix=".tmp", delete=False)
    path = Path(tmp.name)
    try:
        with tmp:
            for _ in range(n):
                tmp.write(group.tobytes())
        fd = os.open(path, os.O_RDONLY)
        try:
            slot = page_aligned_empty(group.nbytes)
            slot.fill(0)
            ro = slot.view()
            ro.setflags(write=False)
            mv = memoryview(slot)
            slot_calls = calls(slot)
            sums = np.zeros(2, np.uint64)
            best = (math.inf, math.inf, math.inf)
            for _ in range(repeat):
                read = comp = swept = 0.0
                for i in range(n):  # back to back: read, check, compute, next group
                    t0 = time.perf_counter()
                    os.preadv(fd, [mv], i * group.nbytes)
                    check(ro, sums)
                    t1 = time.perf_counter()
                    compute(slot_calls)
                    comp += time.perf_counter() - t1
                    read += t1 - t0
                for i in range(n):  # after resident groups' compute
                    for j in range(sweep_groups):
                        compute(resident[(i + j) % len(resident)])
                    t0 = time.perf_counter()
                    os.preadv(fd, [mv], i * group.nbytes)
                    check(ro, sums)
                    swept += time.perf_counter() - t0
                    compute(slot_calls)
                best = tuple(min(a, b / n) for a, b in zip(best, (read, comp, swept)))  # type: ignore[assignment]
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return best
