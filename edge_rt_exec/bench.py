"""`edge-rt-exec bench`: every plan on the same input, each run in a fresh process (so its peak RSS is its
own), runs interleaved across plans (drift on a shared machine hits every plan alike), medians and spread.

Plans may be given as plan files, artifact folders or sweep folders (every `*.plan.json` below them).
Output: a text table (default), markdown, CSV, JSON lines (`-o`), or one JSON object (`--json`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .plan import PLAN_SUFFIX, Plan, load_plan

SENTENCES = [
    "A man is eating food.", "A man is riding a horse.", "The new movie is awesome.",
    "Edge devices have little memory, so models are streamed.", "The cat sits outside.",
    "A woman is playing the violin.", "Two men pushed carts through the woods.", "I love pasta.",
]


def find_plans(paths: list[str]) -> list[Path]:
    """Plan files, and every plan under each folder given (artifact or sweep folders), sorted, once each."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(x for x in p.rglob(f"*{PLAN_SUFFIX}") if x.is_file())
            if not found:
                raise UserError(f"{p}: no *{PLAN_SUFFIX} in this folder or below; compile some with edge-rt-compile")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: plan not found; pass *{PLAN_SUFFIX} files, artifact folders or sweep folders")
    unique: dict[Path, Path] = {}
    for x in out:
        unique.setdefault(x.resolve(), x)
    return list(unique.values())


