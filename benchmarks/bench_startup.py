"""Start-up: process start to the first token (or the embedding written), warm numba cache, medians of runs.

  python benchmarks/bench_startup.py [--repeat 5] [--threads 2]

Cases, each compiled once into a temporary folder: SmolLM2-135M resident (the default q4_1+q8_0 plan at 1G), the
same streamed (sequential at 200M), MiniLM (embed one sentence) and an ONNX graph (the synthetic GPT-2 exported
with past key/values). Beside them, the floor: `python -c "import numba"`. A warm-up run of each case fills
numba's cache and the page cache first; then the cases run interleaved. The executor's bytecode is compiled
first, as `pip install` does. Two figures per case: the process's own
`first_token_s` (`run --json`) or `output_ready_s` (`embed --json`), from its start as the kernel recorded it
(/proc/self/stat against CLOCK_BOOTTIME, to ~10 ms), and the whole process, spawn to exit, timed from outside.
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


def timed(cmd: list[str], key: str | None) -> tuple[float, float, float]:
    """(the process's own start-to-result figure `key` from its --json line, spawn to exit, its peak RSS MB);
    nan where the process reports nothing."""
    t0 = time.perf_counter()
    out = sh(cmd)
    whole = time.perf_counter() - t0
    r = json.loads(out.strip().splitlines()[-1]) if key else {}
    return float(r.get(key, "nan")) if key else float("nan"), whole, float(r.get("peak_rss_mb", "nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # Bytecode as `pip install` writes it for an installed package: an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would otherwise recompile the executor's sources on every start (~0.07 s).
    sh([PY, "-m", "compileall", "-q", "edge_rt_exec"])
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
        t = str(args.threads)
        cases = {name: (lambda p=p: timed([PY, "-m", "edge_rt_exec", "run", p, "-p", "Hi", "-n", "1", "--json",
                                           "-t", t], "first_token_s")) for name, p in plans.items()}
        cases["MiniLM (embed one sentence)"] = lambda: timed(
            [PY, "-m", "edge_rt_exec", "embed", minilm, "--file", str(sentence), "--out", str(tmp / "e.npy"), "--json",
             "-t", t], "output_ready_s")
        cases["floor: python -c 'import numba'"] = lambda: timed([PY, "-c", "import numba"], None)
        for fn in cases.values():  # warm numba's cache and the page cache
            fn()
        times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cases}
        for _ in range(args.repeat):
            for name, fn in cases.items():
                times[name].append(fn())
    print(f"({args.repeat} interleaved runs, {args.threads} threads, warm cache; medians, min-max)")
    print("| case | start to first token / embedding, s | whole process, s | peak RSS, MB |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        own, whole, peak = ([x[i] for x in ts] for i in range(3))
        cell = "-" if own[0] != own[0] else f"{statistics.median(own):.3f} ({min(own):.3f}-{max(own):.3f})"
        mb = "-" if peak[0] != peak[0] else f"{statistics.median(peak):.0f}"
        print(f"| {name} | {cell} | {statistics.median(whole):.3f} ({min(whole):.3f}-{max(whole):.3f}) | {mb} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
