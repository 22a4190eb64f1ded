"""edge-rt against llama.cpp on the same SmolLM2-135M weights in each format, side by side in one run.

  python benchmarks/bench_llamacpp.py [--repeat 3] [--threads 2] [--new-tokens 64] [--formats F32,F16,Q8_0,Q4_0,Q4_1]

Needs llama.cpp's Python bindings (`bash ../shared/bench/llamacpp.sh setup`, once per machine), which also make
the F32/F16/Q8_0/Q4_0 GGUFs from the packaged Q4_1 with llama.cpp's own quantizer: every file holds the same
model in another layout. For each format, edge-rt compiles the GGUF as it is (`quant=keep`: the file's blocks,
never dequantized) into a resident plan (the row `Q4_0-aq8_0`: the Q4_0 file compiled with `act_quant=q8_0`, the
opt-in int8 activations, against llama.cpp's Q4_0, which also quantizes its activations), and both engines run
the same prompt (`llamacpp.sh`'s, 46 tokens, or `--prompt-fixture long`: 76) greedily for the same number of new
tokens at the same thread count. Runs are interleaved
(format by format, engine by engine, repeat by repeat) so drift on a shared machine hits both alike;
medians are reported. Both engines are measured the same way: the model loaded once, then the prompt and the
new tokens run several times in one process (the KV cache reset each time), medians. Decode tok/s counts the
tokens after the first (which prefill gives); prefill ms is the prompt's forward pass plus the first token.
Peak RSS is each process's own (`ru_maxrss`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench" / "llamacpp.sh"
PROMPT = ("The Raspberry Pi is a small single-board computer. Explain step by step how a transformer language "
          "model turns a prompt into new text, one token at a time, and why memory bandwidth matters when it "
          "runs on such a device.")
FORMATS = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"]
#: rows that run edge-rt with the opt-in int8 activations (`act_quant=q8_0`) against llama.cpp's base format
ACT_QUANT = {"Q4_0-aq8_0": "Q4_0"}


def sh(cmd: list[str], **kw) -> str:  # noqa: ANN003
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed:\n{r.stderr[-3000:]}")
    return r.stdout


def gguf_paths() -> dict[str, str]:
    out = sh(["bash", str(SHARED), "formats"])
    paths = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            p = Path(v.strip())
            paths[k.strip()] = str(p if p.is_absolute() else ROOT / p)
    return paths


def compile_plan(gguf: str, out: Path, act_quant: str = "none") -> str:
    text = sh([sys.executable, "-m", "edge_rt_compiler.app", "model=local", f"model.path={gguf}", "budget=1G",
               "strategy=greedy_grouping", "max_context=512", f"act_quant={act_quant}", f"out_dir={out}"])
    return [ln.split("plan: ", 1)[1] for ln in text.splitlines() if ln.startswith("plan: ")][-1]


#: Measured like llama.cpp's side: the model loaded once, then the prompt prefilled and the tokens generated three
#: times in one process (the KV cache reset each time), medians; peak RSS is the process's whole peak.
CHILD = r"""
import json, resource, statistics, sys
from edge_rt_exec.cli import _warm_runtime
from edge_rt_exec.generate import Session
from edge_rt_exec.memory import peak_rss
from edge_rt_exec.plan import load_plan
plan, threads, n, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
p = load_plan(plan)
_warm_runtime(p)
base = peak_rss()
s = Session(p, threads=threads)
ids = s.encode_prompt(prompt)
runs = [s.generate(ids, n, ignore_eos=True, reuse_cache=False) for _ in range(4)][1:]  # the first one warms up
print(json.dumps({"prefill_ms": statistics.median(r.prefill_ms for r in runs),
                  "decode_tok_s": statistics.median(r.decode_tok_s for r in runs), "prompt_tokens": len(ids),
                  "tokens": runs[0].tokens, "peak_rss_mb": peak_rss() / 2**20, "baseline_rss_mb": base / 2**20,
                  "first_prefill_ms": runs[0].prefill_ms}))
