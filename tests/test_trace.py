"""`edge-rt-exec run --trace`: a Chrome trace (Trace Event Format) of compute, reads and tokens.

Every trace a test writes goes through `check_trace`, a strict checker of the format as Perfetto and
chrome://tracing read it (the JSON object form, complete and metadata events), and the overlap the trace exists
to show is asserted from its events: the reader fills group g+1 while the engine computes group g.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from edge_rt_exec.plan import load_plan

from .conftest import compile_synth

MiB = 1 << 20
TOP_KEYS = {"traceEvents", "displayTimeUnit", "otherData", "systemTraceEvents", "stackFrames", "samples",
            "controllerTraceDataKey", "powerTraceAsString", "metadata"}
X_KEYS = {"ph", "name", "cat", "ts", "dur", "pid", "tid", "args", "tts", "tdur", "cname", "id", "bind_id"}
M_NAMES = {"process_name": "name", "thread_name": "name", "process_labels": "labels",
           "process_sort_index": "sort_index", "thread_sort_index": "sort_index"}


def _reject(token: str) -> None:
    raise ValueError(f"{token} is not JSON")


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def check_trace(path: Path) -> list[dict]:
    """Check `path` strictly against the Trace Event Format's JSON object form; return its complete events."""
    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject)  # NaN / Infinity are not JSON
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list), "not a JSON object with traceEvents"
    assert set(doc) <= TOP_KEYS, set(doc) - TOP_KEYS
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    complete, thread_names, process_names = [], {}, {}
    for i, e in enumerate(doc["traceEvents"]):
        assert isinstance(e, dict) and isinstance(e.get("ph"), str), f"event {i}: {e!r}"
        assert _int(e.get("pid")) and _int(e.get("tid")), f"event {i}: pid/tid must be integers: {e!r}"
        assert isinstance(e.get("name"), str) and e["name"], f"event {i}: no name: {e!r}"
        if e["ph"] == "X":
            assert set(e) <= X_KEYS, f"event {i}: unknown keys {set(e) - X_KEYS}"
            assert _num(e.get("ts")) and e["ts"] >= 0, f"event {i}: ts {e.get('ts')!r}"
            assert _num(e.get("dur")) and e["dur"] >= 0, f"event {i}: dur {e.get('dur')!r}"
            assert isinstance(e.get("cat", ""), str)
            assert isinstance(e.get("args", {}), dict)
            json.dumps(e.get("args", {}), allow_nan=False)
            complete.append(e)
        elif e["ph"] == "M":
            assert e["name"] in M_NAMES, f"event {i}: unknown metadata {e['name']!r}"
            assert set(e) <= {"ph", "name", "pid", "tid", "args", "ts", "cat"}, f"event {i}: {e!r}"
            args = e.get("args")
            assert isinstance(args, dict) and M_NAMES[e["name"]] in args, f"event {i}: {e!r}"
            value = args[M_NAMES[e["name"]]]
            if e["name"].endswith("sort_index"):
                assert _int(value), f"event {i}: sort_index {value!r}"
            else:
                assert isinstance(value, str) and value, f"event {i}: name {value!r}"
            if e["name"] == "thread_name":
                assert (e["pid"], e["tid"]) not in thread_names, f"event {i}: thread named twice"
                thread_names[(e["pid"], e["tid"])] = value
            elif e["name"] == "process_name":
                process_names[e["pid"]] = value
        else:
            raise AssertionError(f"event {i}: phase {e['ph']!r} (this writer emits complete and metadata events)")
    for e in complete:
        assert (e["pid"], e["tid"]) in thread_names, f"tid {e['tid']} has no thread_name"
        assert e["pid"] in process_names, f"pid {e['pid']} has no process_name"
    # complete events on one thread nest or are disjoint (else viewers drop or misdraw them), in the viewers'
    # own arithmetic: `ts + dur` in floating point, with no tolerance
    by_tid: dict[int, list[tuple[float, float]]] = {}
    for e in complete:
        by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for tid, spans in by_tid.items():
        stack: list[float] = []
        for a, b in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= a:
                stack.pop()
            assert not stack or b <= stack[-1], f"tid {tid}: [{a}, {b}] µs overlaps its parent ending at {stack[-1]}"
            stack.append(b)
    return complete


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_rt_exec", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory, target: dict) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("trace")
    return {"prefetch": compile_synth(out, "speculative_prefetch", 16 * MiB, target).plan_path,
            "resident": compile_synth(out, "greedy_grouping", 64 * MiB, target).plan_path,
            "sequential": compile_synth(out, "sequential", 10 * MiB, target).plan_path}


