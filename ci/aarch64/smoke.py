"""Smoke test of the emulated aarch64 environment; needs none of edge-rt's own code.

    ci/aarch64/run.sh python ci/aarch64/smoke.py [--reuse-cache]

The process started this way is only a driver: it runs the checks twice, each time in a new child process
(started through ci/aarch64/run.sh when under emulation, since the host cannot exec an aarch64 ELF without
binfmt_misc), both children sharing one numba cache folder:

1. cold: imports numpy, numba, psutil, tokenizers; compiles a ``@njit(cache=True, nogil=True,
   parallel=True)`` prange matvec and checks it against numpy; encodes text with a BPE tokenizer built in
   memory. The first call compiles (cache miss) and writes the cache.
2. warm: the same in a new process, whose first call must load the kernel from the cache (hit, no miss).

It prints one JSON line (machine, versions, numba's CPU name as configured / as LLVM detects it / as used
for code generation, threading layer, timings of both processes) and exits 0 if every check passed, 1 if
not. By default the shared cache folder is a fresh one inside $NUMBA_CACHE_DIR (removed afterwards), so
the cold process really compiles; --reuse-cache uses $NUMBA_CACHE_DIR itself, as the executor will.

Runs natively too (``python ci/aarch64/smoke.py`` on the host or on a Pi).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# BPE built in memory: merges turn "hello" and "world" into one token each.
_BPE_VOCAB = {
    "[UNK]": 0, "h": 1, "e": 2, "l": 3, "o": 4, "w": 5, "r": 6, "d": 7,
    "he": 8, "ll": 9, "hell": 10, "hello": 11, "wo": 12, "wor": 13, "ld": 14, "world": 15,
}
_BPE_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("w", "o"), ("wo", "r"), ("l", "d"),
               ("wor", "ld")]
_BPE_TEXT = "hello world held zero"
_BPE_EXPECTED = ["hello", "world", "he", "ld", "[UNK]", "e", "r", "o"]


# numba.prange once the child has imported numba: the driver process never imports numba (under emulation
# that alone costs seconds), so the kernel is a plain function here and is jitted in _child.
prange = range


def _matvec_py(a, x, out):  # pragma: no cover - compiled by numba in the child
    """out[i] = sum_j a[i, j] * x[j] with the rows in parallel."""
    n, k = a.shape
    for i in prange(n):
        acc = 0.0
        for j in range(k):
            acc += a[i, j] * x[j]
        out[i] = acc


def _child() -> dict:
    """One measured process: imports, kernel, tokenizer. Returns the report (printed as JSON)."""
    t0 = time.perf_counter()
    import platform

    import llvmlite
    import llvmlite.binding as llb
    import numba
    import numpy as np
    import psutil
    import tokenizers
    from numba.core.registry import cpu_target
    from tokenizers import Tokenizer, models, pre_tokenizers

    t_import = time.perf_counter() - t0
    checks: dict[str, bool] = {}

    # numba: a parallel kernel, compiled (or loaded from the cache) on the first call.
    global prange
    prange = numba.prange
    matvec = numba.njit(cache=True, nogil=True, parallel=True)(_matvec_py)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 512), dtype=np.float32)
    x = rng.standard_normal(512, dtype=np.float32)
    out = np.empty(256, dtype=np.float32)
    t1 = time.perf_counter()
    matvec(a, x, out)
    t_first = time.perf_counter() - t1
    t2 = time.perf_counter()
    matvec(a, x, out)
    t_second = time.perf_counter() - t2
    ref = a.astype(np.float64) @ x.astype(np.float64)
    max_err = float(np.max(np.abs(out - ref)))
    checks["matvec_matches_numpy"] = bool(np.allclose(out, a @ x, rtol=1e-5, atol=1e-4)) and max_err < 1e-3
    hits = sum(matvec.stats.cache_hits.values())
    misses = sum(matvec.stats.cache_misses.values())

    # tokenizers: a BPE model from an in-memory vocabulary and merge list.
    tok = Tokenizer(models.BPE(vocab=_BPE_VOCAB, merges=_BPE_MERGES, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    enc = tok.encode(_BPE_TEXT)
    checks["bpe_tokens"] = enc.tokens == _BPE_EXPECTED
    checks["bpe_ids"] = enc.ids == [_BPE_VOCAB[t] for t in _BPE_EXPECTED]

    codegen = cpu_target.target_context.codegen()
    triple, cpu_used, features_used = codegen.magic_tuple()
    proc = psutil.Process()
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {
            "numpy": np.__version__,
            "numba": numba.__version__,
            "llvmlite": llvmlite.__version__,
            "psutil": psutil.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "numba": {
            "cpu_name_config": numba.config.CPU_NAME,  # NUMBA_CPU_NAME
            "cpu_name_llvm_detected": llb.get_host_cpu_name(),  # "generic" under qemu-user
            "cpu_name_used": cpu_used,
            "cpu_features_used": features_used,
            "triple": triple,
            "threading_layer": numba.threading_layer(),
            "num_threads": numba.get_num_threads(),
            "cache_dir": numba.config.CACHE_DIR,
            "cache_hits": hits,
            "cache_misses": misses,
            "matvec_max_abs_err_vs_float64": max_err,
        },
        "tokenizer_ids": enc.ids,
        "psutil": {"cpu_count": psutil.cpu_count(), "rss_mb": round(proc.memory_info().rss / 2**20, 1)},
        "timings_s": {
            "import": round(t_import, 3),
            "first_call": round(t_first, 3),
            "second_call": round(t_second, 6),
        },
    }


def _child_command() -> list[str]:
    runner = os.environ.get("EDGE_RT_AARCH64_RUN")
    if runner:  # under emulation: re-enter through run.sh (same environment, qemu in front)
        return [runner, "python", os.path.abspath(__file__), "--child"]
    return [sys.executable, os.path.abspath(__file__), "--child"]


def _run_child(cmd: list[str], cache_dir: str, timeout: float) -> tuple[dict, float]:
    # run.sh sets NUMBA_CACHE_DIR from EDGE_RT_AARCH64_NUMBA_CACHE_DIR; a native child reads NUMBA_CACHE_DIR.
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, EDGE_RT_AARCH64_NUMBA_CACHE_DIR=cache_dir)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"ok": False, "error": f"child exited {proc.returncode}: {tail}", "stderr": proc.stderr[-4000:]}, wall
    return json.loads(lines[-1]), wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help="internal: run the checks in this process")
    p.add_argument("--reuse-cache", action="store_true",
                   help="use $NUMBA_CACHE_DIR itself instead of a fresh folder inside it")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per child process")
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(_child(), sort_keys=True), flush=True)
        return 0

    base = os.environ.get("NUMBA_CACHE_DIR") or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    cache_dir = base if args.reuse_cache else tempfile.mkdtemp(prefix="smoke-", dir=base)
    cmd = _child_command()
    try:
        cold, cold_wall = _run_child(cmd, cache_dir, args.timeout)
        warm, warm_wall = _run_child(cmd, cache_dir, args.timeout)
    finally:
        if not args.reuse_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)

    checks = {"cold_ok": bool(cold.get("ok")), "warm_ok": bool(warm.get("ok"))}
    if checks["cold_ok"] and checks["warm_ok"]:
        if not args.reuse_cache:
            checks["cold_compiled"] = cold["numba"]["cache_misses"] >= 1
        checks["warm_loaded_from_cache"] = (warm["numba"]["cache_hits"] >= 1
                                            and warm["numba"]["cache_misses"] == 0)
        checks["same_result_both_runs"] = cold["tokenizer_ids"] == warm["tokenizer_ids"]
        checks["children_used_cache_dir"] = (os.path.realpath(cold["numba"]["cache_dir"])
                                             == os.path.realpath(warm["numba"]["cache_dir"])
                                             == os.path.realpath(cache_dir))
    report = {
        "ok": all(checks.values()),
        "checks": checks,
        "cache_dir": cache_dir + ("" if args.reuse_cache else " (fresh, removed)"),
        "child_command": cmd,
    }
    if checks["cold_ok"]:
        for key in ("machine", "python", "versions", "numba", "psutil"):
            report[key] = cold[key]
        report["numba"] = {k: v for k, v in cold["numba"].items() if not k.startswith("cache_")}
    report["timings_s"] = {
        "cold_process": round(cold_wall, 2),
        "cold_first_call": cold.get("timings_s", {}).get("first_call"),
        "cold_import": cold.get("timings_s", {}).get("import"),
        "warm_process": round(warm_wall, 2),
        "warm_first_call": warm.get("timings_s", {}).get("first_call"),
        "warm_import": warm.get("timings_s", {}).get("import"),
        "kernel_call": warm.get("timings_s", {}).get("second_call"),
    }
    report["cache"] = {
        "cold": {k: cold.get("numba", {}).get(k) for k in ("cache_hits", "cache_misses")},
        "warm": {k: warm.get("numba", {}).get(k) for k in ("cache_hits", "cache_misses")},
    }
    for name, child in (("cold", cold), ("warm", warm)):
        if not child.get("ok"):
            report[f"{name}_error"] = child.get("error") or {k: v for k, v in child["checks"].items() if not v}
            if child.get("stderr"):
                sys.stderr.write(f"--- {name} child stderr ---\n{child['stderr']}\n")
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
