"""What verifying a plan on load costs: `load_plan` (read, parse, verify) and `check_plan` alone, medians.

  python benchmarks/bench_plan_check.py [PLAN ...] [--repeat 21]

Default plan: the README's default SmolLM2 plan (artifacts/smollm2-135m/...; compile it first with
`edge-rt-compile`). The issue's target is under 50 ms added to a SmolLM2 start. Prints one JSON line per plan.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_rt_exec.plan import load_plan  # noqa: E402
from edge_rt_exec.plan_check import check_plan  # noqa: E402

DEFAULT = ROOT / "artifacts" / "smollm2-135m" / "greedy_grouping-512M-ctx2048-q4_1+q8_0.plan.json"


def ms(fn, repeat: int) -> float:  # noqa: ANN001
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(ts), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", nargs="*", default=[str(DEFAULT)])
    ap.add_argument("--repeat", type=int, default=21)
    a = ap.parse_args()
    for path in a.plans:
        plan = load_plan(path)  # once, so file reads come from the page cache as on a second start
        print(json.dumps({"plan": Path(path).name, "ops": len(plan.schedule), "buffers": len(plan.buffers),
                          "load_plan_ms": ms(lambda p=path: load_plan(p), a.repeat),
                          "check_plan_ms": ms(lambda p=path, q=plan: check_plan(q, p), a.repeat), "repeat": a.repeat}))


if __name__ == "__main__":
    main()
