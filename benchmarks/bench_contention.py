"""Decode beside a busy core: quiet vs one core held by a pinned busy loop, adaptive threads vs fixed.

  python benchmarks/bench_contention.py [--plan PLAN] [--repeat 3] [--threads 2] [-n 64] [--busy-core 0]

Compiles the default plan (SmolLM2-135M Q4_1, resident) unless `--plan` is given. Each repeat runs, in turn,
quiet then busy (a `python -c "while True: pass"` pinned with `taskset -c BUSY_CORE`, started before the run
and killed after it), each with the adaptive default and with `--fixed-threads`, all at `--threads N`: the four
cases interleaved, so a change of the machine's load hits them alike. Reports the median decode tok/s of each
case, the ratio busy / quiet per mode, and how the adaptive runs spent their tokens (tokens per thread count,
switches). Fresh process per run; a warm-up run fills numba's cache first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PROMPT = "The history of the city begins"


def sh(cmd: list[str]) -> str:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{r.stderr[-3000:]}")
    return r.stdout


def compile_default(out: Path) -> str:
    text = sh([PY, "-m", "edge_rt_compiler.app", f"out_dir={out}"])
    return [ln.split("plan: ", 1)[1] for ln in text.splitlines() if ln.startswith("plan: ")][-1]


def decode(plan: str, threads: int, n: int, fixed: bool) -> dict:
    cmd = [PY, "-m", "edge_rt_exec", "run", plan, "-p", PROMPT, "-n", str(n), "--json", "--ignore-eos",
           "-t", str(threads)] + (["--fixed-threads"] if fixed else [])
    return json.loads(sh(cmd))


class BusyLoop:
    """A busy loop pinned to one core for the duration of a `with` block."""

    def __init__(self, core: int) -> None:
        self.core = core

    def __enter__(self) -> BusyLoop:
        self.p = subprocess.Popen(["taskset", "-c", str(self.core), PY, "-c", "while True: pass"])
        time.sleep(0.3)  # let it start spinning
        return self

    def __exit__(self, *exc: object) -> None:
        self.p.kill()
        self.p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default=None, help="a compiled plan (default: compile the default model)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", "--max-tokens", type=int, default=64)
    ap.add_argument("--busy-core", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the busy loop is killed too
    with tempfile.TemporaryDirectory(prefix="edge-rt-contention-") as t:
        plan = args.plan or compile_default(Path(t))
        decode(plan, args.threads, 4, True)  # warm numba's cache
        cases = [(busy, mode) for busy in ("quiet", "busy") for mode in ("adaptive", "fixed")]
        speeds: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
        spent: list[dict] = []
        tokens: set[tuple[int, ...]] = set()
        for rep in range(args.repeat):
            for busy, mode in cases:
                if busy == "busy":
                    with BusyLoop(args.busy_core):
                        r = decode(plan, args.threads, args.max_tokens, mode == "fixed")
                else:
                    r = decode(plan, args.threads, args.max_tokens, mode == "fixed")
                speeds[(busy, mode)].append(r["decode_tok_s"])
                tokens.add(tuple(r["tokens"]))
                if "adapt_threads" in r:
                    a = r["adapt_threads"]
                    spent.append({"case": busy, "tokens_at": a["tokens_at"], "switches": a["switches"]})
                print(f"  repeat {rep + 1} {busy:5s} {mode:8s} {r['decode_tok_s']:7.2f} tok/s", file=sys.stderr,
                      flush=True)
    med = {f"{b}/{m}": round(statistics.median(v), 2) for (b, m), v in speeds.items()}
    ratio = {m: round(statistics.median(speeds[("busy", m)]) / statistics.median(speeds[("quiet", m)]), 3)
             for m in ("adaptive", "fixed")}
    out = {"threads": args.threads, "max_tokens": args.max_tokens, "repeat": args.repeat,
           "load_average": [round(x, 2) for x in os.getloadavg()], "median_tok_s": med, "busy_over_quiet": ratio,
           "runs": {f"{b}/{m}": v for (b, m), v in speeds.items()}, "adaptive_runs": spent,
           "identical_tokens": len(tokens) == 1}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in med.items():
            print(f"{k:15s} {v:7.2f} tok/s  (runs {speeds[tuple(k.split('/'))]})")
        print(f"busy / quiet: adaptive {ratio['adaptive']:.3f}, fixed {ratio['fixed']:.3f}; identical tokens: "
              f"{out['identical_tokens']}; load average {out['load_average']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
