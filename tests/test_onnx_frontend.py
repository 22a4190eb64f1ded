"""ONNX frontend and graph execution: import checks and malformed files, folding and fusions, symbolic dims,
every strategy and budget on a small graph (against onnxruntime when installed, else the numpy twins), the
`infer` CLI and the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("omegaconf", reason="compiling needs the compile extra")

from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nph  # noqa: E402

from edge_rt_compiler import passes  # noqa: E402
from edge_rt_compiler.frontends import load_path  # noqa: E402
from edge_rt_compiler.interpret import evaluate  # noqa: E402
from edge_rt_compiler.ir import ops_in_order  # noqa: E402
from edge_rt_compiler.partition import STRATEGIES  # noqa: E402
from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model  # noqa: E402
from edge_rt_compiler.verify import verify_plan  # noqa: E402
from edge_rt_exec.engine import Engine  # noqa: E402
from edge_rt_exec.errors import UserError  # noqa: E402

MiB = 1 << 20
TARGET = {
    "name": "performance",
    "threads": 2,
    "read_bandwidth_gbs": 8.0,
    "mem_bandwidth_gbs": 25.0,
    "compute_gflops": 190.0,
    "prefetch_headroom": 0.2,
}


def save(graph, path: Path, opset: int = 17, **kw) -> Path:  # noqa: ANN001
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], **kw)
    onnx.save(model, str(path))
    return path


def compile_onnx(path: Path, out: Path, strategy: str = "greedy_grouping", budget: int = 64 * MiB, **kw):
    return compile_model(
        CompileRequest(ModelRequest(path.stem, "local", path=str(path)), strategy, budget, TARGET, out_dir=out, **kw)
    )


class _Run:
    """An engine run on named inputs; `.worst` is validate mode's worst difference per op type."""

    def __init__(self, plan, validate: bool = False) -> None:  # noqa: ANN001
        self.e = Engine(plan, validate=validate)
        self.worst = self.e.worst

    def infer(self, feeds: dict) -> dict:
        self.e.run(feeds)
        return {o["name"]: np.array(self.e.output(o["name"])) for o in self.e.plan.graph["outputs"]}

    def close(self) -> None:
        self.e.close()


def simplified(path: Path):
    """The ONNX file's IR after the settings-free passes (fold, fuse, dce, classify)."""
    return passes.simplify(load_path(path).graph)


def op_types(g) -> list[str]:
    return [g.nodes[n]["op"] for n in ops_in_order(g)]


