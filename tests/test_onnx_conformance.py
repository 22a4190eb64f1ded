"""ONNX node conformance: every case ONNX ships for every op edge-rt supports, through the compiler's ONNX
frontend and the executor (STYLE.md #14: the cases are generated data, `collect_testcases()`; nothing binary
is committed).

A case belongs to an op: the op of its one node, or for multi-node ("expanded") cases the op its name starts
with. It is in scope when that op is supported or when every node of it is; an in-scope case must pass unless a
regex in `EXCLUDE` names it, with the reason. Each case is compiled (greedy_grouping, resident) and run with
the engine's validate mode, so the numba kernels are checked against the expected outputs and against their
numpy twins. The per-op pass counts are printed at the end of the run.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("omegaconf", reason="compiling needs the compile extra")

from edge_rt_compiler.frontends.onnx import SUPPORTED_OPS  # noqa: E402
from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model  # noqa: E402
from edge_rt_exec.engine import Engine  # noqa: E402

TARGET = {"name": "conformance", "threads": 1, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
          "compute_gflops": 190.0, "prefetch_headroom": 0.2}

#: (regex over the case name, reason). Every in-scope case these do not match must pass.
EXCLUDE: list[tuple[str, str]] = [
    (r"(FLOAT16|BFLOAT16|FLOAT8|FLOAT4|INT4|UINT4|INT2|UINT2|E8M0|STRING|float16|bfloat16|fp16|bf16|_string)",
     "element type float16 / bfloat16 / float8 / float4 / int4 / int2 / string: edge-rt runs float32, float64, bool "
     "and 8- to 64-bit integers"),
    (r"^test_(constantofshape_(float_ones|int_zeros|int_shape_zero)|expand_dim_(changed|unchanged)|"
     r"range_(float|int32)_type_(positive|negative)_delta|(blackman|hamming|hann)window(_symmetric)?_expanded)$",
     "the output size comes from the values of a graph input; edge-rt plans every buffer ahead of time, so these "
     "ops run when their shape inputs are constants or computed from input shapes"),
    (r"^test_range_.*_expanded$", "the expanded form uses Loop (control flow), which edge-rt does not run"),
    (r"^test_identity_(opt|sequence)$", "optional and sequence types are not tensors; edge-rt runs tensors only"),
    (r"^test_tile(_precomputed)?$", "the repeats come from a graph input, so the output size depends on input values; "
     "edge-rt plans every buffer ahead of time (Tile with constant repeats runs)"),
]

_SNAKE: dict[str, str] = {}


def _names() -> dict[str, str]:
    if not _SNAKE:
        for s in onnx.defs.get_all_schemas_with_history():
            op = s.name
            _SNAKE[op.lower()] = op
            _SNAKE[re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", op)).lower()] = op
        _SNAKE["tril"] = _SNAKE["triu"] = "Trilu"
    return _SNAKE


def op_of(case) -> str:  # noqa: ANN001
    nodes = case.model.graph.node
    if len(nodes) == 1:
        return nodes[0].op_type
    rest = case.name[len("test_"):]
    best = ("", "?")
    for key, op in _names().items():
        if rest.startswith(key) and (len(rest) == len(key) or not rest[len(key)].isalpha()) and len(key) > len(best[0]):
            best = (key, op)
    return best[1]


def _collect() -> dict[str, list]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in collect_testcases() if c.kind == "node"]
    by_op: dict[str, list] = defaultdict(list)
    for c in cases:
        op = op_of(c)
        types = {n.op_type for n in c.model.graph.node}
        if op in SUPPORTED_OPS or types <= SUPPORTED_OPS:
            by_op[op].append(c)
    return dict(sorted(by_op.items()))


CASES = _collect()
RESULTS: dict[str, Counter] = defaultdict(Counter)


def excluded(name: str) -> str | None:
    for rx, reason in EXCLUDE:
        if re.search(rx, name):
            return reason
    return None


def _array(x):  # noqa: ANN001, ANN202
    from onnx import TensorProto, numpy_helper

    return numpy_helper.to_array(x) if isinstance(x, TensorProto) else np.asarray(x)


def run_case(case, out_dir: Path) -> None:  # noqa: ANN001
    """Compile the case's model, run every data set, compare with the expected outputs (rtol/atol of the case)."""
    path = out_dir / f"{case.name}.onnx"
    onnx.save(case.model, path)
    graph_inputs = [i.name for i in case.model.graph.input]
    first_inputs = [_array(x) for x in case.data_sets[0][0]]
    dims: dict[str, int] = {}
    for vi, arr in zip(case.model.graph.input, first_inputs):
        for d, v in zip(vi.type.tensor_type.shape.dim, arr.shape):
            if d.dim_param:
                dims[d.dim_param] = max(dims.get(d.dim_param, 1), int(v))
    res = compile_model(CompileRequest(ModelRequest(case.name, "local", path=str(path)), "greedy_grouping", 1 << 30,
                                       TARGET, out_dir=out_dir, max_context=64, max_batch_tokens=64,
                                       onnx_dims=dims or None))
    eng = Engine(res.plan, threads=1, validate=True)
    try:
        for inputs, expected in case.data_sets:
            got = eng.infer(dict(zip(graph_inputs, [_array(x) for x in inputs])))
            for vo, exp in zip(case.model.graph.output, expected):
                exp = _array(exp)
                g = got[vo.name]
                assert g.shape == exp.shape, f"output {vo.name}: shape {g.shape}, expected {exp.shape}"
                if exp.dtype.kind in "fc":
                    np.testing.assert_allclose(g, exp, rtol=case.rtol, atol=case.atol, equal_nan=True,
                                               err_msg=f"output {vo.name}")
                else:
                    np.testing.assert_array_equal(g, exp, err_msg=f"output {vo.name}")
        for op, err in eng.worst.items():  # the numba kernels against their numpy twins (relative error)
            assert err <= 1e-5, f"{op}: kernel and numpy twin differ by {err:.3g} (relative)"
    finally:
        eng.close()


