"""Hostile input to `edge-rt-compile`: each case is a generated malformed model (HF folder, GGUF, ONNX), a bad
override or a hostile chat template. The promise: one line on stderr naming what and where, exit code 2, no
traceback, nothing left in out_dir. The app runs in-process (`app.main` with its argv), as the CLI does; one case
also runs as a real process.

Nothing binary is committed: every file is written here, from numpy arrays and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_rt_compiler import app
from edge_rt_compiler.chat_template import MAX_STEPS, render_chat
from edge_rt_compiler.frontends.synthetic import write_safetensors

from .conftest import ROOT

BINARY = b"\xff\xfe\x00\x01\x80\x81not text\x00"
NESTED_LOOPS = ("{% for a in range(9999) %}{% for b in range(9999) %}{% for c in range(9999) %}{% endfor %}"
                "{% endfor %}{% endfor %}{{ messages[0]['content'] }}")


# ---- generated inputs ------------------------------------------------------------------------------------------

def llama_folder(folder: Path, config: dict | None = None, dtypes: dict | None = None) -> Path:
    """A tiny llama HF folder (2 layers, hidden 16, 2 heads, 1 kv head, vocab 64) written with numpy; `config`
    overrides config.json keys (`...` deletes one), `dtypes` stores tensors in another numpy dtype."""
    V, D, H, KV, F = 64, 16, 2, 1, 24
    hd = D // H
    cfg = {"model_type": "llama", "vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": 2,
           "num_attention_heads": H, "num_key_value_heads": KV, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": True, "eos_token_id": 2}
    for k, v in (config or {}).items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(2):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(D, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(D, np.float32),
                  p + "self_attn.q_proj.weight": w(H * hd, D), p + "self_attn.k_proj.weight": w(KV * hd, D),
                  p + "self_attn.v_proj.weight": w(KV * hd, D), p + "self_attn.o_proj.weight": w(D, H * hd),
                  p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
                  p + "mlp.down_proj.weight": w(D, F)})
    for k, dt in (dtypes or {}).items():
        t[k] = t[k].astype(dt)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", t)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _retype(path: Path, tensor: str, dtype: str) -> None:
    """Rename a tensor's dtype in a safetensors header in place (BOOL has no numpy twin to write it with)."""
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    h = json.loads(b[8:8 + n])
    h[tensor]["dtype"] = dtype
    hb = json.dumps(h, separators=(",", ":")).encode()
    assert len(hb) <= n
    path.write_bytes(b[:8] + hb + b" " * (n - len(hb)) + b[8 + n:])


def _with_file(name: str, content: bytes | str):
    def make(folder: Path) -> Path:
        f = llama_folder(folder)
        data = content.encode() if isinstance(content, str) else content
        (f / name).write_bytes(data)
        return f
    return make


def _bool_weight(folder: Path) -> Path:
    f = llama_folder(folder, dtypes={"model.norm.weight": np.uint8})
    _retype(f / "model.safetensors", "model.norm.weight", "BOOL")
    return f


HF_CASES = {
    # config.json values: type- and range-checked, the file and key named
    "heads_zero": ({"num_attention_heads": 0}, "'num_attention_heads' = 0, expected a whole number"),
    "vocab_string": ({"vocab_size": "8192abc"}, "'vocab_size' = '8192abc', expected a whole number"),
    "eps_null": ({"rms_norm_eps": None}, "'rms_norm_eps' = None, expected a positive number"),
    "eps_negative": ({"rms_norm_eps": -1e-5}, "'rms_norm_eps' = -1e-05, expected a positive number"),
    "rope_factor_zero": ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "'rope_scaling.factor' = 0"),
    "rope_factor_nan": ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "'rope_scaling.factor'"),
    "rope_llama3_band": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
                         "'rope_scaling.high_freq_factor' = 4.0, expected a number above low_freq_factor"),
    "rope_scaling_string": ({"rope_scaling": "linear"}, "'rope_scaling' = 'linear', expected an object"),
    "theta_string": ({"rope_theta": "abc"}, "'rope_theta' = 'abc'"),
    "hidden_negative": ({"hidden_size": -16}, "'hidden_size' = -16"),
    "layers_absurd": ({"num_hidden_layers": 10**12}, "'num_hidden_layers' = 1000000000000"),
    "hidden_not_divisible": ({"num_attention_heads": 3}, "hidden size 16 is not divisible by num_attention_heads = 3"),
    "kv_not_dividing": ({"num_attention_heads": 4, "num_key_value_heads": 3},
                        "num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"),
    "kv_zero": ({"num_key_value_heads": 0}, "'num_key_value_heads' = 0"),
    "bool_for_int": ({"num_hidden_layers": True}, "'num_hidden_layers' = True"),
    "fraction_for_int": ({"hidden_size": 16.5}, "'hidden_size' = 16.5"),
    "list_for_int": ({"intermediate_size": [24]}, "'intermediate_size' = [24]"),
    "context_zero": ({"max_position_embeddings": 0}, "'max_position_embeddings' = 0"),
    "head_dim_string": ({"head_dim": "x"}, "'head_dim' = 'x'"),
    "tie_string": ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' = 'yes', expected true or false"),
    "activation_list": ({"hidden_act": ["silu"]}, "'hidden_act' = ['silu'] is not supported; supported: silu"),
    "eos_string": ({"eos_token_id": "abc"}, "'eos_token_id' = 'abc', expected a token id"),
    "eos_outside_vocab": ({"eos_token_id": 64}, "'eos_token_id' = 64, expected a token id (a whole number >= 0 "
                                                "below 64)"),
    "vocab_missing": ({"vocab_size": ...}, "missing 'vocab_size'"),
}

