"""The compiler writes plans with its own walk (`emit.plan_json`, fast on 100k-op graphs); the bytes must be the
executor's `Plan.to_json()` exactly (plans are compared and checksummed as bytes)."""

from __future__ import annotations

import math
from dataclasses import replace

from edge_rt_compiler.emit import plan_json
from edge_rt_exec.plan import Buffer, Op

from .conftest import compile_synth

MiB = 1 << 20


def test_plan_json_is_to_json_byte_for_byte(synth_dir, target):
    for strategy, budget, quant in (("sequential", 10 * MiB, "keep"), ("greedy_grouping", 64 * MiB, "q4_1"),
                                    ("speculative_prefetch", 16 * MiB, "keep")):
        plan = compile_synth(synth_dir, strategy, budget, target, quant=quant).plan
        assert plan_json(plan) == plan.to_json()
        assert plan.path.read_text(encoding="utf-8") == plan.to_json()


def test_plan_json_odd_values(synth_dir, target):
    """Values no compiled plan holds today, written as json.dumps would: non-ASCII and control characters,
    non-finite and negative floats, tuples, empty containers, non-string keys, nested dataclasses, None."""
    plan = compile_synth(synth_dir, "sequential", 10 * MiB, target).plan
    odd = replace(plan, model={**plan.model, "name": "ünï\u2028\"q\"\\\t\x00🙂", "none": None, "t": (1, (2.5, -0.0)),
                               "e": [], "d": {}, "nested": [[], [{}], {"a": [True, False]}]},
                  predicted={**plan.predicted, "f": [math.nan, math.inf, -math.inf, 1e-300, 1 / 3, 2.0 ** 80],
                             7: "int key", 2.5: "float key", True: "bool key", False: "false key", None: "none key"},
                  schedule=plan.schedule[:2] + [Op(99, "Add", "x", 0, 0, ["a", ""], [], {}, [])],
                  buffers={"b": Buffer("b", "activation", 0, 4, "float32", [])})
    assert plan_json(odd) == odd.to_json()
