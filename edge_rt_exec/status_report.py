"""`edge-rt-exec status`: the recommendation (strategy, safe budget) and the text report, from the dict
`status.collect_status` gathers."""

from __future__ import annotations

from typing import Any

from .status import (
    _NOW_FLAGS,
    _PLAUSIBLE_TEMP_C,
    BUDGET_ALIGN_BYTES,
    HOT_THRESHOLD_C,
    SAFE_BUDGET_FRACTION,
    THROTTLE_BITS,
    MiB,
    _finite,
)


def _hottest(status: dict) -> dict[str, Any] | None:
    best = None
    lo, hi = _PLAUSIBLE_TEMP_C
    for z in status.get("thermal") or []:
        t = _finite(z.get("temp_c")) if isinstance(z, dict) else None
        if t is None or not lo <= t <= hi:
            continue
        if best is None or t > best["temp_c"]:
            best = {**z, "temp_c": t}
    return best


def _mib(n: int | float) -> str:
    return f"{n / MiB:.0f} MiB"


def recommend(status: dict, model_weight_bytes: int | None = None) -> dict:
    """Pick an execution strategy and a safe memory budget from a `collect_status()` dict.

    Safe budget rule: ``floor(SAFE_BUDGET_FRACTION * available / BUDGET_ALIGN_BYTES) * BUDGET_ALIGN_BYTES``,
    i.e. 60 % of currently available memory rounded *down* to a multiple of 16 MiB (40 % stays as headroom
    for the OS, page cache and allocator slack). ``None`` when available memory is unknown; may be 0 on a
    nearly full machine.

    Strategy, first matching rule wins:

    1. ``"sequential"`` when thermally limited: any *now* throttling flag (under-voltage, ARM frequency
       capped, throttled, soft temperature limit) is set, or the hottest plausible sensor reading is
       >= ``HOT_THRESHOLD_C`` (75 °C);
    2. ``"greedy_grouping"`` when ``model_weight_bytes`` is unknown (None) or fits the safe budget;
    3. ``"speculative_prefetch"`` when the CPU has >= 2 logical cores (a reader thread can stream the next
       group while the current one computes); unknown budget counts as "does not fit";
    4. ``"sequential"`` otherwise.

    Returns ``strategy``, ``safe_budget_bytes``, ``reason`` (one line), ``thermally_limited``,
    ``hottest_c``, ``model_weight_bytes`` and ``warnings`` (e.g. throttling that occurred since boot).
    """
    if model_weight_bytes is not None:
        if isinstance(model_weight_bytes, bool) or not isinstance(model_weight_bytes, int):
            raise TypeError(
                f"model_weight_bytes must be an int or None, got {type(model_weight_bytes).__name__}"
            )
        if model_weight_bytes < 0:
            raise ValueError(f"model_weight_bytes must be >= 0, got {model_weight_bytes}")

    memory = status.get("memory") or {}
    available = memory.get("available_bytes")
    budget: int | None = None
    if isinstance(available, (int, float)) and not isinstance(available, bool) and available >= 0:
        budget = int(SAFE_BUDGET_FRACTION * available) // BUDGET_ALIGN_BYTES * BUDGET_ALIGN_BYTES

    flags = (status.get("throttling") or {}).get("flags") or {}
    now_set = [name for name in _NOW_FLAGS if flags.get(name)]
    occurred = [name for bit, name in THROTTLE_BITS.items() if bit >= 16 and flags.get(name)]
    hottest = _hottest(status)
    hottest_c = None if hottest is None else hottest["temp_c"]
    too_hot = hottest_c is not None and hottest_c >= HOT_THRESHOLD_C

    cpu = status.get("cpu") or {}
    cores = cpu.get("logical_cores") or cpu.get("physical_cores")

    warnings = [
        f"{name.removesuffix('_occurred').replace('_', ' ')} has occurred since boot" for name in occurred
    ]
    if budget is None:
        warnings.append("available memory unknown: no safe budget")

    if now_set or too_hot:
        strategy = "sequential"
        parts = []
        if now_set:
            parts.append(
                "firmware reports " + ", ".join(n.removesuffix("_now").replace("_", " ") for n in now_set)
            )
        if too_hot:
            where = hottest.get("type") or hottest.get("name") or "sensor"  # type: ignore[union-attr]
            parts.append(f"{where} at {hottest_c:.1f} °C >= {HOT_THRESHOLD_C:.0f} °C")
        reason = "thermally limited (" + "; ".join(parts) + "): run groups one at a time"
    elif model_weight_bytes is None:
        strategy = "greedy_grouping"
        reason = "model size unknown: group greedily within the safe budget"
    elif budget is not None and model_weight_bytes <= budget:
        strategy = "greedy_grouping"
        reason = f"model weights ({_mib(model_weight_bytes)}) fit the safe budget ({_mib(budget)})"
    else:
        what = (
            f"model weights ({_mib(model_weight_bytes)}) exceed the safe budget ({_mib(budget)})"
            if budget is not None
            else f"model weights ({_mib(model_weight_bytes)}) vs unknown available memory"
        )
        if isinstance(cores, int) and cores >= 2:
            strategy = "speculative_prefetch"
            reason = f"{what}; {cores} cores: stream the next group while computing"
        else:
            strategy = "sequential"
            reason = f"{what}; {'1 core' if cores else 'core count unknown'}: no spare core to prefetch"

    return {
        "strategy": strategy,
        "safe_budget_bytes": budget,
        "reason": reason,
        "thermally_limited": bool(now_set or too_hot),
        "hottest_c": hottest_c,
        "model_weight_bytes": model_weight_bytes,
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------------------------------------
# text report
# ----------------------------------------------------------------------------------------------------------

NA = "n/a"
_LABEL_W = 20


def _fmt_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return NA
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    if n >= 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{int(n)} B"


def _fmt_num(v: Any, fmt: str = "{}", unit: str = "") -> str:
    if v is None or isinstance(v, bool):
        return NA
    try:
        return fmt.format(v) + unit
    except (ValueError, TypeError):
        return NA


def _fmt_temp(v: Any) -> str:
    return _fmt_num(_finite(v), "{:.1f}", " °C")


def _fmt_flag(v: Any) -> str:
    return NA if v is None else ("YES" if v else "no")


def format_status(status: dict, rec: dict) -> str:
    """Render a `collect_status()` dict and a `recommend()` dict as an aligned, multi-line text report."""
    lines: list[str] = []

    def head(title: str) -> None:
        lines.append(title)

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<{_LABEL_W}}{value}")

    cpu = status.get("cpu") or {}
    mem = status.get("memory") or {}
    thr = status.get("throttling") or {}

    head("Device")
    row("Board", status.get("board_model") or NA)
    row("Architecture", status.get("arch") or NA)

    head("CPU")
    row(
        "Cores",
        f"{_fmt_num(cpu.get('logical_cores'))} logical, {_fmt_num(cpu.get('physical_cores'))} physical",
    )
    freq = [
        _fmt_num(cpu.get(k), "{:.0f}", " MHz") for k in ("freq_current_mhz", "freq_min_mhz", "freq_max_mhz")
    ]
    row("Frequency", f"{freq[0]} (min {freq[1]}, max {freq[2]})")
    loads = [_fmt_num(cpu.get(k), "{:.2f}") for k in ("load_avg_1m", "load_avg_5m", "load_avg_15m")]
    row("Load average", " / ".join(loads) + "  (1 / 5 / 15 min)")
    per_core = cpu.get("per_core_percent")
    if per_core:
        cells = [_fmt_num(p, "{:.0f}", "%") for p in per_core]
        for i in range(0, len(cells), 8):
            row("Utilisation" if i == 0 else "", " ".join(f"{c:>4}" for c in cells[i : i + 8]).strip())
    else:
        row("Utilisation", NA)

    head("Memory")
    row("Total", _fmt_bytes(mem.get("total_bytes")))
    row("Available", _fmt_bytes(mem.get("available_bytes")))
    row("Used", _fmt_num(mem.get("used_percent"), "{:.1f}", " %"))
    swap_total = mem.get("swap_total_bytes")
    if swap_total is None:
        row("Swap", NA)
    elif swap_total == 0:
        row("Swap", "none")
    else:
        row(
            "Swap",
            f"{_fmt_bytes(mem.get('swap_used_bytes'))} used of {_fmt_bytes(swap_total)}"
            f" ({_fmt_num(mem.get('swap_used_percent'), '{:.1f}', ' %')})",
        )

    head("Thermal")
    zones = status.get("thermal") or []
    if not zones:
        row("Sensors", NA)
    for z in zones:
        label = str(z.get("type") or z.get("name") or "?")
        if len(label) > _LABEL_W - 1:
            label = label[: _LABEL_W - 2] + "…"
        where = z.get("name") if z.get("source") == "sysfs" else f"psutil {z.get('name')}"
        row(label, f"{_fmt_temp(z.get('temp_c')):<9} ({where})")

    head("Throttling" + (f" (via {thr['source']})" if thr.get("source") else ""))
    raw = thr.get("raw")
    row("Raw value", NA if not isinstance(raw, int) else f"0x{raw:x}")
    flags = thr.get("flags") or {}
    for key, label in (
        ("under_voltage", "Under-voltage"),
        ("arm_freq_capped", "ARM freq capped"),
        ("throttled", "Throttled"),
        ("soft_temp_limit", "Soft temp limit"),
    ):
        now, occ = _fmt_flag(flags.get(f"{key}_now")), _fmt_flag(flags.get(f"{key}_occurred"))
        row(label, f"now: {now:<4} since boot: {occ}")

    head("Recommendation")
    row("Strategy", rec.get("strategy") or NA)
    budget = rec.get("safe_budget_bytes")
    row(
        "Safe budget",
        NA
        if budget is None
        else f"{_fmt_bytes(budget)} ({budget // MiB} MiB, {SAFE_BUDGET_FRACTION:.0%} of available)",
    )
    row(
        "Model weights",
        "unknown" if rec.get("model_weight_bytes") is None else _fmt_bytes(rec["model_weight_bytes"]),
    )
    row("Hottest sensor", _fmt_temp(rec.get("hottest_c")))
    row("Reason", rec.get("reason") or NA)
    for i, w in enumerate(rec.get("warnings") or []):
        row("Warning" if i == 0 else "", w)
    return "\n".join(lines)
