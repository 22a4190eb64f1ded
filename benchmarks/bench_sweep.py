"""Partial residency against today's strategies: a sweep of budgets between the minimum and the model's size,
each budget compiled with sequential, greedy_grouping and speculative_prefetch (today's) and partial_residency,
every plan then run by `edge-rt-exec bench` in one invocation (fresh process per run, runs interleaved across
plans, medians), side by side.

    .venv/bin/python benchmarks/bench_sweep.py [--budgets 192M 352M 512M] [--quant f32] [--repeat 3] [-n 32]

Printed per plan: weights resident (mapped, read once) and streamed, bytes read per token (the bytes of the
groups the plan reads into a slot every forward pass: what the executor's streamer preads per token), decode
ms/token measured and predicted, the plan's peak RSS over the baseline. Then, per budget, partial residency
against the best of today's plans at that budget: its bytes read per token as a share of theirs (they all read
the whole model) and its decode speed-up over the fastest of them. At the middle budget the issue asks for
<= 60% of the reads and a faster decode; the last lines say whether they hold (exit 1 if not).
quant=f32 by default: SmolLM2 is then 513 MB, so that streaming matters (the packaged Q4_1 is resident at 160M).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TODAY = ("sequential", "greedy_grouping", "speculative_prefetch")
NEW = "partial_residency"
MB = 2**20


def compile_plan(model: str, strategy: str, budget: str, quant: str, out: Path) -> Path:
    r = subprocess.run([sys.executable, "-m", "edge_rt_compiler.app", f"model={model}", f"strategy={strategy}",
                        f"budget={budget}", f"quant={quant}", f"out_dir={out}"], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode != 0:
        sys.exit(r.stderr.strip())
    return Path([ln for ln in r.stdout.splitlines() if ln.startswith("plan: ")][0][6:])


def plan_figures(path: Path) -> dict:
    """(resident bytes, bytes read per token) from the plan itself."""
    from edge_rt_exec.plan import load_plan

    p = load_plan(path)
    read = sum(g.byte_end - g.byte_start for g in p.groups if g.slot is not None)
    return {"resident": p.arena.get("resident_weights", 0), "read": read, "slots": len(p.arena.get("slots", [])),
            "total": p.files.get("weights_size", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--budgets", nargs="+", default=["192M", "352M", "512M"])
    ap.add_argument("--quant", default="f32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-n", "--max-tokens", type=int, default=32)
    ap.add_argument("-t", "--threads", default=None, help="as for bench (default: each plan's own)")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench_sweep")
    a = ap.parse_args()

    plans: dict[tuple[str, str], Path] = {}
    for budget in a.budgets:
        for s in (*TODAY, NEW):
            plans[(budget, s)] = compile_plan(a.model, s, budget, a.quant, a.out)
            print(f"compiled {plans[(budget, s)].name}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "edge_rt_exec", "bench", *map(str, plans.values()), "--json",
           "--repeat", str(a.repeat), "-n", str(a.max_tokens)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        sys.exit(r.stderr.strip())
    bench = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {Path(x["plan"]).name: x for x in bench["rows"]}

    print(f"{a.model} quant={a.quant}, {a.max_tokens} tokens, {a.repeat} interleaved runs per plan (medians), "
          "one bench invocation\n")
    head = ("budget", "strategy", "slots", "resident MB", "read MB/token", "decode ms/token", "predicted",
            "plan RSS MB")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    fig: dict[tuple[str, str], dict] = {}
    for (budget, s), path in plans.items():
        row, f = rows[path.name], plan_figures(path)
        fig[(budget, s)] = {**f, "ms": row["measured_ms_per_token"], "tokens": row["tokens"]}
        print(f"| {budget} | {s} | {f['slots']} | {f['resident'] / MB:.0f} | {f['read'] / MB:.0f} | "
              f"{row['measured_ms_per_token']:.1f} | {row['predicted_ms_per_token']:.1f} | {row['plan_rss_mb']:.0f} |")
    print()
    ok = True
    tokens = {json.dumps(v["tokens"]) for v in fig.values()}
    print(f"same tokens across all {len(fig)} plans: {'yes' if len(tokens) == 1 else 'NO'}")
    ok &= len(tokens) == 1
    print("peak RSS <= baseline + budget: " + ("every plan" if all(x["within_budget"] for x in bench["rows"])
                                                else "EXCEEDED"))
    ok &= all(x["within_budget"] for x in bench["rows"])
    middle = a.budgets[len(a.budgets) // 2]
    for budget in a.budgets:
        new = fig[(budget, NEW)]
        best = min(TODAY, key=lambda s: fig[(budget, s)]["ms"])
        old = fig[(budget, best)]
        share = new["read"] / old["read"] if old["read"] else 0.0
        speed = old["ms"] / new["ms"]
        line = (f"{budget}: partial_residency reads {new['read'] / MB:.0f} MB/token = {100 * share:.0f}% of today's "
                f"{old['read'] / MB:.0f} MB; decode {new['ms']:.1f} ms/token vs the best of today's ({best}) "
                f"{old['ms']:.1f}: {speed:.2f}x")
        if budget == middle:
            hold = share <= 0.60 and speed > 1.0
            ok &= hold
            line += f"  [middle budget: <= 60% reads and faster: {'yes' if hold else 'NO'}]"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
