"""The cost model: a plan's predicted decode and prefill latency on a target.

Bytes read per token over the read bandwidth, and compute: with a calibrated target (`edge-rt-exec calibrate`'s
profile, `Rates`), every op's fixed cost plus its kernel's measured rate for its weight format and shape class;
otherwise one memory bandwidth and one compute rate. `auto` and `partial_residency` (partition.py) rank their
candidates with `predict`; the plan records its prediction, which `edge-rt-exec bench` prints beside measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .groups import PartitionResult, PlannedGroup, SchedOp

__all__ = ["Cost", "Rates", "predict", "read_rate"]


@dataclass(frozen=True)
class Cost:
    decode_ms_per_token: float
    prefill_ms: float  #: for `prompt_tokens`
    prompt_tokens: int
    read_bytes_per_token: int
    read_ms_per_token: float
    compute_ms_per_token: float


@dataclass(frozen=True)
class Rates:
    """A target's calibrated rates (the keys `edge-rt-exec calibrate` writes), in bytes, FLOPs and seconds."""

    decode: dict[str, float]  #: Linear at one token: weight bytes per second (from DRAM), by weight format
    #: a streamed group's Linears right after its read and checksum into the slot, by weight format
    #: (`decode_streamed_gbs`; a profile without it: `decode_cached_gbs`, one shape cycled in the CPU cache)
    decode_streamed: dict[str, float]
    cache_bytes: int  #: a streamed group up to this size is computed from the cache
    prefill: dict[str, float]  #: Linear at many tokens: FLOP/s, by weight format
    attention_s: float  #: causal attention: per query head and cached position
    op_s: float  #: the fixed cost of every op (one kernel call)
    flops: float  #: FLOP/s of the other ops

    @classmethod
    def of(cls, target: dict[str, Any]) -> Rates | None:
        """The target's calibrated rates, or None for a target without them (the one-rate model then)."""
        dec = target.get("decode_gbs") or {}
        if not dec:
            return None
        fl = float(target["compute_gflops"]) * 1e9
        hot = {str(f): float(v) * 1e9 for f, v in (target.get("decode_cached_gbs") or {}).items()}
        streamed = {str(f): float(v) * 1e9 for f, v in (target.get("decode_streamed_gbs") or {}).items()}
        return cls({str(f): float(v) * 1e9 for f, v in dec.items()}, streamed or hot,
                   int(target.get("cache_bytes") or 0),
                   {str(f): float(v) * 1e9 for f, v in (target.get("prefill_gflops") or {}).items()},
                   float(target.get("attention_ns") or 0.0) * 1e-9, float(target.get("op_overhead_us") or 0.0) * 1e-6,
                   fl)

    def op_seconds(self, o: SchedOp, rows: int, context: int, hot: bool = False) -> float:
        """One op over `rows` new tokens after `context` cached ones (`hot`: its weights are in the CPU cache)."""
        attrs = dict(o.attrs)
        if o.op == "CausalAttention":  # every new token attends over the cache and the new tokens before it
            positions = rows * context + rows * (rows + 1) // 2
            return self.op_s + int(attrs.get("n_heads", 1)) * positions * self.attention_s
        rows = 1 if attrs.get("last_row") else rows
        if o.op == "Linear" and o.byte_end > o.byte_start:
            fmt = o.weight_format or "f32"
            rate = self.decode.get(fmt, min(self.decode.values()))
            t = (o.byte_end - o.byte_start) / (self.decode_streamed.get(fmt, rate) if hot else rate)
            if rows > 1:
                t = max(t, o.flops * rows / self.prefill.get(fmt, self.flops))
            return self.op_s + t
        return self.op_s + o.flops * rows / self.flops


