"""Compiler stages: config/registry, IR validation, partitioning, memory layout, emit, the Hydra app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from edge_rt_compiler.app import CONF_DIR, compile_from_cfg
from edge_rt_compiler.frontends import load_path
from edge_rt_compiler.ir import build_ir
from edge_rt_compiler.partition import STRATEGIES, fmt_bytes, parse_bytes
from edge_rt_compiler.validate import validate
from edge_rt_compiler.verify import verify_plan
from edge_rt_exec.errors import InternalError, UserError
from edge_rt_exec.plan import load_plan

from .conftest import ROOT, compile_synth

MiB = 1 << 20


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hcompose(config_name="config", overrides=overrides)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_rt_compiler.app", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


# ---- config and registry ---------------------------------------------------------------------------

def test_strategy_registry_matches_conf_both_ways():
    files = {p.stem for p in (CONF_DIR / "strategy").glob("*.yaml")}
    assert files == set(STRATEGIES)
    for name in files:
        assert compose([f"strategy={name}"]).strategy.name == name


def test_default_composition_is_smollm2_for_the_pi():
    cfg = compose([])
    assert cfg.model.name == "smollm2-135m" and cfg.model.source == "package"
    assert cfg.target.name == "rpi4_4gb" and cfg.target.budget == "512M" and cfg.target.strategy == "greedy_grouping"
    assert cfg.strategy is None and cfg.budget is None and cfg.out_dir == "artifacts"


@pytest.mark.parametrize("name,budget,strategy,threads", [("rpi4_4gb", "512M", "greedy_grouping", 4),
                                                           ("constrained_2gb", "256M", "sequential", 2),
                                                           ("performance", "1G", "speculative_prefetch", 4)])
def test_target_presets(name, budget, strategy, threads):
    t = compose([f"target={name}"]).target
    assert (t.budget, t.strategy, t.threads, t.prefetch_headroom) == (budget, strategy, threads, 0.2)
    assert t.read_bandwidth_gbs > 0 and t.mem_bandwidth_gbs > 0 and t.compute_gflops > 0


@pytest.mark.parametrize("text,value", [("512M", 512 * MiB), ("1G", 1 << 30), ("1.5G", int(1.5 * (1 << 30))),
                                        ("800K", 800 << 10), ("1048576", 1 << 20), ("0.5m", MiB // 2)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["abc", "", "-5M", "0", "12X", "nanM", "infG"])
def test_parse_bytes_rejects(text):
    with pytest.raises(UserError, match="not a size"):
        parse_bytes(text)


def test_fmt_bytes_round_trips():
    for n in (8 * MiB, 512 * MiB, 1 << 30, 1536 * MiB):
        assert parse_bytes(fmt_bytes(n)) == n


# ---- IR and validation ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_source(tmp_path_factory):
    from edge_rt_compiler.frontends.synthetic import SyntheticSpec, make_synthetic

    folder = make_synthetic(tmp_path_factory.mktemp("src") / "synth", SyntheticSpec())
    return folder


def test_ir_is_op_level_with_shapes(synth_source):
    src = load_path(synth_source)
    g = build_ir(src)
    assert nx.is_directed_acyclic_graph(g)
    ops = {g.nodes[n]["op"] for n in g.nodes}
    assert {"embed", "layernorm", "linear", "attention", "gelu_tanh", "add", "lm_head"} <= ops
    assert g.graph["units"] == ["embed", "layer.0", "layer.1", "layer.2", "layer.3", "head"]
    q = g.nodes["layers.0.attn.q"]
    assert q["weights"] == {"weight": "layers.0.attn.q.weight", "bias": "layers.0.attn.q.bias"}
    assert q["flops"] == 2 * 128 * 128 and q["weight_bytes"] == 4 * (128 * 128 + 128)
    edge = g.edges["layers.0.attn.q", "layers.0.attn"]
    assert edge["shape"] == ("T", 128) and edge["dtype"] == "float32"
    assert validate(g, src).warnings == []


def test_validation_names_the_bad_weight(synth_source):
    src = load_path(synth_source)
    w = src.weights["layers.1.attn.o.weight"]
    w.shape = (128, 64)
    with pytest.raises(UserError, match=r"op 'layers.1.attn.o'.*layers.1.attn.o.weight"):
        build_ir(src)


def test_validation_config_consistency(synth_source):
    import dataclasses

    src = load_path(synth_source)
    src.config = dataclasses.replace(src.config, n_heads=3)
    with pytest.raises(UserError, match="3 heads do not divide hidden size 128"):
        validate(build_ir(load_path(synth_source)), src)
    src.config = dataclasses.replace(src.config, n_heads=4, vocab_size=100)
    with pytest.raises(UserError, match="vocab_size 100 but the token embedding has 8192 rows"):
        validate(build_ir(load_path(synth_source)), src)


def test_validation_detects_cycles_and_missing_inputs(synth_source):
    src = load_path(synth_source)
    g = build_ir(src)
    g2 = g.copy()
    g2.add_edge("lm_head", "embed", tensor="logits", shape=(1, 8192), dtype="float32")
    with pytest.raises(UserError, match="has a cycle"):
        validate(g2, src)
    g3 = g.copy()
    g3.nodes["layers.2.attn.o"]["inputs"] = ["nowhere"]
    with pytest.raises(UserError, match="input tensor 'nowhere' is not produced"):
        validate(g3, src)


def test_unused_weights_are_a_warning(synth_source):
    src = load_path(synth_source)
    from edge_rt_compiler.frontends.base import WeightRef

    src.weights["extra.weight"] = WeightRef((4,), lambda: None, "test")
    report = validate(build_ir(src), src)
    assert any("extra.weight" in w for w in report.warnings)


# ---- partitioning, memory layout, verifier ---------------------------------------------------------

def test_every_strategy_and_budget_verifies(synth_dir, target):
    seen = set()
    for strategy in STRATEGIES:
        for budget in (10 * MiB, 12 * MiB, 16 * MiB, 64 * MiB):
            try:
                res = compile_synth(synth_dir, strategy, budget, target)
            except UserError as e:
                assert "needs at least" in str(e)
                continue
            p = res.plan
            verify_plan(p)
            assert p.predicted["peak_bytes"] <= budget
            seen.add((p.strategy, p.weights_mode))
            if p.weights_mode == "streamed":
                slot = p.arena["slots"][0]["nbytes"]
                assert all(g.byte_end - g.byte_start <= slot for g in p.groups)
    assert {("greedy_grouping", "resident"), ("greedy_grouping", "streamed"), ("sequential", "streamed"),
            ("speculative_prefetch", "streamed")} <= seen


def test_sequential_is_one_unit_per_group_and_tiles_the_head(synth_dir, target):
    p = compile_synth(synth_dir, "sequential", 10 * MiB, target).plan
    streamed = [g for g in p.groups if g.slot is not None]
    assert all(len([u for u in g.units if u != "embed"]) == 1 for g in streamed)
    tiles = [op for op in p.schedule if op.op == "lm_head"]
    assert len(tiles) > 1, "the 4 MB LM head must be tiled into the ~0.8 MB slot"
    rows = [tuple(op.attrs["rows"]) for op in tiles]
    assert rows[0][0] == 0 and rows[-1][1] == 8192 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_speculative_prefetch_has_two_slots(synth_dir, target):
    p = compile_synth(synth_dir, "speculative_prefetch", 16 * MiB, target).plan
    assert len(p.arena["slots"]) == 2 and len(p.groups) >= 2


def test_infeasible_budget_states_the_minimum(synth_dir, target):
    with pytest.raises(UserError) as e:
        compile_synth(synth_dir, "sequential", 1 * MiB, target)
    msg = str(e.value)
    assert "\n" not in msg
    assert "budget 1M is too small for strategy 'sequential' on synthetic-gpt2: needs at least" in msg
    assert "KV cache" in msg and "largest unit" in msg and "raise budget=" in msg
    need = parse_bytes(msg.split("needs at least ")[1].split(" ")[0])
    compile_synth(synth_dir, "sequential", need + MiB // 10, target)  # the stated minimum works


def test_auto_picks_the_lowest_predicted_latency(synth_dir, target):
    p = compile_synth(synth_dir, "auto", 64 * MiB, target).plan
    assert p.requested_strategy == "auto" and p.strategy == "greedy_grouping" and p.weights_mode == "resident"
    assert any(n.startswith("auto:") for n in p.predicted["notes"])


def test_verifier_catches_overlap_and_budget(synth_dir, target):
    p = compile_synth(synth_dir, "greedy_grouping", 16 * MiB, target).plan
    acts = [b for b in p.buffers.values() if b.kind == "activation"]
    a, b = acts[0], acts[1]
    assert a.first <= b.last and b.first <= a.last or True
    bad = load_plan(p.path)
    live = [x for x in bad.buffers.values() if x.kind == "kv"]
    live[1].offset = live[0].offset  # two KV caches on the same bytes
    with pytest.raises(InternalError, match="overlap"):
        verify_plan(bad)
    bad2 = load_plan(p.path)
    bad2.budget = 1 * MiB
    with pytest.raises(InternalError, match="exceeds the budget"):
        verify_plan(bad2)


def test_arena_is_near_the_lower_bound(synth_dir, target):
    p = compile_synth(synth_dir, "sequential", 12 * MiB, target).plan
    a = p.arena["activations"]
    assert a["size"] <= 1.05 * a["lower_bound"]


# ---- emit ------------------------------------------------------------------------------------------

def test_weights_are_reused_and_shared(tmp_path, target):
    r1 = compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target)
    w = r1.plan.file("weights")
    st1 = w.stat()
    r2 = compile_synth(tmp_path, "sequential", 12 * MiB, target)
    assert not r1.weights_reused and r2.weights_reused
    assert r2.plan.file("weights") == w and w.stat().st_mtime_ns == st1.st_mtime_ns
    assert r1.plan.files["weights_sha256"] == r2.plan.files["weights_sha256"]
    assert not [p for p in w.parent.iterdir() if p.name.endswith(".tmp")]


def test_weights_file_is_in_execution_order(tmp_path, target):
    p = compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target).plan
    offs = [(t.offset, n) for n, t in p.tensors.items()]
    order = [n for _, n in sorted(offs)]
    assert order[0] == "pos_embed.weight"  # gather-only tables first
    assert order.index("layers.0.attn.q.weight") < order.index("layers.1.attn.q.weight")
    assert order[-1] == "tok_embed.weight"  # tied: stored with the LM head, the last op that reads it whole
    assert all(t.offset % 64 == 0 for t in p.tensors.values())
    from edge_rt_exec.binfile import SafetensorsFile

    st = SafetensorsFile(p.file("weights"))  # a valid safetensors file
    assert set(p.tensors) <= set(st.tensors)


def test_failed_compile_leaves_nothing_half_written(tmp_path, target, monkeypatch):
    from edge_rt_compiler.frontends import hf

    real = hf._Tensors.loader

    def broken(self, name, transform=None):
        if "layers.2" in name or "h.2." in name:
            def boom():
                raise UserError("simulated read failure")
            return boom
        return real(self, name, transform)

    monkeypatch.setattr(hf._Tensors, "loader", broken)
    with pytest.raises(UserError, match="simulated"):
        compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target)
    folder = tmp_path / "synthetic-gpt2"
    left = sorted(p.name for p in folder.iterdir())
    assert "weights.safetensors" not in left and not [n for n in left if n.endswith(".tmp")]
    assert not list(folder.glob("*.plan.json"))


def test_golden_plans(synth_dir, target):
    """A refactor that silently changes a plan fails here. Regenerate with EDGE_RT_UPDATE_GOLDEN=1."""
    golden = ROOT / "tests" / "golden" / "synthetic_plans.json"
    got = {}
    for strategy, budget in (("sequential", 10 * MiB), ("greedy_grouping", 12 * MiB), ("greedy_grouping", 64 * MiB),
                             ("speculative_prefetch", 16 * MiB)):
        p = compile_synth(synth_dir, strategy, budget, target).plan
        got[f"{strategy}-{fmt_bytes(budget)}"] = {
            "weights_mode": p.weights_mode, "arena": p.arena,
            "groups": [[g.units, g.op_start, g.op_end, g.byte_start, g.byte_end] for g in p.groups],
            "schedule": [[o.name, o.op, o.group, o.inputs, o.outputs] for o in p.schedule],
            "buffers": {n: [b.offset, b.nbytes, b.first, b.last] for n, b in sorted(p.buffers.items())},
            "weights_sha256": p.files["weights_sha256"],
        }
    got = json.loads(json.dumps(got))
    if os.environ.get("EDGE_RT_UPDATE_GOLDEN") or not golden.exists():
        golden.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(golden.read_text())
    for key in want:
        assert got[key] == want[key], f"plan {key} changed; if intended, regenerate with EDGE_RT_UPDATE_GOLDEN=1"


# ---- the Hydra app -----------------------------------------------------------------------------------

def test_hydra_compose_and_compile(tmp_path):
    cfg = compose(["model=synthetic_gpt2", "budget=12M", "strategy=sequential", f"out_dir={tmp_path}",
                   "max_context=128"])
    res = compile_from_cfg(cfg)
    assert res.plan.strategy == "sequential" and res.plan.max_context == 128 and res.plan.budget == 12 * MiB
    assert res.plan_path.exists() and res.plan_path.parent == tmp_path / "synthetic-gpt2"


@pytest.mark.parametrize("args,needle", [
    (["budget=abc"], "budget='abc' is not a size"),
    (["max_context=0"], "max_context=0 must be a positive whole number"),
    (["strategy=foo"], "strategy=foo is not a known strategy; choose one of auto, greedy_grouping"),
    (["model=nope"], "model=nope is not a known model"),
    (["model=local"], "model=local needs model.path=PATH"),
    (["model=synthetic_gpt2", "budget=1M"], "needs at least"),
    (["model=synthetic_gpt2", "max_context=100000"], "exceeds what synthetic-gpt2 supports (256)"),
    (["model=local", "model.path=/does/not/exist"], "model path not found"),
    (["foo=bar"], "bad override: Could not override 'foo'"),
    (["target.threads=abc"], "bad override"),
])
def test_bad_overrides_are_one_clear_line(tmp_path, args, needle):
    r = run_cli([*args, f"out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_multirun_sweep_writes_every_plan_and_one_table(tmp_path):
    r = run_cli(["-m", "model=synthetic_gpt2", "budget=12M,64M", "strategy=sequential,greedy_grouping",
                 f"out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 0, r.stderr
    plans = [ln.split("plan: ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("plan: ")]
    assert len(plans) == 4 and all(Path(p).exists() for p in plans)
    assert "sweep summary (4 plans" in r.stdout
    summary = list((tmp_path / ".sweeps").glob("*/summary.json"))
    assert len(summary) == 1 and len(json.loads(summary[0].read_text())) == 4
    assert r.stdout.count("weights written") == 1


def test_tokenizer_round_trip(synth_source):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(synth_source / "tokenizer.json"))
    for text in ["Hello world", "  leading spaces and\ttabs\n\nnew lines", "ünïcödé 日本語 🙂", "x = f(1) + 2;"]:
        ids = tok.encode(text).ids
        assert max(ids) < 8192 and tok.decode(ids) == text
    assert tok.encode("a<|endoftext|>b").ids[1] == 8191


def test_stated_minimum_is_enough_for_every_strategy(synth_dir, target):
    for strategy in ("sequential", "greedy_grouping", "speculative_prefetch"):
        with pytest.raises(UserError) as e:
            compile_synth(synth_dir, strategy, 1 * MiB, target)
        need = parse_bytes(str(e.value).split("needs at least ")[1].split(" ")[0])
        compile_synth(synth_dir, strategy, need, target)


def test_onnx_dims_override_reaches_the_request():
    from edge_rt_compiler.app import request_from_cfg

    cfg = compose(["model=local", "model.path=/x.onnx", "+onnx_dims.batch=8"])
    assert request_from_cfg(cfg).onnx_dims == {"batch": 8}
    assert request_from_cfg(compose(["model=local", "model.path=/x.onnx"])).onnx_dims is None
