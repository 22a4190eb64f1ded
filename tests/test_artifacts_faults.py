"""Artifacts are never lost or poisoned: two models never share a folder, a corrupted weights file is rewritten,
not reused, a signal or a full / read-only disk leaves one line, the documented exit code and no partial file, and
a killed compile's temporary file is removed by the next compile. Inputs are generated (the synthetic model)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_rt_compiler.emit import HOLD_ENV
from edge_rt_compiler.frontends.synthetic import SyntheticSpec, make_synthetic
from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import load_plan
from edge_rt_exec.weights import open_weights, verify_weights_sha

from .conftest import compile_synth

MiB = 1 << 20
SMALL = {"n_layers": 1, "hidden": 48, "heads": 2, "vocab": 300, "n_ctx": 32}


def _model(folder: Path, seed: int = 0, **kw: int) -> Path:
    return make_synthetic(folder, SyntheticSpec(**{**SMALL, **kw, "seed": seed}))


def _compile(path: Path, out: Path, target: dict, strategy: str = "greedy_grouping", name: str = "local", **kw):
    return compile_model(CompileRequest(ModelRequest(name, "local", path=str(path)), strategy, 64 * MiB, target,
                                        out_dir=out, **kw))


def _works(plan_path: Path) -> None:
    """The plan still opens against its weights and the weights hash to what the plan says."""
    plan = load_plan(plan_path)
    st = open_weights(plan)
    try:
        assert verify_weights_sha(plan, st)
    finally:
        st.close()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # SIGINT reset to its default: a shell that started the tests in the background may have ignored it
    return subprocess.Popen([sys.executable, "-m", "edge_rt_compiler.app", *args], cwd=cwd, env={**os.environ,
                            **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _one_line_error(r: subprocess.CompletedProcess | tuple[int, str], needle: str) -> str:
    code, err = (r.returncode, r.stderr) if isinstance(r, subprocess.CompletedProcess) else r
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("edge-rt-compile: error:")]
    assert len(lines) == 1 and needle in lines[0], err
    return lines[0]


# ---- 1. two models, one folder name ------------------------------------------------------------------------

def test_a_different_model_is_refused_from_an_occupied_folder(tmp_path, target):
    a, b = _model(tmp_path / "a" / "model", seed=0), _model(tmp_path / "b" / "model", seed=1)
    out = tmp_path / "out"
    first = _compile(a, out, target)
    folder = first.plan_path.parent
    assert folder.name == "model"
    before = _snapshot(folder)
    with pytest.raises(UserError) as e:
        _compile(b, out, target, strategy="sequential")
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and str(a) in msg and "model.name=" in msg and "out_dir=" in msg
    assert _snapshot(folder) == before and not _temps(out)
    _works(first.plan_path)
    # the remedies work: its own name, or its own out_dir
    _works(_compile(b, out, target, name="model-b").plan_path)
    _works(_compile(b, tmp_path / "out2", target).plan_path)
    # the same model copied elsewhere (same bytes, other path and mtime) is the same model
    shutil.copytree(a, tmp_path / "c" / "model")
    again = _compile(tmp_path / "c" / "model", out, target, strategy="sequential")
    assert again.plan.files["weights_sha256"] == first.plan.files["weights_sha256"]
    _works(first.plan_path)
    _works(again.plan_path)


def test_a_changed_model_at_the_same_path_is_refused(tmp_path, target):
    src = _model(tmp_path / "m", seed=0)
    out = tmp_path / "out"
    first = _compile(src, out, target)
    shutil.rmtree(src)
    _model(src, seed=2)  # re-exported in place: other weights
    with pytest.raises(UserError, match="as it was before it changed"):
        _compile(src, out, target, strategy="sequential")
    _works(first.plan_path)


def test_cli_refuses_a_colliding_model_in_one_line(tmp_path):
    a, b = _model(tmp_path / "a" / "model", seed=0), _model(tmp_path / "b" / "model", seed=1)
    common = ["model=local", "budget=64M", "strategy=greedy_grouping", f"out_dir={tmp_path / 'out'}"]
    p = _cli([*common, f"model.path={a}"], tmp_path)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    p = _cli([*common, f"model.path={b}"], tmp_path)
    _one_line_error((p.wait(timeout=600), p.stderr.read()), "already holds the artifacts of another model")


# ---- 2. corrupted weights ----------------------------------------------------------------------------------

def test_corrupted_weights_are_rewritten_not_reused(tmp_path, target, capsys):
    src = _model(tmp_path / "m")
    first = _compile(src, tmp_path / "out", target)
    w = first.plan.file("weights")
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the data section: the header still matches
    w.write_bytes(bytes(data))
    capsys.readouterr()
    again = _compile(src, tmp_path / "out", target, strategy="sequential")
    assert not again.weights_reused
    assert "does not match the sha256 in its header (the file is corrupted); rewriting it" in capsys.readouterr().err
    assert again.plan.files["weights_sha256"] == first.plan.files["weights_sha256"]
    _works(first.plan_path)  # the old plans work again with the rewritten file
    _works(again.plan_path)
    assert _compile(src, tmp_path / "out", target).weights_reused  # and it is reused once it is sound


# ---- 3. signals and killed compiles ------------------------------------------------------------------------

def _held_compile(tmp_path: Path, out: Path, flag: Path) -> subprocess.Popen:
    """A compile paused in the middle of writing its weights (the HOLD_ENV test hook)."""
    p = _cli(["model=synthetic_gpt2", "budget=64M", "strategy=greedy_grouping", f"out_dir={out}",
              *(f"model.synthetic.{k}={v}" for k, v in SMALL.items())], tmp_path, {HOLD_ENV: str(flag)})
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() < deadline, "the compile never reached the weights write"
        time.sleep(0.05)
    assert [t.name for t in _temps(out / "synthetic-gpt2")], "no temporary weights file while writing"
    return p


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_while_writing_weights_is_one_line_and_leaves_nothing(tmp_path, sig, code, name):
    out = tmp_path / "out"
    p = _held_compile(tmp_path, out, tmp_path / "flag")
    p.send_signal(sig)
    rc, err = p.wait(timeout=60), p.stderr.read()
    assert rc == code, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"edge-rt-compile: interrupted by {name}; "), err
    assert not _temps(out)
    assert not list((out / "synthetic-gpt2").glob("weights-*")) and not list(out.rglob("*.plan.json"))


def test_a_killed_compiles_temp_file_is_removed_by_the_next(tmp_path, target, capsys):
    out = tmp_path / "out"
    p = _held_compile(tmp_path, out, tmp_path / "flag")
    folder = out / "synthetic-gpt2"
    p.kill()
    p.wait(timeout=60)
    left = _temps(folder)
    assert len(left) == 1  # SIGKILL runs no cleanup
    other = [folder / ".notes.tmp", folder / "mine.tmp"]  # not atomic_file's names: never touched
    for o in other:
        o.write_text("x")
    capsys.readouterr()
    r = compile_synth(out, "greedy_grouping", 64 * MiB, target, synthetic=dict(SMALL))
    assert f"removed {left[0].name}, left by a killed compile" in capsys.readouterr().err
    assert sorted(_temps(folder)) == sorted(other)
    _works(r.plan_path)


# ---- 4. full disk, read-only disk, out_dir a file ----------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(opts) -> a fresh tmpfs folder (root only; unmounted after the test)."""
    mounted: list[Path] = []

    def mount(opts: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"no tmpfs device: mount not permitted ({r.stderr.strip()})")
        mounted.append(d)
        return d

    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tmpfs, target):
    src = _model(tmp_path / "m")
    disk = tmpfs("size=3m")
    out = disk / "out"
    first = _compile(src, out, target)
    folder = first.plan_path.parent
    _fill(disk)
    before = _snapshot(folder)
    for kw in ({"strategy": "sequential"}, {"quant": "f16"}):  # a new plan only; new weights too
        with pytest.raises(UserError) as e:
            _compile(src, out, target, **kw)
        assert "no space left on the device" in str(e.value) and "out_dir=" in str(e.value)
        assert "\n" not in str(e.value)
        assert _snapshot(folder) == before and not _temps(disk)
    _works(first.plan_path)
    p = _cli(["model=local", f"model.path={src}", "budget=64M", "strategy=sequential", f"out_dir={out}"], tmp_path)
    _one_line_error((p.wait(timeout=600), p.stderr.read()), "no space left on the device")
    assert _snapshot(folder) == before and not _temps(disk)


