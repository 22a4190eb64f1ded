"""Weights that rot or change under a running plan: group checksums (streamed) and the file check (resident).

A streamed plan checks every group it reads against the checksum the compiler stored (`edge_rt_exec.checksum`);
a corrupt byte is one line naming the group, exit 2, never wrong tokens. A resident plan maps its weights: a
file truncated or rewritten while it is mapped is refused, with one line, before the next run touches it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_rt_exec.checksum import checksum, checksum_ref
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import load_plan

from .conftest import compile_synth

MiB = 1 << 20
TARGET = {"name": "performance", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
          "compute_gflops": 190.0, "prefetch_headroom": 0.2}


# ---- the checksum ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 1000, 4097, 100_003, 3 * MiB + 5])
def test_kernel_matches_its_twin(n: int) -> None:
    b = np.random.default_rng(n).integers(0, 256, n + 1, dtype=np.uint8)
    assert checksum(b[:n]) == checksum_ref(b[:n].tobytes())
    assert checksum(b[1:]) == checksum_ref(b[1:])  # an odd start: the kernel loads unaligned words


def test_detects_every_flipped_bit_changed_byte_and_swapped_word() -> None:
    rng = np.random.default_rng(2)
    b = rng.integers(0, 256, 256 + 5, dtype=np.uint8)  # whole rows, a word tail and a byte tail
    want = checksum(b)
    for i in range(b.size):
        for bit in range(8):
            b[i] ^= 1 << bit
            assert checksum(b) != want, (i, bit)
            b[i] ^= 1 << bit
        old = b[i]
        for v in rng.choice(256, 8, replace=False):
            if v != old:
                b[i] = v
                assert checksum(b) != want, (i, v)
        b[i] = old
    w = b[:256].view(np.uint64)
    for i in range(w.size):
        for j in range(i + 1, w.size):
            w[[i, j]] = w[[j, i]]
            assert checksum(b) != want, (i, j)
            w[[i, j]] = w[[j, i]]
    sector = rng.integers(0, 256, 1 * MiB, dtype=np.uint8)
    want = checksum(sector)
    for fill in (0, 0xFF):
        s = sector.copy()
        s[4096:4096 + 512] = fill
        assert checksum(s) != want


# ---- streamed plans ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    out = tmp_path_factory.mktemp("checksum")
    return {"sequential": compile_synth(out, "sequential", 10 * MiB, TARGET).plan_path,
            "speculative_prefetch": compile_synth(out, "speculative_prefetch", 16 * MiB, TARGET).plan_path,
            "resident": compile_synth(out, "greedy_grouping", 64 * MiB, TARGET).plan_path}


def _copy(plan: Path, dst: Path) -> Path:
    shutil.copytree(plan.parent, dst, ignore=shutil.ignore_patterns("*.plan.json", ".lock"))
    shutil.copy(plan, dst / plan.name)
    return dst / plan.name


def exec_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_rt_exec", *args], capture_output=True, text=True, timeout=300)


def _tokens(plan: Path) -> list[int]:
    r = exec_cli("run", str(plan), "-p", "Hello world", "-n", "6", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["tokens"]


def _one_line_exit_2(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr and "this is a bug" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def test_every_streamed_group_carries_its_checksum(plans) -> None:
    for kind in ("sequential", "speculative_prefetch"):
        p = load_plan(plans[kind])
        data = p.file("weights").read_bytes()
        streamed = [g for g in p.groups if g.slot is not None]
        assert streamed and all(g.checksum == checksum_ref(data[g.byte_start:g.byte_end]) for g in streamed)
    assert all(g.checksum is None for g in load_plan(plans["resident"]).groups)


@pytest.mark.parametrize("kind", ["sequential", "speculative_prefetch"])
def test_a_flipped_byte_in_a_group_is_one_line_naming_it(plans, tmp_path: Path, kind: str) -> None:
    """sequential reads on the main thread, speculative_prefetch on its reader thread: both refuse the group."""
    p = _copy(plans[kind], tmp_path / "a")
    plan = load_plan(p)
    g = [g for g in plan.groups if g.slot is not None][2]
    weights = p.parent / plan.files["weights"]
    with open(weights, "r+b") as f:
        off = (g.byte_start + g.byte_end) // 2
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x04]))
    line = _one_line_exit_2(exec_cli("run", str(p), "-p", "Hello world", "-n", "6"))
    assert f"group {g.index} (bytes [{g.byte_start}, {g.byte_end}) of {weights.name})" in line, line
    assert "corrupt" in line and "copy the artifact folder to the device again, or recompile" in line, line


def test_an_unmodified_copy_gives_the_same_tokens(plans, tmp_path: Path) -> None:
    want = _tokens(plans["resident"])
    for kind in ("sequential", "speculative_prefetch"):
        assert _tokens(_copy(plans[kind], tmp_path / kind)) == want, kind


@pytest.mark.parametrize("edit,needle", [
    (lambda g: g.pop("checksum"), "checksum = None is not 32 lowercase hex digits"),
    (lambda g: g.__setitem__("checksum", "xyz"), "checksum = 'xyz' is not 32"),
    (lambda g: g.__setitem__("checksum", "AB" * 16), "is not 32 lowercase hex digits"),
    (lambda g: g.__setitem__("checksum", 12), "checksum = 12 is not"),
])
def test_a_streamed_group_without_a_valid_checksum_is_refused(plans, tmp_path: Path, edit, needle: str) -> None:
    p = _copy(plans["sequential"], tmp_path / "a")
    d = json.loads(p.read_text())
    edit(next(g for g in d["groups"] if g["slot"] is not None))
    p.write_text(json.dumps(d))
    assert needle in _one_line_exit_2(exec_cli("run", str(p), "-p", "hi", "-n", "2"))


def test_a_plan_from_before_checksums_asks_for_a_recompile(plans, tmp_path: Path) -> None:
    """Schema 2 plans have no checksums: refused with one line (recompile), like any older schema."""
    p = _copy(plans["sequential"], tmp_path / "a")
    d = json.loads(p.read_text())
    d["schema_version"] = 2
    for g in d["groups"]:
        g.pop("checksum", None)
    p.write_text(json.dumps(d))
    line = _one_line_exit_2(exec_cli("run", str(p), "-p", "hi", "-n", "2"))
    assert "plan schema version 2 is older" in line and "recompile" in line, line


def test_a_checksum_on_a_group_that_is_not_streamed_is_refused(plans, tmp_path: Path) -> None:
    p = _copy(plans["resident"], tmp_path / "a")
    d = json.loads(p.read_text())
    d["groups"][0]["checksum"] = "0" * 32
    p.write_text(json.dumps(d))
    with pytest.raises(UserError, match="has a checksum but is not read into a slot"):
        load_plan(p)


# ---- resident plans: the mapped file must not change ---------------------------------------------------------

def test_a_resident_weights_file_truncated_while_loaded_is_refused(plans, tmp_path: Path) -> None:
    from edge_rt_exec.generate import Session

    p = _copy(plans["resident"], tmp_path / "a")
    s = Session(str(p))
    try:
        ids = s.encode_prompt("Hello world")
        first = s.generate(ids, max_tokens=3).tokens
        weights = p.parent / s.plan.files["weights"]
        os.truncate(weights, weights.stat().st_size // 2)  # the next touch of a page past the end: SIGBUS
        with pytest.raises(UserError) as e:
            s.generate(ids, max_tokens=3)
        msg = str(e.value)
        assert "\n" not in msg and "changed while it was in use" in msg and "truncated" in msg, msg
        with pytest.raises(UserError, match="changed while it was in use"):  # and every run after it
            s.generate(ids, max_tokens=3)
    finally:
        s.close()
    assert first


def test_a_resident_weights_file_replaced_by_rename_keeps_running(plans, tmp_path: Path) -> None:
    """Renaming a new file over the path (how edge-rt-compile writes) leaves the mapped one intact."""
    from edge_rt_exec.generate import Session

    p = _copy(plans["resident"], tmp_path / "a")
    s = Session(str(p))
    try:
        ids = s.encode_prompt("Hello world")
        first = s.generate(ids, max_tokens=3).tokens
        weights = p.parent / s.plan.files["weights"]
        shutil.copy(weights, weights.with_suffix(".new"))
        os.replace(weights.with_suffix(".new"), weights)
        assert s.generate(ids, max_tokens=3).tokens == first
    finally:
        s.close()
