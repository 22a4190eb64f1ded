"""The op registry: every op has all its parts, and every kernel agrees with its twin on random inputs.

Each op's `sample` gives random cases (inputs already in their weight format's view); each case is bound the
way the engine binds it (outputs allocated from the shape rule, value inputs read, scratch sized by the op)
and run, and every output is compared with the twin's, computed on the dequantized inputs. The worst
relative difference per op is reported.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import numpy as np
import pytest

from edge_rt_exec import formats as F
from edge_rt_exec import ops
from edge_rt_exec.ops.registry import Site, WarmSpec, numel, with_defaults

ROOT = Path(__file__).resolve().parent.parent


def logical_shape(fmt: str | None, a: np.ndarray) -> tuple[int, ...]:
    if fmt is None or not F.get(fmt).quantized:
        return tuple(a.shape)
    f = F.get(fmt)
    return (a.shape[0], a.shape[1] // f.block_bytes * f.block)


def dequantized(fmt: str | None, a: np.ndarray | None) -> np.ndarray | None:
    if a is None or fmt is None or fmt == "f32":
        return a
    return F.get(fmt).dequantize(a, logical_shape(fmt, a))


def run_case(name: str, case) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    d = ops.get(name)
    attrs = with_defaults(d, case.attrs)
    fmts = list(case.formats) + [None] * (len(case.ins) - len(case.formats))
    shapes = [None if x is None else logical_shape(f, x) for x, f in zip(case.ins, fmts)]
    dtypes = [None if x is None else ("float32" if f else x.dtype.name) for x, f in zip(case.ins, fmts)]
    values = {i: case.ins[i] for i in d.value_inputs if i < len(case.ins) and case.ins[i] is not None}
    deq = [dequantized(f, x) for x, f in zip(case.ins, fmts)]
    want = ops.run_twin(name, [None if x is None else x.copy() for x in deq], case.attrs, case.n_out)
    specs = d.shape(shapes, dtypes, values, attrs, len(want))
    outs = [np.full(sh, 7, dtype=np.dtype(dt)) for sh, dt in specs]
    scratch = [np.empty(k, np.float32) for k in (d.scratch(shapes, attrs) if d.scratch else [])]
    ins = [None if x is None else x.copy() for x in case.ins]
    site = Site(name, ins, outs, attrs, fmts, shapes, values, scratch)
    big = any(x is not None and x.size >= ops.registry.PAR_MIN for x in ins + outs)
    d.warm(WarmSpec([None if x is None else x.dtype.name for x in ins], [o.dtype.name for o in outs],
                    [False] * len(ins), fmts, attrs, big))
    loaded = {k: len(k.load().signatures) for k in d.kernels if k.loaded}
    d.bind(site)()
    # warm-up loaded every specialization the call needed: nothing compiled during the call
    for k, n in loaded.items():
        assert len(k.load().signatures) == n, f"{name}: the call compiled a kernel specialization warm did not load"
    rows = attrs.get("rows")
    if rows and d.row_tiled:  # a row tile writes its columns of the full-width output; the twin gives those
        outs = [o[..., rows[0]:rows[1]] for o in outs]
    return list(zip(outs, want))


ALL = sorted(ops.REGISTRY)


def test_every_op_has_all_parts() -> None:
    for name, d in ops.REGISTRY.items():
        assert d.name == name
        for part in ("shape", "twin", "bind", "warm", "sample"):
            assert callable(getattr(d, part)), f"{name}: no {part}"
        metadata = {"Shape", "Size", "ConstantOfShape"}
        assert d.kernels or name in metadata, f"{name}: no kernel (only metadata ops may do without)"
        assert d.sample(np.random.default_rng(0)), f"{name}: no sample cases"
        assert d.doc, f"{name}: no doc"


@pytest.mark.parametrize("name", ALL)
def test_kernels_agree_with_twins(name: str) -> None:
    rng = np.random.default_rng(1234)
    worst = 0.0
    for case in ops.get(name).sample(rng):
        for got, want in run_case(name, case):
            assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype,
                                                                         want.dtype)
            if got.dtype.kind == "f":
                g, w = got.astype(np.float64), want.astype(np.float64)
                same = (g == w) | (np.isnan(g) & np.isnan(w))
                err = np.where(same, 0.0, np.abs(g - w) / np.maximum(1.0, np.abs(np.nan_to_num(w))))
                e = float(err.max()) if err.size else 0.0
                assert e <= case.tol, f"{name}: max relative difference {e:.3g} > {case.tol} ({case.attrs})"
                worst = max(worst, e)
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{name} {case.attrs}")
    print(f"{name}: worst |kernel - twin| / max(1, |twin|) = {worst:.2e}")


def test_kernels_check_shapes() -> None:
    """numba does no bounds checking: kernels refuse mismatched shapes instead of corrupting memory."""
    from edge_rt_exec.ops import movement, norm

    x = np.ones(8, np.float32)
    with pytest.raises(ValueError):
        norm.norm_rows(x, np.ones(3, np.float32), np.zeros(0, np.float32), np.empty(8, np.float32),
                       np.zeros(0, np.float32), np.zeros(0, np.float32), 2, 4, 1e-5, False)
    with pytest.raises(ops.ShapeError):
        movement.bind_copy(x, 0, [1], np.empty(4, np.float32), 0, [1], (8,))


def test_compiler_reads_ops_without_numba() -> None:
    import subprocess
    import sys

    code = ("import sys; import edge_rt_exec.ops as o; import edge_rt_compiler; "
            "assert 'numba' not in sys.modules, 'numba imported'; print(len(o.names()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == len(ops.REGISTRY)


def _import_graph(pkg: str) -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin
        mods[info.name] = Path(spec.origin)
    mods[pkg] = ROOT / pkg / "__init__.py"
    graph: dict[str, set[str]] = {}
    for m, path in mods.items():
        base = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        deps: set[str] = set()
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom):
                mod = n.module or ""
                if n.level:
                    parts = base.split(".")[: len(base.split(".")) - n.level + 1]
                    mod = ".".join(parts + ([mod] if mod else []))
                for a in n.names:
                    for c in (f"{mod}.{a.name}", mod):
                        if c in mods:
                            deps.add(c)
                            break
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names if a.name in mods}
        graph[m] = deps - {m}
    return graph


@pytest.mark.parametrize("pkg", ["edge_rt_exec", "edge_rt_compiler"])
def test_no_import_cycles(pkg: str) -> None:
    """Imports inside functions count too: a split module that imports its parent back is a circle."""
    graph = _import_graph(pkg)
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:10])


def test_sample_sizes_are_real() -> None:
    # the parallel variants are exercised too: some case of each parallel-capable family is large
    big = [n for n, d in ops.REGISTRY.items()
           if any(numel(x.shape) >= ops.registry.PAR_MIN for c in d.sample(np.random.default_rng(0))
                  for x in c.ins if x is not None)]
    for name in ("Exp", "Add", "SiluMul", "Softmax", "LayerNormalization"):
        assert name in big