def _by_cat(events: list[dict], cat: str) -> list[dict]:
    return [e for e in events if e.get("cat") == cat]


def _overlaps(a: dict, b: dict) -> bool:
    return a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]


def check_streamed(plan_path: Path, events: list[dict], tokens: int, profile: bool) -> None:
    """Compute per group per pass, one read per streamed group per pass with its bytes, a span per token, and
    some read of the next streamed group overlapping the compute of a group."""
    plan = load_plan(plan_path)
    seq = [g for g in plan.groups if g.slot is not None]
    assert len(seq) >= 2
    groups, reads, toks = _by_cat(events, "group"), _by_cat(events, "read"), _by_cat(events, "generate")
    passes = len(groups) // len(plan.groups)
    assert passes >= tokens and len(groups) == passes * len(plan.groups)  # prefill's pass(es), then one a token
    assert [e["name"] for e in toks][:2] == ["prefill", "token 2"] and len(toks) == tokens
    assert len(reads) >= passes * len(seq)
    size = {g.index: g.byte_end - g.byte_start for g in seq}
    assert all(r["args"]["bytes"] == size[r["args"]["group"]] for r in reads)
    assert [r["args"]["read"] for r in reads] == list(range(len(reads)))  # none lost, none twice
    assert {r["tid"] for r in reads} != {g["tid"] for g in groups}  # a track of its own
    nxt = {g.index: seq[(i + 1) % len(seq)].index for i, g in enumerate(seq)}
    overlapped = [(c["name"], r["name"]) for c in groups if c["args"]["group"] in nxt for r in reads
                  if r["args"]["group"] == nxt[c["args"]["group"]] and _overlaps(c, r)]
    assert overlapped, "no read of group g+1 overlaps the compute of group g"
    ops = _by_cat(events, "op")
    if profile:
        assert len(ops) == passes * len(plan.schedule)
        assert {o["args"]["op"] for o in ops} == {op.op for op in plan.schedule}
    else:
        assert not ops


def test_trace_of_a_streamed_prefetch_run(plans, tmp_path):
    out = tmp_path / "trace.json"
    r = run_cli("run", str(plans["prefetch"]), "-p", "Once upon a time", "-n", "6", "--ignore-eos", "--json",
                "--profile", "--trace", str(out))
    assert r.returncode == 0, r.stderr
    assert "[trace: " in r.stderr and str(out) in r.stderr
    assert json.loads(r.stdout)["tokens"]
    events = check_trace(out)
    check_streamed(plans["prefetch"], events, 6, profile=True)
    doc = json.loads(out.read_text())
    assert doc["otherData"]["strategy"] == "speculative_prefetch"
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"tokens", "compute", "weights reader (prefetch thread)"}
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


#: Chrome DevTools' trace engine (the Performance panel's importer, which took over from chrome://tracing, gone
#: from Chromium) on the trace text: its warnings, its bounds, and per thread the entries it kept and how many of
#: them it placed in the thread's call tree (an entry that is not properly nested is left out of it)
DEVTOOLS_IMPORT_JS = """(async () => {
  const T = await import('./models/trace/trace.js');
  const model = T.TraceModel.Model.createWithAllHandlers();
  await model.parse(JSON.parse(%s).traceEvents, {metadata: {}, isFreshRecording: false});
  const d = model.parsedTrace(0).data, placed = d.Renderer.entryToNode;
  return {warnings: [...d.Warnings.perWarning.keys()], bad_events: d.Warnings.perEvent.size,
          bounds: [d.Meta.traceBounds.min, d.Meta.traceBounds.max],
          threads: [...d.Renderer.processes.values()].flatMap(p => [...p.threads.values()].map(t => ({
            name: t.name, placed: t.entries.filter(e => placed.has(e)).length,
            entries: t.entries.map(e => [e.cat, e.ts, e.dur, e.args.group ?? null])})))};
})()"""


