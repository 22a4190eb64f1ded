"""The executor verifies every plan on load: generated corruptions of real plans are refused with one line.

Each case mutates a compiled plan's JSON (or the files beside it) the way a bit flip, a hand edit or a hostile
file would, and must give `UserError` from `load_plan`/`Engine` and, through the CLI, exit code 2 with one
line on stderr and no traceback, never "this is a bug".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import load_plan

from .conftest import compile_synth

MiB = 1 << 20
TARGET = {"name": "performance", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
          "compute_gflops": 190.0, "prefetch_headroom": 0.2}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    return {"streamed": compile_synth(out, "sequential", 10 * MiB, TARGET).plan_path,
            "resident": compile_synth(out, "greedy_grouping", 64 * MiB, TARGET).plan_path}


def _copy(plan: Path, dst: Path) -> Path:
    shutil.copytree(plan.parent, dst, ignore=shutil.ignore_patterns("*.plan.json", ".lock"))
    shutil.copy(plan, dst / plan.name)
    return dst / plan.name


def _first(d: dict, kind: str) -> str:
    return next(n for n, b in d["buffers"].items() if b["kind"] == kind)


def _overlapping_pair(d: dict) -> tuple[str, str]:
    """Two activation buffers live at the same op (the input and output of one op) at different offsets."""
    for op in d["schedule"]:
        ins = [t for t in op["inputs"] if t and not t.startswith("@") and d["buffers"][t]["kind"] == "activation"]
        outs = [t for t in op["outputs"] if t and d["buffers"][t]["kind"] == "activation"]
        for a in ins:
            for b in outs:
                if d["buffers"][a]["offset"] != d["buffers"][b]["offset"] and d["buffers"][a]["nbytes"]:
                    return a, b
    raise AssertionError("no pair")


def _alias(d: dict) -> None:
    a, b = _overlapping_pair(d)
    d["buffers"][b]["offset"] = d["buffers"][a]["offset"]


def _set(path: str, value: object):  # noqa: ANN202
    def f(d: dict) -> None:
        keys = path.split(".")
        for k in keys[:-1]:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(keys[-1]) if isinstance(d, list) else keys[-1]] = value
    return f


def _op_attr(op: str, key: str, value: object):  # noqa: ANN202
    def f(d: dict) -> None:
        next(o for o in d["schedule"] if o["op"] == op)["attrs"][key] = value
    return f


def _kv_short(d: dict) -> None:
    for b in d["buffers"].values():
        if b["kind"] == "state" and len(b["shape"]) == 3:
            b["shape"][1] = d["max_context"] - 1


def _empty_schedule(d: dict) -> None:
    d["schedule"] = []
    for g in d["groups"]:
        g["op_start"] = g["op_end"] = 0


def _swap_ops(d: dict) -> None:
    """An op reading a buffer before the op that writes it (lifetimes contradict the schedule)."""
    s = d["schedule"]
    i = next(k for k in range(1, len(s)) if s[k]["group"] == s[k - 1]["group"])
    s[i]["inputs"], s[i - 1]["inputs"] = s[i - 1]["inputs"], s[i]["inputs"]


MUTATIONS = {
    "aliased live buffers": _alias,
    "NaN attribute": _op_attr("LayerNormalization", "epsilon", float("nan")),
    "infinite attribute": _op_attr("CausalAttention", "scale", float("inf")),
    "unknown attribute": _op_attr("Linear", "bogus", 1),
    "missing required attribute": lambda d: next(o for o in d["schedule"] if o["op"] == "Linear")["attrs"].pop(
        "out_features"),
    "unknown op": _set("schedule.0.op", "FancyOp"),
    "empty schedule": _empty_schedule,
    "KV cache shorter than max_context": _kv_short,
    "arena of 1 TiB": _set("arena.size", 1 << 40),
    "budget smaller than the arena": _set("budget", 1024),
    "negative offset": lambda d: d["buffers"][_first(d, "activation")].__setitem__("offset", -64),
    "unaligned offset": lambda d: d["buffers"][_first(d, "activation")].__setitem__("offset", 8),
    "buffer past the arena": lambda d: d["buffers"][_first(d, "activation")].__setitem__("offset", d["arena"]["size"]),
    "unknown dtype": lambda d: d["buffers"][_first(d, "activation")].__setitem__("dtype", "complex64"),
    "unknown buffer kind": lambda d: d["buffers"][_first(d, "activation")].__setitem__("kind", "magic"),
    "unknown weight format": lambda d: next(iter(d["weights"].values())).__setitem__("format", "q3_x"),
    "weight size wrong for its format": lambda d: next(iter(d["weights"].values())).__setitem__("nbytes", 12),
    "string where an int goes": _set("max_context", "2048"),
    "bool where an int goes": _set("max_batch_tokens", True),
    "unknown input buffer": _set("schedule.3.inputs.0", "nowhere"),
    "unknown weight": _set("schedule.1.inputs.1", "@nowhere"),
    "group names a missing op range": _set("groups.0.op_end", 10**6),
    "group index out of order": _set("groups.0.index", 7),
    "op in another group's range": _set("schedule.2.group", 10**6),
    "schema too old": _set("schema_version", 1),
    "big endian": _set("byte_order", "big"),
    "weights file outside the folder": _set("files.weights", "../weights.safetensors"),
    "absolute weights path": _set("files.weights", "/etc/passwd"),
    "weights hash differs": _set("files.weights_sha256", "ab" * 32),
    "graph input without a buffer": _set("graph.inputs.0.name", "nobuffer"),
    "bad kv mode": _set("graph.kv.mode", "teleport"),
    "lifetime contradicts the schedule": _swap_ops,
}


def _write(p: Path, d: dict) -> None:
    p.write_text(json.dumps(d))


def exec_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_rt_exec", *args], capture_output=True, text=True, timeout=120)


def _one_line_exit_2(r: subprocess.CompletedProcess) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr and "this is a bug" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(MUTATIONS))
@pytest.mark.parametrize("kind", ["streamed", "resident"])
def test_corrupt_plans_are_refused(plans, tmp_path: Path, name: str, kind: str) -> None:
    p = _copy(plans[kind], tmp_path / "a")
    d = json.loads(p.read_text())
    MUTATIONS[name](d)
    _write(p, d)
    with pytest.raises(UserError):
        from edge_rt_exec.engine import Engine

        Engine(load_plan(p)).close()


@pytest.mark.parametrize("name", ["aliased live buffers", "NaN attribute", "unknown op",
                                  "KV cache shorter than max_context", "weights file outside the folder",
                                  "lifetime contradicts the schedule"])
def test_corrupt_plans_through_the_cli(plans, tmp_path: Path, name: str) -> None:
    p = _copy(plans["streamed"], tmp_path / "a")
    d = json.loads(p.read_text())
    MUTATIONS[name](d)
    _write(p, d)
    _one_line_exit_2(exec_cli("run", str(p), "-p", "hi", "-n", "2"))


def test_duplicate_keys_deep_nesting_and_garbage(plans, tmp_path: Path) -> None:
    p = _copy(plans["streamed"], tmp_path / "a")
    text = p.read_text()
    for bad in [text.replace('"budget":', '"budget": 1, "budget":', 1), "[" * 100000 + "]" * 100000,
                text[: len(text) // 2], "\x00\x01binary", ""]:
        p.write_text(bad)
        _one_line_exit_2(exec_cli("run", str(p), "-p", "hi"))


def test_symlink_out_of_the_folder_and_fifos(plans, tmp_path: Path) -> None:
    p = _copy(plans["streamed"], tmp_path / "a")
    d = json.loads(p.read_text())
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(p.parent / d["files"]["weights"], outside)
    (p.parent / d["files"]["weights"]).unlink()
    os.symlink(outside, p.parent / d["files"]["weights"])
    _one_line_exit_2(exec_cli("run", str(p), "-p", "hi"))
    (p.parent / d["files"]["weights"]).unlink()
    os.mkfifo(p.parent / d["files"]["weights"])  # a FIFO would block a plain open() forever
    _one_line_exit_2(exec_cli("run", str(p), "-p", "hi"))
    fifo_plan = tmp_path / "fifo.plan.json"
    os.mkfifo(fifo_plan)
    _one_line_exit_2(exec_cli("run", str(fifo_plan), "-p", "hi"))
