"""Tests of the aarch64 emulation CI tools in ci/aarch64/ (compare.py, run.sh, setup.sh, smoke.py).

The executor does not have to exist: compare.py is driven with a fake executor that speaks the same CLI.
Tests that need the emulation environment (ci/aarch64/setup.sh) skip when it has not been built.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "ci" / "aarch64"
COMPARE = TOOLS / "compare.py"
RUN_SH = TOOLS / "run.sh"

FAKE_EXEC = textwrap.dedent(
    '''
    """A stand-in for `python -m edge_rt_exec` with the same command line."""
    import argparse, json, sys, zlib

    p = argparse.ArgumentParser()
    p.add_argument("--flip-at", type=int, default=-1)     # change the token at this position
    p.add_argument("--drop-last", action="store_true")    # one token fewer
    p.add_argument("--fail", action="store_true")         # exit 3 with a message
    p.add_argument("--garbage", action="store_true")      # print no JSON
    p.add_argument("--chatty", action="store_true")       # a log line before the JSON
    p.add_argument("--perturb", type=float, default=0.0)  # added to one embedding value
    p.add_argument("--nan", action="store_true")
    p.add_argument("--rows", type=int, default=0)         # extra rows: a shape mismatch
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("plan")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-tokens", type=int, required=True)
    r.add_argument("--temperature", type=float, required=True)
    r.add_argument("--json", action="store_true", required=True)
    e = sub.add_parser("embed")
    e.add_argument("plan")
    e.add_argument("--file", required=True)
    e.add_argument("--out", required=True)
    a = p.parse_args()
    if a.fail:
        print("Traceback (most recent call last):\\nRuntimeError: kernel exploded", file=sys.stderr)
        sys.exit(3)
    if a.garbage:
        print("hello, not json")
        sys.exit(0)
    if a.cmd == "run":
        assert a.temperature == 0
        seed = zlib.crc32((open(a.plan).read() + a.prompt).encode())
        tokens = [(seed >> (i % 24)) % 50000 + i for i in range(a.max_tokens)]
        if 0 <= a.flip_at < len(tokens):
            tokens[a.flip_at] += 1
        if a.drop_last:
            tokens = tokens[:-1]
        if a.chatty:
            print("numba: compiling kernels...")
        print(json.dumps({"tokens": tokens, "text": "x"}))
    else:
        import numpy as np
        n = sum(1 for line in open(a.file) if line.strip()) + a.rows
        emb = np.linspace(-1, 1, n * 8, dtype=np.float32).reshape(n, 8)
        emb[1, 3] += np.float32(a.perturb)
        if a.nan:
            emb[0, 0] = np.nan
        np.save(a.out, emb)
    '''
)


@pytest.fixture()
def fake(tmp_path: Path):
    """Returns (plan, sentences, prefix(*flags)) for driving compare.py with the fake executor."""
    script = tmp_path / "fake_exec.py"
    script.write_text(FAKE_EXEC)
    plan = tmp_path / "tiny.plan"
    plan.write_text("plan-bytes")
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("a cat\nthe dog sat\nhello\n")

    def prefix(*flags: str) -> str:
        return " ".join([sys.executable, str(script), *flags])

    return plan, sentences, prefix


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMPARE), *args], capture_output=True, text=True, timeout=120)


def run_args(plan: Path, host: str, arm: str, *extra: str) -> list[str]:
    return ["run", str(plan), "--prompt", "Once upon a time", "--host-cmd", host, "--aarch64-cmd", arm, *extra]


def test_run_identical_tokens(fake):
    plan, _, prefix = fake
    p = compare(*run_args(plan, prefix(), prefix()))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("host: ") and lines[1].startswith("aarch64: ")
    assert lines[-1].startswith("OK run: 16 tokens identical (host ")


def test_run_max_tokens_and_stray_log_line(fake):
    plan, _, prefix = fake
    p = compare(*run_args(plan, prefix(), prefix("--chatty"), "--max-tokens", "5"))
    assert p.returncode == 0, p.stderr
    assert "OK run: 5 tokens identical" in p.stdout


def test_run_token_mismatch_names_position(fake):
    plan, _, prefix = fake
    p = compare(*run_args(plan, prefix(), prefix("--flip-at", "7")))
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("MISMATCH run: tokens differ at position 7: host ")


def test_run_length_mismatch(fake):
    plan, _, prefix = fake
    p = compare(*run_args(plan, prefix(), prefix("--drop-last")))
    assert p.returncode == 1
    assert "host produced 16 tokens, aarch64 15; the first 15 agree" in p.stderr


def test_run_side_failure_is_exit_2_with_reason(fake):
    plan, _, prefix = fake
    p = compare(*run_args(plan, prefix(), prefix("--fail")))
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("FAIL run: aarch64 side exited 3 after ")
    assert "RuntimeError: kernel exploded" in last
    assert "stderr ---" in p.stderr  # the tail of the failing side's stderr is shown too


def test_run_unreadable_output(fake):
    plan, _, prefix = fake
    p = compare(*run_args(plan, prefix("--garbage"), prefix()))
    assert p.returncode == 2
    assert "host side printed no JSON object with 'tokens'" in p.stderr
    assert "aarch64:" not in p.stdout  # the second side is not run after the first failed


def test_missing_plan_and_missing_command(fake, tmp_path):
    plan, _, prefix = fake
    p = compare(*run_args(tmp_path / "nope.plan", prefix(), prefix()))
    assert p.returncode == 2 and "no plan at" in p.stderr
    p = compare(*run_args(plan, prefix(), str(tmp_path / "no-such-runner")))
    assert p.returncode == 2 and "aarch64 side could not start" in p.stderr


def test_report_file(fake, tmp_path):
    plan, _, prefix = fake
    report = tmp_path / "report.json"
    p = compare(*run_args(plan, prefix(), prefix("--flip-at", "0"), "--report", str(report)))
    assert p.returncode == 1
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["exit_status"] == 1 and data["mode"] == "run"
    assert data["verdict"].startswith("MISMATCH run")
    assert set(data["sides"]) == {"host", "aarch64"}
    assert data["sides"]["aarch64"]["seconds"] > 0
    assert len(data["tokens_host"]) == 16


def embed_args(plan: Path, sentences: Path, host: str, arm: str, *extra: str) -> list[str]:
    return ["embed", str(plan), "--sentences", str(sentences), "--host-cmd", host, "--aarch64-cmd", arm, *extra]


@pytest.mark.parametrize(
    ("flags", "code", "needle"),
    [
        ((), 0, "OK embed: embeddings (3, 8) agree: max |host - aarch64| = 0 <= 1e-05"),
        (("--perturb", "4e-6"), 0, "OK embed: embeddings (3, 8) agree"),
        (("--perturb", "5e-5"), 1, "MISMATCH embed: max |host - aarch64| = 5e-05 at [1, 3] > 1e-05"),
        (("--nan",), 1, "MISMATCH embed: aarch64 embeddings have 1 non-finite values, first at [0, 0]"),
        (("--rows", "1"), 1, "MISMATCH embed: embedding shapes differ: host (3, 8), aarch64 (4, 8)"),
        (("--fail",), 2, "FAIL embed: aarch64 side exited 3"),
    ],
)
def test_embed(fake, flags, code, needle):
    pytest.importorskip("numpy")
    plan, sentences, prefix = fake
    p = compare(*embed_args(plan, sentences, prefix(), prefix(*flags)))
    assert p.returncode == code, p.stdout + p.stderr
    assert needle in (p.stdout if code == 0 else p.stderr)


def test_embed_keep_and_atol(fake, tmp_path):
    pytest.importorskip("numpy")
    plan, sentences, prefix = fake
    keep = tmp_path / "kept"
    p = compare(*embed_args(plan, sentences, prefix(), prefix("--perturb", "5e-5"), "--atol", "1e-4",
                            "--keep", str(keep)))
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(keep)) == ["embeddings-aarch64.npy", "embeddings-host.npy"]


# ------------------------------------------------------------------------------------------ shell scripts

def test_shell_scripts_parse():
    for name in ("setup.sh", "run.sh", "common.sh"):
        subprocess.run(["bash", "-n", str(TOOLS / name)], check=True)
    p = subprocess.run(["bash", str(TOOLS / "setup.sh"), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "setup.sh [--refresh] [CACHE_DIR]" in p.stdout


def test_run_sh_without_sysroot(tmp_path):
    env = dict(os.environ, EDGE_RT_AARCH64_CACHE=str(tmp_path / "empty"))
    p = subprocess.run([str(RUN_SH), "python", "-c", "pass"], capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert "run ci/aarch64/setup.sh first" in p.stderr
    p = subprocess.run([str(RUN_SH)], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "usage:" in p.stderr


def _emulation_ready() -> bool:
    cache = os.environ.get("EDGE_RT_AARCH64_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edge-rt-aarch64")
    return os.path.exists(os.path.join(cache, "sysroot", ".edge-rt-ready")) and bool(
        shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64"))


needs_emulation = pytest.mark.skipif(not _emulation_ready(),
                                     reason="no aarch64 device: its emulation (ci/aarch64/setup.sh) is not set up")


@needs_emulation
def test_run_sh_is_aarch64_with_pi_settings(tmp_path):
    code = ("import json, os, platform, sys; print(json.dumps([platform.machine(), sys.path[1], "
            "os.environ['NUMBA_CPU_NAME'], os.environ['QEMU_CPU'], os.environ['NUMBA_CACHE_DIR']]))")
    p = subprocess.run([str(RUN_SH), "--", "python", "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, NUMBA_CPU_NAME="znver3", PYTHONPATH="/nonexistent/x86"))
    assert p.returncode == 0, p.stderr
    machine, first_path, cpu, qemu_cpu, cache = json.loads(p.stdout)
    assert machine == "aarch64"
    assert first_path == str(REPO)  # the working tree is imported (sys.path[0] is '' for -c)
    assert cpu == qemu_cpu == "cortex-a72"  # the host's NUMBA_CPU_NAME does not leak in
    assert cache.endswith("numba-cache")
    # A file the guest writes to a temporary folder is visible on the host (not hidden in the sysroot).
    out = tmp_path / "from-guest.txt"
    subprocess.run([str(RUN_SH), "python", "-c", f"open({str(out)!r}, 'w').write('hi')"], check=True, timeout=120)
    assert out.read_text() == "hi"


def _native_smoke_possible() -> bool:
    try:
        import numba  # noqa: F401
        import psutil  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _native_smoke_possible(), reason="numba, psutil or tokenizers missing on the host")
def test_smoke_native(tmp_path):
    """smoke.py also runs natively: cold process compiles, warm process loads from the cache."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("EDGE_RT_AARCH64_RUN", None)
    p = subprocess.run([sys.executable, str(TOOLS / "smoke.py")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["checks"]["warm_loaded_from_cache"] and report["checks"]["cold_compiled"]
    assert report["cache"]["warm"] == {"cache_hits": 1, "cache_misses": 0}