def mlp(path: Path, layers: int = 4, d: int = 64, seed: int = 0) -> Path:
    """x [batch, seq, d] -> MatMul+Add -> decomposed erf GELU -> ... -> LayerNorm -> Reshape via Shape chain."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        w = (rng.standard_normal((d, 2 * d)) * 0.1).astype(np.float32)
        b = (rng.standard_normal(2 * d) * 0.1).astype(np.float32)
        w2 = (rng.standard_normal((2 * d, d)) * 0.1).astype(np.float32)
        inits += [nph.from_array(w, f"w{i}"), nph.from_array(b, f"b{i}"), nph.from_array(w2, f"v{i}")]
        p = f"l{i}."
        nodes += [
            oh.make_node("MatMul", [x, f"w{i}"], [p + "mm"]),
            oh.make_node("Add", [f"b{i}", p + "mm"], [p + "h"]),
            oh.make_node("Div", [p + "h", "sqrt2"], [p + "d"]),
            oh.make_node("Erf", [p + "d"], [p + "e"]),
            oh.make_node("Add", [p + "e", "one"], [p + "e1"]),
            oh.make_node("Mul", [p + "h", p + "e1"], [p + "m"]),
            oh.make_node("Mul", [p + "m", "half"], [p + "g"]),
            oh.make_node("MatMul", [p + "g", f"v{i}"], [p + "o"]),
            oh.make_node("Add", [x, p + "o"], [p + "r"]),
        ]
        x = p + "r"
    inits += [
        nph.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
        nph.from_array(np.array(1.0, np.float32), "one"),
        nph.from_array(np.array(0.5, np.float32), "half"),
        nph.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), "ln_w"),
        nph.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), "ln_b"),
        nph.from_array(np.array([0], np.int64), "i0"),
        nph.from_array(np.array([-1], np.int64), "m1"),
    ]
    nodes += [
        oh.make_node("LayerNormalization", [x, "ln_w", "ln_b"], ["ln"], axis=-1, epsilon=1e-5),
        oh.make_node("Shape", ["ln"], ["shp"]),
        oh.make_node("Gather", ["shp", "i0"], ["bdim"], axis=0),
        oh.make_node("Concat", ["bdim", "m1"], ["tgt"], axis=0),
        oh.make_node("Reshape", ["ln", "tgt"], ["y"]),
        oh.make_node("ReduceMean", ["y"], ["mean"], axes=[1], keepdims=0),
    ]
    g = oh.make_graph(
        nodes,
        "mlp",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", d])],
        [
            oh.make_tensor_value_info("y", TP.FLOAT, ["batch", None]),
            oh.make_tensor_value_info("mean", TP.FLOAT, ["batch"]),
        ],
        inits,
    )
    return save(g, path)


def reference(path: Path, feeds: dict) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        sess = ReferenceEvaluator(str(path))
        names = [o.name for o in onnx.load(str(path)).graph.output]
        return dict(zip(names, sess.run(None, feeds)))
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {o.name: v for o, v in zip(s.get_outputs(), s.run(None, feeds))}


# ---- import, folding, fusion ----------------------------------------------------------------------------------


def test_import_folds_and_fuses(tmp_path):
    path = mlp(tmp_path / "mlp.onnx")
    src = load_path(path)
    assert src.kind == "graph" and src.graph.graph["family"] == "onnx"
    assert [src.graph.nodes[n]["op"] for n in ops_in_order(src.graph)].count("MatMul") == 8  # as the file has it
    g = passes.simplify(src.graph)
    ops = op_types(g)
    assert ops.count("Linear") == 8 and ops.count("Gelu") == 4, ops
    assert "MatMul" not in ops and "Erf" not in ops and "Div" not in ops
    # Shape -> Gather -> Concat depends on the symbolic batch: kept; the weights are [out, in] float32
    ws = g.graph["weights"]
    assert "Shape" in ops and all(w.shape[0] in (64, 128) for w in ws.values())
    lin = [n for n in ops_in_order(g) if g.nodes[n]["op"] == "Linear"][0]
    assert g.nodes[lin]["inputs"] == ["x", "@w0::T", "@b0"] and g.nodes[lin]["attrs"] == {"out_features": 128}
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    got, want = evaluate(g, {"x": x}), reference(path, {"x": x})  # the fused graph computes what the file says
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-5)
    static = tmp_path / "static.onnx"
    gp = onnx.load(str(tmp_path / "mlp.onnx")).graph
    gp.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    gp.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    save(gp, static)
    ops = op_types(simplified(static))
    assert "Shape" not in ops and "Gather" not in ops and "Concat" not in ops, ops  # folded away


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 5), (4, 16)])
def test_symbolic_dims_match_reference(tmp_path, batch, seq):
    path = mlp(tmp_path / "mlp.onnx")
    res = compile_onnx(path, tmp_path, max_context=16, max_batch_tokens=64)
    assert res.plan.graph["bounds"] == {"batch": 4, "seq": 16}
    assert res.plan.graph["inputs"] == [{"name": "x", "dtype": "float32", "dims": ["batch", "seq", 64]}]
    assert res.plan.buffers["x"].shape == [4, 16, 64] and res.plan.graph["kv"]["mode"] == "none"
    x = np.random.default_rng(1).standard_normal((batch, seq, 64)).astype(np.float32)
    want = reference(path, {"x": x})
    eng = _Run(res.plan, validate=True)
    got = eng.infer({"x": x})
    eng.close()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=1e-4)
    assert max(eng.worst.values()) < 1e-5, eng.worst


def test_inputs_beyond_the_plan_are_refused(tmp_path):
    res = compile_onnx(mlp(tmp_path / "mlp.onnx"), tmp_path, max_context=16, max_batch_tokens=32)
    eng = _Run(res.plan)
    try:
        with pytest.raises(UserError, match=r"dim 1 \('seq'\) is 17, above the plan's maximum 16"):
            eng.infer({"x": np.zeros((1, 17, 64), np.float32)})
        with pytest.raises(UserError, match="input 'x' is missing"):
            eng.infer({})
        with pytest.raises(UserError, match="dim 2 is 3 but the graph fixes it at 64"):
            eng.infer({"x": np.zeros((1, 2, 3), np.float32)})
    finally:
        eng.close()


def test_every_strategy_and_budget(tmp_path):
    """Streamed plans (linear layers tiled into small slots) give the resident plan's outputs bit for bit."""
    path = mlp(tmp_path / "mlp.onnx", layers=6, d=128)
    x = np.random.default_rng(2).standard_normal((2, 8, 128)).astype(np.float32)
    want = reference(path, {"x": x})
    weights = sum(w.nbytes for w in simplified(path).graph["weights"].values())
    seen, base = set(), None
    for strategy in STRATEGIES:
        # A quarter of the weights beside the 6M runtime reserve (speculative_prefetch also needs its headroom).
        for budget in (weights // 4 + 6 * MiB + MiB // 2, weights // 4 + 9 * MiB, 64 * MiB):
            try:
                res = compile_onnx(
                    path,
                    tmp_path,
                    strategy,
                    budget,
                    max_context=8,
                    max_batch_tokens=16,
                    plan_name=f"{strategy}-{budget}.plan.json",
                )
            except UserError as e:
                assert "needs at least" in str(e) and strategy in ("speculative_prefetch", "auto")
                continue
            p = res.plan
            verify_plan(p)
            seen.add((p.strategy, p.weights_mode))
            eng = _Run(p)
            got = eng.infer({"x": x})
            eng.close()
            for k in want:
                np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=1e-4)
            base = base or got
            for k in got:
                np.testing.assert_array_equal(got[k], base[k])
    assert {
        ("sequential", "streamed"),
        ("greedy_grouping", "streamed"),
        ("greedy_grouping", "resident"),
        ("speculative_prefetch", "streamed"),
    } <= seen


