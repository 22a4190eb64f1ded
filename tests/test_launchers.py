"""Sweeps on other Hydra launchers (conf/hydra/launcher/): a multirun on a local Ray instance writes every plan, the
summary and the weights once; the Slurm config composes; submitit's local launcher runs a sweep; launcher mistakes
are one line."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from edge_rt_compiler import launchers
from edge_rt_compiler.app import CONF_DIR
from edge_rt_exec.errors import UserError

from .conftest import ROOT

ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: the Hydra warning `launchers.register()` silences in the app (pytest resets warning filters for each test)
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against ConfigStore")
JOB_LINE = re.compile(r"^\((?:\w+) pid=(\d+)\) (.*)$")  # Ray's prefix on a worker's output lines


def compose_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def run_compile(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, int, str, str]:
    """(exit code, the driver's pid, stdout without colours, stderr) of `edge-rt-compile ARGS`."""
    p = subprocess.Popen([sys.executable, "-m", "edge_rt_compiler.app", *args], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    out, err = p.communicate(timeout=300)
    return p.returncode, p.pid, ANSI.sub("", out), ANSI.sub("", err)


def sweep_rows(out_dir: Path) -> tuple[Path, list[dict]]:
    (summary,) = (out_dir / ".sweeps").glob("*/summary.json")
    return summary.parent, json.loads(summary.read_text())


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries TAG (the compile and everything it started: Ray's raylet, GCS,
    workers)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("EDGE_RT_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_ray_sweep_writes_every_plan_the_summary_and_the_weights_once(tmp_path):
    """The issue's command on a local Ray instance (2 CPUs, so two compiles at once): 4 plans, each compiled in a
    Ray worker process (not the driver), one summary with every row read back from the jobs' folders, the weights
    file written by exactly one job (the artifact folder's flock holds across the workers) and no Ray process left
    once the command has returned."""
    tag = uuid.uuid4().hex
    ray_tmp = Path(f"/tmp/ray-{tag[:8]}")  # short: Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"EDGE_RT_TEST_TAG": tag}
    out_dir = tmp_path / "art"
    t0 = time.monotonic()
    try:
        code, driver, out, err = run_compile(
            ["-m", "hydra/launcher=ray", "budget=256M,512M", "strategy=sequential,greedy_grouping",
             "model=synthetic_gpt2", f"out_dir={out_dir}", f"+hydra.launcher.ray.init._temp_dir={ray_tmp}"],
            tmp_path, env)
        seconds = time.monotonic() - t0
        assert code == 0, err[-3000:]
        assert "validated against ConfigStore schema" not in err  # launchers.register() silences it
        job_lines = [m.groups() for m in map(JOB_LINE.match, out.splitlines()) if m]
        plans = {text.split("plan: ", 1)[1] for _, text in job_lines if text.startswith("plan: ")}
        assert len(plans) == 4, out  # one line per job: Ray's folding of similar lines is off
        pids = {int(pid) for pid, text in job_lines if text.startswith("plan: ")}
        assert driver not in pids and pids, out

        sweep, rows = sweep_rows(out_dir)
        assert len(rows) == 4 and not [r for r in rows if "error" in r], rows
        assert {r["plan"] for r in rows} == plans and all(Path(p).exists() for p in plans)
        assert {(r["strategy"], r["budget"]) for r in rows} == {
            (s, b) for s in ("sequential", "greedy_grouping") for b in ("256M", "512M")}
        assert "sweep summary (4 plans" in out
        assert (sweep / "summary.md").read_text().count("\n") == 4 + 2  # header, rule, a line per plan
        assert [r["weights_written"] for r in rows].count(True) == 1, rows
        (weights,) = {r["weights_file"] for r in rows}
        assert [p.name for p in (out_dir / "synthetic-gpt2").glob("weights-*")] == [weights]
        assert err.count(f"writing {weights}") == 1 or out.count(f"writing {weights}") == 1
        assert seconds < 120, seconds  # about 15-25 s on the 2-core dev machine

        deadline = time.monotonic() + 15
        while (left := tagged_processes(tag)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [(p.pid, p.name()) for p in left]
    finally:
        for p in tagged_processes(tag):  # only what this test started
            p.kill()
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_ray_launcher_config_local_by_default_cluster_when_given(monkeypatch):
    """`hydra/launcher=ray` is conf/hydra/launcher/ray.yaml (the project's file wins over the plugin's ConfigStore
    entry of the same name): a small local instance by default; with a cluster address the local-only settings
    are null, as `ray.init` requires when it joins a running cluster."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    launcher = compose_hydra(["hydra/launcher=ray"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    init = OmegaConf.to_container(launcher.ray.init, resolve=True)
    assert init == {"address": "local", "num_cpus": 2, "object_store_memory": 78643200, "include_dashboard": False,
                    "logging_level": "warning", "log_to_driver": True}
    assert OmegaConf.to_container(launcher.ray.remote) == {"num_cpus": 1}

    cluster = compose_hydra(["hydra/launcher=ray", "hydra.launcher.ray.init.address=ray://head:10001"])
    init = OmegaConf.to_container(cluster.hydra.launcher.ray.init, resolve=True)
    assert init["address"] == "ray://head:10001"
    assert init["num_cpus"] is init["object_store_memory"] is init["include_dashboard"] is None

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # Ray's own variable names a cluster too
    init = OmegaConf.to_container(compose_hydra(["hydra/launcher=ray"]).hydra.launcher.ray.init, resolve=True)
    assert init["address"] == "10.0.0.5:6379" and init["num_cpus"] is None


def test_submitit_slurm_config_composes_and_shows(tmp_path):
    """No Slurm here: the config composes with its defaults and overrides, is checked against the plugin's schema,
    and `--cfg hydra` prints it."""
    launcher = compose_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=cpu"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.cpus_per_task, launcher.mem_gb, launcher.timeout_min) == ("cpu", 2, 8, 60)
    assert re.fullmatch(r"artifacts/\.sweeps/[\d_-]+/\.submitit/%j", launcher.submitit_folder)  # in the sweep
    with pytest.raises(Exception, match="mem_gb"):  # the plugin's dataclass types the file's keys
        compose_hydra(["hydra/launcher=submitit_slurm", "hydra.launcher.mem_gb=lots"])

    r = subprocess.run([sys.executable, "-m", "edge_rt_compiler.app", "hydra/launcher=submitit_slurm",
                        "hydra.launcher.partition=cpu", "--cfg", "hydra"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = r.stdout.split("  launcher:\n", 1)[1].split("\n  sweeper:", 1)[0]
    assert "SlurmLauncher" in shown and "partition: cpu" in shown and "mem_gb: 8" in shown, shown
    assert "Warning" not in r.stderr, r.stderr


def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    """The Slurm launcher's code path (submitit) with its local executor: one process per job."""
    out_dir = tmp_path / "art"
    code, driver, out, err = run_compile(["-m", "hydra/launcher=submitit_local", "budget=256M,512M",
                                          "strategy=sequential", "model=synthetic_gpt2", f"out_dir={out_dir}"],
                                         tmp_path)
    assert code == 0, err[-3000:]
    sweep, rows = sweep_rows(out_dir)
    assert len(rows) == 2 and all(Path(r["plan"]).exists() for r in rows), rows
    assert [r["weights_written"] for r in rows].count(True) == 1, rows
    assert list(sweep.glob(".submitit/*/*_result.pkl")), "submitit ran no job"


def test_launcher_mistakes_are_one_line(tmp_path, monkeypatch):
    r = subprocess.run([sys.executable, "-m", "edge_rt_compiler.app", "-m", "hydra/launcher=rayy", "budget=1M,2M"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "hydra/launcher=rayy is not a known launcher" in r.stderr and "ray" in r.stderr
    monkeypatch.setattr(launchers, "_installed", lambda module: False)
    with pytest.raises(UserError, match=r"needs hydra-ray-launcher.*edge-rt\[compile,distributed\]"):
        launchers.check_launcher(["-m", "hydra/launcher=ray", "budget=1M,2M"])
    launchers.check_launcher(["hydra/launcher=basic"])


def test_launcher_configs_ship_in_the_wheel():
    """Every file of conf/ (the package's `conf` symlink) matches a package-data pattern, as setuptools globs."""
    (line,) = re.findall(r"^edge_rt_compiler = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), re.M)
    pkg = ROOT / "edge_rt_compiler"
    shipped = {f for pattern in json.loads(line) for f in glob.glob(pattern, root_dir=pkg)}
    files = {str(p.relative_to(pkg)) for p in (pkg / "conf").rglob("*.yaml")}
    assert {"conf/hydra/launcher/ray.yaml", "conf/hydra/launcher/submitit_slurm.yaml"} <= files
    assert files <= shipped, files - shipped
