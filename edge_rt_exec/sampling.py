"""Next-token choice: greedy (temperature 0) or seeded sampling with the controls llama.cpp users know.

Order of the filters (llama.cpp's default sampler chain, and HF's warpers in the same order): repetition
penalty on the raw logits, then temperature, top-k, top-p (nucleus) and min-p, then a draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """Every sampling control, range-checked once (`check`) before any work."""

    temperature: float = 0.0  #: 0 = greedy
    top_k: int = 0  #: 0 = off
    top_p: float = 1.0  #: 1 = off
    min_p: float = 0.0  #: 0 = off: drop tokens less likely than min_p x the most likely one
    repeat_penalty: float = 1.0  #: 1 = off: divide positive logits (multiply negative) of recent tokens
    repeat_last_n: int = 64  #: how many recent tokens the penalty looks at (llama.cpp's default)
    seed: int = 0

    def check(self) -> SamplingParams:
        def bad(name: str, v: object, rule: str) -> UserError:
            return UserError(f"{name}={v!r} is out of range: it must be {rule}")

        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise bad("temperature", self.temperature, "a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise bad("top_p", self.top_p, "in (0, 1] (1 = off)")
        if not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0):
            raise bad("min_p", self.min_p, "in [0, 1] (0 = off)")
        if not (isinstance(self.repeat_penalty, (int, float)) and math.isfinite(self.repeat_penalty)
                and self.repeat_penalty > 0):
            raise bad("repeat_penalty", self.repeat_penalty, "a finite number > 0 (1 = off)")
        if not isinstance(self.repeat_last_n, int) or self.repeat_last_n < 0:
            raise bad("repeat_last_n", self.repeat_last_n, "an integer >= 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise bad("seed", self.seed, "an integer in [0, 2^63)")
        return self


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp / CTRL repetition penalty: each distinct recent token's logit is divided by `penalty` when
    positive and multiplied by it when negative (a copy when anything changes)."""
    if penalty == 1.0 or not recent:
        return logits
    out = logits.astype(np.float32, copy=True)
    ids = np.unique(np.asarray(recent, np.int64))
    ids = ids[(ids >= 0) & (ids < out.size)]
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           recent: Sequence[int] = ()) -> int:
    """One token id from `logits` (the last position's)."""
    logits = apply_repeat_penalty(logits, recent[-params.repeat_last_n:] if params.repeat_last_n else (),
                                  params.repeat_penalty)
    if params.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if 0 < params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(csum, params.top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    if params.min_p > 0:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))
