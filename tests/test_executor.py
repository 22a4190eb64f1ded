"""Executor: lean imports, plan/weights loading errors, streaming, memory budget, CLI behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import SCHEMA_VERSION, load_plan

from .conftest import compile_synth

MiB = 1 << 20
FORBIDDEN = ["hydra", "omegaconf", "networkx", "onnx", "onnxruntime", "jinja2", "torch", "transformers",
             "edge_rt_compiler", "safetensors", "gguf"]


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    out = tmp_path_factory.mktemp("exec")
    tgt = {"name": "performance", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
           "compute_gflops": 190.0, "prefetch_headroom": 0.2}
    return {
        "resident": compile_synth(out, "greedy_grouping", 64 * MiB, tgt).plan_path,
        "sequential": compile_synth(out, "sequential", 10 * MiB, tgt).plan_path,
        "greedy": compile_synth(out, "greedy_grouping", 11 * MiB, tgt).plan_path,
        "prefetch": compile_synth(out, "speculative_prefetch", 16 * MiB, tgt).plan_path,
    }


def exec_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_rt_exec", *args], capture_output=True, text=True, timeout=300)


def test_import_is_lean():
    code = ("import sys, edge_rt_exec, edge_rt_exec.cli, edge_rt_exec.engine, edge_rt_exec.generate;"
            f"bad=[m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_a_whole_run_is_lean(plans):
    code = ("import sys, atexit\n"
            f"atexit.register(lambda: print('MODULES', [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}],"
            " file=sys.stderr))\n"
            "from edge_rt_exec.cli import main\n"
            f"main(['run', {str(plans['prefetch'])!r}, '--prompt', 'hi there', '--max-tokens', '3', '--json'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "MODULES []" in r.stderr


def test_same_tokens_for_every_strategy(plans):
    outs = {}
    for name, p in plans.items():
        r = exec_cli("run", str(p), "--prompt", "Once upon a time", "--max-tokens", "12", "--json")
        assert r.returncode == 0, r.stderr
        outs[name] = json.loads(r.stdout)
    toks = {json.dumps(o["tokens"]) for o in outs.values()}
    assert len(toks) == 1, outs
    for o in outs.values():
        for key in ("tokens", "text", "prompt_tokens", "prefill_ms", "decode_tok_s", "peak_rss_mb", "baseline_rss_mb"):
            assert key in o
        assert o["within_budget"], o


def _streamed_spans(plan_path: Path, tokens: int):  # noqa: ANN202
    """(streamed groups, streamer stats) after generating `tokens` tokens with the plan."""
    from edge_rt_exec.generate import Session

    s = Session(plan_path)
    try:
        prefetch = s.engine.streamer.prefetch
        s.generate(s.encode_prompt("The quick brown fox"), max_tokens=tokens, ignore_eos=True)
        return prefetch, [g for g in s.plan.groups if g.slot is not None], s.engine.streamer.stats
    finally:
        s.close()


def _live_together(a: tuple[int, int, float, float], b: tuple[int, int, float, float]) -> bool:
    """Whether two (sequence number, group, start, end) spans intersect in time."""
    return a[2] < b[3] and b[2] < a[3]


def test_prefetch_overlaps_reads_with_compute(plans):
    """The reader thread reads group g+1 while the engine computes on group g (speculative_prefetch); a
    one-slot plan reads a group only while nothing computes. From the streamer's read and use spans, not speed."""
    prefetch, groups, st = _streamed_spans(plans["prefetch"], 8)
    assert prefetch and len(groups) >= 2
    # every token reads every streamed group
    assert st.reads >= 8 * len(groups)
    assert st.read_bytes >= 8 * sum(g.byte_end - g.byte_start for g in groups)
    reads = {r[0]: r for r in st.read_spans}
    uses = list(st.use_spans)
    assert len(uses) >= 8 * len(groups)
    assert all(reads[u[0]][1] == u[1] for u in uses if u[0] in reads)  # each use is of its own read's group
    overlapped = [u for u in uses if u[0] + 1 in reads and _live_together(u, reads[u[0] + 1])]
    assert overlapped, "no read of group g+1 happened while group g was computed"

    prefetch, groups, st = _streamed_spans(plans["sequential"], 4)
    assert not prefetch and len(groups) >= 2 and len(st.use_spans) >= 4 * len(groups)
    assert not [(u, r) for u in st.use_spans for r in st.read_spans if _live_together(u, r)], \
        "a sequential plan read a group while computing"


