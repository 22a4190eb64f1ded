"""The plan verifier: every plan is checked when it is loaded, independently of the compiler that wrote it.

A plan is data from a file; a corrupt or hostile one must be refused with one line before any memory is
allocated or any kernel runs (numba kernels do no bounds checking). `check_plan` proves, from the plan alone:

- every field has its type, every number is finite and in range, every dtype and weight format is known;
- every op is one the registry runs, with known attributes and its required ones, and every reference
  (buffer, weight, group, scratch, graph input/output, role) resolves;
- the arena fits the plan's budget (and, at load, the memory available); every buffer lies inside the arena
  region of its kind, aligned; every weight's size is its format's size for its shape;
- groups tile the schedule and streamed groups fit their slot and carry a checksum;
- lifetimes re-derived from the schedule never let two live buffers share bytes;
- the KV cache covers `max_context`.

The compiler runs the same checks on every plan it writes (`edge_rt_compiler.verify`).
"""

from __future__ import annotations

import bisect
import heapq
import math
from typing import Any

import numpy as np

from . import formats as F
from .checksum import CHECKSUM_CHARS
from .errors import UserError

Plan = Any  #: an `edge_rt_exec.plan.Plan` (plan.py calls this module: importing it back would be a circle)

BUFFER_KINDS = ("slot", "state", "const", "input", "activation", "scratch")
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8",
          "bool")
KV_DTYPES = {"float32": "float32", "float16": "uint16"}
MAX_INT = 1 << 53
HEX_DIGITS = "0123456789abcdef"
#: Region of the arena each buffer kind lives in (`arena[region]` = {offset, size}).
REGION = {"state": "state", "const": "state", "input": "activations", "activation": "activations",
          "scratch": "activations"}


#: The resident groups of a streamed plan (partial residency) are counted in whole 64 KiB windows, a margin over
#: page rounding. The executor reads them once into memory of its own (`Engine._read_resident`): mapped, a fault
#: would bring whole page-cache folios around each group's edges into the process (Linux 6.x), past any window.
FAULT_AROUND = 64 * 1024


