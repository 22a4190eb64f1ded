"""A Chrome trace of a run (`edge-rt-exec run ... --trace trace.json`): what computed, what was read, and when.

While a run goes, the engine appends tuples of `time.perf_counter()` readings to the `Tracer`'s lists (one per
group per forward pass, one per op when `--profile` also times them) and the weight streamer keeps its read
spans (`weights.StreamStats.read_spans`, made unbounded here); `generate` adds the prefill and one span per
decoded token. Nothing is formatted until the end, when `write` turns them into the Trace Event Format
(the JSON object form: complete events `ph: "X"` with `ts`/`dur` in microseconds, thread names as metadata
events `ph: "M"`) that Perfetto (ui.perfetto.dev) and Chrome DevTools' Performance panel open. A run without
`--trace` has no tracer: the engine tests a local for None twice per group, and not at all per op (the per-op
timer is chosen when an op is bound).

Tracks (threads of one process): `tokens` (prefill, decode token n), `compute` (the engine's group loop: group
g per pass, with the op events nested in it under `--profile`, and `wait g` where it waited for the reader to
fill g's slot), and `weights reader` (each read of a group into its slot, checksum included, with its bytes):
the reader thread's of `speculative_prefetch`, or the reads the compute thread makes itself with one slot.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

#: thread ids of the tracks (synthetic: stable across runs, ordered as shown)
TOKENS, COMPUTE, READER = 1, 2, 3
#: times are whole 1/1024 µs: viewers compare `ts + dur` in floating point, exact for binary fractions (with
#: decimal nanoseconds a span ending where the next one starts can end 1e-12 µs after it, and Chrome DevTools
#: drops the later span as not nested); the first event is at 1 µs, since DevTools keeps `ts` 0 out of a trace's
#: bounds (metadata events have it)
TICKS_PER_US = 1024


class Tracer:
    """Events of one run, recorded cheaply; `write` formats them once."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()  #: ts 0 of the trace, unless an event came earlier (see `events`)
        #: (group index, slot or -1, before waiting for its slot, compute start, compute end)
        self.groups: list[tuple[int, int, float, float, float]] = []
        #: (op name, op type, start, end): bound calls timed under `--profile`
        self.ops: list[tuple[str, str, float, float]] = []
        #: (name, start, end, args) on the tokens track
        self.spans: list[tuple[str, float, float, dict[str, Any]]] = []
        self.engine: Any = None
        self.pid = os.getpid()
        self.prefetch = False  #: reads are the reader thread's (else the compute thread reads with one slot)
        self._reads: list[tuple[deque[tuple[int, int, float, float]], ...]] = []

    def attach(self, engine: Any) -> Tracer:
        """Trace `engine` from its next run on (before its first: ops are bound, and their timers chosen, then)."""
        self.engine = engine
        engine.tracer = self
        st = engine.streamer
        if st is not None:
            self.prefetch = st.prefetch
            # The reader thread is already running and appends to `read_spans` without a lock: swap in an
            # unbounded deque and keep the old one too, so a read appended to either is in the trace.
            old, new = st.stats.read_spans, deque[tuple[int, int, float, float]]()
            st.stats.read_spans = new
            self._reads.append((old, new))
        return self

    def span(self, name: str, t0: float, t1: float, **args: Any) -> None:
        self.spans.append((name, t0, t1, args))

    # ---- the file --------------------------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        """The trace's events: metadata first, then each track's spans in time order (a parent before the spans
        it contains). Times are whole ticks (`TICKS_PER_US`) from 1 µs before the earliest event (the reader
        starts with the engine, before the tracer), so rounding keeps nested spans nested."""
        p = self.engine.plan if self.engine is not None else None
        groups = {g.index: g for g in p.groups} if p is not None else {}
        # each read is in one of the two deques (see `attach`); read numbers order them
        reads = sorted(r for pair in self._reads for d in pair for r in d)
        origin = min([self.origin] + [r[2] for r in reads] + [s[1] for s in self.spans] + [g[2] for g in self.groups])
        pid = self.pid

        def complete(tid: int, name: str, t0: float, t1: float, cat: str, args: dict[str, Any]) -> dict[str, Any]:
            a, b = (TICKS_PER_US + round((t - origin) * 1e6 * TICKS_PER_US) for t in (t0, t1))
            return {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": a / TICKS_PER_US,
                    "dur": max(0, b - a) / TICKS_PER_US, "args": args}

        out = [complete(TOKENS, name, t0, t1, "generate", args) for name, t0, t1, args in self.spans]
        first = p.groups[0].index if p is not None and p.groups else 0
        n_pass = -1
        for gi, slot, tw, t0, t1 in self.groups:
            n_pass += gi == first
            g = groups.get(gi)
            units = g.units if g is not None else []
            label = f"group {gi}" + (f" ({units[0]}{'..' + units[-1] if len(units) > 1 else ''})" if units else "")
            args: dict[str, Any] = {"group": gi, "pass": n_pass, "units": units}
            if g is not None:
                args["ops"] = g.op_end - g.op_start
            if slot >= 0:  # a streamed group: the compute thread waited for its slot first
                args["slot"] = slot
                out.append(complete(COMPUTE, f"wait {gi}", tw, t0, "wait", {"group": gi, "slot": slot}))
            out.append(complete(COMPUTE, label, t0, t1, "group", args))
        out += [complete(COMPUTE, name, t0, t1, "op", {"op": kind}) for name, kind, t0, t1 in self.ops]
        for k, gi, t0, t1 in reads:
            g = groups.get(gi)
            nbytes = g.byte_end - g.byte_start if g is not None else 0
            out.append(complete(READER, f"read {gi}", t0, t1, "read", {"group": gi, "read": k, "bytes": nbytes}))
        out.sort(key=lambda e: (e["tid"], e["ts"], -e["dur"]))
        return self._metadata(p, {e["tid"] for e in out}) + out

    def _metadata(self, p: Any, tids: set[int]) -> list[dict[str, Any]]:
        reader = "weights reader (prefetch thread)" if self.prefetch else "weights reads (in the compute thread)"
        names = {TOKENS: "tokens", COMPUTE: "compute", READER: reader}
        what = f"{p.model.get('name')} {p.strategy} {p.budget / 2**20:.0f}M" if p is not None else "run"
        md: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0,
                                     "args": {"name": f"edge-rt-exec {what}"}}]
        for tid in sorted(tids):
            md.append({"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid, "args": {"name": names[tid]}})
            md.append({"ph": "M", "name": "thread_sort_index", "pid": self.pid, "tid": tid,
                       "args": {"sort_index": tid}})
        return md

    def document(self) -> dict[str, Any]:
        """The JSON object: `traceEvents` and what the run was (`otherData`)."""
        events = self.events()
        p = self.engine.plan if self.engine is not None else None
        other: dict[str, Any] = {"tool": "edge-rt-exec", "version": __import__("edge_rt_exec").__version__}
        if p is not None:
            other.update(plan=str(p.path or ""), model=str(p.model.get("name")), strategy=p.strategy,
                         budget_bytes=p.budget, weights_mode=p.weights_mode, groups=len(p.groups),
                         threads_at_end=self.engine.threads)
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}

    def write(self, path: Path) -> int:
        """Write the trace to `path` atomically; return the number of events."""
        from .plan import atomic_write

        doc = self.document()
        atomic_write(path, json.dumps(doc, separators=(",", ":")))
        return len(doc["traceEvents"])
