"""Tests for edge_rt_exec.status: collection (live + fake sysfs roots), recommendation, text report."""

from __future__ import annotations

import json
import os
import platform
import re
import stat
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_rt_exec import status as st
from edge_rt_exec.status import collect_status, decode_throttled
from edge_rt_exec.status_report import format_status, recommend

MiB = 1024 * 1024
GiB = 1024 * MiB


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _write(root: Path, rel: str, content: str | bytes) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def _fake_pi_root(root: Path, throttled: str = "50005\n") -> Path:
    """A Raspberry-Pi-like sysfs tree: one good zone, one garbage zone, one unreadable zone, cpufreq."""
    _write(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    _write(root, "sys/class/thermal/thermal_zone0/temp", "48312\n")
    _write(root, "sys/class/thermal/thermal_zone1/type", "gpu-thermal\n")
    _write(root, "sys/class/thermal/thermal_zone1/temp", "not-a-number\n")
    if throttled is not None:
        _write(root, "sys/devices/platform/soc/soc:firmware/get_throttled", throttled)
    _write(root, "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    for i in range(4):
        d = f"sys/devices/system/cpu/cpu{i}/cpufreq"
        _write(root, f"{d}/scaling_cur_freq", "1500000\n" if i % 2 == 0 else "1000000\n")
        _write(root, f"{d}/cpuinfo_min_freq", "600000\n")
        _write(root, f"{d}/cpuinfo_max_freq", "1800000\n")
    _write(root, "sys/devices/system/cpu/cpufreq/policy0/scaling_cur_freq", "1\n")  # not a cpuN dir
    return root


def _fake_vcgencmd(tmp_path: Path, body: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "vcgencmd"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bindir


def _status(
    *,
    available: int | None = 2 * GiB,
    cores: int | None = 4,
    temps: Sequence[float | None] = (45.0,),
    throttled: int | None = 0,
) -> dict:
    """A hand-made status dict in collect_status()'s shape, for recommend()/format_status() tests."""
    return {
        "sysfs_root": "/",
        "board_model": None,
        "arch": "aarch64",
        "cpu": {
            "logical_cores": cores,
            "physical_cores": cores,
            "freq_current_mhz": None,
            "freq_min_mhz": None,
            "freq_max_mhz": None,
            "freq_source": None,
            "load_avg_1m": None,
            "load_avg_5m": None,
            "load_avg_15m": None,
            "per_core_percent": None,
        },
        "memory": {
            "total_bytes": 4 * GiB,
            "available_bytes": available,
            "used_percent": 50.0,
            "swap_total_bytes": 0,
            "swap_used_bytes": 0,
            "swap_used_percent": None,
        },
        "thermal": [
            {"source": "sysfs", "name": f"thermal_zone{i}", "type": f"zone{i}", "temp_c": t}
            for i, t in enumerate(temps)
        ],
        "throttling": {"source": "sysfs", "raw": throttled, "flags": decode_throttled(throttled)},
    }


def _assert_json(obj: dict) -> None:
    text = json.dumps(obj, allow_nan=False)
    assert json.loads(text) == obj


# ----------------------------------------------------------------------------------------------------------
# collect_status
# ----------------------------------------------------------------------------------------------------------


def test_live_status_is_sane():
    s = collect_status()
    _assert_json(s)
    assert s["arch"] == (platform.machine() or None)

    cpu = s["cpu"]
    assert isinstance(cpu["logical_cores"], int) and cpu["logical_cores"] >= 1
    if cpu["physical_cores"] is not None:
        assert 1 <= cpu["physical_cores"] <= cpu["logical_cores"]
    for k in ("freq_current_mhz", "freq_min_mhz", "freq_max_mhz"):
        assert cpu[k] is None or 1 <= cpu[k] <= 20_000
    if cpu["freq_min_mhz"] is not None and cpu["freq_max_mhz"] is not None:
        assert cpu["freq_min_mhz"] <= cpu["freq_max_mhz"]
    for k in ("load_avg_1m", "load_avg_5m", "load_avg_15m"):
        assert cpu[k] is None or cpu[k] >= 0
    assert cpu["per_core_percent"] is not None and len(cpu["per_core_percent"]) >= 1
    assert all(p is None or 0 <= p <= 100 for p in cpu["per_core_percent"])

    mem = s["memory"]
    assert mem["total_bytes"] > 0
    assert 0 <= mem["available_bytes"] <= mem["total_bytes"]
    assert 0 <= mem["used_percent"] <= 100
    assert mem["swap_total_bytes"] >= 0 and 0 <= mem["swap_used_bytes"] <= max(mem["swap_total_bytes"], 0) + 1

    for z in s["thermal"]:
        assert z["source"] in ("sysfs", "psutil")
        assert z["temp_c"] is None or -100 < z["temp_c"] < 250

    thr = s["throttling"]
    assert set(thr["flags"]) == set(st.THROTTLE_BITS.values())
    assert (thr["raw"] is None) == (thr["source"] is None)

    rec = recommend(s)
    _assert_json(rec)
    strategies = {f.stem for f in (Path(__file__).resolve().parent.parent / "conf" / "strategy").glob("*.yaml")}
    assert rec["strategy"] in strategies
    text = format_status(s, rec)
    assert "Recommendation" in text and rec["strategy"] in text


@pytest.mark.parametrize("throttled", ["50005\n", "0x50005\n", "throttled=0x50005\n"])
def test_fake_pi_root(tmp_path, throttled):
    root = _fake_pi_root(tmp_path / "root", throttled)
    s = collect_status(str(root), run_vcgencmd=False)
    _assert_json(s)

    assert s["board_model"] == "Raspberry Pi 4 Model B Rev 1.4"

    zones = s["thermal"]
    assert [z["name"] for z in zones] == ["thermal_zone0", "thermal_zone1"]
    assert zones[0] == {"source": "sysfs", "name": "thermal_zone0", "type": "cpu-thermal", "temp_c": 48.312}
    assert zones[1]["type"] == "gpu-thermal" and zones[1]["temp_c"] is None

    thr = s["throttling"]
    assert thr["source"] == "sysfs"
    assert thr["raw"] == 0x50005
    assert thr["flags"] == {
        "under_voltage_now": True,
        "arm_freq_capped_now": False,
        "throttled_now": True,
        "soft_temp_limit_now": False,
        "under_voltage_occurred": True,
        "arm_freq_capped_occurred": False,
        "throttled_occurred": True,
        "soft_temp_limit_occurred": False,
    }

    cpu = s["cpu"]  # a fake root: cpufreq comes from its files (average cur, min of min, max of max)
    assert cpu["freq_source"] == "sysfs"
    assert (cpu["freq_current_mhz"], cpu["freq_min_mhz"], cpu["freq_max_mhz"]) == (1250.0, 600.0, 1800.0)

    text = format_status(s, recommend(s))
    assert "48.3 °C" in text
    assert "Raspberry Pi 4 Model B Rev 1.4" in text
    assert "0x50005" in text
    assert re.search(r"gpu-thermal\s+n/a", text)
    assert "sequential" in text  # throttled / under-voltage now


@pytest.mark.parametrize("kind", ["garbage", "empty", "directory", "missing", "bad-bytes", "type-missing"])
def test_unreadable_thermal_zone_is_none(tmp_path, kind):
    root = tmp_path / "root"
    _write(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    _write(root, "sys/class/thermal/thermal_zone0/temp", "51000\n")
    z = root / "sys/class/thermal/thermal_zone1"
    z.mkdir(parents=True)
    if kind != "type-missing":
        (z / "type").write_text("weird\n")
    if kind == "garbage":
        (z / "temp").write_text("hello world\n")
    elif kind == "empty":
        (z / "temp").write_text("")
    elif kind == "directory":
        (z / "temp").mkdir()  # reading it raises IsADirectoryError: "unreadable" even when running as root
    elif kind == "bad-bytes":
        (z / "temp").write_bytes(b"\xff\xfe\x00\x01")
    elif kind == "type-missing":
        (z / "temp").write_text("42000\n")
    s = collect_status(str(root), run_vcgencmd=False)
    _assert_json(s)
    assert s["thermal"][0]["temp_c"] == 51.0
    if kind == "type-missing":
        assert s["thermal"][1] == {"source": "sysfs", "name": "thermal_zone1", "type": None, "temp_c": 42.0}
    else:
        assert s["thermal"][1]["temp_c"] is None
    format_status(s, recommend(s))  # renders without raising


def test_permission_denied_zone_is_none(tmp_path, monkeypatch):
    """A zone whose temp cannot be read (EACCES) is listed with temp_c None, the other zones read as usual.
    The PermissionError is simulated at `open` (root reads mode-000 files, and CI runs as root); when not
    root, a real mode-000 file is read too."""
    import builtins
    import errno

    root = tmp_path / "root"
    _write(root, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    p = _write(root, "sys/class/thermal/thermal_zone0/temp", "51000\n")
    _write(root, "sys/class/thermal/thermal_zone1/temp", "42000\n")
    want = [{"source": "sysfs", "name": "thermal_zone0", "type": "cpu-thermal", "temp_c": None},
            {"source": "sysfs", "name": "thermal_zone1", "type": None, "temp_c": 42.0}]
    denied: list[str] = []

    def open_denying(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if os.fspath(file) == str(p):
            denied.append(os.fspath(file))
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return builtins.open(file, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(st, "open", open_denying, raising=False)  # the name status.py's reads resolve first
        s = collect_status(str(root), run_vcgencmd=False)
    assert denied == [str(p)]  # the denied read is the zone's temp, and it was attempted once
    assert s["thermal"] == want
    _assert_json(s)
    format_status(s, recommend(s))  # renders without raising
    assert collect_status(str(root), run_vcgencmd=False)["thermal"][0]["temp_c"] == 51.0  # readable again
    if os.geteuid() != 0:  # a real EACCES from the kernel (root would read the file)
        p.chmod(0)
        try:
            s = collect_status(str(root), run_vcgencmd=False)
        finally:
            p.chmod(0o644)
        assert s["thermal"] == want


def test_thermal_zones_sorted_numerically(tmp_path):
    root = tmp_path / "root"
    for i in (10, 2, 0, 1):
        _write(root, f"sys/class/thermal/thermal_zone{i}/temp", f"{40000 + i}\n")
    names = [z["name"] for z in collect_status(str(root), run_vcgencmd=False)["thermal"]]
    assert names == ["thermal_zone0", "thermal_zone1", "thermal_zone2", "thermal_zone10"]


def test_empty_root_everything_na(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    s = collect_status(str(root))  # run_vcgencmd=True: still not consulted for a non-"/" root
    _assert_json(s)
    assert s["board_model"] is None
    assert s["thermal"] == []
    assert s["throttling"] == {"source": None, "raw": None, "flags": dict.fromkeys(st.THROTTLE_BITS.values())}
    cpu = s["cpu"]
    assert cpu["freq_current_mhz"] is None and cpu["freq_min_mhz"] is None and cpu["freq_max_mhz"] is None
    assert cpu["freq_source"] is None

    rec = recommend(s)
    _assert_json(rec)
    assert rec["hottest_c"] is None and rec["thermally_limited"] is False
    text = format_status(s, rec)
    for label in ("Board", "Frequency", "Sensors", "Raw value", "Under-voltage", "Hottest sensor"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(label))
        assert "n/a" in line, line


def test_nonexistent_root_does_not_raise(tmp_path):
    s = collect_status(str(tmp_path / "does" / "not" / "exist"))
    _assert_json(s)
    assert s["thermal"] == [] and s["throttling"]["raw"] is None and s["board_model"] is None


def test_everything_missing_renders_na():
    """A status where even the host probes failed (all None) still renders, as n/a."""
    s = _status(available=None, cores=None, temps=[None], throttled=None)
    s["arch"] = None
    s["cpu"] = dict.fromkeys(s["cpu"])
    s["memory"] = dict.fromkeys(s["memory"])
    rec = recommend(s, model_weight_bytes=100 * MiB)
    _assert_json(rec)
    assert rec["safe_budget_bytes"] is None and rec["strategy"] == "sequential"
    text = format_status(s, rec)
    for label in (
        "Architecture",
        "Cores",
        "Utilisation",
        "Total",
        "Available",
        "Used",
        "Swap",
        "Safe budget",
    ):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(label))
        assert "n/a" in line, line
    # and a totally empty dict does not raise either
    assert "n/a" in format_status({}, recommend({}))


def test_vcgencmd_preferred_on_live_root(tmp_path, monkeypatch):
    root = _fake_pi_root(tmp_path / "root", throttled="0\n")
    monkeypatch.setenv("PATH", str(_fake_vcgencmd(tmp_path, 'echo "throttled=0x50005"')))
    monkeypatch.setattr(st, "_is_live_root", lambda _root: True)
    s = collect_status(str(root))
    assert s["throttling"]["source"] == "vcgencmd" and s["throttling"]["raw"] == 0x50005
    # run_vcgencmd=False: the firmware file wins
    s = collect_status(str(root), run_vcgencmd=False)
    assert s["throttling"]["source"] == "sysfs" and s["throttling"]["raw"] == 0


@pytest.mark.parametrize(
    "body",
    [
        'echo "VCHI initialization failed" >&2; exit 1',  # no /dev/vchiq access
        'echo "garbage output"',
        "exec sleep 5",  # hangs: hits the timeout
    ],
)
def test_vcgencmd_failure_falls_back_to_file(tmp_path, monkeypatch, body):
    root = _fake_pi_root(tmp_path / "root", throttled="0x4\n")
    monkeypatch.setenv("PATH", str(_fake_vcgencmd(tmp_path, body)))
    monkeypatch.setattr(st, "_is_live_root", lambda _root: True)
    monkeypatch.setattr(st, "VCGENCMD_TIMEOUT_S", 0.3)
    s = collect_status(str(root))
    assert s["throttling"]["source"] == "sysfs"
    assert s["throttling"]["raw"] == 0x4 and s["throttling"]["flags"]["throttled_now"] is True


def test_vcgencmd_not_run_for_fake_root(tmp_path, monkeypatch):
    root = _fake_pi_root(tmp_path / "root", throttled=None)
    monkeypatch.setenv("PATH", str(_fake_vcgencmd(tmp_path, 'echo "throttled=0x50005"')))
    s = collect_status(str(root))
    assert s["throttling"]["source"] is None and s["throttling"]["raw"] is None


def test_psutil_sensors_added_without_duplicates(tmp_path, monkeypatch):
    shwtemp = namedtuple("shwtemp", "label current high critical")
    fake = {
        "cpu_thermal": [shwtemp("", 48.3, None, None)],  # duplicate of the cpu-thermal zone
        "nvme": [shwtemp("Composite", 39.85, 84.85, 84.85), shwtemp("", float("nan"), None, None)],
    }
    monkeypatch.setattr(st.psutil, "sensors_temperatures", lambda: fake, raising=False)
    monkeypatch.setattr(st, "_is_live_root", lambda _root: True)
    root = _fake_pi_root(tmp_path / "root")
    s = collect_status(str(root), run_vcgencmd=False)
    _assert_json(s)
    extra = [z for z in s["thermal"] if z["source"] == "psutil"]
    assert extra == [
        {"source": "psutil", "name": "nvme", "type": "Composite", "temp_c": 39.85},
        {"source": "psutil", "name": "nvme", "type": "nvme#1", "temp_c": None},
    ]
    # a fake root never consults psutil sensors
    monkeypatch.setattr(st, "_is_live_root", lambda _root: False)
    assert all(z["source"] == "sysfs" for z in collect_status(str(root), run_vcgencmd=False)["thermal"])


def test_psutil_probe_failures_become_none(tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("sensor exploded")

    for name in ("cpu_freq", "sensors_temperatures", "cpu_percent", "virtual_memory", "swap_memory"):
        monkeypatch.setattr(st.psutil, name, boom, raising=False)
    monkeypatch.setattr(st, "_is_live_root", lambda _root: True)
    s = collect_status(str(tmp_path))
    _assert_json(s)
    assert s["cpu"]["per_core_percent"] is None
    assert s["memory"]["total_bytes"] is None and s["memory"]["available_bytes"] is None
    assert "n/a" in format_status(s, recommend(s))


def test_decode_throttled():
    assert decode_throttled(None) == dict.fromkeys(st.THROTTLE_BITS.values())
    assert not any(decode_throttled(0).values())
    f = decode_throttled(0xF000F)
    assert all(f.values())
    f = decode_throttled(0x80008)
    assert [k for k, v in f.items() if v] == ["soft_temp_limit_now", "soft_temp_limit_occurred"]


# ----------------------------------------------------------------------------------------------------------
# recommend
# ----------------------------------------------------------------------------------------------------------


def test_safe_budget_rule():
    # 60 % of 1000 MiB = 600 MiB -> rounded down to a multiple of 16 MiB = 592 MiB
    assert recommend(_status(available=1000 * MiB))["safe_budget_bytes"] == 592 * MiB
    assert recommend(_status(available=4 * GiB))["safe_budget_bytes"] == 2448 * MiB  # 2457.6 -> 2448
    assert recommend(_status(available=20 * MiB))["safe_budget_bytes"] == 0
    assert recommend(_status(available=None))["safe_budget_bytes"] is None
    for avail in (123_456_789, 3 * GiB + 7, 16 * MiB * 5):
        b = recommend(_status(available=avail))["safe_budget_bytes"]
        assert b % (16 * MiB) == 0 and b <= 0.6 * avail < b + 16 * MiB


@pytest.mark.parametrize("bit", [0, 1, 2, 3])
def test_sequential_when_throttled_now(bit):
    rec = recommend(_status(throttled=1 << bit), model_weight_bytes=100 * MiB)
    assert rec["strategy"] == "sequential" and rec["thermally_limited"] is True
    assert "thermally limited" in rec["reason"]


def test_sequential_when_hot():
    rec = recommend(_status(temps=[50.0, 75.0]), model_weight_bytes=100 * MiB)
    assert rec["strategy"] == "sequential" and rec["hottest_c"] == 75.0
    assert "75.0 °C" in rec["reason"]
    rec = recommend(_status(temps=[74.9]), model_weight_bytes=100 * MiB)
    assert rec["strategy"] == "greedy_grouping"


def test_implausible_temperature_ignored():
    rec = recommend(_status(temps=[-273.15, 999.0, None, 50.0]))
    assert rec["hottest_c"] == 50.0 and rec["strategy"] == "greedy_grouping"


def test_occurred_only_flags_warn_but_do_not_force_sequential():
    rec = recommend(_status(throttled=0x50000), model_weight_bytes=100 * MiB)
    assert rec["strategy"] == "greedy_grouping" and rec["thermally_limited"] is False
    assert "under voltage has occurred since boot" in rec["warnings"]
    assert "throttled has occurred since boot" in rec["warnings"]


def test_greedy_when_model_fits_or_size_unknown():
    s = _status(available=2 * GiB)  # budget 1228.8 -> 1216 MiB
    assert recommend(s, model_weight_bytes=1216 * MiB)["strategy"] == "greedy_grouping"
    rec = recommend(s)
    assert rec["strategy"] == "greedy_grouping" and "unknown" in rec["reason"]


def test_prefetch_when_model_does_not_fit():
    s = _status(available=2 * GiB, cores=4)
    rec = recommend(s, model_weight_bytes=1216 * MiB + 1)
    assert rec["strategy"] == "speculative_prefetch"
    assert rec["safe_budget_bytes"] == 1216 * MiB
    # unknown available memory counts as "does not fit"
    assert recommend(_status(available=None, cores=2), 10 * MiB)["strategy"] == "speculative_prefetch"


@pytest.mark.parametrize("cores", [1, None])
def test_sequential_when_no_spare_core(cores):
    rec = recommend(_status(available=1 * GiB, cores=cores), model_weight_bytes=2 * GiB)
    assert rec["strategy"] == "sequential" and rec["thermally_limited"] is False


def test_recommend_rejects_bad_model_size():
    with pytest.raises(ValueError):
        recommend(_status(), model_weight_bytes=-1)
    with pytest.raises(TypeError):
        recommend(_status(), model_weight_bytes=1.5)


def test_reason_is_one_line():
    for s, w in [
        (_status(throttled=5, temps=[90.0]), None),
        (_status(), 10 * GiB),
        (_status(cores=1), 10 * GiB),
    ]:
        rec = recommend(s, w)
        assert rec["reason"] and "\n" not in rec["reason"]
        _assert_json(rec)


# ----------------------------------------------------------------------------------------------------------
# format_status
# ----------------------------------------------------------------------------------------------------------


def test_format_status_alignment_and_units():
    s = _status(temps=[48.312, None], throttled=0x50005)
    s["cpu"].update(
        freq_current_mhz=1500.0, freq_min_mhz=None, freq_max_mhz=1800.0, per_core_percent=[1.0] * 11
    )
    text = format_status(s, recommend(s, model_weight_bytes=100 * MiB))
    lines = text.splitlines()
    assert "48.3 °C" in text
    assert "n/a" in text
    assert "min n/a" in text  # the missing min frequency
    # every row puts its value at the same column (2 spaces of indent + the label field)
    from edge_rt_exec import status_report

    col = 2 + status_report._LABEL_W
    rows = [ln for ln in lines if ln.startswith("  ")]
    assert rows
    for ln in rows:
        assert len(ln) > col and ln[col - 1] == " " and ln[col] != " ", repr(ln)
    assert "YES" in text  # flags set
    assert text.count("Utilisation") == 1  # 11 cores wrap onto a continuation line
