"""The Hydra launchers a sweep can run on (`conf/hydra/launcher/`): `ray` (hydra-ray-launcher) and `submitit_slurm`
/ `submitit_local` (hydra-submitit-launcher), from the `distributed` extra, beside Hydra's own `basic` and the
`joblib` of the compile extra.

Each job writes its plan and its summary row (`edge_rt_row.json`) into folders of the shared `out_dir`; the driver's
`SweepSummary` reads the rows back from there, so it sees every job wherever it ran, and the artifact folder's lock
(`emit.locked`, an flock) lets exactly one job write a model's weights file per format."""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

from omegaconf import OmegaConf

from edge_rt_exec.errors import UserError

#: launcher option -> (the module its plugin installs, the PyPI package)
PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def if_local(address: Any, value: Any) -> Any:
    """`${edge_rt.if_local:${.address},VALUE}`: VALUE when Ray starts a new instance here (`address: local`), else
    null: `ray.init` refuses num_cpus, object_store_memory and the like when it joins a running cluster."""
    return value if address == "local" else None


def register() -> None:
    """The resolver of conf/hydra/launcher/ray.yaml, every job's output lines shown by Ray, and silence for one
    Hydra deprecation warning: the launcher files share their names with the plugins' ConfigStore entries on purpose
    (so that `hydra/launcher=ray` picks up this project's defaults), which makes Hydra validate them against the
    plugin's schema and warn that this matching is deprecated. The files are complete configs, so they also work
    once Hydra drops the matching."""
    if not OmegaConf.has_resolver("edge_rt.if_local"):
        OmegaConf.register_new_resolver("edge_rt.if_local", if_local)
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
    # Ray folds log lines of its workers that look alike ("[repeated 3x across cluster]"), which would hide the
    # `plan: PATH` lines of all jobs but one; read when ray is imported, so set before any launcher runs
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def check_launcher(argv: list[str]) -> None:
    """An unknown launcher, or one whose plugin is not installed, is one line (Hydra's own report is several, or a
    traceback)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "hydra/launcher" or value == "basic":
            continue
        if value not in PLUGINS:
            raise UserError(f"hydra/launcher={value} is not a known launcher; choose one of basic, "
                            f"{', '.join(PLUGINS)}")
        module, package = PLUGINS[value]
        if not _installed(module):
            extra = "compile" if value == "joblib" else "compile,distributed"
            raise UserError(f"hydra/launcher={value} needs {package}, which is not installed; "
                            f"pip install 'edge-rt[{extra}]' (or pip install {package})")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # not even the hydra_plugins namespace
        return False