FILE_CASES = {
    # binary / non-UTF-8 / not-a-tokenizer companions
    "config_binary": (_with_file("config.json", BINARY), "config.json: not a text file"),
    "config_not_json": (_with_file("config.json", "{model_type: llama"), "config.json: cannot parse JSON"),
    "config_huge_int": (_with_file("config.json", '{"model_type": "llama", "vocab_size": ' + "9" * 5000 + "}"),
                        "config.json: cannot read JSON"),
    "tokenizer_binary": (_with_file("tokenizer.json", BINARY), "tokenizer.json: not a text file"),
    "tokenizer_not_tokenizer": (_with_file("tokenizer.json", '{"version": "1.0"}'),
                                "tokenizer.json: not a valid tokenizer.json"),
    "generation_config_binary": (_with_file("generation_config.json", BINARY), "generation_config.json: not a text"),
    "tokenizer_config_binary": (_with_file("tokenizer_config.json", BINARY), "tokenizer_config.json: not a text"),
    "chat_template_nul": (_with_file("tokenizer_config.json", json.dumps({"chat_template": "a\x00b"})),
                          "tokenizer_config.json: the chat template is not text"),
    "chat_template_file_binary": (_with_file("chat_template.jinja", BINARY), "chat_template.jinja: not a text file"),
    "modules_binary": (_with_file("modules.json", BINARY), "modules.json: not a text file"),
    # non-float tensors where a float weight is expected
    "weight_i8": (lambda f: llama_folder(f, dtypes={"model.layers.0.mlp.up_proj.weight": np.int8}),
                  "tensor 'model.layers.0.mlp.up_proj.weight' is I8, but a float weight"),
    "weight_i32": (lambda f: llama_folder(f, dtypes={"model.embed_tokens.weight": np.int32}),
                   "tensor 'model.embed_tokens.weight' is I32"),
    "weight_bool": (_bool_weight, "tensor 'model.norm.weight' is BOOL"),
}


def _gguf_cases() -> dict:
    from .test_gguf import TOKENS

    return {
        "block_count_2_31": ({"llama.block_count": ("u32", 2**31)}, "'llama.block_count' = 2147483648"),
        "block_count_int32_max": ({"llama.block_count": ("u32", 2**31 - 1)},
                                  "'llama.block_count' = 2147483647 but the file has tensors of 2 blocks"),
        "block_count_3": ({"llama.block_count": ("u32", 3)}, "'llama.block_count' = 3 but the file has tensors of 2"),
        "head_count_huge": ({"llama.attention.head_count": ("u32", 2**31 - 1)}, "'llama.attention.head_count'"),
        "head_count_kv_mismatch": ({"llama.attention.head_count_kv": ("u32", 4)},
                                   "'llama.attention.head_count_kv' = 4 but tensor 'blk.0.attn_k.weight' has 32 rows"),
        "key_length_huge": ({"llama.attention.key_length": ("u32", 2**30),
                             "llama.attention.value_length": ("u32", 2**30)}, "'llama.attention.head_count' = 4 but"),
        "embedding_length_wrong": ({"llama.embedding_length": ("u32", 2**20)},
                                   "'llama.embedding_length' = 1048576 but tensor 'token_embd.weight' is 64 wide"),
        "feed_forward_huge": ({"llama.feed_forward_length": ("u32", 2**32 - 1)}, "'llama.feed_forward_length'"),
        "context_length_huge": ({"llama.context_length": ("u32", 2**32 - 1)}, "'llama.context_length' = 4294967295"),
        "vocab_size_huge": ({"llama.vocab_size": ("u32", 2**31 - 1)},
                            "'llama.vocab_size' = 2147483647 but tensor 'token_embd.weight' has"),
        "tokens_short": ({"tokenizer.ggml.tokens": ("arr", TOKENS[:100])},
                         "'tokenizer.ggml.tokens' has 100 tokens but tensor 'token_embd.weight' has"),
        "rope_factor_zero": ({"llama.rope.scaling.type": ("str", "linear"), "llama.rope.scaling.factor": ("f32", 0.0)},
                             "'llama.rope.scaling.factor' = 0.0"),
        "rope_scale_linear_zero": ({"llama.rope.scale_linear": ("f32", 0.0)}, "'llama.rope.scale_linear' = 0.0"),
        "chat_template_nul": ({"tokenizer.chat_template": ("str", "a\x00b")}, "the chat template is not text"),
    }


