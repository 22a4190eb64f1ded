"""The budget is real: the nine-point SmolLM2 sweep keeps peak RSS within baseline + budget, as the executor
reports it and as `/usr/bin/time -v` measures it from outside, and every plan gives the same tokens."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

MiB = 1 << 20
SWEEP = [(s, b) for b in ("256M", "512M", "1G") for s in ("sequential", "greedy_grouping", "speculative_prefetch")]


def _run_timed(plan, prompt: str, tokens: int) -> tuple[dict, int]:
    cmd = [sys.executable, "-m", "edge_rt_exec", "run", str(plan), "--prompt", prompt, "--max-tokens", str(tokens),
           "--json", "--threads", "2"]
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return out, kb * 1024


@pytest.mark.slow
def test_nine_point_sweep_within_budget_and_identical(smollm2_artifacts):
    import os

    if not os.path.exists("/usr/bin/time"):
        pytest.skip("/usr/bin/time is not installed (Debian package 'time')")
    from edge_rt_exec.plan import load_plan

    tokens = None
    for strategy, budget in SWEEP:
        plan_path = smollm2_artifacts(strategy, budget)
        plan = load_plan(plan_path)
        out, external_peak = _run_timed(plan_path, "The three primary colours are", 8)
        inside_peak = out["peak_rss_mb"] * MiB
        # the executor's own figure and the external one are the same kernel counter, seen twice
        assert abs(external_peak - inside_peak) <= 0.02 * external_peak + 2 * MiB, (strategy, budget)
        used = external_peak - out["baseline_rss_mb"] * MiB
        assert used <= plan.budget, f"{strategy} {budget}: {used / MiB:.1f} MB above baseline > budget"
        assert out["within_budget"]
        if tokens is None:
            tokens = out["tokens"]
        assert out["tokens"] == tokens, f"{strategy} {budget} changed the tokens"
