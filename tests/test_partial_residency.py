"""Partial residency: below the model's size, what fits stays resident and only the rest is read every token.

The synthetic model (7.2 MB of weights) at every budget from its minimum to its size: bytes read per token fall
with the budget, about one for one, the resident bytes are counted in the plan's peak, the executor reads only the
streamed groups (counted by its own streamer), with prefetch where two slots fit, and tokens equal every other
strategy's. Corrupt partial plans are refused on load. SmolLM2 (slow): tokens equal, and reads fall with budget.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import load_plan

from .conftest import compile_synth

MiB = 1 << 20
TARGET = {"name": "performance", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
          "compute_gflops": 190.0, "prefetch_headroom": 0.2}
#: the synthetic model's minimum (sequential's) is 8.9M; the whole model is resident from 15.5M
BUDGETS = [9, 10, 11, 12, 13, 14, 15]
PROMPT = "Once upon a time"


def _read_per_token(plan) -> int:
    return sum(g.byte_end - g.byte_start for g in plan.groups if g.slot is not None)


def _resident(plan) -> list:
    return [g for g in plan.groups if g.slot is None and g.byte_end > g.byte_start]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("partial")
    plans = {b: compile_synth(out, "partial_residency", b * MiB, TARGET).plan_path for b in BUDGETS}
    # two slots beside resident groups: the cost model prefers them at 10M-12M
    plans["two_slots"] = plans[11]
    plans["sequential"] = compile_synth(out, "sequential", 10 * MiB, TARGET).plan_path
    plans["prefetch"] = compile_synth(out, "speculative_prefetch", 13 * MiB, TARGET).plan_path
    plans["resident"] = compile_synth(out, "greedy_grouping", 64 * MiB, TARGET).plan_path
    return plans


def test_reads_fall_about_linearly_with_the_budget(sweep):
    total = load_plan(sweep["sequential"])
    whole = _read_per_token(total)
    reads, resident = [], []
    for b in BUDGETS:
        p = load_plan(sweep[b])
        assert p.strategy == "partial_residency" and p.weights_mode == "streamed", b
        assert len(p.arena["slots"]) in (1, 2)
        reads.append(_read_per_token(p))
        resident.append(sum(g.byte_end - g.byte_start for g in _resident(p)))
        # every weight byte is either resident or streamed, once
        assert reads[-1] + resident[-1] == whole, b
        assert p.predicted["read_bytes_per_token"] == reads[-1]
        # the resident bytes are in the planned peak (whole fault-around windows), and the peak fits the budget
        assert p.arena["resident_weights"] >= resident[-1]
        assert p.predicted["peak_bytes"] == p.arena["size"] + p.arena["reserve"] + p.arena["resident_weights"]
        assert p.predicted["peak_bytes"] <= p.budget
    assert all(a > b for a, b in zip(reads, reads[1:])), reads
    # about one byte of reads saved per byte of budget over the range; a step of 1 MiB saves at most 1 MiB, a slot
    # (where the cost model switches between two slots and one) and a piece that now fits (at most a slot)
    slot = max(s["nbytes"] for b in BUDGETS for s in load_plan(sweep[b]).arena["slots"])
    steps = [(a - b) / MiB for a, b in zip(reads, reads[1:])]
    assert all(0 < s <= 1 + 2 * slot / MiB for s in steps), steps
    assert 0.75 <= (reads[0] - reads[-1]) / ((BUDGETS[-1] - BUDGETS[0]) * MiB) <= 1.25, reads
    assert reads[-1] < 0.3 * whole and reads[0] > 0.8 * whole


def test_same_tokens_as_every_other_strategy(sweep):
    outs = {}
    for key in ("sequential", "prefetch", "resident", 9, 11, 13, 15):  # 11M: two slots, 13M: one
        r = subprocess.run([sys.executable, "-m", "edge_rt_exec", "run", str(sweep[key]), "--prompt", PROMPT,
                            "--max-tokens", "12", "--json", "--ignore-eos"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        outs[key] = json.loads(r.stdout.strip().splitlines()[-1])
        assert outs[key]["within_budget"], (key, outs[key])
    assert len({json.dumps(o["tokens"]) for o in outs.values()}) == 1, {k: o["tokens"] for k, o in outs.items()}


def _generate(plan_path: Path, tokens: int):  # noqa: ANN202
    from edge_rt_exec.generate import Session

    s = Session(plan_path)
    try:
        eng = s.engine
        s.generate(s.encode_prompt("The quick brown fox"), max_tokens=tokens, ignore_eos=True)
        return s.plan, eng.streamer, eng.timings.steps, eng
    finally:
        s.close()


def test_the_executor_reads_only_streamed_groups(sweep):
    """Counted by the streamer itself: every forward pass preads each streamed group once and no resident one;
    resident groups' weights are views of memory of their own (read once at load), not of a slot."""
    plan, st, passes, eng = _generate(sweep[13], 6)  # one slot at 13M: reads on the calling thread
    assert not st.prefetch and passes >= 6
    streamed = [g.index for g in plan.groups if g.slot is not None]
    assert [g.index for g in st.seq] == streamed and len(streamed) >= 2 and _resident(plan)
    assert st.stats.read_bytes == passes * _read_per_token(plan)
    assert {r[1] for r in st.stats.read_spans} == set(streamed)
    slots = [s.ctypes.data for s in eng.slots]
    for g in _resident(plan):
        for views in eng._weights[(g.index, -1)].values():
            for v in views.values():
                assert v.base is not None and not any(v.ctypes.data - s in range(eng.slots[0].nbytes)
                                                      for s in slots)