"""


def fixture_prompt(name: str) -> str:
    prompts = json.loads((ROOT / "tests" / "fixtures" / "smollm2_reference.json").read_text("utf-8"))["prompts"]
    for p in prompts:
        if p["name"] == name:
            return p["text"]
    raise SystemExit(f"bench_llamacpp: no prompt named {name!r} in tests/fixtures/smollm2_reference.json "
                     f"(there are: {', '.join(p['name'] for p in prompts)})")


def run_edge_rt(plan: str, threads: int, n: int, prompt: str) -> dict:
    out = sh([sys.executable, "-c", CHILD, plan, str(threads), str(n), prompt])
    return json.loads(out.strip().splitlines()[-1])


def run_llamacpp(fmt: str, threads: int, n: int, prompt: str) -> dict:
    out = sh(["bash", str(SHARED), "run", "--threads", str(threads), "--new-tokens", str(n), "--prompt", prompt, fmt])
    r = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    if "error" in r:
        raise SystemExit(f"llama.cpp {fmt}: {r['error']}")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help=f"comma-separated, of {', '.join(FORMATS + list(ACT_QUANT))} (Q4_0-aq8_0: edge-rt with "
                         "act_quant=q8_0, int8 activations, against llama.cpp's Q4_0)")
    ap.add_argument("--json", action="store_true", help="also print every run as JSON lines")
    ap.add_argument("--prompt", default=PROMPT, help="the prompt text (default: llamacpp.sh's, 46 tokens)")
    ap.add_argument("--prompt-fixture", default=None, metavar="NAME",
                    help="a prompt of tests/fixtures/smollm2_reference.json instead (`long`: 76 tokens)")
    args = ap.parse_args()
    prompt = fixture_prompt(args.prompt_fixture) if args.prompt_fixture else args.prompt
    formats = args.formats.split(",")
    paths = gguf_paths()
    with tempfile.TemporaryDirectory(prefix="edge-rt-vs-llamacpp-") as tmp:
        plans = {f: compile_plan(paths[ACT_QUANT.get(f, f)], Path(tmp) / f, "q8_0" if f in ACT_QUANT else "none")
                 for f in formats}
        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.repeat):
            for f in formats:
                runs.setdefault((f, "edge-rt"), []).append(run_edge_rt(plans[f], args.threads, args.new_tokens, prompt))
                runs.setdefault((f, "llama.cpp"), []).append(run_llamacpp(ACT_QUANT.get(f, f), args.threads,
                                                                          args.new_tokens, prompt))
    if args.json:
        for (f, eng), rs in runs.items():
            for r in rs:
                print(json.dumps({"format": f, "engine": eng, **{k: v for k, v in r.items() if k != "tokens"}}))

    def med(f: str, eng: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[(f, eng)]))

    print(f"SmolLM2-135M, {args.threads} threads, {args.new_tokens} new tokens, medians of {args.repeat} interleaved "
          "runs (llama.cpp: each run is itself the median of 3 in one process)")
    print("| format | edge-rt decode tok/s | llama.cpp decode tok/s | decode ratio | edge-rt prefill ms | "
          "llama.cpp prefill ms | prefill ratio (llama.cpp / edge-rt) | edge-rt peak RSS MB (baseline) | "
          "llama.cpp peak RSS MB | prompt tokens | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in formats:
        e_dec, l_dec = med(f, "edge-rt", "decode_tok_s"), med(f, "llama.cpp", "decode_tok_s")
        e_pre, l_pre = med(f, "edge-rt", "prefill_ms"), med(f, "llama.cpp", "prefill_ms")
        e = runs[(f, "edge-rt")][0]
        ll = runs[(f, "llama.cpp")][0]
        same = e["tokens"][:32] == ll["tokens"][:32]
        first_diff = next((i for i, (a, b) in enumerate(zip(e["tokens"], ll["tokens"])) if a != b), None)
        rss = f"{med(f, 'edge-rt', 'peak_rss_mb'):.0f} ({med(f, 'edge-rt', 'baseline_rss_mb'):.0f})"
        print(f"| {f} | {e_dec:.1f} | {l_dec:.1f} | {e_dec / l_dec:.2f}x | {e_pre:.0f} | {l_pre:.0f} | "
              f"{l_pre / e_pre:.2f}x | {rss} | {med(f, 'llama.cpp', 'peak_rss_mb'):.0f} | "
              f"{e['prompt_tokens']} / {ll['prompt_tokens']} | {'32/32' if same else f'first {first_diff}'} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
