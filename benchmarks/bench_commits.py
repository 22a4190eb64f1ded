"""The working tree against an earlier commit, side by side in one run: same models, same prompts, same
machine, interleaved runs, medians.

  python benchmarks/bench_commits.py BASE_REF [--repeat 5] [--threads 2]
      [--cases smollm2,smollm2-default,minilm,onnx-gpt2]

Each tree compiles its own plans with its own compiler (float32 weights in both except in `smollm2-default`, so
the comparison is of the engines, not of the formats) and runs them with its own executor through the command
line, so nothing but the code differs. Cases:

- `smollm2`: SmolLM2-135M, resident 1G plan, the llama.cpp benchmark prompt as a chat message, 64 new tokens:
  decode tok/s and prefill ms (both trees' first and only run of the process, as `edge-rt-exec run` is used);
- `smollm2-default`: the same prompt on each tree's default compile (`edge-rt-compile model=smollm2_135m`: the
  Pi target's budget and strategy, and each tree's default weight format), also peak RSS;
- `minilm`: all-MiniLM-L6-v2, 32 sentences: ms per sentence;
- `onnx-gpt2`: the synthetic GPT-2 exported to ONNX with past key/values (`scripts/export_onnx.py`): decode
  ms per step (the per-op overhead of an ONNX graph).
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
PY = sys.executable
PROMPT = ("The Raspberry Pi is a small single-board computer. Explain step by step how a transformer language "
          "model turns a prompt into new text, one token at a time, and why memory bandwidth matters when it "
          "runs on such a device.")


def sh(cmd: list[str], tree: Path, **kw) -> str:  # noqa: ANN003
    env = dict(os.environ, PYTHONPATH=str(tree))
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed in {tree}:\n{r.stderr[-3000:]}")
    return r.stdout


def has_quant(tree: Path) -> bool:
    return "quant" in (tree / "conf" / "config.yaml").read_text()


def compile_plans(tree: Path, out: Path, cases: list[str], onnx_dir: Path) -> dict[str, str]:
    q = ["quant=f32"] if has_quant(tree) else []
    plans: dict[str, str] = {}

    def compile_one(name: str, args: list[str], fmt: list[str] = q) -> None:
        text = sh([PY, "-m", "edge_rt_compiler.app", *args, f"out_dir={out / name}", *fmt], tree)
        plans[name] = [ln.split("plan: ", 1)[1] for ln in text.splitlines() if ln.startswith("plan: ")][-1]

    if "smollm2" in cases:
        compile_one("smollm2", ["model=smollm2_135m", "budget=1G", "strategy=greedy_grouping", "max_context=512"])
    if "smollm2-default" in cases:  # each tree's own defaults, formats included: what `edge-rt-compile` gives
        compile_one("smollm2-default", ["model=smollm2_135m"], [])
    if "minilm" in cases:
        compile_one("minilm", ["model=minilm_l6", "budget=256M", "strategy=greedy_grouping"])
    if "onnx-gpt2" in cases:
        compile_one("onnx-gpt2", ["model=local", f"model.path={onnx_dir / 'model.onnx'}", "budget=256M",
                                  "strategy=greedy_grouping", "max_context=256"])
    return plans


def measure(tree: Path, case: str, plan: str, threads: int, sentences: Path, tmp: Path) -> dict[str, float]:
    base = [PY, "-m", "edge_rt_exec"]
    if case == "minilm":
        r = json.loads(sh(base + ["embed", plan, "--file", str(sentences), "--out", str(tmp / "e.npy"), "--json",
                                  "--threads", str(threads)], tree).strip().splitlines()[-1])
        return {"ms_per_sentence": r["ms_per_sentence"]}
    smollm2 = case.startswith("smollm2")
    n = 64 if smollm2 else 32
    prompt = PROMPT if smollm2 else "Once upon a time"
    chat = ["--chat"] if smollm2 else []  # the instruct model ends a bare prompt at once; both trees agree
    r = json.loads(sh(base + ["run", plan, "--prompt", prompt, "--max-tokens", str(n), "--json", "--threads",
                              str(threads), *chat], tree).strip().splitlines()[-1])
    out = {"decode_tok_s": r["decode_tok_s"], "prefill_ms": r["prefill_ms"], "tokens": len(r["tokens"])}
    if case == "smollm2-default":
        out["peak_rss_mb"] = r["peak_rss_mb"]
    if case == "onnx-gpt2":
        out = {"decode_ms_per_step": 1e3 / r["decode_tok_s"] if r["decode_tok_s"] else float("inf"),
               "tokens": len(r["tokens"])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="git ref to compare the working tree with")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="smollm2,minilm,onnx-gpt2")
    ap.add_argument("--raw", action="store_true", help="also print every run")
    args = ap.parse_args()
    cases = args.cases.split(",")
    with tempfile.TemporaryDirectory(prefix="edge-rt-bench-") as t:
        tmp = Path(t)
        sha = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        base_tree = tmp / f"base-{sha}"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {f"base {sha}": base_tree, "working tree": ROOT}
            onnx_dir = tmp / "onnx-gpt2"
            if "onnx-gpt2" in cases:
                # the synthetic GPT-2's HF folder (written by a compile), exported once with past key/values
                src = tmp / "synth"
                sh([PY, "-m", "edge_rt_compiler.app", "model=synthetic_gpt2", f"out_dir={src}", "budget=64M"], ROOT)
                hf = next((src / "_sources").iterdir())
                sh([PY, "scripts/export_onnx.py", "gpt2", str(onnx_dir), "--hf-folder", str(hf), "--past"], ROOT)
            plans = {name: compile_plans(tree, tmp / name.replace(" ", "-"), cases, onnx_dir)
                     for name, tree in trees.items()}
            sentences = tmp / "sentences.txt"
            sentences.write_text("\n".join(["A man is eating food.", "The new movie is awesome.",
                                            "Edge devices have little memory.", "A woman plays the violin."] * 8))
            results: dict[tuple[str, str], list[dict[str, float]]] = {}
            for _ in range(args.repeat):  # interleaved: drift on a shared machine hits both trees alike
                for case in cases:
                    for name, tree in trees.items():
                        results.setdefault((case, name), []).append(
                            measure(tree, case, plans[name][case], args.threads, sentences, tmp))
            print(f"| case | metric | {' | '.join(trees)} | ratio (working / base) |")
            print("|---|---|" + "---|" * (len(trees) + 1))
            for case in cases:
                for metric in results[(case, next(iter(trees)))][0]:
                    if metric == "tokens":
                        continue
                    med = [statistics.median(r[metric] for r in results[(case, name)]) for name in trees]
                    ratio = f"{med[1] / med[0]:.2f}" if med[0] else "n/a"
                    print(f"| {case} | {metric} | " + " | ".join(f"{m:.2f}" for m in med) + f" | {ratio} |")
            print(f"(medians of {args.repeat} interleaved runs, {args.threads} threads)")
            if args.raw:
                print(json.dumps({f"{c}/{n}": rs for (c, n), rs in results.items()}))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
