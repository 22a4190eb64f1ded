"""Byte sizes as users type and read them (budget=512M, "needs at least 119.6M"), and arena alignment."""

from __future__ import annotations

import math
from typing import Any

from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import ALIGNMENT


def align(n: int, a: int = ALIGNMENT) -> int:
    """n rounded up to a multiple of a."""
    return -(-n // a) * a


def fmt_bytes(n: int, round_up: bool = False) -> str:
    """Bytes as the override syntax users type (K/M/G, one decimal when needed). `round_up` for minimums: the
    printed value itself must be enough."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            v = n / scale
            if round_up:
                v = math.ceil(v * 10 - 1e-9) / 10
            return f"{v:.0f}{unit}" if abs(v - round(v)) < 0.05 and (not round_up or v == round(v)) \
                else f"{v:.1f}{unit}"
    return f"{n}B"


def parse_bytes(text: Any, what: str = "budget") -> int:
    """'512M', '1.5G', '800K', '1048576' -> bytes (binary units). Raises UserError with the accepted forms."""
    s = str(text).strip()
    scales = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
              "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
    num = s.rstrip("kKmMgGiIbB")
    unit = s[len(num):].upper()
    try:
        value = float(num)
    except ValueError:
        value = float("nan")
    if unit not in scales or not value == value or value <= 0 or value == float("inf"):
        raise UserError(f"{what}={s!r} is not a size; use a positive number with an optional K/M/G suffix, "
                        f"e.g. {what}=512M or {what}=1.5G")
    return int(value * scales[unit])
