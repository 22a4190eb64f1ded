"""Process memory measurements: current RSS and the kernel's peak of this program's address space."""

from __future__ import annotations

import resource
import sys

import psutil

MB = 1024 * 1024


def rss_now() -> int:
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
