"""Process memory measurements: current RSS and the kernel's lifetime peak (what `/usr/bin/time -v` reports)."""

from __future__ import annotations

import resource
import sys

import psutil

MB = 1024 * 1024


def rss_now() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
