"""Device status (CPU, memory, thermal, Raspberry Pi throttling) and a strategy recommendation.

`collect_status()` gathers a snapshot as a plain, JSON-serialisable dict. It never raises because a sensor
is missing: anything that cannot be read (absent file, garbage content, permission error, missing
binary, timeout) is recorded as ``None`` and rendered as ``"n/a"`` by `format_status()`.

Where each value comes from:

* live host, always (psutil / stdlib; ``sysfs_root`` does not apply): logical/physical core count,
  load average, per-core utilisation, memory and swap, machine architecture;
* files under ``sysfs_root``: thermal zones, cpufreq, the firmware ``get_throttled`` file, the
  device-tree board model;
* host-only sensor sources, used **only when ``sysfs_root`` is "/"** (they read the real machine and
  would otherwise mix real values into a fake root): ``psutil.cpu_freq()``,
  ``psutil.sensors_temperatures()`` and ``vcgencmd get_throttled`` (the latter also only when
  ``run_vcgencmd`` is true).

`status_report.recommend()` turns a status dict into a strategy name and a safe memory budget;
`status_report.format_status()` renders both as an aligned text report.
"""

from __future__ import annotations

import glob
import math
import os
import platform
import re
import shutil
import subprocess
from typing import Any

import psutil

__all__ = ["BUDGET_ALIGN_BYTES", "HOT_THRESHOLD_C", "SAFE_BUDGET_FRACTION", "THROTTLE_BITS", "collect_status",
           "decode_throttled"]

MiB = 1024 * 1024

#: Fraction of currently available memory the planner may use; the rest is headroom for the OS,
#: page cache and allocator slack.
SAFE_BUDGET_FRACTION = 0.60
#: The safe budget is rounded *down* to a multiple of this.
BUDGET_ALIGN_BYTES = 16 * MiB
#: A thermal reading at or above this (°C) counts as thermally limited (the Pi 4 soft limit is 80 °C).
HOT_THRESHOLD_C = 75.0
#: Readings outside this range are treated as bogus and ignored when looking for the hottest sensor.
_PLAUSIBLE_TEMP_C = (-40.0, 150.0)
#: `vcgencmd get_throttled` timeout in seconds.
VCGENCMD_TIMEOUT_S = 1.0