def read_rate(target: dict[str, Any], total_weight_bytes: int, slot_bytes: int = 0, n_slots: int = 1,
              after_resident: bool = False) -> float:
    """Bytes per second of a streamed group's read and checksum. Calibrated: from the page cache when the weights
    file fits in the memory that was available (`page_cache_bytes`), else from the storage (`read_cold_gbs`); by
    a prefetching reader (two slots) beside the running kernels at `read_overlapped_gbs`; by a one-slot plan into
    a slot the CPU cache holds as measured on the decode loop (`stream_read_gbs`, or `stream_read_swept_gbs` when
    the group computed before the read was resident: its weights from DRAM swept the caches), into a larger one
    at `read_cached_large_gbs`."""
    if target.get("read_cached_gbs") is None:
        return float(target["read_bandwidth_gbs"]) * 1e9
    cached = total_weight_bytes <= int(target.get("page_cache_bytes") or 0)
    if cached and n_slots >= 2 and target.get("read_overlapped_gbs") is not None:
        return float(target["read_overlapped_gbs"]) * 1e9  # checksum included
    small = slot_bytes <= int(target.get("cache_bytes") or 0)
    key = "stream_read_swept_gbs" if after_resident else "stream_read_gbs"
    if cached and small and target.get(key) is not None:
        return float(target[key]) * 1e9  # checksum included
    key = "read_cached_gbs" if cached or target.get("read_cold_gbs") is None else "read_cold_gbs"
    if key == "read_cached_gbs" and slot_bytes > int(target.get("cache_bytes") or 0) and \
            target.get("read_cached_large_gbs") is not None:
        key = "read_cached_large_gbs"
    rate = float(target[key]) * 1e9
    check = float(target.get("checksum_gbs") or 0.0) * 1e9
    return 1.0 / (1.0 / rate + (1.0 / check if check else 0.0))


def predict(result: PartitionResult, target: dict[str, Any], total_weight_bytes: int,
            prompt_tokens: int = 64) -> Cost:
    """Latency from bytes read (read bandwidth) and compute. Streamed groups are read once per token in decode
    and once per prompt in prefill; with two slots the read of group g+1 overlaps the compute of group g. Bytes
    are the weights' stored sizes, so a quantized plan reads and touches fewer of them. Decode is one token after
    `prompt_tokens` cached ones.

    Compute: with a calibrated target (`Rates`), every op's fixed cost plus, for a Linear, its weight bytes at
    its format's decode rate (from the CPU cache for a streamed group that fits it, else from DRAM; prefill: its
    FLOPs at the format's prefill rate, if slower), for attention its heads x positions; otherwise the larger of
    the bytes a group touches (memory bandwidth) and its FLOPs (one compute rate)."""
    mem = float(target["mem_bandwidth_gbs"]) * 1e9
    fl = float(target["compute_gflops"]) * 1e9
    rates = Rates.of(target)
    # A two-slot plan's reader takes a core from the kernels when they would use every core (as the executor
    # then runs one thread fewer: engine.default_threads): its compute is `reader_slowdown` times slower.
    threads, cores = int(target.get("threads") or 1), int(target.get("cores") or 0)
    slow = float(target.get("reader_slowdown") or 1.0) if result.n_slots >= 2 and cores and threads >= cores else 1.0

    def compute_s(g: PlannedGroup, rows: int) -> float:
        if rates is not None:
            hot = g.streamed and g.nbytes <= rates.cache_bytes
            return slow * sum(rates.op_seconds(o, rows, prompt_tokens if rows == 1 else 0, hot) for o in g.ops)
        touched = g.nbytes if g.streamed else 0
        return max(touched / mem, g.flops * rows / fl)

    if result.weights_mode == "resident" and rates is not None:
        dec, pre = (sum(compute_s(g, n) for g in result.groups) for n in (1, prompt_tokens))
        return Cost(dec * 1e3, pre * 1e3, prompt_tokens, 0, 0.0, dec * 1e3)
    if result.weights_mode == "resident":
        flops = sum(g.flops for g in result.groups)
        dec = max(total_weight_bytes / mem, flops / fl)
        pre = max(total_weight_bytes / mem, flops * prompt_tokens / fl)
        return Cost(dec * 1e3, pre * 1e3, prompt_tokens, 0, 0.0, dec * 1e3)
    # only streamed groups are read per token (partial residency keeps the others resident), each after the
    # compute of the last group before it (cyclically) that has weights
    weighted = [g for g in result.groups if g.nbytes]
    before = {id(g): weighted[i - 1] for i, g in enumerate(weighted)}
    reads = [g.nbytes / read_rate(target, total_weight_bytes, result.slot_bytes, result.n_slots,
                                  after_resident=not before.get(id(g), g).streamed) if g.streamed else 0.0
             for g in result.groups]
    rbytes = sum(g.nbytes for g in result.groups if g.streamed)

    def total(rows: int) -> tuple[float, float]:
        comp = [compute_s(g, rows) for g in result.groups]
        if result.n_slots >= 2:
            # Steady state of the cyclic schedule: group g computes while group g+1 is read.
            nxt = reads[1:] + reads[:1]
            return sum(max(c, r) for c, r in zip(comp, nxt)), sum(comp)
        return sum(reads) + sum(comp), sum(comp)

    dec, comp = total(1)
    pre, _ = total(prompt_tokens)
    return Cost(dec * 1e3, pre * 1e3, prompt_tokens, rbytes, sum(reads) * 1e3, comp * 1e3)