def test_a_read_only_disk_is_one_line_and_leaves_nothing(tmp_path, tmpfs, target):
    src = _model(tmp_path / "m")
    disk = tmpfs("size=8m")
    first = _compile(src, disk / "out", target)
    folder = first.plan_path.parent
    before = _snapshot(folder)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    with pytest.raises(UserError, match="read-only filesystem; set out_dir="):
        _compile(src, disk / "out", target, strategy="sequential")
    p = _cli(["model=local", f"model.path={src}", "budget=64M", "strategy=sequential", f"out_dir={disk / 'out'}"],
             tmp_path)
    _one_line_error((p.wait(timeout=600), p.stderr.read()), "read-only filesystem")
    assert _snapshot(folder) == before
    _works(first.plan_path)


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, target):
    src = _model(tmp_path / "m")
    f = tmp_path / "afile"
    f.write_text("not a folder")
    with pytest.raises(UserError, match="a file is in the way of a folder; set out_dir="):
        _compile(src, f, target)
    for out in (f, f / "sub"):
        p = _cli(["model=local", f"model.path={src}", "budget=64M", f"out_dir={out}"], tmp_path)
        _one_line_error((p.wait(timeout=600), p.stderr.read()), "is a file, not a folder; set out_dir=")
    assert f.read_text() == "not a folder" and not _temps(tmp_path)