def devtools_import(path: Path) -> dict:
    """What Chrome DevTools' Performance panel makes of the trace file at `path`, run in headless Chromium."""
    from .chromium import Chromium

    browser = Chromium()
    try:
        tab = browser.open("devtools://devtools/bundled/devtools_app.html")
        return browser.evaluate(tab, DEVTOOLS_IMPORT_JS % json.dumps(path.read_text(encoding="utf-8")))
    finally:
        browser.close()


def test_chrome_devtools_imports_the_streamed_trace_with_reads_beside_compute(plans, tmp_path):
    """The trace of a streamed speculative_prefetch run, read by a real viewer's importer rather than our own
    checker: no warning, every event kept and placed on its thread's track within the trace's bounds, and in
    the viewer's own model a read of group g+1 on the reader thread overlaps the compute of group g."""
    out = tmp_path / "trace.json"
    r = run_cli("run", str(plans["prefetch"]), "-p", "Once upon a time", "-n", "6", "--ignore-eos", "--json",
                "--profile", "--trace", str(out))  # with the ops nested in their groups
    assert r.returncode == 0, r.stderr
    mine = check_trace(out)
    seen = devtools_import(out)
    assert seen["warnings"] == [] and seen["bad_events"] == 0, seen["warnings"]
    threads = {t["name"]: t for t in seen["threads"]}
    assert set(threads) == {"tokens", "compute", "weights reader (prefetch thread)"}
    assert sum(len(t["entries"]) for t in threads.values()) == len(mine)
    for t in threads.values():
        assert t["placed"] == len(t["entries"]), f"{t['name']}: the viewer left {len(t['entries']) - t['placed']} " \
            "events out of its track (not properly nested there)"
        lo, hi = seen["bounds"]
        assert all(lo <= ts and ts + dur <= hi for _, ts, dur, _ in t["entries"]), (t["name"], seen["bounds"])
    seq = [g.index for g in load_plan(plans["prefetch"]).groups if g.slot is not None]
    nxt = {g: seq[(i + 1) % len(seq)] for i, g in enumerate(seq)}
    computes = [e for e in threads["compute"]["entries"] if e[0] == "group"]
    reads = [e for e in threads["weights reader (prefetch thread)"]["entries"] if e[0] == "read"]
    assert len(computes) >= 6 * len(seq) and len(reads) >= 6 * len(seq)
    overlapped = [(c, x) for c in computes for x in reads if c[3] in nxt and x[3] == nxt[c[3]]
                  and x[1] < c[1] + c[2] and c[1] < x[1] + x[2]]
    assert overlapped, "in the viewer's model no read of group g+1 overlaps the compute of group g"


def test_trace_of_a_resident_run_has_no_reads(plans, tmp_path):
    out = tmp_path / "resident.json"
    r = run_cli("run", str(plans["resident"]), "-p", "Hello", "-n", "3", "--ignore-eos", "--json",
                "--trace", str(out))
    assert r.returncode == 0, r.stderr
    events = check_trace(out)
    plan = load_plan(plans["resident"])
    groups = _by_cat(events, "group")
    assert groups and len(groups) % len(plan.groups) == 0 and len(groups) >= 3 * len(plan.groups)
    assert not _by_cat(events, "read") and not _by_cat(events, "wait") and not _by_cat(events, "op")
    names = {e["args"]["name"] for e in json.loads(out.read_text())["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"tokens", "compute"}


def test_trace_of_a_one_slot_plan_shows_reads_as_stalls(plans, tmp_path):
    """With one slot the compute thread reads each group itself: every read lies inside the wait before its
    group's compute, and none overlaps any compute."""
    out = tmp_path / "sequential.json"
    r = run_cli("run", str(plans["sequential"]), "-p", "Hello", "-n", "3", "--ignore-eos", "--json",
                "--trace", str(out))
    assert r.returncode == 0, r.stderr
    events = check_trace(out)
    reads, waits, groups = _by_cat(events, "read"), _by_cat(events, "wait"), _by_cat(events, "group")
    assert reads and len(waits) == len(groups) >= 3 * len(load_plan(plans["sequential"]).groups)
    assert not [(c["name"], x["name"]) for c in groups for x in reads if _overlaps(c, x)]
    for x in reads:
        assert any(w["args"]["group"] == x["args"]["group"] and w["ts"] <= x["ts"]
                   and x["ts"] + x["dur"] <= w["ts"] + w["dur"] + 1e-3 for w in waits), x
    names = {e["args"]["name"] for e in json.loads(out.read_text())["traceEvents"] if e["name"] == "thread_name"}
    assert "weights reads (in the compute thread)" in names


def _doc(*events: dict) -> dict:
    named = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "p"}},
             {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "compute"}}]
    return {"traceEvents": named + list(events)}


