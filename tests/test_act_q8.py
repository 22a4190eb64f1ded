"""The opt-in activation-quantized Linear path (`act_quant=q8_0`, q4_0 weights): its quantization, its kernels
against the numpy twin, the compiler override and a whole plan run with it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_rt_exec import formats as F
from edge_rt_exec.ops import _act_q8 as A
from edge_rt_exec.ops import linear as L

from .conftest import compile_synth

MiB = 1 << 20


def _q4_0(rng: np.random.Generator, m: int, k: int, fmt: str = "q4_0") -> np.ndarray:
    f = F.get(fmt)
    w = (rng.standard_normal((m, k)) * 0.5).astype(np.float32)
    v = f.view(f.quantize(w).reshape(-1).view(np.uint8), (m, k))
    v.setflags(write=False)
    return v


def test_quantize_q8_rounds_each_block_to_127_steps() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 96)) * np.array([1.0, 1e-3, 50.0])[:, None]).astype(np.float32)
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, quants 0
    x[2, :32] = np.clip(x[2, :32], -100, 100)
    x[2, 0], x[2, 5], x[2, 6] = 127.0, 2.5, -2.5  # scale 1: halves round away from zero (numpy's round: to even)
    q, d = A.quantize_q8(x)
    assert q.dtype == np.int8 and d.shape == (3, 3) and np.abs(q).max() == 127
    assert d[1, 1] == 0 and not q[1, 32:64].any()
    err = np.abs(A.dequantize_q8(q, d) - x).reshape(3, 3, 32).max(axis=-1)
    assert (err <= d * 0.5 * (1 + 1e-5)).all()  # within half a step
    assert d[2, 0] == 1 and (q[2, 5], q[2, 6]) == (3, -3)


@pytest.mark.parametrize("m,k", [(37, 96), (20, 160), (48, 64), (576, 1536)])
def test_decode_kernel_quantizes_like_the_twin_and_matches_it(m: int, k: int) -> None:
    rng = np.random.default_rng(m + k)
    w, x = _q4_0(rng, m, k), rng.standard_normal(k).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    xq, xs, xd = np.zeros(k, np.int8), np.zeros(k // 4, np.int32), np.zeros(k // 4, np.float32)
    out = np.full(m + 7, 9.0, np.float32)
    A.linear_vec_q4_0_q8.load()(x, w, bias, out, 3, xq, xs, xd)
    q, d = A.quantize_q8(x)
    assert np.array_equal(xq, q) and np.array_equal(xd, np.repeat(d, 8))  # bit for bit the twin's quantization
    assert np.array_equal(xs, -8 * q.astype(np.int32).reshape(-1, 4).sum(axis=1))
    want = L.linear(A.dequantize_q8(q, d)[None], F.get("q4_0").dequantize(w.reshape(-1), (m, k)), bias)[0]
    np.testing.assert_allclose(out[3:3 + m], want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))
    assert (out[:3] == 9).all() and (out[3 + m:] == 9).all()  # only its columns written


@pytest.mark.parametrize("m,k", [(37, 96), (48, 64), (600, 576)])
def test_q8_0_decode_kernel_matches_the_twin(m: int, k: int) -> None:
    """q8_0 weights (an LM head): |w| times the signed activations, -128 included."""
    rng = np.random.default_rng(m)
    w = np.array(_q4_0(rng, m, k, "q8_0"))
    w.reshape(m, -1, 34)[0, 0, 2:] = 0x80  # a block of -128 quants
    x = rng.standard_normal(k).astype(np.float32)
    out = np.zeros(m, np.float32)
    act = np.zeros(A.act_floats(1, k), np.float32)
    A.bind(x[None], w, np.zeros(0, np.float32), out[None], 0, act, np.zeros(0, np.float32), "q8_0")()
    want = L.linear(A.dequantize_q8(*A.quantize_q8(x))[None], F.get("q8_0").dequantize(w.reshape(-1), (m, k)))[0]
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("n,m,k", [(2, 37, 96), (4, 16, 64), (5, 20, 160), (9, 48, 32), (76, 61, 576)])
def test_prefill_kernel_matches_the_twin(n: int, m: int, k: int) -> None:
    rng = np.random.default_rng(n * m)
    w, x = _q4_0(rng, m, k), rng.standard_normal((n, k)).astype(np.float32)
    act = np.zeros(A.act_floats(n, k), np.float32)
    panels = np.zeros(L.SLOTS * L.PANEL * k, np.float32)
    out = np.zeros((n, m), np.float32)
    A.bind(x, w, np.zeros(0, np.float32), out, 0, act, panels)()
    want = L.linear(A.dequantize_q8(*A.quantize_q8(x)), F.get("q4_0").dequantize(w.reshape(-1), (m, k)))
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))


def test_kernels_refuse_mismatched_buffers() -> None:
    rng = np.random.default_rng(1)
    w, x = _q4_0(rng, 8, 64), rng.standard_normal(64).astype(np.float32)
    with pytest.raises(ValueError):  # xs one lane short
        A.linear_vec_q4_0_q8.load()(x, w, np.zeros(0, np.float32), np.zeros(8, np.float32), 0,
                                    np.zeros(64, np.int8), np.zeros(15, np.int32), np.zeros(16, np.float32))
    with pytest.raises(ValueError):  # out too narrow for col0
        A.linear_vec_q4_0_q8.load()(x, w, np.zeros(0, np.float32), np.zeros(8, np.float32), 1,
                                    np.zeros(64, np.int8), np.zeros(16, np.int32), np.zeros(16, np.float32))
    from edge_rt_exec.ops.registry import ShapeError

    with pytest.raises(ShapeError):  # too little scratch for 9 tokens
        A.bind(np.zeros((9, 64), np.float32), w, np.zeros(0, np.float32), np.zeros((9, 8), np.float32), 0,
               np.zeros(16, np.float32), np.zeros(L.SLOTS * L.PANEL * 64, np.float32))


def test_act_quant_override_marks_only_q4_0_linears_and_names_the_plan(tmp_path, target) -> None:
    base = compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target, quant="q4_0")
    r = compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target, quant="q4_0", act_quant="q8_0")
    assert r.plan_path.name == base.plan_path.name.replace("-q4_0", "-q4_0-aq8_0")
    assert r.plan.files["weights"] == base.plan.files["weights"]  # one weights file per format
    ops = r.plan.schedule
    linears = [o for o in ops if o.op == "Linear"]
    assert linears and all(o.attrs.get("act_quant") == "q8_0" for o in linears)
    assert all("act_quant" not in o.attrs for o in base.plan.schedule)
    f32 = compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target, act_quant="q8_0")  # no q4_0 weight
    assert all("act_quant" not in o.attrs for o in f32.plan.schedule)
    q8 = compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target, quant="q8_0", act_quant="q8_0")
    marked = [o.name for o in q8.plan.schedule if o.attrs.get("act_quant")]
    assert marked == ["lm_head"]  # q8_0: the LM head (one row) only

    from edge_rt_exec.errors import UserError

    with pytest.raises(UserError, match="act_quant=int4 is not an activation type; choose one of none, q8_0"):
        compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target, quant="q4_0", act_quant="int4")


def test_an_act_quant_plan_runs_close_to_the_default(tmp_path, target) -> None:
    """The whole synthetic model, prefill and decode, on both paths: validate mode checks every op against its
    twin, and the first greedy tokens agree with the float32-activation plan's."""
    from edge_rt_exec.generate import Session

    runs = {}
    for aq in ("none", "q8_0"):
        p = compile_synth(tmp_path, "greedy_grouping", 64 * MiB, target, quant="q4_0", act_quant=aq).plan_path
        s = Session(p, validate=True)
        try:
            r = s.generate(s.encode_prompt("Hello there, general Kenobi, how are you"), max_tokens=6,
                           ignore_eos=True)
            runs[aq] = (r.tokens, dict(s.engine.worst))
        finally:
            s.close()
    assert max(runs["q8_0"][1].values()) < 1e-4, runs["q8_0"][1]
    assert runs["q8_0"][0][:2] == runs["none"][0][:2]


