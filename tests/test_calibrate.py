"""`edge-rt-exec calibrate` (a target profile measured on this machine), the compiler taking it
(`target.profile=FILE`), and the cost model's calibrated rates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_rt_compiler.config import load_profile
from edge_rt_compiler.cost import predict
from edge_rt_compiler.partition import PartitionResult, PlannedGroup, SchedOp
from edge_rt_exec import cli
from edge_rt_exec.calibrate import to_yaml

from .conftest import ROOT
from .test_hostile_compile import run_app

GUESS = {"name": "t", "threads": 2, "read_bandwidth_gbs": 1.0, "mem_bandwidth_gbs": 4.0, "compute_gflops": 10.0,
         "prefetch_headroom": 0.2}
CALIBRATED = {**GUESS, "read_cold_gbs": 0.1, "read_cached_gbs": 2.0, "read_cached_large_gbs": 1.5, "checksum_gbs": 8.0,
              "read_overlapped_gbs": 0.5, "page_cache_bytes": 1 << 30,
              "decode_gbs": {"f32": 4.0, "q4_0": 1.0}, "prefill_gflops": {"f32": 50.0, "q4_0": 20.0},
              "decode_cached_gbs": {"f32": 16.0}, "cache_bytes": 4 << 20,
              "attention_ns": 2.0, "op_overhead_us": 10.0}
MB = 1 << 20


def run_exec(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = 0
    try:
        cli.main(args)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, prog: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


# ---- calibrate -> profile -> compile ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibrate")
    prof = folder / "profile.yaml"
    try:
        cli.main(["calibrate", str(folder), "--out", str(prof), "--quick", "-t", "1"])
    except SystemExit as e:
        assert e.code == 0
    assert not [p for p in folder.iterdir() if p.name.startswith(".edge-rt-calibrate-")]  # the temp file is gone
    return prof


def test_quick_profile_is_valid(quick_profile: Path) -> None:
    p = load_profile(str(quick_profile))
    assert p["threads"] == 1 and p["profile_version"] == 1
    for key in ("read_cold_gbs", "read_cached_gbs", "read_cached_large_gbs", "read_overlapped_gbs", "checksum_gbs",
                "mem_bandwidth_gbs", "compute_gflops", "read_bandwidth_gbs", "stream_read_gbs",
                "stream_read_swept_gbs"):
        assert p[key] > 0, key
    maps = ("decode_gbs", "decode_cached_gbs", "decode_streamed_gbs", "prefill_gflops")
    assert all(set(p[m]) == {"f32", "f16", "q8_0", "q4_0", "q4_1"} for m in maps)
    assert all(v > 0 for m in maps for v in p[m].values())
    assert p["cache_bytes"] > 0 and p["cores"] >= 1 and p["reader_slowdown"] == 1.0  # 1 thread: no core to give
    assert p["attention_ns"] >= 0 and p["op_overhead_us"] > 0 and p["page_cache_bytes"] > 0


def test_compiler_takes_the_profile(quick_profile: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    plans = {}
    for name, extra in (("guess", []), ("calibrated", [f"target.profile={quick_profile}"])):
        out = tmp_path / name
        code, err = run_app(["model=synthetic_gpt2", "budget=16M", "strategy=sequential", f"out_dir={out}",
                                 *extra], monkeypatch, capsys)
        assert code == 0, err
        plans[name] = json.loads(next(out.rglob("*.plan.json")).read_text())
    prof = load_profile(str(quick_profile))
    t = plans["calibrated"]["target"]
    assert t["decode_gbs"] == prof["decode_gbs"] and t["threads"] == 1  # the profile's values override the target's
    assert t["name"] == "rpi4_4gb" and "decode_gbs" not in plans["guess"]["target"]  # the rest falls back
    assert plans["calibrated"]["predicted"]["decode_ms_per_token"] != plans["guess"]["predicted"]["decode_ms_per_token"]


def test_executor_side_imports_no_compiler() -> None:
    code = ("import sys, edge_rt_exec.calibrate, edge_rt_exec.cli\n"
            "bad = [m for m in ('edge_rt_compiler', 'hydra', 'omegaconf', 'yaml', 'networkx') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_yaml_round_trip(tmp_path: Path) -> None:
    p = {**{k: v for k, v in CALIBRATED.items() if k not in ("name", "prefetch_headroom")}, "profile_version": 1,
         "cores": 2, "reader_slowdown": 1.5, "_cold_dropped": False, "_shapes": [(8, 32)], "_chunk_mb": 16,
         "decode_streamed_gbs": {"f32": 12.0}, "stream_read_gbs": 1.8, "stream_read_swept_gbs": 1.2}
    f = tmp_path / "p.yaml"
    f.write_text(to_yaml(p, tmp_path))
    back = load_profile(str(f))
    assert back["decode_gbs"] == CALIBRATED["decode_gbs"] and back["attention_ns"] == 2.0
    assert back["cores"] == 2 and back["reader_slowdown"] == 1.5 and back["cache_bytes"] == 4 << 20
    assert back["decode_streamed_gbs"] == {"f32": 12.0} and back["stream_read_swept_gbs"] == 1.2
    assert "not a cold read" in f.read_text()  # said when the page cache could not be dropped


# ---- bad input: one line, exit 2 ---------------------------------------------------------------------------------

def test_calibrate_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_exec(["calibrate", str(tmp_path / "nope")], capsys)
    one_line_error(code, err, "edge-rt-exec", "no such folder")
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, _, err = run_exec(["calibrate", str(f)], capsys)
    one_line_error(code, err, "edge-rt-exec", "not a folder")
    code, _, err = run_exec(["calibrate", str(tmp_path), "--out", str(tmp_path / "missing" / "p.yaml")], capsys)
    one_line_error(code, err, "edge-rt-exec", "does not exist")
    code, _, err = run_exec(["calibrate", str(tmp_path), "--out", str(tmp_path)], capsys)
    one_line_error(code, err, "edge-rt-exec", "is a folder")
    code, _, err = run_exec(["calibrate", str(tmp_path), "-t", "0"], capsys)
    one_line_error(code, err, "edge-rt-exec", "at least 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing written


@pytest.mark.parametrize("text, needle", [
    (None, "no such file"),
    ("threads: [1, 2\n", "not a YAML profile"),
    ("- 1\n- 2\n", "a mapping of target keys"),
    ("decode_gbs: {f32: 1.0}\nbogus: 1\n", "unknown key 'bogus'"),
    ("decode_gbs: {f33: 1.0}\n", "unknown weight format"),
    ("decode_gbs: {f32: -1.0}\n", "decode_gbs.f32=-1.0 must be a number more than 0"),
    ("read_cold_gbs: 0\n", "read_cold_gbs=0 must be a number more than 0"),
    ("threads: 1.5\n", "threads=1.5 must be a whole number"),
    ("name: other\n", "unknown key 'name'"),
])
def test_compile_refuses_a_bad_profile(text: str | None, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    prof = tmp_path / "p.yaml"
    if text is not None:
        prof.write_text(text)
    out = tmp_path / "out"
    code, err = run_app(["model=synthetic_gpt2", "budget=16M", f"out_dir={out}", f"target.profile={prof}"],
                            monkeypatch, capsys)
    one_line_error(code, err, "edge-rt-compile", f"target.profile={prof}", needle)
    assert not out.exists() or not any(out.rglob("*.json"))


# ---- the cost model ----------------------------------------------------------------------------------------------

def linear(name: str, start: int, nbytes: int, fmt: str = "f32", k: int = 256) -> SchedOp:
    weights = nbytes // 4 if fmt == "f32" else nbytes * 2
    return SchedOp(name, name, "Linear", 1, ("x", f"@{name}.w"), ("y",), (("out_features", weights // k),), (),
                   2 * weights, start, start + nbytes, fmt)


def attention(heads: int = 8) -> SchedOp:
    return SchedOp("a", "a", "CausalAttention", 1, ("q", "k", "v"), ("o",), (("n_heads", heads),), (), 0, 0, 0)


def plan_of(groups: list[list[SchedOp]], streamed: bool, n_slots: int = 1) -> PartitionResult:
    gs = []
    for ops in groups:
        spans = [(o.byte_start, o.byte_end) for o in ops if o.byte_end > o.byte_start]
        lo, hi = (min(s for s, _ in spans), max(e for _, e in spans)) if spans else (0, 0)
        gs.append(PlannedGroup(ops, ["u"], lo, hi, streamed and bool(spans)))
    return PartitionResult("t", "streamed" if streamed else "resident", n_slots if streamed else 0,
                           max(g.nbytes for g in gs) if streamed else 0, gs)


def test_decode_uses_each_formats_rate() -> None:
    r = plan_of([[linear("a", 0, 4 * MB, "f32"), linear("b", 4 * MB, 4 * MB, "q4_0")]], streamed=False)
    c = predict(r, CALIBRATED, 8 * MB)
    want = 2 * 10e-6 + 4 * MB / 4e9 + 4 * MB / 1e9  # overheads + f32 bytes at 4 GB/s + q4_0 bytes at 1 GB/s
    assert c.decode_ms_per_token == pytest.approx(want * 1e3)
    assert c.read_bytes_per_token == 0


def test_prefill_is_flops_at_the_formats_rate() -> None:
    op = linear("a", 0, 4 * MB, "q4_0")
    c = predict(plan_of([[op]], streamed=False), CALIBRATED, 4 * MB, prompt_tokens=64)
    assert c.prefill_ms == pytest.approx((10e-6 + op.flops * 64 / 20e9) * 1e3)


def test_attention_costs_heads_times_positions() -> None:
    r = plan_of([[attention(8)]], streamed=False)
    short, long = (predict(r, CALIBRATED, 0, prompt_tokens=n).decode_ms_per_token for n in (64, 1024))
    assert long - short == pytest.approx(8 * (1024 - 64) * 2e-9 * 1e3)


def test_streamed_reads_cached_or_cold() -> None:
    r = plan_of([[linear("a", 0, 8 * MB)], [linear("b", 8 * MB, 8 * MB)]], streamed=True)
    read = 1 / (1 / 1.5e9 + 1 / 8e9)  # page-cached pread into a slot larger than the CPU cache, then the checksum
    comp = 2 * (10e-6 + 8 * MB / 4e9)
    c = predict(r, CALIBRATED, 16 * MB)
    assert c.decode_ms_per_token == pytest.approx((16 * MB / read + comp) * 1e3)
    assert c.read_bytes_per_token == 16 * MB
    cold = predict(r, {**CALIBRATED, "page_cache_bytes": MB}, 16 * MB)  # the file does not fit the page cache
    assert cold.decode_ms_per_token == pytest.approx((16 * MB / (1 / (1 / 0.1e9 + 1 / 8e9)) + comp) * 1e3)


def test_a_streamed_group_that_fits_the_cache_computes_from_it() -> None:
    small = plan_of([[linear("a", 0, 2 * MB)]], streamed=True)  # 2 MB <= cache_bytes: just read, still cached
    read = 2 * MB / (1 / (1 / 2e9 + 1 / 8e9))  # and read into a slot in the cache
    assert predict(small, CALIBRATED, 2 * MB).decode_ms_per_token == pytest.approx(
        (read + 10e-6 + 2 * MB / 16e9) * 1e3)
    resident = plan_of([[linear("a", 0, 2 * MB)]], streamed=False)  # mapped: from DRAM
    assert predict(resident, CALIBRATED, 2 * MB).decode_ms_per_token == pytest.approx((10e-6 + 2 * MB / 4e9) * 1e3)


def test_decode_loop_rates_read_after_resident_compute_slower() -> None:
    """With the decode loop's rates (`measure_groups`), a one-slot group read right after a resident group's
    compute pays `stream_read_swept_gbs`, one after a streamed group `stream_read_gbs` (checksum included), and
    a just-read group computes at `decode_streamed_gbs`."""
    tgt = {**CALIBRATED, "stream_read_gbs": 2.0, "stream_read_swept_gbs": 1.0, "decode_streamed_gbs": {"f32": 8.0}}
    a, b, c = (linear(n, i * 2 * MB, 2 * MB) for i, n in enumerate("abc"))
    groups = [PlannedGroup([a], ["u"], 0, 2 * MB, False), PlannedGroup([b], ["u"], 2 * MB, 4 * MB, True),
              PlannedGroup([c], ["u"], 4 * MB, 6 * MB, True)]
    r = PartitionResult("partial_residency", "streamed", 1, 2 * MB, groups)
    want = (10e-6 + 2 * MB / 4e9) + 2 * MB / 1e9 + 2 * MB / 2e9 + 2 * (10e-6 + 2 * MB / 8e9)
    assert predict(r, tgt, 6 * MB).decode_ms_per_token == pytest.approx(want * 1e3)
    assert predict(r, tgt, 6 * MB).read_bytes_per_token == 4 * MB


def test_two_slots_overlap_reads_and_compute() -> None:
    groups = [[linear(n, i * 8 * MB, 8 * MB)] for i, n in enumerate("abc")]
    one, two = (predict(plan_of(groups, True, s), CALIBRATED, 24 * MB).decode_ms_per_token for s in (1, 2))
    read = 8 * MB / (1 / (1 / 1.5e9 + 1 / 8e9))
    beside = 8 * MB / 0.5e9  # a prefetching reader's pread + checksum while the kernels run
    comp = 10e-6 + 8 * MB / 4e9
    assert one == pytest.approx(3 * (read + comp) * 1e3)
    assert two == pytest.approx(3 * max(beside, comp) * 1e3)


def test_two_slots_without_a_spare_core_compute_slower() -> None:
    groups = [[linear(n, i * 8 * MB, 8 * MB)] for i, n in enumerate("abc")]
    comp = 10e-6 + 8 * MB / 4e9
    tgt = {**CALIBRATED, "read_cached_large_gbs": 1000.0, "read_overlapped_gbs": 1000.0, "checksum_gbs": 1000.0,
           "reader_slowdown": 1.6, "cores": 2}
    spare, none = (predict(plan_of(groups, True, 2), {**tgt, "threads": t}, 24 * MB).decode_ms_per_token
                   for t in (1, 2))
    assert spare == pytest.approx(3 * comp * 1e3, rel=1e-3)  # 1 thread on 2 cores: the reader has its own core
    assert none == pytest.approx(3 * 1.6 * comp * 1e3, rel=1e-3)
    one_slot = predict(plan_of(groups, True, 1), {**tgt, "threads": 2}, 24 * MB).decode_ms_per_token
    assert one_slot == pytest.approx(3 * comp * 1e3, rel=1e-2)  # no reader thread: no slowdown


def test_targets_without_a_profile_keep_the_one_rate_model() -> None:
    r = plan_of([[linear("a", 0, 8 * MB)], [linear("b", 8 * MB, 8 * MB)]], streamed=True)
    flops = sum(g.flops for g in r.groups)
    c = predict(r, GUESS, 16 * MB)
    comp = sum(max(g.nbytes / 4e9, g.flops / 10e9) for g in r.groups)
    assert c.decode_ms_per_token == pytest.approx((16 * MB / 1e9 + comp) * 1e3)
    res = predict(plan_of([[linear("a", 0, 8 * MB)]], streamed=False), GUESS, 8 * MB)
    assert res.decode_ms_per_token == pytest.approx(max(8 * MB / 4e9, flops / 2 / 10e9) * 1e3)