X = {"ph": "X", "name": "a", "pid": 1, "tid": 2, "ts": 10.0, "dur": 5.0}


@pytest.mark.parametrize("doc, why", [
    ([X], "not a JSON object"),
    (_doc({**X, "dur": -1.0}), "dur"),
    (_doc({**X, "ts": "10"}), "ts"),
    (_doc({**X, "tid": 3}), "no thread_name"),
    (_doc({k: v for k, v in X.items() if k != "name"}), "no name"),
    (_doc({**X, "ph": "B"}), "phase"),
    (_doc(X, {**X, "ts": 12.0, "dur": 10.0}), "overlaps its parent"),
    (_doc({"ph": "M", "name": "thread_label", "pid": 1, "tid": 2, "args": {"name": "x"}}), "unknown metadata"),
])
def test_the_checker_rejects_malformed_traces(tmp_path, doc, why):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(AssertionError, match=why):
        check_trace(path)
    path.write_text(json.dumps(_doc(X, {**X, "ts": 11.0, "dur": 2.0}, {**X, "ts": 15.0})))
    assert len(check_trace(path)) == 3  # nested and adjacent events are fine


@pytest.mark.parametrize("bad", ["missing-folder/trace.json", "."])
def test_bad_trace_path_is_one_line_before_any_work(plans, tmp_path, bad):
    target = tmp_path / bad
    r = run_cli("run", str(plans["prefetch"]), "-f", str(tmp_path / "no-such-prompt.txt"), "--trace", str(target))
    # the trace path is checked first: before the prompt is read, the plan loaded or a kernel warmed
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trace" in lines[0] and "no-such-prompt" not in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_ctrl_c_writes_what_was_recorded(plans, tmp_path, monkeypatch):
    """An interrupt mid-run (here: two groups into the 6th forward pass, the prefill's being the first) still
    writes the trace, atomically, with what ran until then; exit code 130."""
    from edge_rt_exec import cli
    from edge_rt_exec.weights import GroupStreamer

    acquire = GroupStreamer.acquire
    calls = {"n": 0}
    plan = load_plan(plans["prefetch"])
    assert all(g.slot is not None for g in plan.groups)  # every group goes through `acquire`
    groups = len(plan.groups)

    def interrupting(self, g):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 5 * groups + 2:  # two groups into the 6th pass
            raise KeyboardInterrupt
        return acquire(self, g)

    monkeypatch.setattr(GroupStreamer, "acquire", interrupting)
    from edge_rt_exec.ops import _jit  # the CLI sets process-wide switches: restored after this test

    monkeypatch.setattr(_jit, "LEAN_IMPORTS", getattr(_jit, "LEAN_IMPORTS", False), raising=False)
    out = tmp_path / "partial.json"
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(plans["prefetch"]), "-p", "Once upon a time", "-n", "20", "--ignore-eos", "--json",
                  "--trace", str(out)])
    assert e.value.code == 130
    events = check_trace(out)
    computed = _by_cat(events, "group")
    assert len(computed) == 5 * groups + 1  # the 6th pass's second group was interrupted before it computed
    assert [t["name"] for t in _by_cat(events, "generate")] == ["prefill", "token 2", "token 3", "token 4", "token 5"]
    assert len(_by_cat(events, "read")) >= 5 * groups + 1
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_trace_of_a_smollm2_streamed_run(smollm2_artifacts, tmp_path):
    plan = smollm2_artifacts("speculative_prefetch", "200M")
    out = tmp_path / "smollm2.json"
    r = run_cli("run", str(plan), "-p", "The history of the printing press", "-n", "4", "--ignore-eos", "--json",
                "--trace", str(out))
    assert r.returncode == 0, r.stderr
    check_streamed(plan, check_trace(out), 4, profile=False)
