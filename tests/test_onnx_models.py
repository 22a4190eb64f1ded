"""Real exports (`slow`): all-MiniLM-L6-v2 and the synthetic GPT-2 exported with torch.onnx by
scripts/export_onnx.py, compiled under every strategy at a quarter of the weights, against onnxruntime for
several batch and sequence sizes; the GPT-2 decoder with past key/values generating with `run`.

"A quarter of the weights": MiniLM's budget is a quarter of its weights file. The synthetic GPT-2's weights
(11 MB) are smaller than the runtime reserve alone, so its budget is what the plan needs besides weights
(activations, constants, reserve) plus a quarter of the weights (over 1 - prefetch headroom for
speculative_prefetch).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from edge_rt_compiler.partition import STRATEGIES  # noqa: E402
from edge_rt_compiler.pipeline import RUNTIME_RESERVE, CompileRequest, ModelRequest, compile_model, load_source  # noqa: E402
from edge_rt_compiler.verify import verify_plan  # noqa: E402
from edge_rt_exec.decoder import Decoder  # noqa: E402
from edge_rt_exec.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = {
    "name": "performance",
    "threads": 2,
    "read_bandwidth_gbs": 8.0,
    "mem_bandwidth_gbs": 25.0,
    "compute_gflops": 190.0,
    "prefetch_headroom": 0.2,
}
ATOL = 1e-4
SIZES = [(1, 1), (1, 7), (2, 16), (4, 32)]  # (batch, sequence); the plans hold up to 4 x 32


def _export():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "scripts" / "export_onnx.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_models")


@pytest.fixture(scope="module")
def gpt2_folder(work: Path) -> Path:
    """The synthetic GPT-2 HF folder, where the compiler writes it (`<out_dir>/_sources/`)."""
    src = load_source(ModelRequest("synthetic-gpt2", "synthetic"), work)
    return Path(src.origin)


def _compile(path: Path, out: Path, strategy: str, budget: int, **kw):  # noqa: ANN202
    return compile_model(
        CompileRequest(
            ModelRequest(path.parent.name, "local", path=str(path)),
            strategy,
            budget,
            TARGET,
            out_dir=out,
            plan_name=f"{strategy}-{budget}.plan.json",
            **kw,
        )
    )


def _feeds(sess, batch: int, seq: int, vocab: int, rng: np.random.Generator) -> dict:  # noqa: ANN001
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, (batch, seq))
        elif i.name == "attention_mask":
            m = np.ones((batch, seq), np.int64)
            m[1:, seq - seq // 3 :] = 0  # padded rows in a batch
            feeds[i.name] = m
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros((batch, seq), np.int64)
    return feeds


def _check_every_strategy(path: Path, out: Path, budgets: dict[str, int], vocab: int) -> dict:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cases = [_feeds(sess, b, s, vocab, rng) for b, s in SIZES]
    want = [dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f))) for f in cases]
    modes = {}
    for strategy in STRATEGIES:
        res = _compile(path, out, strategy, budgets[strategy], max_context=32, max_batch_tokens=128)
        verify_plan(res.plan)
        assert res.plan.predicted["peak_bytes"] <= budgets[strategy]
        modes[strategy] = (res.plan.strategy, res.plan.weights_mode, len(res.plan.groups))
        eng = Engine(res.plan)
        try:
            for f, w in zip(cases, want):
                got = eng.infer(f)
                for k in w:
                    err = float(np.abs(got[k] - w[k]).max())
                    assert err <= ATOL, f"{strategy}: {k} {list(w[k].shape)} differs from onnxruntime by {err}"
        finally:
            eng.close()
    return modes


@pytest.mark.parametrize("opset", [17, 18])
def test_minilm_matches_onnxruntime(work: Path, opset: int):
    path = _export().export_minilm(work / f"minilm{opset}", opset)
    probe = _compile(path, work / "probe", "greedy_grouping", 1 << 30, max_context=32, max_batch_tokens=128)
    quarter = probe.plan.files["weights_size"] // 4
    modes = _check_every_strategy(path, work / "out", {s: quarter for s in STRATEGIES}, 30522)
    assert all(m[1] == "streamed" for m in modes.values()), modes


def _quarter_beside_fixed(path: Path, out: Path, **kw) -> dict[str, int]:
    """What the plan needs besides weights, plus a quarter of the weights (see the module docstring)."""
    p = _compile(path, out, "greedy_grouping", 1 << 30, **kw).plan
    quarter = p.arena["size"] + RUNTIME_RESERVE + p.files["weights_size"] // 4
    budgets = {s: quarter for s in STRATEGIES}
    budgets["speculative_prefetch"] = int(quarter / (1 - TARGET["prefetch_headroom"])) + 1
    return budgets


@pytest.mark.parametrize("opset", [17, 18])
def test_gpt2_matches_onnxruntime(work: Path, gpt2_folder: Path, opset: int):
    path = _export().export_gpt2(gpt2_folder, work / f"gpt2_{opset}", opset)
    budgets = _quarter_beside_fixed(path, work / "probe", max_context=32, max_batch_tokens=128)
    modes = _check_every_strategy(path, work / "out", budgets, 8191)
    assert all(m[1] == "streamed" for m in modes.values()), modes


def test_llama_matches_onnxruntime(work: Path):
    """RoPE (Cos/Sin), RMSNorm, SwiGLU, GQA as torch exports them."""
    path = _export().export_llama(work / "llama", 18)
    budgets = _quarter_beside_fixed(path, work / "probe", max_context=32, max_batch_tokens=128)
    modes = _check_every_strategy(path, work / "out", budgets, 512)
    assert all(m[1] == "streamed" for m in modes.values()), modes


@pytest.mark.parametrize("strategy", ["greedy_grouping", "sequential", "speculative_prefetch"])
def test_llama_with_past_steps_match_onnxruntime(work: Path, strategy: str):
    """Chunked prefill (11 tokens in chunks of 8) then single-token steps, the presents fed back as pasts."""
    path = work / "llama_past" / "model.onnx"
    if not path.exists():
        _export().export_llama(path.parent, 18, past=True)
    budget = _quarter_beside_fixed(path, work / "probe", max_context=32, max_batch_tokens=8)[strategy]
    res = _compile(path, work / "dec", strategy, budget, max_context=32, max_batch_tokens=8)
    assert res.plan.weights_mode == "streamed"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    pasts = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past")
    }
    assert len(pasts) >= 2  # the export has past key/value inputs
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 512, 11)] + [rng.integers(0, 512, 1) for _ in range(4)]
    eng = Engine(res.plan)
    dec = Decoder(eng)
    try:
        total = 0
        for k, c in enumerate(chunks):
            total += len(c)
            o = dict(
                zip(
                    outs,
                    sess.run(None, {"input_ids": c[None], "attention_mask": np.ones((1, total), np.int64), **pasts}),
                )
            )
            pasts = {n: o[n.replace("past_key_values", "present")] for n in pasts}
            assert all(v.shape[2] == total for v in pasts.values())  # the reference's pasts hold every token
            got = dec.prefill(c) if k == 0 else dec.step(c)
            assert dec.pos == total and dec.tokens == [int(t) for t in np.concatenate(chunks[: k + 1])]
            err = float(np.abs(got - o["logits"][0, -1]).max())
            assert err <= ATOL, f"step {k}: logits differ from onnxruntime by {err}"
    finally:
        eng.close()


# ---- decoders -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_past(work: Path, gpt2_folder: Path) -> Path:
    return _export().export_gpt2(gpt2_folder, work / "gpt2_past", 18, past=True)


def _greedy_reference(folder: Path, prompt: str, n: int) -> list[int]:
    """Exactly `n` greedy tokens from transformers, stepping with its past key/values and never stopping at the
    end-of-sequence token (as `run --ignore-eos`)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids
    m = GPT2LMHeadModel.from_pretrained(folder).eval()
    out: list[int] = []
    with torch.no_grad():
        o = m(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            out.append(int(o.logits[0, -1].argmax()))
            o = m(torch.tensor([[out[-1]]]), cache=o.cache, use_cache=True)
    return out


@pytest.mark.parametrize("strategy", ["greedy_grouping", "sequential", "speculative_prefetch"])
def test_gpt2_with_past_generates_like_transformers(work: Path, gpt2_folder: Path, gpt2_past: Path, strategy: str):
    budget = {"greedy_grouping": 64 << 20, "sequential": 12 << 20, "speculative_prefetch": 20 << 20}[strategy]
    res = _compile(gpt2_past, work / "dec", strategy, budget, max_context=64, max_batch_tokens=16)
    assert res.plan.model["kind"] == "decoder" and res.plan.graph["kv"]["mode"] == "past_present"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_rt_exec",
            "run",
            str(res.plan_path),
            "--prompt",
            "Once upon a time, in a land far away,",
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["within_budget"], out
    got = out["tokens"]
    assert len(got) == 12 and out["stop_reason"] == "max_tokens", out  # 11 steps with past key/values fed back
    want = _greedy_reference(gpt2_folder, "Once upon a time, in a land far away,", 12)
    assert got == want


def test_gpt2_without_past_generates_and_says_so(work: Path, gpt2_folder: Path):
    path = _export().export_gpt2(gpt2_folder, work / "gpt2_nopast", 18)
    res = _compile(path, work / "dec", "greedy_grouping", 64 << 20, max_context=48, max_batch_tokens=48)
    assert any("recomputes the whole sequence" in w for w in res.warnings)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_rt_exec",
            "run",
            str(res.plan_path),
            "--prompt",
            "Once upon a time, in a land far away,",
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("recomputing the whole sequence") == 1, r.stderr
    out = json.loads(r.stdout)
    got = out["tokens"]
    assert len(got) == 8 and out["stop_reason"] == "max_tokens", out  # 7 steps recomputing the sequence
    want = _greedy_reference(gpt2_folder, "Once upon a time, in a land far away,", 8)
    assert got == want


@pytest.mark.parametrize("strategy", ["sequential", "speculative_prefetch"])
def test_minilm_quarter_budget_holds_in_rss(work: Path, strategy: str):
    """peak RSS <= baseline + budget for `infer` on a streamed plan at a quarter of the weights."""
    path = work / "minilm17" / "model.onnx"
    if not path.exists():
        _export().export_minilm(path.parent, 17)
    probe = _compile(path, work / "probe", "greedy_grouping", 1 << 30, max_context=32, max_batch_tokens=128)
    budget = probe.plan.files["weights_size"] // 4
    res = _compile(path, work / "rss", strategy, budget, max_context=32, max_batch_tokens=128)
    rng = np.random.default_rng(0)
    np.savez(
        work / "rss_in.npz",
        input_ids=rng.integers(100, 30000, (4, 32)),
        attention_mask=np.ones((4, 32), np.int64),
        token_type_ids=np.zeros((4, 32), np.int64),
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_rt_exec",
            "infer",
            str(res.plan_path),
            "--inputs",
            str(work / "rss_in.npz"),
            "--out",
            str(work / "rss_out.npz"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["plan_rss_mb"] * (1 << 20) <= budget, info