def test_external_data(tmp_path):
    folder = tmp_path / "ext"
    folder.mkdir()
    path = mlp(folder / "m.onnx")
    model = onnx.load(str(path))
    onnx.save_model(
        model,
        str(folder / "m_ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=64,
    )
    x = np.ones((1, 3, 64), np.float32)
    res = compile_onnx(folder / "m_ext.onnx", tmp_path / "out")
    got = _Run(res.plan).infer({"x": x})
    np.testing.assert_allclose(got["y"], reference(path, {"x": x})["y"], atol=1e-4)


# ---- malformed files: one clear line each -------------------------------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_cycle(tmp_path):
    g = oh.make_graph(
        [
            oh.make_node("Add", ["x", "c"], ["a"], name="first"),
            oh.make_node("Relu", ["a"], ["c"], name="second"),
            oh.make_node("Neg", ["a"], ["y"], name="out"),
        ],
        "cyc",
        [oh.make_tensor_value_info("x", TP.FLOAT, [2])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    with pytest.raises(UserError) as e:
        compile_onnx(save(g, tmp_path / "cyc.onnx"), tmp_path)
    assert "has a cycle (" in _one_line(e) and "first" in str(e.value) and "second" in str(e.value)


def test_missing_initializer_and_dangling_input(tmp_path):
    g = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W"], ["y"], name="proj")],
        "missing",
        [oh.make_tensor_value_info("x", TP.FLOAT, [2, 4])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [2, 4])],
    )
    with pytest.raises(UserError) as e:
        compile_onnx(save(g, tmp_path / "missing.onnx"), tmp_path)
    msg = _one_line(e)
    assert "node 'proj' (MatMul) reads 'W'" in msg and "missing initializer" in msg
    g = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["h"]), oh.make_node("Add", ["h", "ghost"], ["y"], name="add")],
        "dangling",
        [oh.make_tensor_value_info("x", TP.FLOAT, [2])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [2])],
    )
    with pytest.raises(UserError) as e:
        compile_onnx(save(g, tmp_path / "dangling.onnx"), tmp_path)
    assert "node 'add' (Add) reads 'ghost'" in _one_line(e)


