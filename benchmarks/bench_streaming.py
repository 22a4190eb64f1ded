"""Streamed decode: speculative_prefetch against sequential at a budget that leaves a quarter of the weights'
size for weight slots (the KV cache, activations and the runtime reserve come on top), each beside a lower bound
on its time per token. Side by side in one run, runs interleaved, medians.

    .venv/bin/python benchmarks/bench_streaming.py [--model smollm2_135m] [--repeat 5] [--max-tokens 32]

The bound per decoded token, from two parts timed apart from the token itself:

- read = one token's reads, as the streamed run made them: the executor's streamer times every pread it makes and
  the checksum of the group it read (`read_s` + `check_s` of `run --json`: the reader thread's for
  speculative_prefetch, beside the busy kernels; the main thread's for sequential, kernels idle), one pread per
  group the plan reads into a slot, from the weights file in the page cache (the runs read it one after another;
  nothing here reads cold). read_s over the run's forward passes (the prefill's, then one a decoded token) is a
  token's read time (the prefetching reader may have read up to two groups ahead when the run ends: counted as read,
  so as not to overstate a token's reads). The run's own reader is timed because reads timed apart beside a busy
  kernel thread are not the run's: read flat out, the reader is scheduled as a CPU hog, and on a loaded 2-core
  machine read 2-4x slower than the run's reader, which reads a group and sleeps.
- compute = the resident plan's decode time per token (kernels, sampling, the per-token Python) at the *same
  numba thread count* as the streamed run (on 2 cores speculative_prefetch leaves one core to its reader).
- overlapped (speculative_prefetch): t >= max(read, compute); sequential: t >= read + compute.

bound / measured is then at most 100%; a figure above it, or any single run faster than its own bound (its own
reads, the fastest compute seen), means the bound is wrong, and the benchmark says so and exits 1. For scale,
the same reads are also timed alone (the executor's GroupStreamer on each plan's groups and slot sizes,
consumed as fast as they come, no kernels running), with the bound they give. The thread counts of every
measurement are printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The history of the printing press"


def compile_plan(model: str, strategy: str, budget: str, out: Path, max_context: int) -> Path:
    r = subprocess.run([sys.executable, "-m", "edge_rt_compiler.app", f"model={model}", f"strategy={strategy}",
                        f"budget={budget}", f"max_context={max_context}", f"out_dir={out}"],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(r.stderr.strip())
    return Path([ln for ln in r.stdout.splitlines() if ln.startswith("plan: ")][0][6:])


def run(plan: Path, tokens: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "edge_rt_exec", "run", str(plan), "--prompt", PROMPT,
           "--max-tokens", str(tokens), "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr.strip())
    return json.loads(r.stdout)


def reads_alone(plan_path: Path, passes: int) -> float:
    """Seconds in pread per token of `passes` tokens' reads by the executor's GroupStreamer on the plan's groups
    and slot sizes, consumed as fast as they come, no kernels running (a reader thread with two slots, the
    calling thread with one, as the engine does). Imports no numba."""
    from edge_rt_exec.binfile import SafetensorsFile
    from edge_rt_exec.plan import load_plan
    from edge_rt_exec.weights import GroupStreamer

    plan = load_plan(plan_path)
    st = SafetensorsFile(plan.file("weights"))
    slots = [np.ones(s["nbytes"], np.uint8) for s in plan.arena["slots"]]  # touched, as the arena's are
    gs = GroupStreamer(st, plan.groups, slots, prefetch=len(slots) >= 2)
    try:
        for _ in range(passes):
            for g in gs.seq:
                gs.acquire(g)
                gs.release(g)
    finally:
        gs.close()
        st.close()
    per_token = sum(g.byte_end - g.byte_start for g in gs.seq)
    # the reader's read-ahead is in both; each read is followed by its group's checksum (check_s)
    return (gs.stats.read_s + gs.stats.check_s) * per_token / gs.stats.read_bytes


def streamed_groups(plan: Path) -> list[int]:
    """Bytes of each group the plan reads into a slot (every one of them, every forward pass)."""
    return [g["byte_end"] - g["byte_start"] for g in json.loads(plan.read_text())["groups"] if g["slot"] is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per run; also the tokens of reads timed alone")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="numba threads of every run (default: each plan's)")
    ap.add_argument("--out", default=None, help="artifacts folder (default: a temporary one)")
    a = ap.parse_args()
    if a.max_tokens < 2:
        sys.exit("--max-tokens: at least 2 (decode speed counts the tokens after the first)")
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="edge-rt-bench-"))
    resident = compile_plan(a.model, "greedy_grouping", "2G", out, a.max_context)
    weights = resident.parent / json.loads(resident.read_text())["files"]["weights"]
    arena = json.loads(resident.read_text())["arena"]
    fixed = arena["state"]["size"] + arena["activations"]["size"] + arena["reserve"]
    quarter = f"{(fixed + weights.stat().st_size // 4) // 1024}K"
    plans = {"resident": resident,
             "sequential": compile_plan(a.model, "sequential", quarter, out, a.max_context),
             "speculative_prefetch": compile_plan(a.model, "speculative_prefetch", quarter, out, a.max_context)}
    streamed = ("sequential", "speculative_prefetch")
    groups = {k: streamed_groups(plans[k]) for k in streamed}
    mbt = {(d := json.loads(p.read_text()))["strategy"]: d["max_batch_tokens"] for p in plans.values()}

    runs: dict[str, list[dict]] = {}  # "resident@N": the resident plan at N threads
    alone: dict[str, list[float]] = {k: [] for k in streamed}
    threads: dict[str, int] = {}
    for _ in range(a.repeat):  # interleaved, so drift on a shared machine hits every measurement alike
        for k in streamed:
            r = run(plans[k], a.max_tokens, a.threads)
            if threads.setdefault(k, r["threads"]) != r["threads"]:
                sys.exit(f"{k}: ran at {r['threads']} threads, before at {threads[k]}")
            runs.setdefault(k, []).append(r)
        for n in sorted({threads[k] for k in streamed}):  # the resident plan at each streamed run's count
            r = run(resident, a.max_tokens, n)
            if r["threads"] != n:
                sys.exit(f"the resident plan ran at {r['threads']} threads, not {n}")
            runs.setdefault(f"resident@{n}", []).append(r)
        for k in streamed:
            alone[k].append(reads_alone(plans[k], a.max_tokens))

    def ms_token(r: dict) -> float:  # decode time per token, as decode tok/s counts it
        return 1e3 / r["decode_tok_s"]

    def passes(r: dict) -> int:  # forward passes of a run: the prefill's chunks, then one a decoded token
        return math.ceil(r["prompt_tokens"] / mbt[r["strategy"]]) + len(r["tokens"]) - 1

    def per_pass(r: dict, field: str) -> float:  # ms of a run's stats per forward pass
        return 1e3 * r[field] / passes(r)

    def read_ms(r: dict, k: str) -> float:  # the run's own reads of one token: every pass reads the plan's groups,
        b = sum(groups[k])  # and the prefetching reader may have read up to two more (counted, so as not to
        ahead = 2 * max(groups[k]) if k == "speculative_prefetch" else 0  # overstate a token's reads)
        return 1e3 * (r["read_s"] + r.get("check_s", 0.0)) * b / (passes(r) * b + ahead)

    def med(key: str, f) -> float:  # noqa: ANN001
        return statistics.median(f(r) for r in runs[key])

    def med_pass(key: str, field: str) -> float:
        return statistics.median(per_pass(r, field) for r in runs[key])

    comp = {n: (med(f"resident@{n}", ms_token), min(ms_token(r) for r in runs[f"resident@{n}"]))
            for n in {threads[k] for k in streamed}}  # (median, fastest) ms per token

    def bound(k: str, rd: float, c: float) -> float:
        return max(rd, c) if k == "speculative_prefetch" else rd + c

    size = weights.stat().st_size
    print(f"model {a.model}, weights {size / 2**20:.0f} MB, budget {quarter} (a quarter of the weights for slots), "
          f"max_context {a.max_context}, {a.max_tokens} tokens a run, {a.repeat} runs each, interleaved, medians; "
          f"{len(os.sched_getaffinity(0))} cores")
    print(f"{'plan':<22}{'compute thr':>12}{'reader thr':>11}{'decode tok/s':>14}{'ms/token':>10}{'prefill ms':>12}"
          f"{'plan RSS MB':>13}  per forward pass, ms: read  wait  compute")
    rows = [(f"resident@{n}", "resident", n, "-") for n in sorted(comp)] + \
        [(k, k, threads[k], "1" if k == "speculative_prefetch" else "- (main)") for k in streamed]
    for key, name, n, rt in rows:
        print(f"{name:<22}{n:>12}{rt:>11}{med(key, lambda r: r['decode_tok_s']):>14.1f}{med(key, ms_token):>10.2f}"
              f"{med(key, lambda r: r['prefill_ms']):>12.0f}{med(key, lambda r: r['plan_rss_mb']):>13.1f}"
              f"{'':>22}{med_pass(key, 'read_s'):>6.2f}{med_pass(key, 'wait_s'):>6.2f}"
              f"{med_pass(key, 'compute_s'):>9.2f}")
    print("compute per token (the resident plan's decode): " + ", ".join(
        f"{n} numba thread{'s' if n > 1 else ''} {comp[n][0]:.2f} ms" for n in sorted(comp)))

    violated = []
    for k in streamed:
        b = sum(groups[k])
        t, rd, c = med(k, ms_token), med(k, lambda r: read_ms(r, k)), comp[threads[k]][0]  # noqa: B023
        bd, rd0 = bound(k, rd, c), statistics.median(alone[k]) * 1e3
        who, alone_by = (("its reader thread, beside the kernels", "GroupStreamer's reader thread")
                         if k == "speculative_prefetch" else
                         ("the main thread, kernels idle", "GroupStreamer on the calling thread"))
        print(f"{k}: {b / 2**20:.1f} MB a token in {len(groups[k])} preads of <= {max(groups[k]) / 2**20:.1f} MB; "
              f"in the run, by {who}: {rd:.2f} ms ({b / rd / 1e6:.1f} GB/s); the same reads alone ({alone_by}, "
              f"no kernels): {rd0:.2f} ms ({b / rd0 / 1e6:.1f} GB/s)")
        form = f"max(read {rd:.2f}, compute {c:.2f})" if k == "speculative_prefetch" else \
            f"read {rd:.2f} + compute {c:.2f}"
        print(f"  bound at {threads[k]} compute thread(s) + "
              f"{'1 reader thread' if k == 'speculative_prefetch' else 'no reader thread'}: {form} = {bd:.2f} "
              f"ms/token ({1e3 / bd:.1f} tok/s); measured {t:.2f} ms/token ({1e3 / t:.1f} tok/s); "
              f"bound / measured {100 * bd / t:.0f}% (with the reads alone: {100 * bound(k, rd0, c) / t:.0f}%)")
        if bd > t:
            violated.append(f"{k}: median {t:.2f} ms/token beats its bound {bd:.2f} ms")
        for i, r in enumerate(runs[k]):
            own = bound(k, read_ms(r, k), comp[threads[k]][1])
            if ms_token(r) < own:
                violated.append(f"{k}: run {i + 1} at {ms_token(r):.2f} ms/token beats its own bound {own:.2f} ms "
                                f"(its reads, the fastest compute)")
    ratio = med("speculative_prefetch", lambda r: r["decode_tok_s"]) / med("sequential", lambda r: r["decode_tok_s"])
    print(f"speculative_prefetch / sequential decode: {ratio:.2f}x (target >= 1.3x)")
    same = len({json.dumps(r["tokens"]) for rs in runs.values() for r in rs}) == 1
    print(f"same tokens in every run of every plan: {'yes' if same else 'NO'}")
    if violated:
        msg = "BOUND VIOLATED, so the bound is wrong:\n  " + "\n  ".join(violated)
        print(msg, flush=True)
        print(msg, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
