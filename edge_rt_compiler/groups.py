"""The partitioner's data: ops as scheduled, the groups a strategy plans, and its result.

Its own module so that the cost model (cost.py) and the partitioner (partition.py) share these types without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PartitionResult", "PlannedGroup", "SchedOp"]


@dataclass(frozen=True)
class SchedOp:
    """An IR op as scheduled: possibly a row tile `rows=[r0, r1]` of a Linear."""

    node: str
    name: str
    op: str
    unit: int
    inputs: tuple[str, ...]  #: positional, weights as "@name" (as in the plan)
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...]
    scratch: tuple[str, ...]
    flops: int  #: per token row
    byte_start: int  #: slot-loaded weight bytes of this op in the weights file (start == end: none)
    byte_end: int
    weight_format: str = ""  #: the format of its weight (a Linear's input 1), for the cost model's kernel rates


@dataclass
class PlannedGroup:
    ops: list[SchedOp]
    units: list[str]
    byte_start: int
    byte_end: int
    streamed: bool

    @property
    def nbytes(self) -> int:
        return max(0, self.byte_end - self.byte_start)

    @property
    def flops(self) -> int:
        return sum(o.flops for o in self.ops)


@dataclass
class PartitionResult:
    strategy: str
    weights_mode: str  #: "resident" | "streamed"
    n_slots: int
    slot_bytes: int
    groups: list[PlannedGroup]
    notes: list[str] = field(default_factory=list)