def test_missing_and_escaping_external_data(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    model = onnx.load(str(mlp(folder / "src.onnx")))
    onnx.save_model(model, str(folder / "ext.onnx"), save_as_external_data=True, location="w.bin", size_threshold=64)
    (folder / "w.bin").write_bytes((folder / "w.bin").read_bytes()[:100])
    with pytest.raises(UserError) as e:
        compile_onnx(folder / "ext.onnx", tmp_path / "o1")
    assert "truncated" in _one_line(e)
    (folder / "w.bin").unlink()
    with pytest.raises(UserError) as e:
        compile_onnx(folder / "ext.onnx", tmp_path / "o2")
    assert "does not exist beside the model" in _one_line(e)
    m = onnx.load(str(folder / "ext.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../../etc/passwd"
    onnx.save(m, str(folder / "evil.onnx"))
    with pytest.raises(UserError) as e:
        compile_onnx(folder / "evil.onnx", tmp_path / "o3")
    assert "outside the model's folder" in _one_line(e) and "refused" in str(e.value)


def test_truncated_file(tmp_path):
    data = mlp(tmp_path / "ok.onnx").read_bytes()
    for cut in (len(data) // 2, 37, 0):
        bad = tmp_path / f"cut{cut}.onnx"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError) as e:
            compile_onnx(bad, tmp_path)
        assert "truncated or corrupt" in _one_line(e) or "empty file" in str(e.value)


def test_unsupported_ops_are_listed_once(tmp_path):
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["c1"], name="conv1"),
        oh.make_node("Conv", ["c1", "w"], ["c2"], name="conv2"),
        oh.make_node("LpPool", ["c2"], ["y"], name="pool", kernel_shape=[2, 2]),
    ]
    g = oh.make_graph(
        nodes,
        "cnn",
        [oh.make_tensor_value_info("x", TP.FLOAT, [1, 1, 8, 8])],
        [oh.make_tensor_value_info("y", TP.FLOAT, None)],
        [nph.from_array(np.ones((1, 1, 3, 3), np.float32), "w")],
    )
    with pytest.raises(UserError) as e:
        compile_onnx(save(g, tmp_path / "cnn.onnx"), tmp_path)
    msg = _one_line(e)
    assert (
        "3 node(s) of op types edge-rt does not support: Conv (2 nodes, first 'conv1'), LpPool (1 node, first "
        "'pool')" in msg
    )


def test_old_opset_only_when_unchanged(tmp_path):
    g = oh.make_graph(
        [oh.make_node("Not", ["x"], ["y"])],
        "old",
        [oh.make_tensor_value_info("x", TP.BOOL, [3])],
        [oh.make_tensor_value_info("y", TP.BOOL, [3])],
    )
    res = compile_onnx(save(g, tmp_path / "not11.onnx", opset=11), tmp_path)  # Not is the same at 13
    assert _Run(res.plan).infer({"x": np.array([True, False, True])})["y"].tolist() == [False, True, False]
    g = oh.make_graph(
        [oh.make_node("Unsqueeze", ["x"], ["y"], axes=[0])],
        "old",
        [oh.make_tensor_value_info("x", TP.FLOAT, [3])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [1, 3])],
    )
    with pytest.raises(UserError) as e:
        compile_onnx(save(g, tmp_path / "unsq11.onnx", opset=11), tmp_path)
    assert "opset 11 is older than 13 and Unsqueeze changed since" in _one_line(e)


