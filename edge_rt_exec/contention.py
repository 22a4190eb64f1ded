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
The kernels' results do not depend on the thread count (a row's result never depends on which thread
computes it), so switching changes speed only, never tokens (tests/test_contention.py).
"""

from __future__ import annotations

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
    _due: dict[tuple[int, int], int] = field(default_factory=dict)  #: (from, to) -> the age its next probe is due
    _probe: tuple[int, float] | None = None  #: while probing: (the count to go back to, its window's median)
    #: (from, to) -> tokens between its probes (doubles on a miss)
    _every: dict[tuple[int, int], int] = field(default_factory=dict)
    _measured: bool = False  #: a first window was taken (the first is one token: decide early)
    _down: bool = True  #: the direction of the next probe from a count with two neighbours
    _last: float | None = None
    _skip: int = 0
    _t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.max_threads = max(1, self.max_threads)
        self.threads = min(self.threads or self.max_threads, self.max_threads)
        if self.threads > 1:  # probe down after the first token: contention may predate the run
            self._due[(self.threads, self.threads - 1)] = 0

    # ---- the decode loop's calls ---------------------------------------------------------------------------------
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
        if n > 1 and m > self.slower * best:
            self._try(n - 1, m, "slower")
            return
        due = [to for to in (n - 1, n + 1) if 1 <= to <= self.max_threads
               and self._age >= self._due.get((n, to), self.probe_every)]
        if due:
            to = due[0] if len(due) == 1 else (n - 1 if self._down else n + 1)
            self._down = to > n  # the other way next time both are due
            self._try(to, m, "probe")

    def _end_probe(self, m: float) -> None:
        assert self._probe is not None
        back, ref = self._probe
        n = self.threads
        self._probe = None
        self._times.clear()
        if m < ref * self.gain:
            self._best[n] = m
            self._every.pop((back, n), None)
            self._every.pop((n, back), None)
            self._arrive()
            self.events.append(self._event(back, n, m, ref, "kept"))
        else:
            self._best[back] = ref  # the level just measured is the norm at `back`
            every = self._every[(back, n)] = min(2 * self._every.get((back, n), self.probe_every), self.max_every)
            self._due[(back, n)] = self._age + every
            self._switch(back, "reverted", m, ref)

    def _arrive(self) -> None:
        """At a new count: probes from it are due `probe_every` tokens from now (or their backed-off interval)."""
        self._age = 0
        self._due = dict(self._every)

    def _try(self, to: int, ref: float, why: str) -> None:
        self._probe = (self.threads, ref)
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