_GENERIC = r"""
import sys
import numpy as np
from edge_rt_exec.ops import _act_q8 as A
A._has_vnni = lambda: False  # the generic LLVM vector IR (what aarch64 runs), not the x86 VNNI intrinsic
sys.path.insert(0, sys.argv[1])
from tests.test_act_q8 import _cases
np.save(sys.argv[2], np.concatenate([c().ravel() for c in _cases()]))
assert "vpdpbusd" not in "".join(A.linear_vec_q4_0_q8.load().inspect_asm().values())
"""


def _cases() -> list:
    """Calls of every act_quant kernel on fixed inputs (odd block counts, edge tiles) -> their outputs."""
    rng = np.random.default_rng(7)
    out = []
    for fmt, n, m, k in (("q4_0", 1, 37, 96), ("q8_0", 1, 40, 160), ("q4_0", 9, 37, 160), ("q4_0", 76, 20, 64)):
        w, x = np.array(_q4_0(rng, m, k, fmt)), rng.standard_normal((n, k)).astype(np.float32)
        act = np.zeros(A.act_floats(n, k), np.float32)
        panels = np.zeros(L.SLOTS * L.PANEL * k, np.float32)

        def run(w=w, x=x, act=act, panels=panels, fmt=fmt, n=n, m=m) -> np.ndarray:
            o = np.zeros((n, m), np.float32)
            A.bind(x, w, np.zeros(0, np.float32), o, 0, act, panels, fmt)()
            return o
        out.append(run)
    return out


def test_generic_integer_path_gives_the_same_bits(tmp_path) -> None:
    """The integer sums are exact, so the generic IR (aarch64, x86 without VNNI) and `vpdpbusd` give the same
    float32 results bit for bit; the generic path is compiled here in a fresh process and cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = np.concatenate([c().ravel() for c in _cases()])
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", _GENERIC, str(Path(__file__).parent.parent), str(tmp_path / "g.npy")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "g.npy"), here)