OVERRIDE_CASES = [
    (["+onnx_dims.batch=abc"], "onnx_dims.batch='abc' must be a whole number"),
    (["+onnx_dims.batch=0"], "onnx_dims.batch=0 must be a whole number in [1,"),
    (["onnx_dims=5"], "bad override: Error merging override onnx_dims=5"),
    (["threads=-4"], "did you mean target.threads?"),
    (["target.threads=-4"], "target.threads=-4 must be a whole number in [1, 4096]"),
    (["target.threads=0"], "target.threads=0 must be a whole number in [1, 4096]"),
    (["target.threads=abc"], "could not be converted to Integer"),
    (["target.read_bandwidth_gbs=-1"], "target.read_bandwidth_gbs=-1.0 must be a number more than 0"),
    (["target.prefetch_headroom=5"], "target.prefetch_headroom=5.0 must be a number at least 0 and at most 0.9"),
    (["budget=abc"], "budget='abc' is not a size"),
    (["budget=-1G"], "budget='-1G' is not a size"),
    (["max_context=0"], "max_context=0 must be a positive whole number"),
    (["max_batch_tokens=-1"], "max_batch_tokens=-1 must be a positive whole number"),
    (["model.max_context=0"], "model.max_context=0 must be a whole number"),
    (["budgett=1G"], "Could not override 'budgett' (did you mean budget?)"),
    (["+foo=1"], "unknown setting 'foo'"),
    (["+target.foo=1"], "unknown setting 'target.foo'"),
    (["+model.foo=1"], "unknown setting 'model.foo'"),
    (["out_dir="], "out_dir='' must name a folder"),
]


# ---- running the app -------------------------------------------------------------------------------------------

