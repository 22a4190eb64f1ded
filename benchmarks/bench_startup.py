"""Start-up: process start to the first token (or the first embedding), warm numba cache, medians of runs.

  python benchmarks/bench_startup.py [--repeat 5] [--threads 2]

Cases, each compiled once into a temporary folder: SmolLM2-135M resident (the default q4_1+q8_0 plan at 1G), the
same streamed (sequential at 200M), MiniLM (embed one sentence) and an ONNX graph (the synthetic GPT-2 exported
with past key/values). Beside them, the floor: `python -c "import numba"`. A warm-up run of each case fills
numba's cache first. For `run`, `first_token_s` is measured by the process itself from its start time (as the
kernel records it); for `embed` and the floor, the whole process's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def sh(cmd: list[str]) -> str:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{r.stderr[-3000:]}")
    return r.stdout


def compile_plan(out: Path, *overrides: str) -> str:
    text = sh([PY, "-m", "edge_rt_compiler.app", *overrides, f"out_dir={out}"])
    return [ln.split("plan: ", 1)[1] for ln in text.splitlines() if ln.startswith("plan: ")][-1]


def first_token(plan: str, threads: int) -> float:
    r = json.loads(sh([PY, "-m", "edge_rt_exec", "run", plan, "-p", "Hi", "-n", "1", "--json", "-t", str(threads)]))
    return float(r["first_token_s"])


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    sh(cmd)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-rt-startup-") as t:
        tmp = Path(t)
        src = tmp / "synth"
        sh([PY, "-m", "edge_rt_compiler.app", "model=synthetic_gpt2", f"out_dir={src}", "budget=64M"])
        hf = next((src / "_sources").iterdir())
        sh([PY, "scripts/export_onnx.py", "gpt2", str(tmp / "onnx"), "--hf-folder", str(hf), "--past"])
        sentence = tmp / "one.txt"
        sentence.write_text("A man is eating food.\n")
        plans = {
            "SmolLM2 resident (run, first token)": compile_plan(tmp / "a", "budget=1G", "strategy=greedy_grouping"),
            "SmolLM2 streamed (run, first token)": compile_plan(tmp / "a", "budget=200M", "strategy=sequential"),
            "ONNX GPT-2 with past (run, first token)": compile_plan(tmp / "b", "model=local",
                                                                    f"model.path={tmp / 'onnx' / 'model.onnx'}",
                                                                    "budget=256M", "max_context=256"),
        }
        minilm = compile_plan(tmp / "c", "model=minilm_l6", "budget=128M")
        cases = {name: (lambda p=p: first_token(p, args.threads)) for name, p in plans.items()}
        cases["MiniLM (embed one sentence, whole process)"] = lambda: wall(
            [PY, "-m", "edge_rt_exec", "embed", minilm, "--file", str(sentence), "--out", str(tmp / "e.npy"), "-t",
             str(args.threads)])
        cases["floor: python -c 'import numba' (whole process)"] = lambda: wall([PY, "-c", "import numba"])
        for fn in cases.values():  # warm numba's cache and the page cache
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeat):
            for name, fn in cases.items():
                times[name].append(fn())
    print(f"| case | median s | min-max s |  ({args.repeat} interleaved runs, {args.threads} threads, warm cache)")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f}-{max(ts):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
