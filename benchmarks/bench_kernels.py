"""Decode matvec throughput: `kernels.linear` with n=1 on SmolLM2-135M shapes, next to `np.dot`.

Reports the median time of `--repeats` calls and the weight bytes read per second (the matvec is memory-bound:
every weight is read once per token), plus the best call: on a shared machine the median picks up other
processes' load. np.dot runs on numpy's BLAS thread pool, which `--threads` does not size.
Run: `python benchmarks/bench_kernels.py [--repeats 50] [--threads N]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np

from edge_rt_exec import kernels

# (label, m, k): one attention / MLP projection and the tied LM head of SmolLM2-135M.
SHAPES = [("mlp up/gate 1536x576", 1536, 576), ("lm head 49152x576", 49152, 576)]


def time_calls(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) seconds of `repeats` calls after one warm-up call."""
    fn()  # warm up: page in the weights, start the thread pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=numba.get_num_threads())
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    print(f"numba {numba.__version__}, {args.threads} threads, median (best) of {args.repeats} calls")
    rng = np.random.default_rng(0)
    no_bias = np.zeros(0, np.float32)
    for label, m, k in SHAPES:
        w = rng.standard_normal((m, k), dtype=np.float32)
        x = rng.standard_normal((1, k), dtype=np.float32)
        out = np.empty((1, m), np.float32)
        gb = w.nbytes / 1e9
        kernel = time_calls(lambda: kernels.linear(x, w, no_bias, out), args.repeats)  # noqa: B023
        numpy = time_calls(lambda: np.dot(x, w.T, out=out), args.repeats)  # noqa: B023
        cells = [
            f"{name} {t[0] * 1e6:8.1f} us {gb / t[0]:5.1f} GB/s ({gb / t[1]:5.1f})"
            for name, t in (("kernels.linear", kernel), ("np.dot", numpy))
        ]
        print(f"{label:22s} {w.nbytes / 2**20:6.1f} MiB   " + "   ".join(cells))
    print(f"threading layer: {numba.threading_layer()}")


if __name__ == "__main__":
    main()