def test_prefetch_with_resident_groups_between(sweep):
    """Two slots: the reader fills the next *streamed* group while the kernels compute, resident ones included."""
    plan, st, passes, _ = _generate(sweep["two_slots"], 8)
    assert len(plan.arena["slots"]) == 2 and st.prefetch and _resident(plan)
    streamed = [g.index for g in plan.groups if g.slot is not None]
    assert {r[1] for r in st.stats.read_spans} == set(streamed)
    # each use is of its own read; reads of group k+1 overlap the use of group k
    reads = {r[0]: r for r in st.stats.read_spans}
    uses = list(st.stats.use_spans)
    assert all(reads[u[0]][1] == u[1] for u in uses if u[0] in reads)
    assert any(u[0] + 1 in reads and reads[u[0] + 1][2] < u[3] and u[2] < reads[u[0] + 1][3] for u in uses)
    # the reader may be up to two groups ahead when the run ends
    assert passes * len(streamed) <= st.stats.reads <= passes * len(streamed) + 2


def test_auto_weighs_partial_residency(sweep, tmp_path):
    p = compile_synth(tmp_path, "auto", 12 * MiB, TARGET).plan
    notes = {n.split()[1]: float(n.split()[3]) for n in p.predicted["notes"] if n.startswith("auto:")}
    assert "partial_residency" in notes and p.strategy == min(notes, key=notes.get)
    assert p.strategy == "partial_residency"  # it reads least at this budget
    p = compile_synth(tmp_path, "auto", 64 * MiB, TARGET).plan
    assert p.strategy == "greedy_grouping" and p.weights_mode == "resident"  # a tie with it: the first name


def test_minimum_budget_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"too small for strategy 'partial_residency'.*needs at least 8\.9M"):
        compile_synth(tmp_path, "partial_residency", 8 * MiB, TARGET)


def _corrupt(sweep, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    src = Path(sweep[12])
    dst = tmp_path / "copy"
    shutil.copytree(src.parent, dst, ignore=shutil.ignore_patterns("*.plan.json", ".lock"))
    d = json.loads(src.read_text())
    edit(d)
    (dst / src.name).write_text(json.dumps(d))
    return dst / src.name


@pytest.mark.parametrize("what,edit,needle", [
    ("resident bytes undercounted", lambda d: d["arena"].__setitem__("resident_weights", 0),
     "resident groups map"),
    ("a resident group's range cut short",
     lambda d: next(g for g in d["groups"] if g["slot"] is None and g["byte_end"] > g["byte_start"])
     .__setitem__("byte_end", next(g for g in d["groups"] if g["slot"] is None and g["byte_end"] > g["byte_start"])
                  ["byte_start"]), "outside the group's resident bytes"),
])
def test_corrupt_partial_plans_are_refused(sweep, tmp_path, what, edit, needle):
    path = _corrupt(sweep, tmp_path, edit)
    with pytest.raises(UserError, match=needle):
        load_plan(path)
    r = subprocess.run([sys.executable, "-m", "edge_rt_exec", "run", str(path), "--prompt", "hi", "--max-tokens",
                        "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_smollm2_partial_residency_tokens_and_reads(smollm2_artifacts):
    """The packaged Q4_1 SmolLM2 at max_context 512: partial plans at 48M and 64M give the tokens of the resident
    and streamed plans, and the larger budget reads less per token."""
    paths = {("partial_residency", b): smollm2_artifacts("partial_residency", b, max_context=512)
             for b in ("48M", "64M")}
    paths[("greedy_grouping", "160M")] = smollm2_artifacts("greedy_grouping", "160M", max_context=512)
    paths[("sequential", "48M")] = smollm2_artifacts("sequential", "48M", max_context=512)
    reads = {k: _read_per_token(load_plan(p)) for k, p in paths.items()}
    assert 0 < reads[("partial_residency", "64M")] < reads[("partial_residency", "48M")] \
        < reads[("sequential", "48M")]
    toks = {}
    for k, p in paths.items():
        r = subprocess.run([sys.executable, "-m", "edge_rt_exec", "run", str(p), "--prompt", PROMPT,
                            "--max-tokens", "16", "--json", "--ignore-eos"], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["within_budget"], (k, out)
        toks[k] = out["tokens"]
    assert len({json.dumps(t) for t in toks.values()}) == 1, toks
