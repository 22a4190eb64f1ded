"""The budget is real, with the plan filled: for every strategy at a tight, a middle and a resident budget,
SmolLM2 (the packaged Q4_1 GGUF, max_context 512, max_batch_tokens 128) takes a prompt of exactly
max_batch_tokens tokens (the largest activations) and generates until the context is full (every KV position,
every weight slot), and peak RSS stays within baseline + budget. Every plan gives the same tokens.

Two witnesses, both required (a missing one fails, never skips):
- peak RSS from outside: `/usr/bin/time -v` around the run (the executor's own figure must agree);
- the baseline from outside: a separate process makes the same imports, warms the same plan's kernels, starts
  the thread pool and loads the tokenizer, as the executor does before it takes its baseline, and reports its
  own peak RSS (the second time: the first fills numba's cache, as a compile's peak would hide the plan's
  memory). The run's reported baseline must agree with it (an executor that allocated plan memory before
  measuring its baseline would hide it there), and the budget is checked against the external baseline.

The arena is `np.empty` (only touched pages count), which is why the plan must be filled: a short prompt and a
few tokens touch a few KV rows and could hide an overshoot at long context or a long prefill.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

MiB = 1 << 20
MAX_CONTEXT, BATCH = 512, 128
#: (strategy, budget): 48M is a few MB above the smallest plans (33.2M; speculative_prefetch 44.1M), 64M streams in
#: large groups, 160M is resident for greedy_grouping
SWEEP = [(s, b) for b in ("48M", "64M", "160M") for s in ("sequential", "greedy_grouping", "speculative_prefetch")]
#: partial residency below the model's size: mapped resident groups count in RSS, beside the slot(s)
SWEEP += [("partial_residency", "48M"), ("partial_residency", "64M")]
TEXT = ("Memory on a small board is shared by everything that runs on it, so a model has to know its budget before "
        "it starts. The compiler plans every byte ahead of time: the weights that stay, the groups that are read "
        "from the file while others compute, the key and value cache for each position of the context, and the "
        "activations of the widest step. The executor then replays that plan, token after token, and never asks "
        "the allocator for more. ") * 4
#: the external baseline: the executor's imports and warm-up, nothing of the plan's own memory (see the docstring)
BASELINE_PROBE = """
import sys
from edge_rt_exec import cli  # the executor's own imports, as `python -m edge_rt_exec run` makes them
from edge_rt_exec.generate import load_tokenizer
from edge_rt_exec.plan import load_plan
plan = load_plan(sys.argv[1])
cli._warm_runtime(plan)
load_tokenizer(plan)
# the peak of this process's own address space (VmHWM, read here, not by the executor's code): ru_maxrss would
# start at pytest's size, carried across fork and exec
print(next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
"""


def _prompt(plan_path) -> str:
    """A text of exactly BATCH tokens for this plan's tokenizer."""
    from edge_rt_exec.generate import load_tokenizer
    from edge_rt_exec.plan import load_plan

    tok = load_tokenizer(load_plan(plan_path))
    text = tok.decode(tok.encode(TEXT, add_special_tokens=False).ids[:BATCH])
    assert len(tok.encode(text, add_special_tokens=False).ids) == BATCH
    return text


def _external_baseline(plan_path) -> int:
    r = subprocess.run([sys.executable, "-c", BASELINE_PROBE, str(plan_path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1])


def _run_timed(plan, prompt: str) -> tuple[dict, int]:
    cmd = [sys.executable, "-m", "edge_rt_exec", "run", str(plan), "--prompt", prompt, "--max-tokens", "100000",
           "--ignore-eos", "--json", "--threads", "2"]
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return out, kb * 1024


@pytest.mark.slow
def test_sweep_filled_to_max_context_within_budget_and_identical(smollm2_artifacts):
    assert os.access("/usr/bin/time", os.X_OK), ("/usr/bin/time (Debian package 'time') is the external witness of "
                                                 "peak RSS: install it (apt-get install time)")
    from edge_rt_exec.plan import load_plan

    tokens = None
    modes = set()
    for strategy, budget in SWEEP:
        plan_path = smollm2_artifacts(strategy, budget, max_context=MAX_CONTEXT, max_batch_tokens=BATCH)
        plan = load_plan(plan_path)
        assert (plan.max_context, plan.max_batch_tokens) == (MAX_CONTEXT, BATCH)
        modes.add(plan.weights_mode)
        _external_baseline(plan_path)  # once to fill numba's cache: a compile's peak would hide the plan's memory
        base = _external_baseline(plan_path)
        out, external_peak = _run_timed(plan_path, _prompt(plan_path))
        where = (f"{strategy} {budget}: peak {external_peak / MiB:.1f} MB (/usr/bin/time), {out['peak_rss_mb']} MB "
                 f"(executor); baseline {base / MiB:.1f} MB (apart), {out['baseline_rss_mb']} MB (executor)")
        # filled: a prompt of max_batch_tokens rows, then tokens until every KV position is written
        assert out["prompt_tokens"] == BATCH, where
        assert out["stop_reason"] == "context" and len(out["tokens"]) == MAX_CONTEXT - BATCH + 1, where
        # the executor's own figures and the external ones are the same kernel counters, seen twice
        inside_peak = out["peak_rss_mb"] * MiB
        assert abs(external_peak - inside_peak) <= 0.02 * external_peak + 2 * MiB, where
        # the baseline the executor reports is the one measured apart (a larger one could hide plan memory, a
        # smaller one means the run's warm-up differs from the executor's)
        assert abs(out["baseline_rss_mb"] * MiB - base) <= 4 * MiB, where
        used = external_peak - base
        assert used <= plan.budget, f"{where}: {used / MiB:.1f} MB above the external baseline > budget {budget}"
        assert out["within_budget"], where
        if tokens is None:
            tokens = out["tokens"]
        assert out["tokens"] == tokens, f"{where} changed the tokens"
    assert modes == {"streamed", "resident"}