def measure_bandwidth(repeat: int = 5) -> float:
    """DRAM read bandwidth in GB/s: every core sums its share of an array larger than the caches (numpy releases
    the GIL in the reduction); median of runs. Sized to at most an eighth of the memory available (a 2 GB board
    may not have the 1 GiB a fixed probe would take), at least 64 MB."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    mb = int(max(64, min(512, psutil.virtual_memory().available / 8 / 2**20)))
    a = np.ones(mb * 2**20 // 4, np.float32)
    n = os.cpu_count() or 1
    parts = np.array_split(a, n)
    ts = []
    with ThreadPoolExecutor(n) as pool:
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            ts.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(ts) / 1e9


def _run_one(p: Plan, args: Any, sentences_file: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edge_rt_exec"]
    if p.model["kind"] != "encoder":
        cmd += ["run", str(p.path), "--prompt", args.prompt, "--max-tokens", str(args.max_tokens), "--json",
                "--ignore-eos"]
    else:
        out = os.path.join(os.path.dirname(sentences_file), "emb.npy")
        cmd += ["embed", str(p.path), "--file", sentences_file, "--out", out, "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if getattr(args, "fixed_threads", False) and p.model["kind"] != "encoder":
        cmd += ["--fixed-threads"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"bench: {p.path.name if p.path else '?'} failed: {msg}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _fmt_format(p: Plan) -> str:
    """The weight formats of a plan, largest share first ("q4_1+q8_0+f32")."""
    return "+".join(f for f, _ in sorted(p.weight_formats().items(), key=lambda kv: -kv[1]))


def run_bench(args: Any) -> int:
    if args.repeat < 1:
        raise UserError("--repeat must be at least 1")
    plans = [load_plan(p) for p in find_plans(args.plans)]
    names = [str(p.path.relative_to(Path.cwd())) if p.path and p.path.is_relative_to(Path.cwd()) else
             str(p.path) for p in plans]
    runs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plans))}
    with tempfile.TemporaryDirectory() as tmp:
        sentences = os.path.join(tmp, "sentences.txt")
        with open(sentences, "w", encoding="utf-8") as f:
            f.write("\n".join(SENTENCES * 4) + "\n")
        for _ in range(args.repeat):
            for i, p in enumerate(plans):
                runs[i].append(_run_one(p, args, sentences))
    rows = [_row(p, n, runs[i]) for i, (p, n) in enumerate(zip(plans, names))]
    bw = measure_bandwidth()
    summary = _summary(rows, bw)
    fmt = "json" if args.json else args.output
    if fmt == "json":
        print(json.dumps({"rows": rows, "summary": summary}))
    elif fmt == "jsonl":
        for r in rows:
            print(json.dumps(r))
    elif fmt == "csv":
        print(format_csv(rows), end="")
    else:
        print(format_table(rows, markdown=fmt == "md"))
        for line in summary["lines"]:
            print(("- " if fmt == "md" else "") + line)
    return 0 if all(r["within_budget"] for r in rows) else 1


def _row(p: Plan, name: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in rs)) if key in rs[0] else float("nan")

    def spread(key: str) -> list[float]:
        v = [r[key] for r in rs]
        return [round(min(v), 3), round(max(v), 3)]

    row: dict[str, Any] = {
        "plan": name, "model": p.model["name"], "format": _fmt_format(p), "quant": p.quant, "strategy": p.strategy,
        "budget_mb": round(p.budget / 2**20, 1), "groups": len(p.groups), "mode": p.weights_mode,
        "slots": len(p.arena.get("slots", [])),
        "planned_peak_mb": round(p.predicted["peak_bytes"] / 2**20, 1),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "baseline_rss_mb": med("baseline_rss_mb"),
        "plan_rss_mb": max(r["plan_rss_mb"] for r in rs), "runs": len(rs),
        "weights_bytes": int(p.files.get("weights_size", 0)),
        "read_bytes_per_token": int(p.predicted.get("read_bytes_per_token", 0)),
    }
    row["within_budget"] = row["plan_rss_mb"] <= row["budget_mb"]
    if "decode_tok_s" in rs[0]:
        ms = [1e3 / r["decode_tok_s"] if r["decode_tok_s"] else float("inf") for r in rs]
        pred = float(p.predicted.get("decode_ms_per_token", float("nan")))
        measured = float(statistics.median(ms))
        row.update(prefill_ms=med("prefill_ms"), prefill_ms_range=spread("prefill_ms"),
                   decode_tok_s=med("decode_tok_s"), decode_tok_s_range=spread("decode_tok_s"),
                   predicted_ms_per_token=round(pred, 3), measured_ms_per_token=round(measured, 3),
                   prediction_error=round((pred - measured) / measured, 3) if measured else None,
                   read_s=med("read_s"), wait_s=med("wait_s"), compute_s=med("compute_s"),
                   first_token_s=med("first_token_s"), tokens=rs[0]["tokens"],
                   same_tokens=all(r["tokens"] == rs[0]["tokens"] for r in rs))
    else:
        row.update(ms_per_sentence=med("ms_per_sentence"), ms_per_sentence_range=spread("ms_per_sentence"))
    return row


def _summary(rows: list[dict[str, Any]], bw: float) -> dict[str, Any]:
    lines = []
    dec = [r for r in rows if "decode_tok_s" in r]
    if dec:
        fast = max(dec, key=lambda r: r["decode_tok_s"])
        lines.append(f"fastest: {fast['plan']} ({fast['decode_tok_s']:.1f} tok/s)")
        for model in sorted({r["model"] for r in dec}):
            toks = {json.dumps(r["tokens"]) for r in dec if r["model"] == model and r["quant"] == dec[0]["quant"]}
            lines.append(f"same tokens across the {dec[0]['quant']} plans of {model}: "
                         f"{'yes' if len(toks) == 1 else 'NO'}")
    least = min(rows, key=lambda r: r["plan_rss_mb"])
    lines.append(f"least memory: {least['plan']} ({least['plan_rss_mb']:.1f} MB above a "
                 f"{least['baseline_rss_mb']:.0f} MB baseline)")
    over = [r["plan"] for r in rows if not r["within_budget"]]
    lines.append("peak RSS <= baseline + budget: " + ("every plan" if not over else "EXCEEDED by " + ", ".join(over)))
    lines.append(f"measured memory read bandwidth (all cores): {bw:.1f} GB/s")
    for r in dec:
        if r["mode"] == "resident" and r["weights_bytes"]:
            roof = bw * 1e9 / r["weights_bytes"]
            lines.append(f"{r['plan']}: decode {r['decode_tok_s']:.1f} tok/s = {100 * r['decode_tok_s'] / roof:.0f}% "
                         f"of the bandwidth roofline ({roof:.1f} tok/s for {r['weights_bytes'] / 2**20:.0f} MB per "
                         "token)")
    return {"lines": lines, "bandwidth_gbs": round(bw, 2)}


COLS = [("plan", "plan"), ("model", "model"), ("format", "format"), ("strategy", "strategy"),
        ("budget_mb", "budget MB"), ("groups", "groups"), ("planned_peak_mb", "planned MB"),
        ("plan_rss_mb", "measured MB"), ("baseline_rss_mb", "baseline MB"), ("prefill_ms", "prefill ms"),
        ("decode_tok_s", "decode tok/s"), ("decode_tok_s_range", "min-max"),
        ("predicted_ms_per_token", "predicted ms/tok"), ("measured_ms_per_token", "measured ms/tok"),
        ("prediction_error", "error"), ("ms_per_sentence", "ms/sentence"), ("ms_per_sentence_range", "min-max")]


def _cell(v: Any) -> str:
    if isinstance(v, list):
        return "-".join(_cell(x) for x in v)
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    cols = [(k, h) for k, h in COLS if any(k in r for r in rows)]
    body = [[_cell(r.get(k, "")) for k, _ in cols] for r in rows]
    head = [h for _, h in cols]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(row) + " |" for row in body])
    w = [max(len(x) for x in c) for c in zip(head, *body)]
    out = ["  ".join(h.ljust(x) for h, x in zip(head, w)), "  ".join("-" * x for x in w)]
    out += ["  ".join(c.ljust(x) for c, x in zip(row, w)) for row in body]
    return "\n".join(out)


def format_csv(rows: list[dict[str, Any]]) -> str:
    keys = [k for k, _ in COLS if any(k in r for r in rows)] + ["within_budget", "peak_rss_mb", "runs"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for r in rows:
        w.writerow([_cell(r.get(k, "")) for k in keys])
    return buf.getvalue()