def mapped_bytes(spans: list[tuple[int, int]]) -> int:
    """Bytes a set of resident file ranges is counted for: each range widened to whole 64 KiB windows, overlaps
    counted once."""
    total = reach = 0
    for lo, hi in sorted((a - a % FAULT_AROUND, -(-b // FAULT_AROUND) * FAULT_AROUND) for a, b in spans if b > a):
        lo = max(lo, reach)
        if hi > lo:
            total += hi - lo
            reach = hi
    return total


class PlanError(UserError):
    """A plan that fails verification: corrupt, hand-edited or from another edge-rt version."""


def _fail(where: str, what: str) -> PlanError:
    return PlanError(f"{where}: {what}; the plan is corrupt or from another edge-rt version, recompile it")


def _int(where: str, name: str, v: Any, lo: int = 0, hi: int = MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(where, f"{name} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _finite(where: str, name: str, v: Any, depth: int = 0) -> None:
    """Every float finite, every int in range, nesting bounded (attributes are small)."""
    if depth > 8:
        raise _fail(where, f"{name} nests deeper than 8 levels")
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return
    if isinstance(v, int):
        if abs(v) > MAX_INT:
            raise _fail(where, f"{name} = {v} is out of range")
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise _fail(where, f"{name} = {v} is not a finite number")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _finite(where, f"{name}[{i}]", x, depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            _finite(where, f"{name}.{k}", x, depth + 1)
    else:
        raise _fail(where, f"{name} has a value of type {type(v).__name__}")


def check_plan(plan: Plan, where: str) -> None:
    """Raise a `PlanError` (one line) unless `plan` is safe to run."""
    from . import ops

    _scalars(plan, where)
    _weights(plan, where)
    _buffers(plan, where)
    n_ops = len(plan.schedule)
    if n_ops == 0:
        raise _fail(where, "the schedule is empty")
    # a buffer is read only after an op wrote it, unless it is a graph input or persistent (state, constants)
    written = {i["name"] for i in plan.graph.get("inputs", []) if isinstance(i, dict)}
    written |= {n for n, b in plan.buffers.items() if b.kind in ("state", "const", "slot")}
    for i, op in enumerate(plan.schedule):
        w = f"{where}: op {i} ('{op.name}')"
        if op.index != i:
            raise _fail(w, f"index {op.index} is not its position {i}")
        try:
            d = ops.get(op.op)
        except KeyError:
            raise PlanError(f"{w}: op type {op.op!r} is not one this executor runs; upgrade edge-rt on the device "
                            "or recompile the plan") from None
        unknown = sorted(set(op.attrs) - set(d.attrs))
        if unknown:
            raise _fail(w, f"unknown attributes {unknown} for {op.op}")
        missing = [k for k in d.required if op.attrs.get(k) is None]
        if missing:
            raise _fail(w, f"{op.op} needs attributes {missing}")
        _finite(w, "attrs", op.attrs)
        if not all(isinstance(t, str) for t in op.inputs):
            raise _fail(w, f"inputs {op.inputs!r} are not all names")
        for _, name in op.weight_inputs():
            if name not in plan.weights:
                raise _fail(w, f"reads unknown weight '{name}'")
        for t in op.buffer_inputs():
            if t not in plan.buffers:
                raise _fail(w, f"reads unknown buffer '{t}'")
            if t not in written and t not in op.scratch:
                raise _fail(w, f"reads buffer '{t}' before any op writes it")
        for t in op.outputs:
            if not isinstance(t, str) or (t and t not in plan.buffers):
                raise _fail(w, f"writes unknown buffer {t!r}")
            if t and plan.buffers[t].kind in ("slot", "const", "input"):
                raise _fail(w, f"writes '{t}', a {plan.buffers[t].kind} buffer")
        for t in op.scratch:
            if t not in plan.buffers or plan.buffers[t].kind != "scratch":
                raise _fail(w, f"scratch '{t}' is not a scratch buffer")
        written.update(o for o in op.outputs if o)
        if not 0 <= op.group < len(plan.groups):
            raise _fail(w, f"names group {op.group} of {len(plan.groups)}")
        if op.op == "CausalAttention":
            _kv_cache(plan, w, op.inputs[3:5])
    _groups(plan, where)
    _graph(plan, where)
    _lifetimes(plan, where)


def check_fits_memory(plan: Plan, where: str) -> None:
    """Refuse (one line) a plan whose arena and resident weights exceed the memory available right now."""
    import psutil

    need = plan.arena["size"] + plan.arena.get("resident_weights", 0)
    available = psutil.virtual_memory().available
    if need > available:
        raise UserError(f"{where}: the plan needs {need / 2**20:.0f} MiB (arena and resident weights) but only "
                        f"{available / 2**20:.0f} MiB are available; close other programs or compile for a smaller "
                        "budget=")


def _scalars(plan: Plan, where: str) -> None:
    _int(where, "budget", plan.budget, 1)
    _int(where, "max_context", plan.max_context, 1, 1 << 24)
    _int(where, "max_batch_tokens", plan.max_batch_tokens, 1, 1 << 24)
    a = _int(where, "alignment", plan.alignment, 1, 1 << 16)
    if a & (a - 1):
        raise _fail(where, f"alignment {a} is not a power of two")
    if plan.weights_mode not in ("resident", "streamed"):
        raise _fail(where, f"weights_mode {plan.weights_mode!r} is neither resident nor streamed")
    if plan.kv_dtype not in KV_DTYPES:
        raise _fail(where, f"kv_dtype {plan.kv_dtype!r} is not one of {list(KV_DTYPES)}")
    _finite(where, "target", plan.target)
    _finite(where, "predicted", plan.predicted)
    threads = plan.target.get("threads")
    if threads is not None:
        _int(where, "target.threads", threads, 1, 4096)


def _weights(plan: Plan, where: str) -> None:
    for name, w in plan.weights.items():
        ww = f"{where}: weight '{name}'"
        if w.format not in F.FORMATS:
            raise _fail(ww, f"format {w.format!r} is not one of {list(F.FORMATS)}")
        if not isinstance(w.shape, list) or not w.shape or len(w.shape) > 8:
            raise _fail(ww, f"shape {w.shape!r} is not a list of 1 to 8 dims")
        for d in w.shape:
            _int(ww, "dim", d, 1)
        _int(ww, "offset", w.offset)
        f = F.get(w.format)
        if not f.supports(w.shape) or f.nbytes(w.shape) != w.nbytes:
            raise _fail(ww, f"{w.nbytes} bytes do not hold a {w.format} tensor of shape {w.shape}")
        if not isinstance(w.gather, bool):
            raise _fail(ww, "gather is not a boolean")


def _buffers(plan: Plan, where: str) -> None:
    arena = plan.arena
    size = _int(where, "arena.size", arena.get("size"))
    reserve = _int(where, "arena.reserve", arena.get("reserve", 0))
    resident = _int(where, "arena.resident_weights", arena.get("resident_weights", 0))
    peak = size + reserve + resident
    if peak > plan.budget:
        raise _fail(where, f"arena {size} + reserve {reserve} + resident weights {resident} bytes exceed the "
                           f"budget {plan.budget}")
    slots = arena.get("slots", [])
    if not isinstance(slots, list):
        raise _fail(where, "arena.slots is not a list")
    regions: dict[str, tuple[int, int]] = {}
    for key in ("state", "activations"):
        r = arena.get(key)
        if not isinstance(r, dict):
            raise _fail(where, f"arena.{key} is missing")
        off, n = _int(where, f"arena.{key}.offset", r.get("offset")), _int(where, f"arena.{key}.size", r.get("size"))
        if off + n > size:
            raise _fail(where, f"arena.{key} ends past the arena")
        regions[key] = (off, off + n)
    for i, s in enumerate(slots):
        if not isinstance(s, dict):
            raise _fail(where, f"slot {i} is not an object")
        off, n = _int(where, f"slot {i} offset", s.get("offset")), _int(where, f"slot {i} size", s.get("nbytes"))
        if off + n > size:
            raise _fail(where, f"slot {i} ends past the arena")
    for name, b in plan.buffers.items():
        bw = f"{where}: buffer '{name}'"
        if b.name != name:
            raise _fail(bw, f"is named '{b.name}' inside")
        if b.kind not in BUFFER_KINDS:
            raise _fail(bw, f"kind {b.kind!r} is not one of {list(BUFFER_KINDS)}")
        if b.dtype not in DTYPES:
            raise _fail(bw, f"dtype {b.dtype!r} is not one of {list(DTYPES)}")
        off, n = _int(bw, "offset", b.offset), _int(bw, "nbytes", b.nbytes)
        if off % plan.alignment:
            raise _fail(bw, f"offset {off} is not {plan.alignment}-byte aligned")
        if off + n > size:
            raise _fail(bw, f"[{off}, {off + n}) lies outside the {size}-byte arena")
        if not isinstance(b.shape, list):
            raise _fail(bw, "shape is not a list")
        for d in b.shape:
            _int(bw, "dim", d)
        if b.kind == "slot":
            if not any(s.get("offset") == off and s.get("nbytes") == n for s in slots):
                raise _fail(bw, "is not one of the arena's slots")
            continue
        count = 1
        for d in b.shape:
            count *= d
        if count * np.dtype(b.dtype).itemsize > n:
            raise _fail(bw, f"shape {b.shape} of {b.dtype} does not fit its {n} bytes")
        lo, hi = regions[REGION[b.kind]]
        if n and not (lo <= off and off + n <= hi):
            raise _fail(bw, f"[{off}, {off + n}) lies outside the arena's {REGION[b.kind]} region [{lo}, {hi})")


def _kv_cache(plan: Plan, where: str, caches: list[str]) -> None:
    for t in caches:
        b = plan.buffers.get(t)
        if b is None or b.kind != "state":
            raise _fail(where, f"KV cache '{t}' is not a state buffer")
        if len(b.shape) != 3 or b.shape[1] < plan.max_context:
            raise _fail(where, f"KV cache '{t}' {b.shape} does not hold max_context {plan.max_context} positions")
        if b.dtype != KV_DTYPES[plan.kv_dtype]:
            raise _fail(where, f"KV cache '{t}' is {b.dtype} but the plan's kv_dtype is {plan.kv_dtype}")


def _groups(plan: Plan, where: str) -> None:
    n_slots = len(plan.arena.get("slots", []))
    if plan.weights_mode == "resident" and n_slots:
        raise _fail(where, "a resident plan has weight slots")
    pos = 0
    for i, g in enumerate(plan.groups):
        gw = f"{where}: group {i}"
        if g.index != i or g.op_start != pos or not g.op_start <= g.op_end <= len(plan.schedule):
            raise _fail(gw, f"ops [{g.op_start}, {g.op_end}) do not continue the schedule at op {pos}")
        pos = g.op_end
        for op in plan.schedule[g.op_start:g.op_end]:
            if op.group != i:
                raise _fail(gw, f"holds op '{op.name}', which names group {op.group}")
        if g.slot is not None:
            _int(gw, "slot", g.slot, 0, max(0, n_slots - 1))
            if plan.weights_mode != "streamed" or not n_slots:
                raise _fail(gw, "is streamed in a plan without weight slots")
            _int(gw, "byte_start", g.byte_start)
            if g.byte_end - g.byte_start > min(s["nbytes"] for s in plan.arena["slots"]) or g.byte_end < g.byte_start:
                raise _fail(gw, f"bytes [{g.byte_start}, {g.byte_end}) do not fit a weight slot")
            if not isinstance(g.checksum, str) or len(g.checksum) != CHECKSUM_CHARS \
                    or g.checksum.strip(HEX_DIGITS):
                raise _fail(gw, f"checksum = {g.checksum!r} is not {CHECKSUM_CHARS} lowercase hex digits (every "
                                "streamed group carries one)")
        elif g.checksum is not None:
            raise _fail(gw, "has a checksum but is not read into a slot")
    if pos != len(plan.schedule):
        raise _fail(where, f"groups cover {pos} of {len(plan.schedule)} ops")
    if plan.weights_mode == "streamed":
        _resident_groups(plan, where)


def _resident_groups(plan: Plan, where: str) -> None:
    """A streamed plan holds the weights of its groups without a slot resident (partial residency: read once at
    load): such a group's ops load weights only inside its byte range, and those ranges, as counted
    (`mapped_bytes`), are within `resident_weights` (hence within the budget)."""
    from . import ops

    spans = []
    for g in plan.groups:
        if g.slot is not None:
            continue
        gw = f"{where}: group {g.index}"
        _int(gw, "byte_start", g.byte_start)
        _int(gw, "byte_end", g.byte_end, g.byte_start, int(plan.files.get("weights_size") or MAX_INT))
        for op in plan.schedule[g.op_start:g.op_end]:
            d = ops.get(op.op)
            for i, name in op.weight_inputs():
                w = plan.weights[name]
                if w.gather or i in d.row_gather:
                    continue  # a table: its rows are read on demand
                lo, hi = w.offset, w.offset + w.nbytes
                rows = op.attrs.get("rows")
                if rows is not None and i in d.row_tiled and isinstance(rows, list) and len(rows) == 2:
                    row = w.nbytes // max(1, w.shape[0])
                    lo, hi = w.offset + rows[0] * row, w.offset + rows[1] * row
                if lo < g.byte_start or hi > g.byte_end:
                    raise _fail(gw, f"op '{op.name}' maps weight '{name}' [{lo}, {hi}) outside the group's "
                                    f"resident bytes [{g.byte_start}, {g.byte_end})")
        spans.append((g.byte_start, g.byte_end))
    need = mapped_bytes(spans)
    have = plan.arena.get("resident_weights", 0)
    if need > have:
        raise _fail(where, f"resident groups map {need} bytes but arena.resident_weights counts {have}")


def _graph(plan: Plan, where: str) -> None:
    g = plan.graph
    inputs, outputs = g.get("inputs"), g.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise _fail(where, "graph.inputs / graph.outputs are missing")
    bounds = g.get("bounds", {})
    if not isinstance(bounds, dict):
        raise _fail(where, "graph.bounds is not an object")
    for k, v in bounds.items():
        _int(where, f"bound of '{k}'", v, 1)
    for i in inputs:
        if not isinstance(i, dict) or i.get("name") not in plan.buffers or not isinstance(i.get("dims"), list):
            raise _fail(where, f"graph input {i!r} has no buffer or dims")
        if plan.buffers[i["name"]].dtype != i.get("dtype"):
            raise _fail(where, f"graph input '{i['name']}' is {i.get('dtype')} but its buffer is "
                               f"{plan.buffers[i['name']].dtype}")
        for d in i["dims"]:
            if not (isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_INT)):
                raise _fail(where, f"graph input '{i['name']}' has dim {d!r}")
    for o in outputs:
        if not isinstance(o, dict) or o.get("name") not in plan.buffers:
            raise _fail(where, f"graph output {o!r} has no buffer")
    for role, name in g.get("io", {}).items():
        if name not in plan.buffers:
            raise _fail(where, f"role '{role}' names unknown buffer {name!r}")
    kv = g.get("kv", {"mode": "none", "pairs": []})
    if kv.get("mode") not in ("cache", "past_present", "none"):
        raise _fail(where, f"graph.kv.mode {kv.get('mode')!r} is not cache, past_present or none")
    for pair in kv.get("pairs", []):
        if not isinstance(pair, list) or len(pair) != 2 or any(p not in plan.buffers for p in pair):
            raise _fail(where, f"kv pair {pair!r} names unknown buffers")
    for name, c in g.get("constants", {}).items():
        b = plan.buffers.get(name)
        if b is None or not isinstance(c, dict) or c.get("dtype") not in DTYPES or not isinstance(c.get("data"), list):
            raise _fail(where, f"constant '{name}' has no buffer, dtype or data")
        if len(c["data"]) * np.dtype(c["dtype"]).itemsize > b.nbytes:
            raise _fail(where, f"constant '{name}' does not fit its buffer")


def _lifetimes(plan: Plan, where: str) -> None:
    """Re-derive every buffer's live range from the schedule; no two buffers live at the same op share bytes."""
    n = len(plan.schedule)
    life: dict[str, list[int]] = {}
    for op in plan.schedule:
        for t in op.buffer_inputs() + [o for o in op.outputs if o] + list(op.scratch):
            r = life.setdefault(t, [op.index, op.index])
            r[1] = op.index
    persistent = {name for name, b in plan.buffers.items() if b.kind in ("slot", "state", "const")}
    for i in plan.graph.get("inputs", []):
        life.setdefault(i["name"], [0, 0])[0] = 0
    ends = [o["name"] for o in plan.graph.get("outputs", [])]
    ends += [p for pair in plan.graph.get("kv", {}).get("pairs", []) for p in pair]  # pasts are refilled between runs
    for t in ends:
        life.setdefault(t, [0, n])[1] = n
    starts: dict[int, list[tuple[int, int, int, str]]] = {}
    for name, b in plan.buffers.items():
        if b.nbytes == 0:
            continue
        first, last = (0, n) if name in persistent else tuple(life.get(name, (n + 1, -1)))
        if last >= first:  # (never used otherwise)
            starts.setdefault(first, []).append((b.offset, b.offset + b.nbytes, last, name))
    # Sweep over time keeping the live buffers' byte ranges sorted by offset: they are disjoint so far, so a new
    # range can only collide with its predecessor or successor. O(n log n) in the number of buffers.
    offs: list[int] = []  # sorted starts of live ranges
    live: dict[int, tuple[int, int, str]] = {}  # start -> (end, last op, name)
    expiry: list[tuple[int, int]] = []  # heap of (last op, start)
    for t in sorted(starts):
        while expiry and expiry[0][0] < t:
            _, s0 = heapq.heappop(expiry)
            del offs[bisect.bisect_left(offs, s0)]
            del live[s0]
        for s0, e0, last, name in starts[t]:
            k = bisect.bisect_left(offs, s0)
            for j in (k - 1, k):
                if 0 <= j < len(offs):
                    o = offs[j]
                    e1, _, other = live[o]
                    if o < e0 and s0 < e1:
                        raise _fail(where, f"buffers '{other}' [{o}, {e1}) and '{name}' [{s0}, {e0}) are live "
                                           f"together at op {t} and share bytes")
            offs.insert(k, s0)
            live[s0] = (e0, last, name)
            heapq.heappush(expiry, (last, s0))
