"""Decoding beside other processes: the kernels' thread count adapted between tokens (on by default for run,
chat and serve; `--fixed-threads` turns it off).

Every parallel kernel (a few hundred per token) gives each thread one static share of its rows and ends at a
barrier. When another process holds a core, the OS takes one of our threads off the CPU for whole timeslices
(milliseconds) while the others finish their shares and wait for it, spinning and then sleeping: every region
lasts as long as that thread's time off the CPU. On the 2-core machine, a 2-thread decode with one core held
by a busy loop ran at ~0.05-0.1x its quiet speed, while 1 thread on the free core kept ~0.5x of the quiet
2-thread speed (benchmarks/bench_contention.py). Smaller chunks taken dynamically would not save it: the
descheduled thread still holds its chunk for its timeslice, and the region's barrier waits for that chunk.
So the fix is fewer threads than there are busy-free cores, chosen while running, since contention starts
and stops mid-run.

The adapter costs one `perf_counter` per token. It takes the median of every `window` tokens at the present
count n and tries a neighbour count for one window (a probe): after the first token (contention may predate
the run), every `probe_every` tokens, and at once (to n - 1) when a window is `slower` times the best median
seen at n. The probe is kept when its median beats the window before it by the `gain` factor, else the count
goes back: at once if a single probe token is `slower` times that window (a 2-thread token beside a busy loop
costs ~10 1-thread ones, so a probe up must not last a whole window). A probe that misses doubles the tokens
before the next probe from that count in that direction (up to `max_every`), and the level just measured
becomes that count's reference (a longer context or a load that n still handles best does not probe again at
once). Probes alternate up and down between 1 and `max_threads`, so threads come back when the other process goes away.

Timing alone pays for what it learns: a probe up beside a busy core costs ~10 tokens' time, and so does the
first token of a run that starts at every core beside one. So the adapter also reads, between windows, how
many of its cores other processes used (`CpuLoad`: /proc/stat's busy time of the cores this process may run on,
less this process's own CPU time): a probe up is put off while the cores it needs are taken, a window at more
threads than the free cores probes down at once, and a generation that starts while the cores are taken (the
load measured since the last look, over the model's load or the last request) starts at the free count, before
its prefill. Where /proc/stat is missing, timing alone decides.
The kernels' results do not depend on the thread count (a row's result never depends on which thread
computes it), so switching changes speed only, never tokens (tests/test_contention.py).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Tokens per measurement (their median: one slow token, a page fault or a timer tick, moves nothing).
WINDOW = 3
#: Tokens at one count between probes of a neighbour count (a quiet 2-thread run spends 3 of every ~38 at 1).
PROBE_EVERY = 48
#: A probe that fails doubles the tokens before the next one from that count, up to this.
MAX_EVERY = 256
#: A window this many times slower than the best at its count probes one thread fewer at once; a probe token
#: this many times slower than the window before the probe ends it.
SLOWER = 1.5
#: A probe is kept when its median is below `GAIN` x the median of the window before it.
GAIN = 0.9
#: Switches kept in the report (the count of all of them is kept too).
EVENTS_KEPT = 32
#: The shortest span a load reading covers (/proc/stat counts in 10 ms ticks: 0.1 s is 10 per core).
LOAD_SPAN_S = 0.1
#: Before a generation's prefill, a reading may be this short (the model's load, from the session's start):
#: 5 ticks of a busy core, enough to tell a held core from a free one.
FIRST_SPAN_S = 0.05
#: Cores taken by other processes round to whole cores at this fraction (0.6 of a core taken: one core less).
LOAD_ROUND = 0.5


class CpuLoad:
    """Cores that other processes kept busy, among those this process may run on, since the last reading.

    From /proc/stat's per-core busy time (user, nice, system, irq, softirq and steal: everything but idle and
    iowait) less this process's CPU time (all its threads, spinning numba workers included) over the same wall
    time. A reading covers at least `span_s`; a call before that returns the last one."""

    def __init__(self, stat_path: str = "/proc/stat", span_s: float = LOAD_SPAN_S,
                 clock: Callable[[], float] = time.perf_counter, own: Callable[[], float] = time.process_time) -> None:
        self.path = stat_path
        self.span_s = span_s
        self.clock, self.own = clock, own
        try:
            self.cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self.cpus = {f"cpu{c}" for c in range(os.cpu_count() or 1)}
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._ref = self._sample()
        self.others: float | None = None  #: the last reading (cores), None before the first

    def _sample(self) -> tuple[float, float, float] | None:
        """(wall s, busy s of our cores, our CPU s), or None when /proc/stat cannot be read."""
        try:
            with open(self.path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        busy = 0
        for ln in lines:
            parts = ln.split()
            if parts and parts[0] in self.cpus and len(parts) >= 5:
                v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
                busy += sum(v) - v[3] - (v[4] if len(v) > 4 else 0)
        return self.clock(), busy / self.hz, self.own()

    def read(self, span_s: float | None = None) -> float | None:
        """Cores used by other processes over the last span of at least `span_s` (default: the load's own;
        None: unknown)."""
        if self._ref is None:
            return None
        now = self._sample()
        if now is None:
            return None
        wall = now[0] - self._ref[0]
        if wall >= (self.span_s if span_s is None else span_s):
            self.others = max(0.0, ((now[1] - self._ref[1]) - (now[2] - self._ref[2])) / wall)
            self._ref = now
        return self.others

    def free_cores(self, span_s: float | None = None) -> float | None:
        """Cores left to this process, by the last reading."""
        others = self.read(span_s)
        return None if others is None else len(self.cpus) - others


@dataclass
class ThreadAdapter:
    max_threads: int
    set_threads: Callable[[int], Any]
    threads: int = 0
    window: int = WINDOW
    probe_every: int = PROBE_EVERY
    slower: float = SLOWER
    gain: float = GAIN
    max_every: int = MAX_EVERY
    switches: int = 0
    tokens_at: dict[int, int] = field(default_factory=dict)  #: tokens timed at each thread count
    events: deque = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    _times: list[float] = field(default_factory=list)
    _best: dict[int, float] = field(default_factory=dict)
    _age: int = 0  #: tokens timed at this count since the adapter came to it
    #: (from, to), or (from, to, "load") for the load's probes -> the age its next probe is due
    _due: dict[tuple, int] = field(default_factory=dict)
    #: while probing: (the count to go back to, its window's median, the key of its back-off)
    _probe: tuple[int, float, tuple] | None = None
    #: the same keys -> tokens between its probes (doubles on a miss)
    _every: dict[tuple, int] = field(default_factory=dict)
    _measured: bool = False  #: a first window was taken (the first is one token: decide early)
    _down: bool = True  #: the direction of the next probe from a count with two neighbours
    _last: float | None = None
    _skip: int = 0
    _t0: float = field(default_factory=time.perf_counter)
    #: the other processes' load on our cores (`CpuLoad`); None: timing alone
    load: Any = field(default_factory=CpuLoad)

    def __post_init__(self) -> None:
        self.max_threads = max(1, self.max_threads)
        self.threads = min(self.threads or self.max_threads, self.max_threads)
        if self.threads > 1:  # probe down after the first token: contention may predate the run
            self._due[(self.threads, self.threads - 1)] = 0

    # ---- the decode loop's calls ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Call before a generation's prefill: start at the free cores' count when other processes hold some."""
        fit = self._fit(FIRST_SPAN_S)
        if fit is not None and fit < self.threads:
            self._probe = None
            self._arrive()
            self._switch(fit, "busy cores")
        elif fit is not None and not self._measured:  # the cores are free: no early probe down is needed
            self._due.pop((self.threads, self.threads - 1), None)

    def start(self) -> None:
        """Call before the decode loop. Prefill is not a token, and the first decode step (which binds the decode
        program) is not timed: the first `tick` only starts the clock, the second restarts it."""
        self._last = None
        self._skip = 1
        self._times.clear()
        if self._probe is not None:  # a probe cut short by the end of the last generation: go back
            self._switch(self._probe[0], "probe cut short")
            self._probe = None

    def tick(self) -> None:
        """Call between tokens: times the token since the last call."""
        now = time.perf_counter()
        if self._last is not None:
            if self._skip:
                self._skip -= 1
            else:
                self.observe(now - self._last)
        self._last = now

    def limit(self, n: int) -> None:
        """A new ceiling (the thermal governor's count): go to it and adapt below it from there."""
        self.max_threads = max(1, n)
        self._probe = None
        self._times.clear()
        self._arrive()
        self._switch(self.max_threads, "limit")

    # ---- the decision --------------------------------------------------------------------------------------------
    def observe(self, dt: float) -> None:
        """One token took `dt` seconds at the present thread count."""
        n = self.threads
        self.tokens_at[n] = self.tokens_at.get(n, 0) + 1
        if self.max_threads <= 1:
            return
        if self._probe is not None and dt > self._probe[1] * self.slower:
            self._end_probe(dt)  # clearly slower at once (a contended core costs ~10x): no median needed
            return
        self._times.append(dt)
        if len(self._times) < (self.window if self._measured else 1):
            return
        m = sorted(self._times)[len(self._times) // 2]
        self._times.clear()
        self._measured = True
        if self._probe is not None:
            self._end_probe(m)
            return
        best = self._best[n] = min(self._best.get(n, m), m)
        self._age += self.window
        fit = self._fit()
        if n > 1 and fit is not None and fit < n and self._age >= self._due.get((n, fit, "load"), 0):
            self._try(fit, m, "busy cores")  # a probe: kept only if faster (and backed off like one if not)
            return
        if n > 1 and m > self.slower * best:
            self._try(n - 1, m, "slower")
            return
        due = [to for to in (n - 1, n + 1) if 1 <= to <= self.max_threads
               and self._age >= self._due.get((n, to), self.probe_every)]
        if fit is not None and n + 1 in due and fit < n + 1:
            due.remove(n + 1)  # the core it needs is taken: look again in `probe_every` tokens, at no cost
            self._due[(n, n + 1)] = self._age + self.probe_every
        if due:
            to = due[0] if len(due) == 1 else (n - 1 if self._down else n + 1)
            self._down = to > n  # the other way next time both are due
            self._try(to, m, "probe")

    def _fit(self, span_s: float | None = None) -> int | None:
        """Threads that fit the cores other processes leave free (None: unknown)."""
        free = self.load.free_cores(span_s) if self.load is not None else None
        if free is None:
            return None
        return max(1, min(self.max_threads, int(free + LOAD_ROUND)))

    def _end_probe(self, m: float) -> None:
        assert self._probe is not None
        back, ref, key = self._probe
        n = self.threads
        self._probe = None
        self._times.clear()
        if m < ref * self.gain:
            self._best[n] = m
            self._every.pop(key, None)
            self._every.pop((n, back), None)
            self._arrive()
            self.events.append(self._event(back, n, m, ref, "kept"))
        else:
            self._best[back] = ref  # the level just measured is the norm at `back`
            every = self._every[key] = min(2 * self._every.get(key, self.probe_every), self.max_every)
            self._due[key] = self._age + every
            self._switch(back, "reverted", m, ref)

    def _arrive(self) -> None:
        """At a new count: probes from it are due `probe_every` tokens from now (or their backed-off interval)."""
        self._age = 0
        self._due = dict(self._every)

    def _try(self, to: int, ref: float, why: str) -> None:
        # a probe on the load's word backs off apart from the timing's probes: each is checked by its own misses
        self._probe = (self.threads, ref, (self.threads, to) + (("load",) if why == "busy cores" else ()))
        self._switch(to, why, None, ref)

    def _switch(self, to: int, why: str, m: float | None = None, ref: float | None = None) -> None:
        if to == self.threads:
            return
        self.events.append(self._event(self.threads, to, m, ref, why))
        self.switches += 1
        self.threads = to
        self.set_threads(to)

    def _event(self, frm: int, to: int, m: float | None, ref: float | None, why: str) -> dict[str, Any]:
        return {"t_s": round(time.perf_counter() - self._t0, 3), "from": frm, "to": to, "why": why,
                "ms": None if m is None else round(m * 1e3, 2), "ref_ms": None if ref is None else round(ref * 1e3, 2)}

    def report(self) -> dict[str, Any]:
        return {"threads": self.threads, "max_threads": self.max_threads, "switches": self.switches,
                "tokens_at": {str(k): v for k, v in sorted(self.tokens_at.items())}, "events": list(self.events)}