def run_app(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`edge-rt-compile ARGS` in-process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["edge-rt-compile", *args])
    code = 0
    try:
        app.main()
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, out: Path, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("edge-rt-compile: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []
    assert not left, f"left behind in out_dir: {left}"


def _compile_args(path: Path, out: Path) -> list[str]:
    return ["model=local", f"model.path={path}", f"out_dir={out}", "budget=512M", "strategy=sequential"]


# ---- the cases ---------------------------------------------------------------------------------------------------

def test_the_generated_models_compile(tmp_path, monkeypatch, capsys):
    """The baseline every case below corrupts is itself a good model."""
    from .test_gguf import write_tiny_llama

    write_tiny_llama(tmp_path / "ok.gguf")
    for i, path in enumerate((llama_folder(tmp_path / "ok"), tmp_path / "ok.gguf")):
        code, err = run_app(_compile_args(path, tmp_path / f"out{i}"), monkeypatch, capsys)
        assert code == 0, err


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_bad_config_json(tmp_path, monkeypatch, capsys, case):
    config, needle = HF_CASES[case]
    folder = llama_folder(tmp_path / case, config)
    code, err = run_app(_compile_args(folder, tmp_path / "out"), monkeypatch, capsys)
    assert_refused(code, err, tmp_path / "out", str(folder / "config.json"), needle)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_model_files(tmp_path, monkeypatch, capsys, case):
    make, needle = FILE_CASES[case]
    folder = make(tmp_path / case)
    code, err = run_app(_compile_args(folder, tmp_path / "out"), monkeypatch, capsys)
    assert_refused(code, err, tmp_path / "out", str(folder), needle)


@pytest.mark.parametrize("case", sorted(_gguf_cases()))
def test_bad_gguf_metadata(tmp_path, monkeypatch, capsys, case):
    from .test_gguf import write_tiny_llama

    meta, needle = _gguf_cases()[case]
    path = tmp_path / f"{case}.gguf"
    write_tiny_llama(path, meta_overrides=meta)
    code, err = run_app(_compile_args(path, tmp_path / "out"), monkeypatch, capsys)
    assert_refused(code, err, tmp_path / "out", str(path), needle)


@pytest.mark.parametrize("args,needle", OVERRIDE_CASES)
def test_bad_overrides(tmp_path, monkeypatch, capsys, args, needle):
    out = tmp_path / "out"
    code, err = run_app(["model=synthetic_gpt2", "budget=64M", "max_context=64", f"out_dir={out}", *args],
                        monkeypatch, capsys)
    assert_refused(code, err, out, needle)
    assert not (ROOT / "synthetic-gpt2").exists()  # out_dir= must not fall back to the working folder


def test_bad_onnx_companions(tmp_path, monkeypatch, capsys):
    from .test_onnx_frontend import mlp

    path = mlp(tmp_path / "m.onnx")
    for name, content, needle in (("tokenizer.json", BINARY, "tokenizer.json: not a text file"),
                                  ("tokenizer.json", "[]", "tokenizer.json: not a valid tokenizer.json"),
                                  ("generation_config.json", '{"eos_token_id": "abc"}', "'eos_token_id' = 'abc'")):
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        code, err = run_app(_compile_args(path, tmp_path / "out"), monkeypatch, capsys)
        assert_refused(code, err, tmp_path / "out", needle)
        (tmp_path / name).unlink()


def test_one_case_as_a_real_process(tmp_path):
    """The in-process runs above match the installed command: exit 2, one line, no traceback."""
    from .test_gguf import write_tiny_llama

    path = tmp_path / "blocks.gguf"
    write_tiny_llama(path, meta_overrides={"llama.block_count": ("u32", 2**31 - 1)})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "edge_rt_compiler.app", *_compile_args(path, out)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert_refused(r.returncode, r.stderr, out, "'llama.block_count' = 2147483647")


# ---- chat templates: an operation limit that holds off the main thread too ---------------------------------------

@pytest.mark.parametrize("template,needle", [
    (NESTED_LOOPS, f"more than {MAX_STEPS} template steps"),
    ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "template steps"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}", "range of 100000 items"),
    ("{{ 'x' * 100000000 }}", "a repetition of 100000000 items"),
    ("{{ 2 ** 100000000 }}", "an exponent of 100000000"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
])
@pytest.mark.parametrize("where", ["main", "thread"])
def test_hostile_templates_stop(template, needle, where):
    box: dict = {}

    def work() -> None:
        box["result"] = render_chat(template, {"bos_token": "", "eos_token": ""})

    if where == "main":
        work()
    else:  # a joblib or server worker thread: SIGALRM cannot reach it, the step limit must
        t = threading.Thread(target=work, daemon=True)
        t.start()
        t.join(120)  # a hang guard, not a speed bound
        assert not t.is_alive(), "the template rendering does not stop off the main thread"
    r = box["result"]
    assert r["chat"] is None and r["chat_prefix"] is None
    assert needle in r["chat_error"], r["chat_error"]


def test_hostile_template_compiles_in_a_worker_thread(tmp_path):
    """A model whose template never ends still compiles (the chat structure is recorded as unavailable), from a
    thread as joblib's threading backend or a server would run it."""
    from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model

    folder = llama_folder(tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": NESTED_LOOPS}))
    box: dict = {}

    def work() -> None:
        try:
            box["res"] = compile_model(CompileRequest(ModelRequest("m", "local", path=str(folder)), "sequential",
                                                      512 << 20, {"threads": 2, "read_bandwidth_gbs": 8.0,
                                                                  "mem_bandwidth_gbs": 25.0, "compute_gflops": 190.0,
                                                                  "prefetch_headroom": 0.2},
                                                      out_dir=tmp_path / "out"))
        except BaseException as e:  # handed to the test's thread
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(300)
    assert not t.is_alive(), "compiling a model with a hostile template hangs in a worker thread"
    if "error" in box:
        raise box["error"]
    gen = json.loads((box["res"].plan_path.parent / "generation.json").read_text())
    assert "template steps" in gen["chat_error"] and gen["chat"] is None
