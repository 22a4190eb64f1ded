"""What every frontend produces: the model's graph IR (built through `ir.GraphBuilder`) and what ships beside
the plan (tokenizer, generation settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from ..families.base import TransformerConfig


@dataclass
class ModelSource:
    """A frontend's output: the IR, plus everything the emitter needs besides it."""

    name: str
    graph: nx.DiGraph  #: the IR as the frontend built it (passes run next)
    source_key: str  #: identifies the source bytes; equal keys mean the repacked weights can be reused
    max_position: int  #: the longest context the model supports
    config: TransformerConfig | None = None  #: transformer families; None for ONNX graphs
    tokenizer_json: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  #: source tensors deliberately not used (buffers)
    origin: str = ""  #: the file or folder it was read from
    default_context: int | None = None  #: the maximum context when the preset and request set none

    @property
    def kind(self) -> str:
        return str(self.graph.graph["kind"])
