"""Start-up: what a run imports and loads before its first token, the process clock its figures use, and the
tokenizer parsed beside the kernels (errors still one line). Speed itself is measured in
benchmarks/bench_startup.py, never here."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time

import pytest

from .conftest import compile_synth

MiB = 1 << 20
#: numba's optional integrations: installed in the development environment (by the reference libraries), never
#: used by a kernel, so an executor process does not import them (a device with only the executor's
#: dependencies has neither).
NOT_FOR_KERNELS = ["scipy", "cffi"]


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("startup")
    tgt = {"name": "performance", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
           "compute_gflops": 190.0, "prefetch_headroom": 0.2}
    return compile_synth(out, "greedy_grouping", 64 * MiB, tgt).plan_path


def test_optional_numba_integrations_are_installed_here():
    # Otherwise the next test could not fail: numba would skip them anyway.
    assert all(importlib.util.find_spec(m) is not None for m in NOT_FOR_KERNELS)


def test_a_run_does_not_import_numbas_optional_integrations(plan):
    code = ("import sys, atexit\n"
            f"atexit.register(lambda: print('MODULES', sorted({{m.split('.')[0] for m in sys.modules}} & "
            f"{set(NOT_FOR_KERNELS)!r}), file=sys.stderr))\n"
            f"sys.argv = ['edge-rt-exec', 'run', {str(plan)!r}, '-p', 'hi there', '-n', '3', '--json']\n"
            "from edge_rt_exec.cli import main\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "MODULES []" in r.stderr, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == 3
    assert 0 < out["first_token_s"] < 300


def test_library_use_keeps_numba_whole():
    # Outside the CLIs (a user's own process) numba is left as it is: np.dot in the user's kernels needs scipy.
    code = ("import sys\n"
            "from edge_rt_exec.ops import _jit\n"
            "_jit.numba_module()\n"
            "print('scipy' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_process_start_time_is_the_spawn_time():
    # psutil's create_time() is early by the fraction of a second /proc/stat's boot time rounds away (0-1 s):
    # the start-up figures use the kernel's record against CLOCK_BOOTTIME instead (10 ms ticks).
    before = time.time()
    r = subprocess.run([sys.executable, "-c", "import time; from edge_rt_exec.memory import process_start_time; "
                        "print(process_start_time(), time.time())"], capture_output=True, text=True, check=True)
    start, child_now = map(float, r.stdout.split())
    assert before - 0.02 <= start <= child_now


def test_a_bad_tokenizer_is_still_one_line(plan, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(plan.parent, folder)
    (folder / "tokenizer.json").write_text('{"model": ')
    r = subprocess.run([sys.executable, "-m", "edge_rt_exec", "run", str(folder / plan.name), "-p", "hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot load the tokenizer" in lines[0], r.stderr
