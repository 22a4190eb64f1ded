"""HF-format folders: tiny llama (GQA, RoPE scaling, untied head, biases) and bert models made by
transformers itself, sharded checkpoints, and malformed safetensors files."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge_rt_exec.errors import UserError

MiB = 1 << 20
TARGET = {"name": "t", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0, "compute_gflops": 190.0,
          "prefetch_headroom": 0.2}


def _compile(path, strategy="greedy_grouping", budget=256 * MiB, out=None, **kw):
    from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model

    return compile_model(CompileRequest(ModelRequest("m", "local", path=str(path)), strategy, budget, TARGET,
                                        out_dir=out or path.parent / "art", **kw))


def _llama_folder(tmp_path, **cfg):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0,
                tie_word_embeddings=False)
    base.update(cfg)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval()
    with torch.no_grad():  # random, non-trivial norms and (if present) biases
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            if n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "llama"
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.mark.parametrize("cfg", [
    {},
    {"tie_word_embeddings": True, "num_key_value_heads": 1},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, "attention_bias": True},
])
def test_llama_logits_match_transformers(tmp_path, cfg):
    import torch

    folder, model = _llama_folder(tmp_path, **cfg)
    ids = [5, 17, 250, 3, 99, 42, 7, 8, 200, 11]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    from edge_rt_exec.engine import Engine

    for strategy, budget in (("greedy_grouping", 256 * MiB), ("sequential", 7 * MiB)):
        res = _compile(folder, strategy, budget, max_context=64)
        e = Engine(res.plan)
        got = np.stack([e.step(np.array([t])).copy() for t in ids])
        e.reset()
        last = e.prefill(ids).copy()
        e.close()
        assert np.abs(got - want).max() < 1e-4, strategy
        assert np.abs(last - want[-1]).max() < 1e-4, strategy


def test_bert_embeddings_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=80, max_position_embeddings=64, type_vocab_size=2)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    folder = tmp_path / "bert"
    model.save_pretrained(folder, safe_serialization=True)
    ids = np.array([[2, 15, 77, 120, 3, 0, 0], [2, 9, 9, 3, 0, 0, 0], [2, 44, 45, 46, 47, 48, 3]], np.int64)
    mask = (ids != 0).astype(np.int64)
    mask[:, 0] = 1
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    pooled = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    want = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    from edge_rt_exec.engine import Engine

    for strategy, budget in (("greedy_grouping", 64 * MiB), ("sequential", 7 * MiB)):
        res = _compile(folder, strategy, budget)
        e = Engine(res.plan)
        got = e.encode_batch(ids, mask)
        e.close()
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
    with pytest.raises(UserError, match="model_type 'mamba' is not supported; supported: gpt2, llama, bert"):
        _compile(folder)
