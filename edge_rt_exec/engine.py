"""The engine: binds a plan's schedule (plan schema 3) to the op registry's kernels and replays it on one arena.

Every buffer lives at its plan offset in one `uint8` arena allocated once. A run takes named graph inputs;
their shapes decide every op's shapes (the registry's shape rules). For one set of input shapes the engine
binds each op once (`OpDef.bind` resolves views, strides and kernels into a zero-argument call) and keeps
the list of calls: a decode step is a loop over prepared calls with no per-op Python work left (STYLE #19).
A new set of shapes (a longer prompt, an ONNX decoder's growing past) re-binds only the ops whose input
shapes changed (each op keeps its calls by input shapes). When a shape-deciding value depends on the data of
a graph input, the program is not kept and every run binds as it goes.

Weights are views in their own format: mapped from the file (resident) or over an arena slot the streamer
fills (streamed); tables read only by gathers stay in the file and their rows are read on demand.
`validate=True` runs every op's numpy twin on a copy of its inputs and records the worst difference per op
type; `profile=True` times every op. Both wrap the bound calls; the calls themselves do not branch. A
`trace.Tracer` attached to the engine (`run --trace`) gets a span per group per pass (and per op when profiling).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import formats as F
from . import ops
from .binfile import page_aligned_empty
from .checksum import fletcher
from .errors import InternalError, UserError
from .ops.registry import PAR_MIN, OpDef, ShapeError, Site, WarmSpec, numel, with_defaults
from .plan import WEIGHT_REF, Op, Plan, load_plan
from .plan_check import check_fits_memory
from .weights import GroupStreamer, open_weights

Shape = tuple[int, ...]
#: Programs kept per engine (one per distinct set of input shapes: decode, a few prompt lengths).
PROGRAMS_KEPT = 16


@dataclass
class Timings:
    compute_s: float = 0.0
    steps: int = 0
    per_op: dict[str, float] = field(default_factory=dict)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(n: int | None) -> int:
    import numba

    avail = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    n = avail if not n else max(1, min(int(n), avail))
    numba.set_num_threads(n)
    return n


def default_threads(plan: Plan) -> int:
    """The plan's preset, capped by the cores available to this process (a preset of 4 on a 2-core machine
    would oversubscribe it). Two slots leave one core to the reader thread."""
    cores = available_cores()
    want = min(int(plan.target.get("threads") or cores), cores)
    if len(plan.arena.get("slots", [])) >= 2 and cores > 1 and want >= cores:
        # speculative_prefetch: compute and reads fighting over every core stall the kernels' parallel regions
        # on the descheduled thread (benchmarks/bench_streaming.py)
        want = cores - 1
    return max(1, want)


def _taint(plan: Plan) -> set[str]:
    """Buffers whose contents depend on the data of a graph input (not only on shapes): a shape that depends
    on one of these can change between runs of equal input shapes."""
    tainted = {i["name"] for i in plan.graph["inputs"]}
    for op in plan.schedule:
        if op.op in ("Shape", "Size"):
            continue
        if any(t in tainted for t in op.buffer_inputs()):
            tainted.update(o for o in op.outputs if o)
    return tainted


@dataclass
class _Bound:
    """One op of the schedule, resolved at load."""

    op: Op
    d: OpDef
    attrs: dict[str, Any]
    value_idx: tuple[int, ...]
    tainted_values: bool  #: a value input depends on input data
    memo: dict[Any, tuple[list, Callable]] = field(default_factory=dict)  #: (in shapes, values, slot) -> call

    def __post_init__(self) -> None:
        self.buffers = frozenset(self.op.buffer_inputs())  #: the buffers it reads
        self.outs = tuple(o for o in self.op.outputs if o)
        #: the buffers whose values decide its shapes or arguments
        self.value_names = frozenset(self.op.inputs[i] for i in self.value_idx if i < len(self.op.inputs)
                                     and self.op.inputs[i] and not self.op.inputs[i].startswith(WEIGHT_REF))
        self.shape_only = self.op.op in ("Shape", "Size")  #: its outputs depend on its inputs' shapes only


@dataclass
class _Program:
    """The calls of one set of input shapes, per (group, slot), and the shapes every tensor had."""

    shapes: dict[str, Shape]
    calls: dict[tuple[int, int], list[Callable[[], Any]]] = field(default_factory=dict)


class _Delta:
    """What changed since the program `base` ran, as a run goes (programs of cacheable plans only: no shape
    depends on input data). An op keeps its call from `base` unless one of its inputs changed shape or one of
    its value inputs (a Reshape target, Slice starts) may hold other values.

    Only values that shapes are computed from matter, and those are never derived from input data (else the
    plan would not be cacheable): so "may hold other values" is tracked for such tensors only (`clean`: not
    derived from input data). Shape and Size outputs change only with their input's shape; any other clean
    output may change when the op is bound again or one of its clean inputs may have changed."""

    def __init__(self, base: _Program, shapes: dict[str, Shape], tainted: set[str]) -> None:
        self.base = base
        self.tainted = tainted
        self.shapes: set[str] = {t for t, sh in shapes.items() if base.shapes.get(t) != sh}
        self.values: set[str] = {t for t in self.shapes if t not in tainted}

    def keep(self, b: _Bound, shapes: dict[str, Shape]) -> bool:
        """Whether `b` keeps its call from `base` (then its outputs keep their shapes, recorded in `shapes`)."""
        if not self.shapes.isdisjoint(b.buffers) or not self.values.isdisjoint(b.value_names):
            return False
        base = self.base.shapes
        for o in b.outs:
            shapes[o] = base[o]
        if b.shape_only is False and not self.values.isdisjoint(b.buffers):
            self.values.update(o for o in b.outs if o not in self.tainted)
        return True

    def rebound(self, b: _Bound, shapes: dict[str, Shape]) -> None:
        base = self.base.shapes
        for o in b.outs:
            if base.get(o) != shapes.get(o):
                self.shapes.add(o)
        self.values.update(o for o in b.outs if o not in self.tainted)


class Engine:
    """Load a plan, map its weights and run its graph."""

    def __init__(self, plan: Plan | str | os.PathLike, threads: int | None = None, validate: bool = False,
                 profile: bool = False) -> None:
        self.plan = p = plan if isinstance(plan, Plan) else load_plan(plan)
        self.threads = set_threads(threads if threads is not None else default_threads(p))
        self.validate = validate
        self.profile = profile
        self.tracer: Any = None  #: a `trace.Tracer` (`--trace`), attached before the first run
        self.worst: dict[str, float] = {}
        self.timings = Timings()
        self.where = str(p.path or p.model.get("name"))
        self.ops = [self._resolve(op) for op in p.schedule]
        check_fits_memory(p, self.where)
        self.st = open_weights(p)
        self.arena = page_aligned_empty(p.arena["size"])  # slots: weight reads land here
        self.flat: dict[str, np.ndarray] = {}
        for b in p.buffers.values():
            raw = self.arena[b.offset:b.offset + b.nbytes]
            self.flat[b.name] = raw if b.kind == "slot" else raw.view(np.dtype(b.dtype))
        self.slots = [self.flat[f"slot.{i}"] for i in range(len(p.arena["slots"]))]
        self.const_shapes: dict[str, Shape] = {}
        for name, c in p.graph.get("constants", {}).items():
            a = np.asarray(c["data"], dtype=np.dtype(c["dtype"])).reshape(c["shape"])
            dst = self.flat.get(name)
            if dst is None or a.size > dst.size:
                raise UserError(f"{self.where}: constant '{name}' does not fit its buffer; the plan is corrupt")
            dst[:a.size] = a.reshape(-1)
            self.const_shapes[name] = tuple(a.shape)
        for name, b in p.buffers.items():
            if b.kind == "state":
                self.const_shapes[name] = tuple(b.shape)
        self.streamer: GroupStreamer | None = None
        if p.weights_mode == "streamed":
            self.streamer = GroupStreamer(self.st, p.groups, self.slots, prefetch=len(self.slots) >= 2)
        self._weights = self._weight_views()
        self._tainted = _taint(p)
        for b in self.ops:
            b.tainted_values = any(b.op.inputs[i] in self._tainted for i in b.value_idx if i < len(b.op.inputs))
        self._programs: OrderedDict[Any, _Program] = OrderedDict()
        self._last: _Program | None = None
        self.shapes: dict[str, Shape] = dict(self.const_shapes)  #: every tensor's shape in the last run

    # ---- load ----------------------------------------------------------------------------------------------------
    def _resolve(self, op: Op) -> _Bound:
        try:
            d = ops.get(op.op)
        except KeyError:
            raise UserError(f"{self.where}: op '{op.name}' has type {op.op!r}, which this executor does not run; "
                            "upgrade edge-rt on the device") from None
        unknown = sorted(set(op.attrs) - set(d.attrs))
        if unknown:
            raise UserError(f"{self.where}: op '{op.name}' ({op.op}) has unknown attributes {unknown}; the plan is "
                            "corrupt or from another edge-rt version")
        missing = sorted(k for k in d.required if op.attrs.get(k) is None)
        if missing:
            raise UserError(f"{self.where}: op '{op.name}' ({op.op}) lacks attributes {missing}; the plan is corrupt")
        return _Bound(op, d, with_defaults(d, op.attrs), d.value_inputs, False)

    def _weight_view(self, name: str, base: np.ndarray | None, base_off: int, rows: list[int] | None) -> np.ndarray:
        """A weight as its format's view (read-only), whole or rows r0..r1; over the file map (`base` None) or a
        slot holding bytes from `base_off` of the file."""
        w = self.plan.weights[name]
        f = F.get(w.format)
        shape = list(w.shape)
        off, nbytes = w.offset, w.nbytes
        if rows is not None:
            row = nbytes // shape[0]
            off, nbytes, shape[0] = off + rows[0] * row, (rows[1] - rows[0]) * row, rows[1] - rows[0]
        if base is None:
            raw = self.st.file.view(off, nbytes, "u1", (nbytes,), f"weight '{name}'")
        else:
            start = off - base_off
            if start < 0 or start + nbytes > base.nbytes:
                raise InternalError(f"weight {name} [{off}, {off + nbytes}) is outside its group's slot")
            raw = base[start:start + nbytes]
        v = f.view(raw, shape)
        v.flags.writeable = False
        return v

    def _weight_views(self) -> dict[tuple[int, int], dict[int, dict[int, np.ndarray]]]:
        """(group, slot) -> op index -> input position -> view. Slot memory is fixed, so views are made once;
        tables of a streamed plan that only gathers read are left out (their rows are read on demand)."""
        p = self.plan
        views: dict[tuple[int, int], dict[int, dict[int, np.ndarray]]] = {}
        for g in p.groups:
            targets = [(-1, None)] if g.slot is None else list(enumerate(self.slots))
            if g.slot is None and p.weights_mode == "streamed" and g.byte_end > g.byte_start:
                targets = [(-1, self._read_resident(g))]
            for s, base in targets:
                per_op: dict[int, dict[int, np.ndarray]] = {}
                for b in self.ops[g.op_start:g.op_end]:
                    tiled = set(b.d.row_tiled) if b.attrs.get("rows") else set()
                    per_op[b.op.index] = {
                        i: self._weight_view(w, None if p.weights[w].gather else base, g.byte_start,
                                             b.attrs["rows"] if i in tiled else None)
                        for i, w in b.op.weight_inputs()
                        if not (p.weights_mode == "streamed" and (p.weights[w].gather or i in b.d.row_gather))
                    }
                views[(g.index, s)] = per_op
        return views

    def _read_resident(self, g: Any) -> np.ndarray:
        """A resident group of a streamed plan (partial residency): its bytes read once, here, into memory of its
        own, never re-read. Not mapped: a fault on a mapping brings whole page-cache folios (up to 2 MB on Linux
        6.x) around each group's edges into the process, past what the plan counts."""
        buf = page_aligned_empty(g.byte_end - g.byte_start, phase=g.byte_start)
        self.st.file.read_into(g.byte_start, buf, f"group {g.index}")
        return buf

    # ---- running -------------------------------------------------------------------------------------------------
    def use_threads(self, n: int | None = None) -> None:
        """Set numba's thread count for the calling thread (numba keeps it per thread: a server's worker thread
        must set its own) to `n`, or to the engine's."""
        import numba

        if n is not None:
            self.threads = set_threads(n)
        elif numba.get_num_threads() != self.threads:
            numba.set_num_threads(self.threads)

    def reset_programs(self) -> None:
        self._programs.clear()

    def run(self, feeds: dict[str, Any], in_place: dict[str, Shape] | None = None) -> None:
        """Run the graph on named inputs (`in_place`: inputs already in their buffers, by shape: a decoder's
        past keys and values). Outputs are read with `output(name)` until the next run."""
        self.st.file.unchanged("weights file")  # a mapped file cut short would end the process with SIGBUS
        shapes = self.bind_inputs(feeds, in_place or {})
        key = tuple(shapes[i["name"]] for i in self.plan.graph["inputs"])
        prog = self._programs.get(key)
        if prog is not None:
            self._programs.move_to_end(key)
            self._execute(prog, None)
        else:
            prog = _Program(shapes)
            cacheable = not any(b.tainted_values for b in self.ops)
            # Shapes that changed since the last run decide which ops must be bound again; the others keep
            # their calls (an ONNX decoder's past grows every step, but most of its ops do not see it).
            base = self._last if cacheable else None
            self._execute(prog, _Delta(base, shapes, self._tainted) if base is not None else None)
            if cacheable:
                self._programs[key] = prog
                while len(self._programs) > PROGRAMS_KEPT:
                    self._programs.popitem(last=False)
        self._last = prog
        self.shapes = prog.shapes
        self.timings.steps += 1

    def _execute(self, prog: _Program, delta: _Delta | None) -> None:
        p = self.plan
        i = -1
        tracer = self.tracer  # `--trace`: two tests of a local per group, none per op
        try:
            for g in p.groups:
                tw = time.perf_counter() if tracer is not None else 0.0  # before waiting for the slot
                s = self.streamer.acquire(g) if (self.streamer is not None and g.slot is not None) else -1
                calls = prog.calls.get((g.index, s))
                t0 = time.perf_counter()
                if calls is None:  # first run of these shapes in this slot: bind each op, then run it
                    base = delta.base.calls.get((g.index, s)) if delta is not None else None
                    calls = []
                    for i in range(g.op_start, g.op_end):
                        b = self.ops[i]
                        if base is not None and delta is not None and delta.keep(b, prog.shapes):
                            c = base[i - g.op_start]
                        else:
                            c = self._bind(b, prog.shapes, g.index, s)
                            if delta is not None:
                                delta.rebound(b, prog.shapes)
                        c()
                        calls.append(c)
                    prog.calls[(g.index, s)] = calls
                else:
                    for i, c in enumerate(calls, g.op_start):  # noqa: B007 (i names the op if one raises)
                        c()
                t1 = time.perf_counter()
                self.timings.compute_s += t1 - t0
                if tracer is not None:
                    tracer.groups.append((g.index, s, tw, t0, t1))
                if self.streamer is not None and g.slot is not None:
                    self.streamer.release(g)
        except (IndexError, ValueError, ShapeError) as e:
            self._restart_streamer()
            op = p.schedule[i] if 0 <= i < len(p.schedule) else None
            what = f"op '{op.name}' ({op.op})" if op is not None else "the graph"
            raise UserError(f"{self.where}: {what}: {e}; check the input values and shapes") from None
        except BaseException:
            self._restart_streamer()
            raise

    def _restart_streamer(self) -> None:
        if self.streamer is not None:  # the cyclic read order is broken: start the reader afresh
            self.streamer.close()
            self.streamer = GroupStreamer(self.st, self.plan.groups, self.slots, prefetch=len(self.slots) >= 2)

    def _bind(self, b: _Bound, shapes: dict[str, Shape], group: int, slot: int) -> Callable[[], Any]:
        """The bound call of one op at the shapes its inputs have now (memoised per input shapes and slot)."""
        op = b.op
        wviews = self._weights[(group, slot)][op.index]
        in_shapes: list[Shape | None] = []
        for i, t in enumerate(op.inputs):
            if not t:
                in_shapes.append(None)
            elif t.startswith(WEIGHT_REF):
                w = self.plan.weights[t[1:]]
                shape = list(w.shape)
                if b.attrs.get("rows") and i in b.d.row_tiled:
                    shape[0] = b.attrs["rows"][1] - b.attrs["rows"][0]
                in_shapes.append(tuple(shape))
            else:
                sh = shapes.get(t)
                if sh is None:
                    raise InternalError(f"op {op.name}: input {t} is read before any op wrote it")
                in_shapes.append(sh)
        values = {i: self._view(op.inputs[i], in_shapes[i]).copy() for i in b.value_idx
                  if i < len(op.inputs) and op.inputs[i] and not op.inputs[i].startswith(WEIGHT_REF)}
        key = (tuple(in_shapes), tuple((i, v.tobytes()) for i, v in sorted(values.items())), slot)
        hit = b.memo.get(key)
        if hit is not None:
            outs_shapes, call = hit
            shapes.update((o, sh) for o, sh in zip(op.outputs, outs_shapes) if o)
            return call
        # weights are float32 to the shape rules whatever their format (their logical dtype)
        dtypes = [None if not t else ("float32" if t.startswith(WEIGHT_REF) else self.plan.buffers[t].dtype)
                  for t in op.inputs]
        try:
            specs = b.d.shape(in_shapes, dtypes, values, b.attrs, len(op.outputs))
        except ShapeError as e:
            raise UserError(f"{self.where}: op '{op.name}' ({op.op}): {e}; the inputs do not fit this graph") \
                from None
        outs: list[np.ndarray | None] = []
        for o, (sh, dt) in zip(op.outputs, specs):
            if not o:
                outs.append(None)
                continue
            if np.dtype(dt) != self.flat[o].dtype:
                raise InternalError(f"op {op.name}: output {o} infers to {dt} but its buffer is "
                                    f"{self.flat[o].dtype}")
            outs.append(self._view(o, sh, op))
        ins: list[np.ndarray | None] = []
        formats: list[str | None] = []
        streamed: dict[int, Any] = {}
        for i, t in enumerate(op.inputs):
            if not t:
                ins.append(None)
                formats.append(None)
            elif t.startswith(WEIGHT_REF):
                w = self.plan.weights[t[1:]]
                formats.append(w.format)
                v = wviews.get(i)
                if v is None:  # a table of a streamed plan: rows are read from the file
                    streamed[i] = self._row_reader(t[1:])
                ins.append(v)
            else:
                formats.append(None)
                ins.append(self._view(t, in_shapes[i], op))
        scratch = [self.flat[s] for s in op.scratch]
        site = Site(op.name, ins, outs, b.attrs, formats, in_shapes, values, scratch, streamed)
        try:
            call = b.d.bind(site)
        except ShapeError as e:
            raise UserError(f"{self.where}: op '{op.name}' ({op.op}): {e}; the inputs do not fit this graph") \
                from None
        if self.validate:
            call = self._validated(call, b, site)
        if self.profile:
            call = self._timed(call, op.op, op.name)
        out_shapes = [sh for sh, _ in specs]
        shapes.update((o, sh) for o, sh in zip(op.outputs, out_shapes) if o)
        b.memo[key] = (out_shapes, call)
        return call

    def _view(self, name: str, shape: Shape, op: Op | None = None) -> np.ndarray:
        buf = self.flat[name]
        n = numel(shape)
        if n > buf.size:
            who = f"op '{op.name}' needs" if op is not None else "needs"
            raise UserError(f"{self.where}: {who} {n} elements for '{name}' {list(shape)} at these input sizes but "
                            f"the plan holds {buf.size}; use smaller inputs or recompile with larger max_context= / "
                            "max_batch_tokens=")
        return buf[:n].reshape(shape)

    def _row_reader(self, name: str) -> Callable[[int, np.ndarray], None]:
        w = self.plan.weights[name]
        row = w.nbytes // w.shape[0]
        file, off = self.st.file, w.offset

        def read(r: int, buf: np.ndarray) -> None:
            file.read_into(off + r * row, buf, f"row {r} of weight '{name}'")
        return read

    def infer(self, feeds: dict[str, Any], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run on named inputs and return copies of the named outputs (default: every graph output)."""
        self.run(feeds)
        return {o: self.output(o).copy() for o in (outputs or [x["name"] for x in self.plan.graph["outputs"]])}

    def output(self, name: str) -> np.ndarray:
        """A graph tensor after the last run, with the shape it had (a view into the arena)."""
        sh = self.shapes.get(name)
        if sh is None:
            raise UserError(f"{self.where}: no tensor '{name}' was computed; outputs: "
                            f"{[o['name'] for o in self.plan.graph['outputs']]}")
        return self._view(name, sh)

    def bind_inputs(self, feeds: dict[str, Any], in_place: dict[str, Shape]) -> dict[str, Shape]:
        """Check the feeds against the graph inputs (dtype, rank, fixed dims, symbols consistent and within the
        plan's bounds), write them into their buffers, and return the shapes of inputs and constants."""
        spec = self.plan.graph["inputs"]
        names = [i["name"] for i in spec]
        extra = sorted(set(feeds) - set(names))
        if extra:
            raise UserError(f"unknown input(s) {extra}; the graph takes {names}")
        env: dict[str, int] = {}
        shapes = dict(self.const_shapes)
        bounds = self.plan.graph.get("bounds", {})
        for s in spec:
            name = s["name"]
            if name in in_place:
                shape = tuple(in_place[name])
                self._check_dims(name, s["dims"], shape, env, bounds)
                shapes[name] = shape
                continue
            if name not in feeds:
                raise UserError(f"input '{name}' is missing; the graph takes {names}")
            a = np.asarray(feeds[name])
            want = np.dtype(s["dtype"])
            if a.dtype != want:
                if not (np.can_cast(a.dtype, want, "same_kind") or (a.dtype.kind in "iub" and want.kind in "iu")):
                    raise UserError(f"input '{name}' is {a.dtype} but the graph takes {want}")
                a = a.astype(want)
            self._check_dims(name, s["dims"], a.shape, env, bounds)
            dst = self.flat[name]
            if a.size > dst.size:
                raise UserError(f"input '{name}' {list(a.shape)} does not fit the plan's buffer ({dst.size} "
                                "elements)")
            dst[:a.size] = a.reshape(-1)
            shapes[name] = tuple(a.shape)
        return shapes

    @staticmethod
    def _check_dims(name: str, dims: list[Any], shape: Shape, env: dict[str, int], bounds: dict[str, int]) -> None:
        if len(shape) != len(dims):
            raise UserError(f"input '{name}' has shape {list(shape)} but the graph takes rank {len(dims)} {dims}")
        for ax, (d, v) in enumerate(zip(dims, shape)):
            if isinstance(d, int):
                if v != d:
                    raise UserError(f"input '{name}' dim {ax} is {v} but the graph fixes it at {d}")
                continue
            if d in env and env[d] != v:
                raise UserError(f"input '{name}' dim {ax} ('{d}') is {v} but another input binds '{d}' to {env[d]}")
            env[d] = int(v)
            bound = bounds.get(d)
            if bound is not None and v > bound:
                raise UserError(f"input '{name}' dim {ax} ('{d}') is {v}, above the plan's maximum {bound}; use "
                                "smaller inputs or recompile with larger max_context= / max_batch_tokens=")

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None

    # ---- validate and profile (wrappers of bound calls) ----------------------------------------------------------
    def _validated(self, call: Callable[[], Any], b: _Bound, site: Site) -> Callable[[], Any]:
        op = b.op

        def snapshot() -> list[np.ndarray | None]:
            out = []
            for i, x in enumerate(site.ins):
                fmt = site.formats[i]
                if x is None and i in site.streamed:  # a streamed table: map it for the check
                    w = self.plan.weights[op.inputs[i][1:]]
                    x = F.get(w.format).view(self.st.file.view(w.offset, w.nbytes, "u1", (w.nbytes,), "table"),
                                             w.shape)
                if x is not None and fmt is not None:
                    x = F.get(fmt).dequantize(x, site.shapes[i])
                out.append(None if x is None else np.array(x, copy=True))
            return out

        def validated() -> None:
            ins = snapshot()
            call()
            want = ops.run_twin(op.op, ins, op.attrs, len(op.outputs))
            for got, exp in zip(site.outs, want):
                if got is None or got.size == 0:
                    continue
                g, x = got, exp
                rows = b.attrs.get("rows")
                if rows is not None and b.d.row_tiled and g.shape != x.shape:
                    g = got[..., rows[0]:rows[1]]
                if g.dtype.kind == "f":
                    with np.errstate(all="ignore"):
                        g64, x64 = g.astype(np.float64), np.asarray(x, np.float64)
                        same = (g64 == x64) | (np.isnan(g64) & np.isnan(x64))
                        d = np.where(same, 0.0, np.abs(g64 - x64))
                        d = np.where(np.isnan(d), np.inf, d) / np.maximum(1.0, np.abs(np.nan_to_num(x64)))
                    err = float(d.max())
                else:
                    err = float(np.count_nonzero(g != x))
                self.worst[op.op] = max(self.worst.get(op.op, 0.0), err)
        return validated

    def _timed(self, call: Callable[[], Any], kind: str, name: str) -> Callable[[], Any]:
        per_op = self.timings.per_op
        if self.tracer is not None:  # chosen at bind: the untraced timer stays as it was
            events = self.tracer.ops

            def traced() -> None:
                t0 = time.perf_counter()
                call()
                t1 = time.perf_counter()
                per_op[kind] = per_op.get(kind, 0.0) + t1 - t0
                events.append((name, kind, t0, t1))
            return traced

        def timed() -> None:
            t0 = time.perf_counter()
            call()
            per_op[kind] = per_op.get(kind, 0.0) + time.perf_counter() - t0
        return timed


def start_threads() -> None:
    """Start numba's thread pool (its threads and their stacks belong to the runtime, not to a plan)."""
    from .ops.elementwise import unary_par

    x = np.zeros(1, np.float32)
    unary_par.load()(x, x, 0, 0.0, 0.0)


#: Seconds a first-run compile takes per kernel, about (measured on the 2-core x86-64 machine; a Pi 4 is ~3x).
COMPILE_S_PER_KERNEL = 4.0


def warm_plan(plan: Plan, notice: Any = None) -> None:
    """Load, from numba's on-disk cache (compiling on a first run), every kernel specialization `plan` calls and
    nothing else. The CLIs call it before measuring the runtime baseline, so kernel code counts as runtime.
    `notice(text)` is told once, just before the first kernel numba's cache does not hold is compiled."""
    from .ops import _jit

    if notice is not None:
        candidates = {k for op in plan.schedule for k in ops.get(op.op).kernels if not k.loaded}
        if plan.weights_mode == "streamed" and not fletcher.loaded:
            candidates.add(fletcher)
        said: list[bool] = []

        def announce(k: Any) -> None:
            if not said:
                said.append(True)
                todo = sum(1 for c in candidates if not c.cached())
                notice(f"edge-rt: compiling the numba kernels of this plan for this machine once (up to {todo}, "
                       f"about {COMPILE_S_PER_KERNEL:.0f} s each); later runs load them from "
                       f"{os.environ.get('NUMBA_CACHE_DIR', 'the numba cache')}")
        _jit.on_compile = announce
    try:
        _warm(plan)
    finally:
        _jit.on_compile = None


def _warm(plan: Plan) -> None:
    if plan.weights_mode == "streamed":
        fletcher.load()  # the streamer checks every group it reads
    seen: set[Any] = set()
    for op in plan.schedule:
        d = ops.get(op.op)
        attrs = with_defaults(d, op.attrs)
        in_dtypes: list[str | None] = []
        readonly: list[bool] = []
        formats: list[str | None] = []
        sizes = []
        for t in op.inputs:
            if not t:
                in_dtypes.append(None)
                readonly.append(False)
                formats.append(None)
            elif t.startswith(WEIGHT_REF):
                w = plan.weights[t[1:]]
                in_dtypes.append(F.get(w.format).view_dtype)
                readonly.append(True)
                formats.append(w.format)
                sizes.append(numel(w.shape))
            else:
                in_dtypes.append(plan.buffers[t].dtype)
                readonly.append(False)
                formats.append(None)
                b = plan.buffers[t]
                sizes.append(b.nbytes // max(1, np.dtype(b.dtype).itemsize))
        out_dtypes = [plan.buffers[o].dtype if o else None for o in op.outputs]
        sizes += [plan.buffers[o].nbytes // max(1, np.dtype(plan.buffers[o].dtype).itemsize) for o in op.outputs if o]
        big = max(sizes, default=0) >= PAR_MIN
        key = (op.op, tuple(in_dtypes), tuple(readonly), tuple(formats), tuple(out_dtypes), big,
               tuple(sorted((k, repr(v)) for k, v in attrs.items())))
        if key in seen:
            continue
        seen.add(key)
        d.warm(WarmSpec(in_dtypes, out_dtypes, readonly, formats, attrs, big))