def test_validate_mode_runs_numpy_twins(plans):
    from edge_rt_exec.generate import Session

    for key in ("resident", "sequential"):
        s = Session(plans[key], validate=True)
        try:
            s.generate(s.encode_prompt("Hello there, general"), max_tokens=4, ignore_eos=True)
            worst = s.engine.worst
        finally:
            s.close()
        assert {"Gather", "LayerNormalization", "Linear", "CausalAttention", "Gelu", "Add"} <= set(worst)
        assert max(worst.values()) < 1e-4, worst


def test_streamed_plan_stays_within_budget(plans):
    for key in ("sequential", "prefetch", "resident"):
        o = json.loads(exec_cli("run", str(plans[key]), "--prompt", "a b c d", "--max-tokens", "8", "--json").stdout)
        plan = load_plan(plans[key])
        assert (o["peak_rss_mb"] - o["baseline_rss_mb"]) * MiB <= plan.budget, o


def _copy_artifact(plan_path: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(plan_path.parent, dst, ignore=shutil.ignore_patterns("*.plan.json", ".lock"))
    shutil.copy(plan_path, dst / plan_path.name)
    return dst / plan_path.name


def _edit(plan_path: Path, **changes) -> None:
    d = json.loads(plan_path.read_text())
    for k, v in changes.items():
        if "." in k:
            a, b = k.split(".")
            d[a][b] = v
        else:
            d[k] = v
    plan_path.write_text(json.dumps(d))


@pytest.mark.parametrize("change,needle", [
    ({"schema_version": SCHEMA_VERSION + 1}, "newer than this executor supports"),
    ({"schema_version": SCHEMA_VERSION - 1}, "recompile the plan with edge-rt-compile"),
    ({"byte_order": "big"}, "byte order"),
    ({"files.weights_sha256": "ab" * 32}, "are not the ones"),
    ({"format": "something"}, "not an edge-rt plan"),
    ({"groups": "x"}, "field 'groups' is missing or not a list"),
])
def test_plan_mismatches_are_clear(plans, tmp_path, change, needle):
    p = _copy_artifact(plans["sequential"], tmp_path / "a")
    _edit(p, **change)
    r = exec_cli("run", str(p), "--prompt", "hi", "--json")
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_and_truncated_weights(plans, tmp_path):
    p = _copy_artifact(plans["sequential"], tmp_path / "b")
    w = p.parent / json.loads(p.read_text())["files"]["weights"]
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    r = exec_cli("run", str(p), "--prompt", "hi")
    assert r.returncode == 2 and w.name in r.stderr and "Traceback" not in r.stderr
    w.unlink()
    r = exec_cli("run", str(p), "--prompt", "hi")
    assert r.returncode == 2 and "weights file not found" in r.stderr


def test_plan_offsets_are_bounded(plans, tmp_path):
    p = _copy_artifact(plans["sequential"], tmp_path / "c")
    d = json.loads(p.read_text())
    d["buffers"]["logits"]["offset"] = d["arena"]["size"]
    p.write_text(json.dumps(d))
    with pytest.raises(UserError, match="outside the"):
        load_plan(p)


def test_folder_argument(plans, tmp_path):
    p = _copy_artifact(plans["resident"], tmp_path / "d")
    r = exec_cli("run", str(p.parent), "--prompt", "hi", "--max-tokens", "2", "--json")
    assert r.returncode == 0, r.stderr
    r = exec_cli("run", str(plans["resident"].parent), "--prompt", "hi")
    assert r.returncode == 2 and "plans in this folder" in r.stderr


def test_prompt_longer_than_context_is_an_error(plans):
    r = exec_cli("run", str(plans["resident"]), "--prompt", "word " * 400, "--max-tokens", "2")
    assert r.returncode == 2 and "max_context" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_arguments_are_one_line():
    r = exec_cli("run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--help" in r.stderr
    r = exec_cli("run", "/nope/plan.json", "--prompt", "x")
    assert r.returncode == 2 and "plan not found" in r.stderr


def test_sampling_is_seeded(plans):
    a = exec_cli("run", str(plans["resident"]), "--prompt", "hi", "--max-tokens", "8", "--temperature", "0.9",
                 "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--json")
    b = exec_cli("run", str(plans["resident"]), "--prompt", "hi", "--max-tokens", "8", "--temperature", "0.9",
                 "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--json")
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_sampling_rules():
    from edge_rt_exec.sampling import SamplingParams, sample

    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 4.9, -3.0], np.float32)
    assert sample(logits, SamplingParams(), rng) == 1
    assert {sample(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(50)} <= {1, 2}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(50)} == {1}
    # min-p keeps only tokens at least min_p as likely as the best: 4.9 is, 0.0 is not
    assert {sample(logits, SamplingParams(temperature=1.0, min_p=0.5), rng) for _ in range(50)} == {1, 2}
    # the repeat penalty divides a recent token's positive logit: 5.0 / 2 < 4.9, so greedy picks token 2
    assert sample(logits, SamplingParams(repeat_penalty=2.0), rng, recent=[1]) == 2
    assert sample(logits, SamplingParams(repeat_penalty=2.0, repeat_last_n=1), rng, recent=[1, 3]) == 1


