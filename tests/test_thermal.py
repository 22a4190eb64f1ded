"""The thermal governor (`--max-temp`) against a fake sysfs tree whose temperature the test drives."""

from __future__ import annotations

from pathlib import Path

from edge_rt_exec.thermal import ThermalGovernor


def fake_root(tmp_path: Path) -> tuple[Path, Path, Path]:
    zone = tmp_path / "sys" / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    fw = tmp_path / "sys" / "devices" / "platform" / "soc" / "soc:firmware"
    fw.mkdir(parents=True)
    (fw / "get_throttled").write_text("0\n")
    return tmp_path, zone / "temp", fw / "get_throttled"


def test_threads_lowered_then_paced_then_restored(tmp_path: Path) -> None:
    root, temp, _ = fake_root(tmp_path)
    calls: list[int] = []
    notes: list[str] = []
    g = ThermalGovernor(80.0, 4, calls.append, root=str(root), notify=notes.append)

    def at(celsius: float, steps: int = 1) -> None:
        temp.write_text(f"{int(celsius * 1000)}\n")
        for _ in range(steps):
            g._adjust(*_reading(g))

    at(60.0)
    assert g.threads == 4 and g.pause_s == 0 and not calls  # cool: nothing changes
    at(79.0, 3)  # within 2 C of the ceiling: one thread less per poll
    assert calls == [3, 2, 1] and g.threads == 1
    at(81.0)  # still hot at one thread: tokens are paced
    assert g.threads == 1 and g.pause_s > 0
    paced = g.pause_s
    at(82.0)
    assert g.pause_s > paced  # hotter: longer pauses
    at(76.0, 3)  # between restore and near margins: hold
    assert g.threads == 1 and g.pause_s > 0
    at(70.0, 12)  # well below: pacing eased off first, then threads given back one by one
    assert g.pause_s == 0 and g.threads == 4 and calls[-3:] == [2, 3, 4]
    actions = [e["action"] for e in g.events]
    assert actions.index("paced tokens") < actions.index("eased pacing") < actions.index("restored threads")
    assert any("lowered threads" in n and "80 C ceiling" in n for n in notes)
    assert g.report()["events"] == g.events


def test_firmware_throttling_counts_as_hot(tmp_path: Path) -> None:
    root, temp, throttled = fake_root(tmp_path)
    temp.write_text("50000\n")
    throttled.write_text("50005\n")  # under-voltage and throttled now
    calls: list[int] = []
    g = ThermalGovernor(85.0, 2, calls.append, root=str(root))
    g.step(force=True)
    assert calls == [1]


def test_no_sensor_no_change(tmp_path: Path) -> None:
    calls: list[int] = []
    g = ThermalGovernor(80.0, 2, calls.append, root=str(tmp_path))
    g.step(force=True)
    assert not calls and not g.events


def _reading(g: ThermalGovernor) -> tuple:
    from edge_rt_exec.status import soc_temperature, throttled_now

    return soc_temperature(g.root), throttled_now(g.root)