@pytest.mark.parametrize("op", list(CASES))
def test_node_conformance(op: str, tmp_path: Path) -> None:
    failures = []
    for case in CASES[op]:
        reason = excluded(case.name)
        if reason is not None:
            RESULTS[op]["excluded"] += 1
            continue
        try:
            run_case(case, tmp_path)
            RESULTS[op]["passed"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported with its case
            RESULTS[op]["failed"] += 1
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            failures.append(f"{case.name}: {e.__class__.__name__}: {first[:300]}")
    assert not failures, f"{len(failures)} {op} case(s) failed:\n" + "\n".join(failures)


def test_exclusions_are_all_used() -> None:
    """An exclusion that matches no in-scope case is stale: remove it."""
    names = [c.name for cs in CASES.values() for c in cs]
    for rx, _ in EXCLUDE:
        assert any(re.search(rx, n) for n in names), f"exclusion {rx!r} matches no case"


def test_print_pass_counts(request: pytest.FixtureRequest) -> None:
    """The per-op table (runs last in this file; counts what the conformance tests above recorded)."""
    if not RESULTS:
        pytest.skip("no conformance case ran")
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{'op':<27} passed excluded failed"]
    tot: Counter = Counter()
    for op in sorted(RESULTS):
        r = RESULTS[op]
        tot.update(r)
        label = op if op in SUPPORTED_OPS else f"{op} (expanded)"
        lines.append(f"{label:<27} {r['passed']:>6} {r['excluded']:>8} {r['failed']:>6}")
    lines.append(f"{'total':<27} {tot['passed']:>6} {tot['excluded']:>8} {tot['failed']:>6}")
    text = "\nONNX node conformance (passed / excluded / failed per op):\n" + "\n".join(lines)
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    if rep is not None and cap is not None:
        with cap.global_and_fixture_disabled():  # show it on the terminal, not in the captured output
            rep.write_line(text)
    else:
        print(text)
