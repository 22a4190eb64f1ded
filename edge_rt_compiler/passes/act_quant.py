"""act_quant: the opt-in activation quantization of the Linear layers (`act_quant=`).

`none` (the default) keeps every activation float32, so a plan gives the dequantized model's tokens. `q8_0` marks
each Linear whose weight is stored as q4_0 (and a q8_0 LM head, which reads the last row only) with
`act_quant: "q8_0"`: its input is quantized to int8 per 32-block
(as llama.cpp does) and multiplied as integer dot products (`edge_rt_exec/ops/_act_q8.py`), faster, at the
fidelity cost the README states. Other formats keep float32 activations. Runs after `quantize` (it reads the
storage formats) and then re-runs `bind_dims` for the scratch the marked ops need; the plan records the
attribute, and the plan name says `-aq8_0`.
"""

from __future__ import annotations

import networkx as nx

from edge_rt_exec.errors import UserError
from edge_rt_exec.ops.linear import ACT_QUANTS

from ..ir import is_weight, weight_name
from .dims import bind_dims

#: the weight formats whose Linear layers have activation-quantized kernels; q8_0 only for an op that reads
#: the last row alone (an LM head: decode kernel only)
ACT_QUANT_FORMATS, LAST_ROW_FORMATS = ("q4_0",), ("q8_0",)


def check_act_quant(value: str) -> None:
    if value not in ACT_QUANTS:
        raise UserError(f"act_quant={value} is not an activation type; choose one of {', '.join(ACT_QUANTS)}")


def act_quant(g: nx.DiGraph, value: str) -> nx.DiGraph:
    """Set `act_quant` on the Linear nodes with a q4_0 weight (value `q8_0`); `none` leaves the graph alone."""
    check_act_quant(value)
    if value == "none":
        return g
    weights, marked = g.graph["weights"], 0
    for _, node in g.nodes(data=True):
        if node["op"] != "Linear" or len(node["inputs"]) < 2 or not is_weight(node["inputs"][1]):
            continue
        fmt = weights[weight_name(node["inputs"][1])].format
        if fmt in ACT_QUANT_FORMATS or (fmt in LAST_ROW_FORMATS and node["attrs"].get("last_row")):
            node["attrs"]["act_quant"] = value
            marked += 1
    # the marked ops need scratch for the quantized activations: re-derive every op's scratch (and spec) at the
    # plan's dims, as `bind_dims` did before the formats were known
    return bind_dims(g, g.graph["dims"]) if marked else g


def plan_suffix(value: str) -> str:
    """What the plan name adds for `act_quant=value` ("" for none)."""
    return "" if value == "none" else f"-a{value}"
