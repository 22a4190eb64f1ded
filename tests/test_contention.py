"""The thread adapter (contention.py): its decisions on synthetic token times, and tokens that do not change
when it switches thread counts. No timing assertions: the speed is measured by benchmarks/bench_contention.py."""

from __future__ import annotations

import numba
import pytest

from edge_rt_exec.contention import ThreadAdapter

from .conftest import compile_synth

MiB = 1 << 20
QUIET = {2: 0.010, 1: 0.017}  #: seconds per token at each count, a quiet 2-core machine
BUSY = {2: 0.200, 1: 0.025}  #: one core held by a busy loop


def feed(a: ThreadAdapter, times: dict[int, float], tokens: int) -> None:
    for _ in range(tokens):
        a.observe(times[a.threads])


def adapter(max_threads: int = 2, load: object = None) -> tuple[ThreadAdapter, list[int]]:
    """An adapter on synthetic token times; `load`: a fake `CpuLoad` (None: timing alone, as without /proc/stat)."""
    calls: list[int] = []
    return ThreadAdapter(max_threads, calls.append, load=load), calls


class FakeLoad:
    """A `CpuLoad` whose readings the test sets: `free` cores of `cpus`."""

    def __init__(self, free: float) -> None:
        self.free = free

    def free_cores(self, span_s: float | None = None) -> float:
        return self.free


def test_quiet_stays_at_max_after_one_early_probe() -> None:
    a, calls = adapter()
    feed(a, QUIET, 40)
    assert a.threads == 2 and calls == [1, 2]  # one probe down after the first token, ended after one token
    assert a.tokens_at[1] == 1 and a.events[-1]["why"] == "reverted"
    feed(a, QUIET, 200)
    assert a.threads == 2
    assert a.tokens_at[1] <= 4  # failed probes back off: 48, then 96, then 192 tokens apart


def test_contention_drops_a_thread_then_recovers() -> None:
    a, calls = adapter()
    feed(a, QUIET, 60)
    assert a.threads == 2
    feed(a, BUSY, 3)  # contention starts mid-run: one window later, a probe at one thread ...
    assert a.threads == 1 and a.events[-1]["why"] == "slower"
    feed(a, BUSY, 3)  # ... is kept
    assert a.threads == 1 and a.events[-1]["why"] == "kept"
    at2 = a.tokens_at[2]
    feed(a, BUSY, 300)
    assert a.threads == 1
    assert a.tokens_at[2] - at2 <= 4  # probes back up end after one slow token, and back off
    feed(a, QUIET, 600)  # the busy process went away: the next probe up is kept
    assert a.threads == 2 and calls[-1] == 2
    assert a.report()["switches"] == a.switches and a.report()["tokens_at"]["1"] == a.tokens_at[1]


def test_contention_before_the_run_is_found_at_the_first_token() -> None:
    a, _ = adapter()
    feed(a, BUSY, 64)
    assert a.threads == 1
    assert a.tokens_at[2] <= 2  # the first token, and at most one probe back up


def test_four_threads_step_down_one_at_a_time_and_up_again() -> None:
    a, calls = adapter(4)
    three_free = {4: 0.2, 3: 0.006, 2: 0.008, 1: 0.015}
    feed(a, three_free, 200)
    assert a.threads == 3 and calls[0] == 3  # one step down, kept; probes from 3 (to 2 or 4) revert
    feed(a, {4: 0.004, 3: 0.006, 2: 0.008, 1: 0.015}, 400)
    assert a.threads == 4


def test_limit_caps_and_one_thread_never_probes() -> None:
    a, calls = adapter()
    a.limit(1)  # the thermal governor's ceiling
    assert calls == [1]
    feed(a, BUSY, 100)
    assert calls == [1] and a.threads == 1
    a.limit(2)
    assert a.threads == 2


def test_noise_spikes_do_not_switch() -> None:
    a, calls = adapter()
    feed(a, QUIET, 10)
    n = len(calls)
    for i in range(40):  # one token in three is twice as slow: the medians stay at the quiet level
        a.observe(QUIET[a.threads] * (2.0 if i % 3 == 0 else 1.0))
    assert len(calls) == n and a.threads == 2


def test_busy_cores_seen_before_the_prefill_start_at_one_thread_and_never_probe_up() -> None:
    load = FakeLoad(1.0)  # a busy loop holds one of two cores
    a, calls = adapter(load=load)
    a.prepare()
    assert calls == [1] and a.events[-1]["why"] == "busy cores"
    feed(a, BUSY, 400)
    assert a.threads == 1 and a.tokens_at.get(2, 0) == 0  # no ~10x probe token while the core is taken
    load.free = 2.0  # it went away: the next due probe up goes ahead and is kept
    feed(a, QUIET, 300)
    assert a.threads == 2


