"""Process measurements: current RSS, the kernel's peak of this program's address space, and when the process
started."""

from __future__ import annotations

import os
import resource
import sys
import time

MB = 1024 * 1024


def rss_now() -> int:
    import psutil  # imported when first needed: start-up does not pay for it

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux: the address space's high-water mark (`VmHWM` in /proc/self/status), not `ru_maxrss`: across fork and
    exec the kernel carries the parent's high-water mark into the child's `ru_maxrss`, so an executor started by
    a 300 MB process (a test runner, a service manager written in Python) would begin with a 300 MB "peak" and
    could not see its own plan's memory under it. `VmHWM` belongs to this program's own address space and starts
    at exec. Elsewhere (macOS: bytes) and where /proc is missing: `ru_maxrss`."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
        except (OSError, ValueError, IndexError):
            pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def process_start_time() -> float:
    """When this process started, as a `time.time()` value, to ~10 ms.

    Linux: the start time the kernel recorded (`/proc/self/stat` field 22, clock ticks since boot) against
    `CLOCK_BOOTTIME`. Not `psutil.Process().create_time()`: psutil adds those ticks to the boot time of
    `/proc/stat`, which is whole seconds, so its value is early by a fixed 0-1 s for the whole uptime (measured
    0.75 s on one boot) and a start-up figure built on it is off by as much. Elsewhere: psutil's."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/stat", "rb") as f:
                stat = f.read()
            ticks = int(stat[stat.rindex(b")") + 2:].split()[19])  # fields after "(comm)": state is field 3
            since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
            return time.time() - since_start
        except (OSError, ValueError, IndexError, AttributeError):
            pass
    import psutil

    return psutil.Process().create_time()