def test_compile_cli_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04junk" * 3)
    r = subprocess.run(
        [sys.executable, "-m", "edge_rt_compiler.app", "model=local", f"model.path={bad}", f"out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in r.stderr


# ---- the infer CLI ------------------------------------------------------------------------------------------------


def test_infer_cli(tmp_path):
    path = mlp(tmp_path / "mlp.onnx", layers=1)
    plan = compile_onnx(path, tmp_path, max_context=8, max_batch_tokens=16).plan_path
    x = np.random.default_rng(3).standard_normal((2, 4, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_rt_exec",
            "infer",
            str(plan),
            "--inputs",
            str(tmp_path / "in.npz"),
            "--out",
            str(tmp_path / "out.npz"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["outputs"]["y"]["shape"] == [2, 256] and info["outputs"]["mean"]["shape"] == [2]
    with np.load(tmp_path / "out.npz") as z:
        want = reference(path, {"x": x})
        np.testing.assert_allclose(z["y"], want["y"], atol=1e-4)
        np.testing.assert_allclose(z["mean"], want["mean"], atol=1e-5)
    np.savez(tmp_path / "bad.npz", x=x, extra=x)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_rt_exec",
            "infer",
            str(plan),
            "--inputs",
            str(tmp_path / "bad.npz"),
            "--out",
            str(tmp_path / "o.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("edge-rt: compiling")]  # first-run notice
    assert r.returncode == 2 and len(errors) == 1 and "unknown input(s) ['extra']" in errors[0], r.stderr


def _norm_graph(path: Path, rms: bool) -> Path:
    """A decomposed LayerNorm (opset < 17 exporters) or RMSNorm (Llama's, with Casts and 1/sqrt) over the last axis."""
    rng = np.random.default_rng(4)
    d = 32
    c = {
        "two": np.array(2.0, np.float32),
        "eps": np.array(1e-5, np.float32),
        "one": np.array(1.0, np.float32),
        "w": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        "b": (0.1 * rng.standard_normal(d)).astype(np.float32),
        "axes": np.array([-1], np.int64),
    }
    if rms:
        nodes = [
            oh.make_node("Cast", ["x"], ["xf"], to=TP.FLOAT),
            oh.make_node("Pow", ["xf", "two"], ["p"]),
            oh.make_node("ReduceMean", ["p", "axes"], ["v"], keepdims=1),
            oh.make_node("Add", ["v", "eps"], ["e"]),
            oh.make_node("Sqrt", ["e"], ["s"]),
            oh.make_node("Div", ["one", "s"], ["r"]),
            oh.make_node("Mul", ["xf", "r"], ["n"]),
            oh.make_node("Cast", ["n"], ["nc"], to=TP.FLOAT),
            oh.make_node("Mul", ["w", "nc"], ["y"]),
        ]
    else:
        nodes = [
            oh.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
            oh.make_node("Sub", ["x", "m"], ["dd"]),
            oh.make_node("Pow", ["dd", "two"], ["p"]),
            oh.make_node("ReduceMean", ["p", "axes"], ["v"], keepdims=1),
            oh.make_node("Add", ["v", "eps"], ["e"]),
            oh.make_node("Sqrt", ["e"], ["s"]),
            oh.make_node("Div", ["dd", "s"], ["n"]),
            oh.make_node("Mul", ["n", "w"], ["nw"]),
            oh.make_node("Add", ["nw", "b"], ["y"]),
        ]
    g = oh.make_graph(
        nodes,
        "norm",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", d])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", d])],
        [nph.from_array(v, k) for k, v in c.items()],
    )
    return save(g, path, opset=18)


@pytest.mark.parametrize("rms", [False, True])
def test_decomposed_norms_fuse(tmp_path, rms):
    path = _norm_graph(tmp_path / "norm.onnx", rms)
    g = simplified(path)
    assert op_types(g) == ["RMSNormalization" if rms else "LayerNormalization"], op_types(g)
    x = np.random.default_rng(5).standard_normal((2, 3, 32)).astype(np.float32) * 3
    np.testing.assert_allclose(evaluate(g, {"x": x})["y"], reference(path, {"x": x})["y"], atol=1e-5, rtol=1e-5)
    got = _Run(compile_onnx(path, tmp_path, max_context=8, max_batch_tokens=16).plan).infer({"x": x})
    np.testing.assert_allclose(got["y"], reference(path, {"x": x})["y"], atol=1e-5, rtol=1e-5)


def test_onnx_linear_weights_take_quant(tmp_path):
    """quant= quantizes the fused Linear weights of an ONNX graph; biases, norms stay f32."""
    gguf = pytest.importorskip("gguf")
    path = mlp(tmp_path / "mlp.onnx")
    res = compile_onnx(path, tmp_path, quant="q8_0", max_context=8, max_batch_tokens=16)
    w = res.plan.weights
    assert w["w0::T"].format == "q8_0" and w["b0"].format == "f32" and w["ln_w"].format == "f32"
    assert res.plan.files["weights"] == "weights-q8_0.safetensors"
    raw = res.plan.file("weights").read_bytes()[w["w0::T"].offset:w["w0::T"].offset + w["w0::T"].nbytes]
    want = gguf.quants.quantize(simplified(path).graph["weights"]["w0::T"].data.load(), gguf.GGMLQuantizationType.Q8_0)
    assert raw == want.tobytes()


def test_onnx_kv_dtype_is_a_note(tmp_path):
    res = compile_onnx(mlp(tmp_path / "mlp.onnx", layers=1), tmp_path, kv_dtype="f16", max_context=8,
                       max_batch_tokens=16)
    assert res.plan.kv_dtype == "float32" and any("kv_dtype=f16 ignored" in n for n in res.notes)


def test_matmul_operands_stay_f32_and_unknown_attributes_are_refused(tmp_path):
    x = oh.make_tensor_value_info("x", TP.FLOAT, [32, 32])
    y = oh.make_tensor_value_info("y", TP.FLOAT, [32, 32])
    w = nph.from_array(np.ones((32, 32), np.float32), "w")
    g = oh.make_graph([oh.make_node("MatMul", ["x", "x2"], ["y"]), oh.make_node("Relu", ["x"], ["x1"]),
                       oh.make_node("Add", ["x1", "w"], ["x2"])], "g", [x], [y], [w])
    res = compile_onnx(save(g, tmp_path / "mm.onnx"), tmp_path, quant="q4_0")
    assert res.plan.weights["w"].format == "f32"  # an Add operand, not a Linear weight
    g = oh.make_graph([oh.make_node("LayerNormalization", ["x", "s"], ["y"], stash_type=0)], "g", [x], [y],
                      [nph.from_array(np.ones(32, np.float32), "s")])
    with pytest.raises(UserError, match="attribute stash_type=0 is not supported") as e:
        compile_onnx(save(g, tmp_path / "ln.onnx", opset=17), tmp_path)
    assert "\n" not in str(e.value)
