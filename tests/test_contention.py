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


def adapter(max_threads: int = 2) -> tuple[ThreadAdapter, list[int]]:
    calls: list[int] = []
    return ThreadAdapter(max_threads, calls.append), calls


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
            s.adapt_threads(**adapt)
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
