"""Holding a temperature ceiling (`--max-temp C` of run, chat and serve).

A Raspberry Pi 4 without a fan reaches its 80 C soft limit within minutes of sustained decoding, then the
firmware halves the clock for everyone. The governor acts first: between tokens it reads the SoC temperature
(the thermal zones `status` reads) and the firmware's throttling flags; near the ceiling it lowers the kernels'
thread count one step at a time, and at one thread it paces tokens (sleeps between them, the duty cycle
falling as the temperature rises). Well below the ceiling it restores them. Every change is recorded and
reported. Sensors are read under `EDGE_RT_SYSFS_ROOT` when set (tests drive a fake temperature).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .status import soc_temperature, sysfs_root, throttled_now

#: Within this many degrees of the ceiling, or throttled: shed load. Below ceiling - RESTORE_MARGIN: give it back.
NEAR_MARGIN_C = 2.0
RESTORE_MARGIN_C = 5.0
#: Poll at most this often (reading sysfs costs ~0.1 ms; tokens come every 10-100 ms).
POLL_S = 0.25
#: Longest pause inserted between two tokens at one thread.
MAX_PAUSE_S = 0.5


@dataclass
class ThermalGovernor:
    max_temp_c: float
    max_threads: int
    set_threads: Callable[[int], Any]
    root: str = field(default_factory=sysfs_root)
    threads: int = 0
    pause_s: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    notify: Callable[[str], None] | None = None
    _last: float = -1e9
    _t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.threads = self.threads or self.max_threads

    def step(self, force: bool = False) -> None:
        """Call between tokens: adjust threads or pacing to the temperature, then pause if pacing."""
        now = time.monotonic()
        if force or now - self._last >= POLL_S:
            self._last = now
            self._adjust(soc_temperature(self.root), throttled_now(self.root))
        if self.pause_s > 0:
            time.sleep(self.pause_s)

    def _adjust(self, temp: float | None, throttled: bool) -> None:
        if temp is None and not throttled:
            return
        hot = throttled or (temp is not None and temp >= self.max_temp_c - NEAR_MARGIN_C)
        cool = not throttled and temp is not None and temp <= self.max_temp_c - RESTORE_MARGIN_C
        if hot:
            if self.threads > 1:
                self._change(self.threads - 1, 0.0, temp, throttled, "lowered threads")
            else:
                over = 0.0 if temp is None else max(0.0, temp - (self.max_temp_c - NEAR_MARGIN_C))
                pause = min(MAX_PAUSE_S, max(self.pause_s * 2, 0.02, 0.05 * over))
                if pause != self.pause_s:
                    self._change(1, pause, temp, throttled, "paced tokens")
        elif cool:
            if self.pause_s > 0:
                pause = self.pause_s / 2 if self.pause_s > 0.02 else 0.0
                self._change(self.threads, pause, temp, throttled, "eased pacing")
            elif self.threads < self.max_threads:
                self._change(self.threads + 1, 0.0, temp, throttled, "restored threads")

    def _change(self, threads: int, pause: float, temp: float | None, throttled: bool, what: str) -> None:
        before = self.threads
        if threads != self.threads:
            self.set_threads(threads)
            self.threads = threads
        self.pause_s = pause
        ev = {"t_s": round(time.monotonic() - self._t0, 3), "temp_c": temp, "throttled": throttled,
              "threads": threads, "pause_ms": round(pause * 1e3, 1), "action": what}
        self.events.append(ev)
        if self.notify is not None:
            reading = f"{temp:.1f} C" if temp is not None else "firmware throttling"
            self.notify(f"[thermal: {reading} against a {self.max_temp_c:g} C ceiling: {what} "
                        f"({before} -> {threads} threads, {pause * 1e3:.0f} ms pause per token)]")

    def report(self) -> dict[str, Any]:
        return {"max_temp_c": self.max_temp_c, "threads": self.threads, "pause_ms": round(self.pause_s * 1e3, 1),
                "events": self.events}
