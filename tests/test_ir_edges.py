"""The IR's edges after the passes are what the ops' inputs and outputs say: only the passes that rewire ops
relink (a relink of a 100k-op graph costs a fraction of a second), so this checks that none is missing."""

from __future__ import annotations

import networkx as nx
import pytest

from edge_rt_compiler import passes
from edge_rt_compiler.frontends import ModelRequest, load_path, load_source
from edge_rt_compiler.ir import relink

pytest.importorskip("onnx")

from .test_onnx_frontend import _norm_graph, mlp  # noqa: E402


def _fresh_edges(g: nx.DiGraph) -> set[tuple[str, str, str]]:
    h = g.copy()
    h.remove_edges_from(list(h.edges))
    relink(h)
    return set(h.edges(data="tensor"))


def _check(g: nx.DiGraph) -> None:
    assert set(g.edges(data="tensor")) == _fresh_edges(g)
    simple = passes.simplify(g)
    assert set(simple.edges(data="tensor")) == _fresh_edges(simple)
    done = passes.run(simple, passes.plan_dims(simple, 16, 16), "keep", "f32")
    assert set(done.edges(data="tensor")) == _fresh_edges(done)


def test_edges_after_folds_and_fusions(tmp_path):
    _check(load_path(mlp(tmp_path / "mlp.onnx")).graph)  # Linear+Add, GELU, a folded Shape chain
    for rms in (False, True):
        _check(load_path(_norm_graph(tmp_path / f"norm{rms}.onnx", rms)).graph)


def test_edges_of_the_synthetic_model(tmp_path):
    _check(load_source(ModelRequest("synthetic-gpt2", "synthetic"), tmp_path).graph)