def test_streaming_text_matches_final_text(plans):
    r = exec_cli("run", str(plans["resident"]), "--prompt", "Hello", "--max-tokens", "10")
    j = json.loads(exec_cli("run", str(plans["resident"]), "--prompt", "Hello", "--max-tokens", "10", "--json").stdout)
    assert r.returncode == 0
    assert r.stdout.rstrip("\n") == j["text"]


def test_inspect_and_status(plans):
    r = exec_cli("inspect", str(plans["prefetch"]), "--verify")
    assert r.returncode == 0 and "slot 1" in r.stdout and "sha256 matches" in r.stdout
    j = json.loads(exec_cli("inspect", str(plans["sequential"]), "--json").stdout)
    assert j["strategy"] == "sequential" and len(j["groups"]) > 1
    s = json.loads(exec_cli("status", "--json").stdout)
    assert s["status"]["memory"]["total_bytes"] > 0 and s["recommendation"]["strategy"]


def test_bench_table(plans):
    r = exec_cli("bench", str(plans["resident"]), str(plans["sequential"]), "--repeat", "1", "--max-tokens", "4",
                 "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert len(j["rows"]) == 2 and all(row["within_budget"] for row in j["rows"])
    assert any("same tokens" in ln and "yes" in ln for ln in j["summary"]["lines"])


def test_python_m_equals_console_script(plans):
    import shutil

    exe = shutil.which("edge-rt-exec") or str(Path(sys.executable).parent / "edge-rt-exec")
    a = subprocess.run([exe, "run", str(plans["resident"]), "--prompt", "hi", "--max-tokens", "5", "--json"],
                       capture_output=True, text=True)
    b = exec_cli("run", str(plans["resident"]), "--prompt", "hi", "--max-tokens", "5", "--json")
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_target_threads_set_numba_threads(tmp_path):
    import numba

    tgt = {"name": "one-core", "threads": 1, "read_bandwidth_gbs": 1.0, "mem_bandwidth_gbs": 4.0,
           "compute_gflops": 10.0, "prefetch_headroom": 0.2}
    plan = compile_synth(tmp_path, "greedy_grouping", 64 * MiB, tgt).plan_path
    code = (f"import numba, json; from edge_rt_exec.engine import Engine; e = Engine({str(plan)!r}); "
            "print(json.dumps([e.threads, numba.get_num_threads()]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == [1, 1]
    o = json.loads(exec_cli("run", str(plan), "--prompt", "hi", "--max-tokens", "2", "--json",
                            "--threads", "2").stdout)
    assert o["threads"] == min(2, numba.config.NUMBA_NUM_THREADS)