#: Bits of the Raspberry Pi firmware throttled word -> flag names.
THROTTLE_BITS: dict[int, str] = {
    0: "under_voltage_now",
    1: "arm_freq_capped_now",
    2: "throttled_now",
    3: "soft_temp_limit_now",
    16: "under_voltage_occurred",
    17: "arm_freq_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}
_NOW_FLAGS = tuple(name for bit, name in THROTTLE_BITS.items() if bit < 16)

_THROTTLED_FILE = "sys/devices/platform/soc/soc:firmware/get_throttled"
_MODEL_FILE = "proc/device-tree/model"
_THERMAL_GLOB = "sys/class/thermal/thermal_zone*"
_CPU_GLOB = "sys/devices/system/cpu/cpu[0-9]*"


# ----------------------------------------------------------------------------------------------------------
# small, never-raising readers
# ----------------------------------------------------------------------------------------------------------


def _path(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def _is_live_root(root: str) -> bool:
    """True when `root` is the real filesystem root, so host-only sources may be consulted."""
    try:
        return os.path.realpath(root) == os.path.realpath(os.sep)
    except (OSError, ValueError):
        return False


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
    except (OSError, ValueError):
        return None
    text = data.replace(b"\x00", b"").decode("utf-8", errors="replace").strip()
    return text or None


def _read_int(path: str) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _positive(x: Any) -> float | None:
    v = _finite(x)
    return v if v is not None and v > 0 else None


def _safe(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception:  # a status probe must never take the caller down
        return None


def _natural_key(path: str) -> tuple[str, int]:
    m = re.search(r"(\d+)$", path)
    return (re.sub(r"\d+$", "", path), int(m.group(1)) if m else -1)


# ----------------------------------------------------------------------------------------------------------
# collectors
# ----------------------------------------------------------------------------------------------------------


def _sysfs_cpufreq(root: str) -> dict[str, float | None]:
    """Average current, min-of-min and max-of-max frequency (MHz) from cpu*/cpufreq (values are kHz)."""
    cur: list[int] = []
    mins: list[int] = []
    maxs: list[int] = []
    for cpu in sorted(glob.glob(_path(root, _CPU_GLOB)), key=_natural_key):
        if not re.fullmatch(r"cpu\d+", os.path.basename(cpu)):
            continue
        d = os.path.join(cpu, "cpufreq")
        for target, names in (
            (cur, ("scaling_cur_freq", "cpuinfo_cur_freq")),
            (mins, ("cpuinfo_min_freq", "scaling_min_freq")),
            (maxs, ("cpuinfo_max_freq", "scaling_max_freq")),
        ):
            for name in names:
                v = _read_int(os.path.join(d, name))
                if v is not None and v > 0:
                    target.append(v)
                    break
    return {
        "current": round(sum(cur) / len(cur) / 1000.0, 1) if cur else None,
        "min": round(min(mins) / 1000.0, 1) if mins else None,
        "max": round(max(maxs) / 1000.0, 1) if maxs else None,
    }


def _collect_cpu(root: str, live: bool) -> dict[str, Any]:
    logical = _safe(psutil.cpu_count, logical=True) or os.cpu_count()
    physical = _safe(psutil.cpu_count, logical=False)

    freq: dict[str, float | None] = {"current": None, "min": None, "max": None}
    source = None
    if live:
        f = _safe(psutil.cpu_freq)
        if f is not None:
            freq = {"current": _positive(f.current), "min": _positive(f.min), "max": _positive(f.max)}
            if any(v is not None for v in freq.values()):
                source = "psutil"
    if any(v is None for v in freq.values()):
        sysfs = _sysfs_cpufreq(root)
        filled = False
        for k, v in sysfs.items():
            if freq[k] is None and v is not None:
                freq[k] = v
                filled = True
        if filled:
            source = "sysfs" if source is None else source + "+sysfs"

    load = _safe(psutil.getloadavg) if hasattr(psutil, "getloadavg") else None
    if load is None:
        load = _safe(os.getloadavg)
    load_vals = [round(v, 2) if (v := _finite(x)) is not None else None for x in load] if load else []
    load_vals = (load_vals + [None, None, None])[:3]

    per_core = _safe(psutil.cpu_percent, interval=0.1, percpu=True)
    if per_core:
        per_core = [_finite(p) for p in per_core]
    else:
        per_core = None

    return {
        "logical_cores": int(logical) if logical else None,
        "physical_cores": int(physical) if physical else None,
        "freq_current_mhz": None if freq["current"] is None else round(freq["current"], 1),
        "freq_min_mhz": None if freq["min"] is None else round(freq["min"], 1),
        "freq_max_mhz": None if freq["max"] is None else round(freq["max"], 1),
        "freq_source": source,
        "load_avg_1m": load_vals[0],
        "load_avg_5m": load_vals[1],
        "load_avg_15m": load_vals[2],
        "per_core_percent": per_core,
    }


def _collect_memory() -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(
        (
            "total_bytes",
            "available_bytes",
            "used_percent",
            "swap_total_bytes",
            "swap_used_bytes",
            "swap_used_percent",
        )
    )
    vm = _safe(psutil.virtual_memory)
    if vm is not None:
        out["total_bytes"] = int(vm.total)
        out["available_bytes"] = int(vm.available)
        out["used_percent"] = _finite(vm.percent)
    sw = _safe(psutil.swap_memory)
    if sw is not None:
        out["swap_total_bytes"] = int(sw.total)
        out["swap_used_bytes"] = int(sw.used)
        out["swap_used_percent"] = _finite(sw.percent) if sw.total else None
    return out


def _norm_name(s: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (s or "").lower())


def _collect_thermal(root: str, live: bool) -> list[dict[str, Any]]:
    """One entry per sysfs thermal zone, plus psutil sensors that do not duplicate a zone."""
    zones: list[dict[str, Any]] = []
    for zdir in sorted(glob.glob(_path(root, _THERMAL_GLOB)), key=_natural_key):
        milli = _read_int(os.path.join(zdir, "temp"))
        zones.append(
            {
                "source": "sysfs",
                "name": os.path.basename(zdir),
                "type": _read_text(os.path.join(zdir, "type")),
                "temp_c": None if milli is None else round(milli / 1000.0, 3),
            }
        )
    if live and hasattr(psutil, "sensors_temperatures"):
        sensors = _safe(psutil.sensors_temperatures) or {}
        known = {_norm_name(z["type"]) for z in zones}
        for chip, readings in sorted(sensors.items()):
            if _norm_name(chip) in known:  # e.g. hwmon "cpu_thermal" == zone type "cpu-thermal"
                continue
            for i, r in enumerate(readings):
                label = getattr(r, "label", "") or f"{chip}#{i}"
                zones.append(
                    {
                        "source": "psutil",
                        "name": chip,
                        "type": label,
                        "temp_c": _finite(getattr(r, "current", None)),
                    }
                )
    return zones


def decode_throttled(value: int | None) -> dict[str, bool | None]:
    """Decode the Raspberry Pi firmware throttled word into named flags (all None when `value` is None)."""
    if value is None:
        return dict.fromkeys(THROTTLE_BITS.values())
    return {name: bool(value >> bit & 1) for bit, name in THROTTLE_BITS.items()}


def _parse_throttled(text: str | None) -> int | None:
    """Parse `throttled=0x50005` (vcgencmd) or `50005` (sysfs, hex without prefix) into an int."""
    if not text:
        return None
    m = re.search(r"(?:throttled=)?\s*((?:0x)?[0-9a-fA-F]+)\s*$", text.strip())
    if not m:
        return None
    try:
        return int(m.group(1), 16)
    except ValueError:
        return None


def _vcgencmd_throttled() -> int | None:
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, "get_throttled"],
            capture_output=True,
            text=True,
            timeout=VCGENCMD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if proc.returncode != 0:
        return None
    return _parse_throttled(proc.stdout)


def _collect_throttling(root: str, live: bool, run_vcgencmd: bool) -> dict[str, Any]:
    raw: int | None = None
    source = None
    if live and run_vcgencmd:
        raw = _vcgencmd_throttled()
        if raw is not None:
            source = "vcgencmd"
    if raw is None:
        raw = _parse_throttled(_read_text(_path(root, _THROTTLED_FILE)))
        if raw is not None:
            source = "sysfs"
    return {"source": source, "raw": raw, "flags": decode_throttled(raw)}


def sysfs_root() -> str:
    """The filesystem root sensors are read under: `EDGE_RT_SYSFS_ROOT` (tests point it at a fake tree) or /."""
    return os.environ.get("EDGE_RT_SYSFS_ROOT") or "/"


def soc_temperature(root: str) -> float | None:
    """The hottest plausible thermal-zone reading under `root` (sysfs only: cheap enough to poll every token)."""
    temps = [z["temp_c"] for z in _collect_thermal(root, live=False) if z["temp_c"] is not None
             and _PLAUSIBLE_TEMP_C[0] <= z["temp_c"] <= _PLAUSIBLE_TEMP_C[1]]
    return max(temps) if temps else None


def throttled_now(root: str) -> bool:
    """Whether the Raspberry Pi firmware reports throttling or a capped frequency right now (sysfs)."""
    flags = _collect_throttling(root, live=False, run_vcgencmd=False)["flags"]
    return bool(flags.get("throttled_now") or flags.get("arm_freq_capped_now") or flags.get("soft_temp_limit_now"))


def collect_status(sysfs_root: str = "/", run_vcgencmd: bool = True) -> dict:
    """Snapshot CPU, memory, thermal zones, Pi throttling, board model and arch as a JSON-safe dict.

    Never raises for a missing or unreadable sensor; such values are ``None``. See the module docstring
    for which values come from ``sysfs_root`` and which from the live host. Takes ~0.1 s (the per-core
    utilisation sample).
    """
    root = sysfs_root or "/"
    live = _is_live_root(root)
    machine = _safe(platform.machine)
    return {
        "sysfs_root": root,
        "board_model": _read_text(_path(root, _MODEL_FILE)),
        "arch": machine or None,
        "cpu": _collect_cpu(root, live),
        "memory": _collect_memory(),
        "thermal": _collect_thermal(root, live),
        "throttling": _collect_throttling(root, live, run_vcgencmd),
    }
