"""Streamed decode: speculative_prefetch against sequential at a budget that leaves a quarter of the weights'
size for weight slots (the KV cache, activations and the runtime reserve come on top), beside the roofline
min(read bandwidth, compute). Side by side in one run, medians over runs.

    .venv/bin/python benchmarks/bench_streaming.py [--model smollm2_135m] [--repeat 5] [--max-tokens 32]

The roofline of a streamed token is max(bytes read / pread bandwidth, the resident plan's compute time):
with perfect overlap a token costs the slower of the two. The read time is one token's group reads, as
the plan makes them, on the same weights file (page cache, as on a board whose RAM holds the file; an SD card is
far slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def compile_plan(model: str, strategy: str, budget: str, out: Path, max_context: int) -> Path:
    r = subprocess.run([sys.executable, "-m", "edge_rt_compiler.app", f"model={model}", f"strategy={strategy}",
                        f"budget={budget}", f"max_context={max_context}", f"out_dir={out}"],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(r.stderr.strip())
    return Path([ln for ln in r.stdout.splitlines() if ln.startswith("plan: ")][0][6:])


def run(plan: Path, tokens: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "edge_rt_exec", "run", str(plan), "--prompt", "The history of the printing press",
           "--max-tokens", str(tokens), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr.strip())
    return json.loads(r.stdout)


def pread_seconds(plan: Path, repeat: int = 5) -> tuple[float, int]:
    """One token's reads as the streamed plan makes them: every group's byte range, in order, into one buffer
    the size of the plan's largest slot (page cache). Returns (median seconds, bytes)."""
    p = json.loads(plan.read_text())
    ranges = [(g["byte_start"], g["byte_end"]) for g in p["groups"]]
    buf = np.ones(max(b - a for a, b in ranges), np.uint8)  # touched once: the executor's slot is too
    fd = os.open(plan.parent / p["files"]["weights"], os.O_RDONLY)
    ts = []
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            for a, b in ranges:
                off = a
                while off < b:
                    off += os.preadv(fd, [memoryview(buf)[: b - off]], off)
            ts.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return statistics.median(ts), sum(b - a for a, b in ranges)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="artifacts folder (default: a temporary one)")
    a = ap.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="edge-rt-bench-"))
    resident = compile_plan(a.model, "greedy_grouping", "2G", out, a.max_context)
    weights = resident.parent / json.loads(resident.read_text())["files"]["weights"]
    arena = json.loads(resident.read_text())["arena"]
    fixed = arena["state"]["size"] + arena["activations"]["size"] + arena["reserve"]
    quarter = f"{(fixed + weights.stat().st_size // 4) // 1024}K"
    plans = {"resident": resident,
             "sequential": compile_plan(a.model, "sequential", quarter, out, a.max_context),
             "speculative_prefetch": compile_plan(a.model, "speculative_prefetch", quarter, out, a.max_context)}
    runs: dict[str, list[dict]] = {k: [] for k in plans}
    for _ in range(a.repeat):  # interleaved, so drift on a shared machine hits every plan alike
        for k, p in plans.items():
            runs[k].append(run(p, a.max_tokens, a.threads))
    med = {k: {m: statistics.median(r[m] for r in rs) for m in ("decode_tok_s", "prefill_ms", "plan_rss_mb",
                                                                  "read_s", "wait_s", "compute_s")}
           for k, rs in runs.items()}
    size = weights.stat().st_size
    t_read, read_bytes = pread_seconds(plans["speculative_prefetch"])
    bw = read_bytes / t_read / 1e9
    t_compute = 1.0 / med["resident"]["decode_tok_s"]
    roof = 1.0 / max(t_read, t_compute)
    print(f"model {a.model}, weights {size / 2**20:.0f} MB, budget {quarter} (a quarter of the weights for slots), "
          f"max_context {a.max_context}, "
          f"{a.repeat} runs each, medians")
    print(f"{'plan':<22}{'decode tok/s':>14}{'prefill ms':>12}{'plan RSS MB':>13}{'read s':>9}{'wait s':>9}"
          f"{'compute s':>11}")
    for k, m in med.items():
        print(f"{k:<22}{m['decode_tok_s']:>14.1f}{m['prefill_ms']:>12.0f}{m['plan_rss_mb']:>13.1f}{m['read_s']:>9.3f}"
              f"{m['wait_s']:>9.3f}{m['compute_s']:>11.3f}")
    ratio = med["speculative_prefetch"]["decode_tok_s"] / med["sequential"]["decode_tok_s"]
    print(f"speculative_prefetch / sequential decode: {ratio:.2f}x (target >= 1.3x)")
    print(f"pread of one token's groups ({read_bytes / 2**20:.0f} MB) {t_read * 1e3:.1f} ms ({bw:.1f} GB/s); "
          f"resident compute {t_compute * 1e3:.1f} "
          f"ms/token; roofline {roof:.1f} tok/s; speculative_prefetch at "
          f"{100 * med['speculative_prefetch']['decode_tok_s'] / roof:.0f}% of it (target >= 80%)")
    same = len({json.dumps(r["tokens"]) for rs in runs.values() for r in rs}) == 1
    print(f"same tokens in every run of every plan: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
