"""How compile time grows with graph size: generated ONNX graphs of N nodes, compiled in-process, timed per phase.

  python benchmarks/bench_compile_scale.py [--nodes 1000 5000 20000 100000] [--budget 1G] [--strategy ...]
                                           [--out DIR] [--profile N]

Each graph is a chain of blocks `x -> MatMul(d, 2d) -> Relu -> MatMul(2d, d) -> Add(x) -> Mul(skip)` where the
`Mul` also reads the output of a block a few blocks back (so lifetimes overlap unevenly, as residual streams
do), and every few blocks a wider `MatMul(d, 4d)` side branch lives across several blocks. Sizes differ between
tensors so the planners' size ordering matters. The pipeline's stages are timed by wrapping the functions
`compile_model` calls (pipeline.py is not changed); `load_plan` on the written plan is timed too, since the
executor re-verifies every plan it loads. Times are CPU seconds of this process (`time.process_time`, steadier
than wall time on a shared machine; `compile_wall_s` is the wall time). Prints one JSON line per graph.
`--profile N` prints a cProfile summary of the compile of the N-node graph instead.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as nph  # noqa: E402

from edge_rt_compiler import pipeline, verify  # noqa: E402
from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model  # noqa: E402
from edge_rt_compiler.sizes import parse_bytes  # noqa: E402
from edge_rt_exec.plan import load_plan  # noqa: E402

TARGET = {"threads": 1, "cores": 1, "l2_bytes": 1 << 20, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
          "compute_gflops": 190.0, "prefetch_headroom": 0.2}

#: Functions `compile_model` calls, timed as phases (`verify_plan` includes the executor's `check_plan`, which
#: is also reported on its own).
PHASES = ("load_source", "validate", "passes.plan_dims", "passes.run", "compute_layout", "sched_ops",
          "plan_activations", "minimum_slot", "partition", "tensor_requests", "lay_out", "make_plan",
          "write_weights", "write_companions", "verify_plan", "write_plan")


def chain_graph(n_nodes: int, d: int = 8, rows: int = 2, seed: int = 0) -> onnx.ModelProto:
    """An ONNX model of about `n_nodes` nodes (see the module docstring)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    outs: list[str] = [x]
    side: str | None = None
    w_up = nph.from_array((rng.standard_normal((d, 2 * d)) * 0.1).astype(np.float32), "w_up")
    w_down = nph.from_array((rng.standard_normal((2 * d, d)) * 0.1).astype(np.float32), "w_down")
    w_wide = nph.from_array((rng.standard_normal((d, 4 * d)) * 0.1).astype(np.float32), "w_wide")
    w_back = nph.from_array((rng.standard_normal((4 * d, d)) * 0.1).astype(np.float32), "w_back")
    inits += [w_up, w_down, w_wide, w_back]
    k = 0
    while len(nodes) < n_nodes:
        p = f"b{k}."
        skip = outs[max(0, len(outs) - 1 - int(rng.integers(1, 6)))]
        nodes += [
            oh.make_node("MatMul", [x, "w_up"], [p + "up"]),
            oh.make_node("Relu", [p + "up"], [p + "act"]),
            oh.make_node("MatMul", [p + "act", "w_down"], [p + "down"]),
            oh.make_node("Add", [x, p + "down"], [p + "res"]),
            oh.make_node("Mul", [p + "res", skip], [p + "out"]),
        ]
        x = p + "out"
        if k % 7 == 0:  # a wide side branch, read again a few blocks later
            if side is not None:
                nodes.append(oh.make_node("Add", [x, side], [p + "join"]))
                x = p + "join"
            nodes += [oh.make_node("MatMul", [x, "w_wide"], [p + "wide"]),
                      oh.make_node("Tanh", [p + "wide"], [p + "wide_t"]),
                      oh.make_node("MatMul", [p + "wide_t", "w_back"], [p + "side"])]
            side = p + "side"
        outs.append(x)
        k += 1
    if side is not None:
        nodes.append(oh.make_node("Add", [x, side], ["y"]))
    else:
        nodes.append(oh.make_node("Identity", [x], ["y"]))
    g = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", TP.FLOAT, [rows, d])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [rows, d])], inits)
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])


def _timed(times: dict[str, float], key: str, fn):  # noqa: ANN001, ANN202
    @functools.wraps(fn)
    def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        t0 = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            times[key] += time.process_time() - t0
    return wrapper


def instrument(times: dict[str, float]) -> None:
    for key in PHASES:
        mod, name = (pipeline.passes, key.split(".")[1]) if key.startswith("passes.") else (pipeline, key)
        setattr(mod, name, _timed(times, key, getattr(mod, name)))
    verify.check_plan = _timed(times, "check_plan", verify.check_plan)


def compile_one(path: Path, out: Path, budget: int, strategy: str):  # noqa: ANN201
    return compile_model(CompileRequest(ModelRequest(path.stem, "local", path=str(path)), strategy, budget, TARGET,
                                        out_dir=out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="*", default=[1000, 5000, 20000, 100000])
    ap.add_argument("--budget", default="1G")
    ap.add_argument("--strategy", default="greedy_grouping")
    ap.add_argument("--out", type=Path, default=None, help="folder for the models and plans (default: a temp dir)")
    ap.add_argument("--profile", type=int, default=None, help="cProfile the compile of this many nodes")
    a = ap.parse_args()
    budget = parse_bytes(a.budget)
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if a.profile:
            path = out / f"chain{a.profile}.onnx"
            onnx.save(chain_graph(a.profile), str(path))
            prof = cProfile.Profile()
            prof.runcall(compile_one, path, out, budget, a.strategy)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
            return
        times: dict[str, float] = defaultdict(float)
        instrument(times)
        for n in a.nodes:
            model = chain_graph(n)
            path = out / f"chain{n}.onnx"
            onnx.save(model, str(path))
            times.clear()
            w0, t0 = time.perf_counter(), time.process_time()
            res = compile_one(path, out, budget, a.strategy)
            wall, total = time.perf_counter() - w0, time.process_time() - t0
            t1 = time.process_time()
            plan = load_plan(res.plan_path)
            load_s = time.process_time() - t1
            act = plan.arena["activations"]
            print(json.dumps({
                "nodes": len(model.graph.node), "ops": len(plan.schedule), "buffers": len(plan.buffers),
                "compile_s": round(total, 3), "compile_wall_s": round(wall, 3), "load_plan_s": round(load_s, 3),
                "arena_over_lower_bound": round(act["size"] / max(1, act["lower_bound"]), 4),
                "algorithm": act["algorithm"],
                "phases_s": {k: round(v, 3) for k, v in sorted(times.items(), key=lambda kv: -kv[1]) if v >= 0.001},
            }), flush=True)


if __name__ == "__main__":
    main()