def test_busy_cores_mid_run_probe_down_without_waiting_for_slow_windows() -> None:
    load = FakeLoad(2.0)
    a, calls = adapter(load=load)
    a.prepare()
    feed(a, QUIET, 40)
    assert calls == [] and a.threads == 2  # the cores are free: no early probe down
    feed(a, QUIET, 20)
    assert a.threads == 2
    load.free = 0.9
    feed(a, BUSY, 3)  # one window: the load alone sends it down (a probe, kept when faster)
    assert a.threads == 1 and a.events[-1]["why"] == "busy cores"
    feed(a, BUSY, 3)
    assert a.events[-1]["why"] == "kept"


def test_a_misread_load_is_checked_by_timing_and_backs_off() -> None:
    a, calls = adapter(load=FakeLoad(1.2))  # another process uses most of a core, yet 2 threads stay faster
    feed(a, QUIET, 400)
    down = [e for e in a.events if e["why"] == "busy cores"]
    assert down and all(e["from"] == 2 for e in down)
    assert a.tokens_at.get(1, 0) <= 24  # each probe down reverts after a window, backing off 48, 96, 192 ...
    assert a.threads == 2


def test_cpu_load_reads_other_processes_busy_time(tmp_path) -> None:
    import os

    from edge_rt_exec.contention import CpuLoad

    cpus = sorted(os.sched_getaffinity(0))[:2]
    stat = tmp_path / "stat"
    clock, own = [0.0], [0.0]

    def write(busy: list[int], idle: list[int]) -> None:
        lines = [f"cpu {sum(busy)} 0 0 {sum(idle)} 0 0 0 0 0 0"]
        lines += [f"cpu{c} {b} 0 0 {i} 0 0 0 0 0 0" for c, b, i in zip(cpus, busy, idle)]
        stat.write_text("\n".join(lines + ["intr 1 2 3", "ctxt 5"]) + "\n")

    write([0] * len(cpus), [0] * len(cpus))
    load = CpuLoad(str(stat), span_s=0.1, clock=lambda: clock[0], own=lambda: own[0])
    load.cpus = {f"cpu{c}" for c in cpus}
    hz = load.hz
    clock[0] = 1.0  # one second: every core busy, half of one core of it ours
    own[0] = 0.5
    write([hz] * len(cpus), [0] * len(cpus))
    assert load.read() == pytest.approx(len(cpus) - 0.5)
    assert load.free_cores() == pytest.approx(0.5)  # a reading shorter than the span keeps the last one
    clock[0] = 2.0  # the next second: all idle
    write([hz] * len(cpus), [hz] * len(cpus))
    assert load.read() == pytest.approx(0.0)
    assert CpuLoad(str(tmp_path / "missing")).read() is None  # no /proc/stat: timing alone


def test_adapter_reads_real_proc_stat() -> None:
    from edge_rt_exec.contention import CpuLoad

    load = CpuLoad(span_s=0.0)
    x = 0
    for i in range(2_000_000):  # some CPU time of our own: not counted as others'
        x += i
    others = load.read()
    assert others is not None and 0.0 <= others <= len(load.cpus)


@pytest.fixture(scope="module")
def synth_plan(tmp_path_factory: pytest.TempPathFactory):
    tgt = {"name": "performance", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
           "compute_gflops": 190.0, "prefetch_headroom": 0.2}
    return compile_synth(tmp_path_factory.mktemp("contention"), "greedy_grouping", 64 * MiB, tgt).plan_path


def _tokens(plan, threads: int, adapt: dict | None) -> tuple[list[int], dict | None]:
    from edge_rt_exec.generate import Session

    s = Session(plan, threads=threads, adapt_threads=False)
    try:
        if adapt is not None:
            s.adapt_threads(load=None, **adapt)
        ids = s.encode_prompt("Once upon a time there was")
        r = s.generate(ids, max_tokens=24, ignore_eos=True)
        return r.tokens, s.adapter.report() if s.adapter is not None else None
    finally:
        s.close()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_tokens_do_not_depend_on_threads_or_switches(synth_plan) -> None:
    one, _ = _tokens(synth_plan, 1, None)
    two, _ = _tokens(synth_plan, 2, None)
    # every probe kept (gain inf) and one every token: the count changes every other token
    switching, rep = _tokens(synth_plan, 2, {"window": 1, "probe_every": 1, "gain": float("inf")})
    assert rep is not None and rep["switches"] >= 8 and set(rep["tokens_at"]) == {"1", "2"}
    assert one == two == switching


def test_default_session_adapts_and_cli_reports_it(synth_plan) -> None:
    import json
    import subprocess
    import sys

    def run(*extra: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "edge_rt_exec", "run", str(synth_plan), "-p", "hi", "-n", "8",
                            "--json", "-t", "2", *extra], capture_output=True, text=True, timeout=300, check=True)
        return json.loads(r.stdout)

    on, off = run(), run("--fixed-threads")
    assert set(on["adapt_threads"]) >= {"threads", "max_threads", "switches", "tokens_at", "events"}
    assert "adapt_threads" not in off and on["tokens"] == off["tokens"]
