"""The streamed-group checksum (edge_rt_exec/checksum.py) against the reads it guards: GB/s of the numba kernel on
one thread, for group-sized and large buffers, next to a pread of the same bytes from the page cache.

  python benchmarks/bench_checksum.py [--repeat 50]

Best and median of `--repeat` calls per size; one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_rt_exec.checksum import fletcher  # noqa: E402

MiB = 1 << 20


def timed(fn, repeat: int) -> list[float]:  # noqa: ANN001
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=50)
    a = ap.parse_args()
    k = fletcher.load()
    out = np.zeros(2, np.uint64)
    with tempfile.TemporaryDirectory() as d:
        for size in (2 * MiB, 16 * MiB, 64 * MiB):
            buf = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
            path = os.path.join(d, "data.bin")
            buf.tofile(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                dst = np.empty(size, np.uint8)
                os.preadv(fd, [dst], 0)  # into the page cache
                k(buf, out)
                ck = timed(lambda b=buf: k(b, out), a.repeat)
                rd = timed(lambda f=fd, b=dst: os.preadv(f, [b], 0), a.repeat)
            finally:
                os.close(fd)
            print(json.dumps({"bytes": size, "checksum_GBs_best": round(size / min(ck) / 1e9, 1),
                              "checksum_GBs_median": round(size / statistics.median(ck) / 1e9, 1),
                              "pread_GBs_median": round(size / statistics.median(rd) / 1e9, 1),
                              "checksum_over_read": round(statistics.median(ck) / statistics.median(rd), 3)}))


if __name__ == "__main__":
    main()
