"""`edge-rt-exec bench`: every plan on the same input, each run in a fresh process (so its peak RSS is its
own), medians over `--repeat` runs, side by side in one table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from .errors import UserError
from .plan import load_plan

SENTENCES = [
    "A man is eating food.", "A man is riding a horse.", "The new movie is awesome.",
    "Edge devices have little memory, so models are streamed.", "The cat sits outside.",
    "A woman is playing the violin.", "Two men pushed carts through the woods.", "I love pasta.",
]


def measure_bandwidth(mb: int = 1024, repeat: int = 5) -> float:
    """DRAM read bandwidth in GB/s: every core sums its share of an array far larger than the caches (numpy
    releases the GIL in the reduction); median of runs. The roofline of a decode step, which reads every
    weight once."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(mb * 1024 * 1024 // 4, np.float32)
    n = os.cpu_count() or 1
    parts = np.array_split(a, n)
    ts = []
    with ThreadPoolExecutor(n) as pool:
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            ts.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(ts) / 1e9


def _run_one(plan_path: str, args: Any, sentences_file: str) -> dict[str, Any]:
    p = load_plan(plan_path)
    cmd = [sys.executable, "-m", "edge_rt_exec"]
    if p.model["kind"] == "decoder":
        cmd += ["run", str(p.path), "--prompt", args.prompt, "--max-tokens", str(args.max_tokens), "--json"]
    else:
        out = os.path.join(os.path.dirname(sentences_file), "emb.npy")
        cmd += ["embed", str(p.path), "--file", sentences_file, "--out", out, "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"bench: {_name(p)} failed: {msg}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _name(p: Any) -> str:
    return p.path.name if p.path is not None else "?"


def run_bench(args: Any) -> int:
    if args.repeat < 1:
        raise UserError("--repeat must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sentences = os.path.join(tmp, "sentences.txt")
        with open(sentences, "w", encoding="utf-8") as f:
            f.write("\n".join(SENTENCES * 4) + "\n")
        plans = [load_plan(p) for p in args.plans]
        runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plans))}
        # Interleave plans run by run, so drift on a shared machine hits every plan alike.
        for _ in range(args.repeat):
            for i, p in enumerate(plans):
                runs[i].append(_run_one(str(p.path), args, sentences))
        for i, p in enumerate(plans):
            rs = runs[i]

            def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
                return float(statistics.median(r[key] for r in rs)) if key in rs[0] else float("nan")

            _weights_bytes[_name(p)] = int(p.files.get("weights_size", 0))
            row = {"plan": _name(p), "model": p.model["name"], "strategy": p.strategy,
                   "budget_mb": round(p.budget / 2**20, 1), "groups": len(p.groups), "mode": p.weights_mode,
                   "planned_peak_mb": round(p.predicted["peak_bytes"] / 2**20, 1),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "baseline_rss_mb": med("baseline_rss_mb"),
                   "plan_rss_mb": max(r["plan_rss_mb"] for r in rs), "runs": len(rs)}
            row["within_budget"] = row["plan_rss_mb"] <= row["budget_mb"]
            if p.model["kind"] == "decoder":
                row.update(prefill_ms=med("prefill_ms"), decode_tok_s=med("decode_tok_s"), read_s=med("read_s"),
                           wait_s=med("wait_s"), compute_s=med("compute_s"), first_token_s=med("first_token_s"),
                           tokens=rs[0]["tokens"], same_tokens=all(r["tokens"] == rs[0]["tokens"] for r in rs))
            else:
                row.update(ms_per_sentence=med("ms_per_sentence"))
            rows.append(row)
    bw = measure_bandwidth()
    summary = _summary(rows, bw)
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}))
    else:
        print(format_rows(rows))
        for line in summary["lines"]:
            print(line)
    return 0 if all(r["within_budget"] for r in rows) else 1


def _summary(rows: list[dict[str, Any]], bw: float) -> dict[str, Any]:
    lines = []
    dec = [r for r in rows if "decode_tok_s" in r]
    if dec:
        fast = max(dec, key=lambda r: r["decode_tok_s"])
        lines.append(f"fastest: {fast['plan']} ({fast['decode_tok_s']:.1f} tok/s)")
        toks = {json.dumps(r["tokens"]) for r in dec if r["model"] == dec[0]["model"]}
        lines.append(f"same tokens across plans of {dec[0]['model']}: {'yes' if len(toks) == 1 else 'NO'}")
    least = min(rows, key=lambda r: r["plan_rss_mb"])
    lines.append(f"least memory: {least['plan']} ({least['plan_rss_mb']:.1f} MB above a "
                 f"{least['baseline_rss_mb']:.0f} MB baseline)")
    over = [r["plan"] for r in rows if not r["within_budget"]]
    lines.append("peak RSS <= baseline + budget: " + ("every plan" if not over else "EXCEEDED by " + ", ".join(over)))
    lines.append(f"measured read bandwidth: {bw:.1f} GB/s")
    for r in dec:
        if r["mode"] == "resident":
            p = load_plan_cached(r)
            roof = bw * 1e9 / p if p else 0
            pct = 100 * r["decode_tok_s"] / roof if roof else 0.0
            lines.append(f"{r['plan']}: decode {r['decode_tok_s']:.1f} tok/s = {pct:.0f}% of "
                         f"the bandwidth roofline ({roof:.1f} tok/s); DESIGN targets >= 75% and, for SmolLM2 fp32, "
                         ">= 40 tok/s (2.5x HF transformers' ~16) and prefill <= ~170 ms for 76 tokens")
    return {"lines": lines, "bandwidth_gbs": round(bw, 2)}


_weights_bytes: dict[str, int] = {}


def load_plan_cached(row: dict[str, Any]) -> int:
    return _weights_bytes.get(row["plan"], 0)


COLS = [("plan", "plan"), ("strategy", "strategy"), ("budget_mb", "budget MB"), ("groups", "groups"),
        ("planned_peak_mb", "planned MB"), ("plan_rss_mb", "measured MB"), ("baseline_rss_mb", "baseline MB"),
        ("prefill_ms", "prefill ms"), ("decode_tok_s", "decode tok/s"), ("read_s", "read s"),
        ("compute_s", "compute s"), ("ms_per_sentence", "ms/sentence")]


def format_rows(rows: list[dict[str, Any]]) -> str:
    cols = [(k, h) for k, h in COLS if any(k in r for r in rows)]
    body = [[_fmt(r.get(k, "")) for k, _ in cols] for r in rows]
    head = [h for _, h in cols]
    w = [max(len(x) for x in c) for c in zip(head, *body)]
    out = ["  ".join(h.ljust(x) for h, x in zip(head, w)), "  ".join("-" * x for x in w)]
    out += ["  ".join(c.ljust(x) for c, x in zip(row, w)) for row in body]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
