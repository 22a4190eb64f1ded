"""`edge-rt-exec calibrate`: measure this device for the compiler's cost model and write a target profile (YAML).

Measured at the thread count the executor will use (`-t`), with the executor's own code paths:

* storage: `pread` of a temporary file written into the folder measured (the artifact's storage), cold (dropped
  from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)` after an `fsync`) and page-cached, in chunks the
  size of a streamed group, into one slot and into a slot larger than the CPU cache; the streamer's checksum
  kernel over the same bytes; and a prefetching reader's pread + checksum while the decode kernels run;
* memory bandwidth: every thread sums its share of an array larger than the caches;
* the Linear kernels of every weight format: decode (`linear_vec_<fmt>`, one token: weight bytes per second, the
  weights cycled from an array larger than the caches, as a decode step finds them) and prefill
  (`linear_mat_<fmt>` at `PREFILL_TOKENS` tokens: FLOP/s), on the Linear weight shapes of the artifact's plan (or
  a small LLM's shapes without one);
* `causal_attention` of one new token at two cache lengths: nanoseconds per (query head x cached position);
* the cost of one parallel kernel call that does next to nothing (the per-op overhead of a step).

The profile is flat YAML written by hand (the executor does not depend on a YAML library): the keys of a target
(`conf/target/*.yaml`) the compiler takes with `edge-rt-compile target=NAME target.profile=FILE`.
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import formats as F
from .binfile import page_aligned_empty
from .calibrate_loop import FORMATS, best_time, measure_groups, plan_layer
from .errors import UserError
from .plan import PLAN_SUFFIX, load_plan

PROFILE_VERSION = 1
PREFILL_TOKENS = 64  #: rows of the prefill measurement (the cost model's default prompt)
#: (out_features, in_features) of the Linear weights measured when the folder holds no plan (SmolLM2-135M's).
DEFAULT_SHAPES = [(576, 576), (1536, 576), (576, 1536), (192, 576)]
MAX_SHAPES = 4
ATTENTION = (9, 3, 64)  #: (heads, kv heads, head dim) measured


def _loop(fn: Callable[..., Any], argsets: list[tuple]) -> None:
    for a in argsets:
        fn(*a)


# ---- storage ----------------------------------------------------------------------------------------------------

def _drop_cache(fd: int) -> bool:
    os.fsync(fd)
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


@contextmanager
def kernels_running(threads: int) -> Iterator[None]:
    """The f32 decode kernel running on `threads` numba threads in a background thread over weights larger than the
    caches, as a two-slot plan computes while its reader reads."""
    from .engine import set_threads
    from .ops.linear import VEC

    vec = VEC["f32"].load()
    rng = np.random.default_rng(1)
    ws = _weights("f32", (1536, 576), 40, rng)  # 141 MB
    x = rng.standard_normal(576, dtype=np.float32)
    x.setflags(write=False)
    out = np.zeros(1536, np.float32)
    empty = np.zeros(0, np.float32)
    empty.setflags(write=False)
    stop = threading.Event()

    def spin() -> None:
        set_threads(threads)  # numba's thread count is per calling thread
        while not stop.is_set():
            _loop(vec, [(x, w, empty, out, 0) for w in ws])

    t = threading.Thread(target=spin, name="edge-rt-calibrate-kernels", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def measure_storage(folder: Path, nbytes: int, chunk: int, repeat: int, beside: int = 0) -> dict[str, Any]:
    """Cold and page-cached pread rates (GB/s) of a temporary file in `folder`, and the checksum rate; with `beside`
    threads, also the rate of a reader's pread + checksum while kernels run on that many threads."""
    from .checksum import fletcher

    chunk = min(chunk, nbytes)
    sums = np.zeros(2, np.uint64)
    check = fletcher.load()
    buf = page_aligned_empty(chunk)  # as the engine's slots are (binfile.page_aligned_empty says why)
    data = np.random.default_rng(0).integers(0, 256, size=chunk, dtype=np.uint8)
    try:
        tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=".edge-rt-calibrate-", suffix=".tmp", delete=False)
    except OSError as e:
        raise UserError(f"{folder}: cannot write a temporary file to measure its storage ({e.strerror or e}); "
                        "pass a writable folder on the storage the artifact lives on") from None
    path = Path(tmp.name)
    try:
        with tmp:
            n = 0
            while n < nbytes:
                tmp.write(data[:min(chunk, nbytes - n)].tobytes())
                n += chunk
            tmp.flush()
        fd = os.open(path, os.O_RDONLY)
        try:
            def read_all() -> None:
                mv = memoryview(buf)
                for off in range(0, nbytes, chunk):
                    os.preadv(fd, [mv[:min(chunk, nbytes - off)]], off)

            colds = []
            dropped = False
            for _ in range(max(1, repeat // 2)):
                dropped = _drop_cache(fd)
                t0 = time.perf_counter()
                read_all()
                colds.append(time.perf_counter() - t0)
            cold = min(colds)
            read_all()  # into the page cache
            cached = best_time(read_all, repeat)
            whole = page_aligned_empty(nbytes)  # a slot larger than the CPU caches: the copy goes to DRAM
            whole.fill(0)

            def read_whole() -> None:
                mv = memoryview(whole)
                for off in range(0, nbytes, chunk):
                    os.preadv(fd, [mv[off:off + chunk]], off)
            large = best_time(read_whole, repeat)
            overlapped = None
            if beside:
                ro_buf = buf.view()
                ro_buf.setflags(write=False)

                def read_check() -> None:
                    mv = memoryview(buf)
                    for off in range(0, nbytes, chunk):
                        os.preadv(fd, [mv[:min(chunk, nbytes - off)]], off)
                        check(ro_buf, sums)
                read_check()
                with kernels_running(beside):
                    time.sleep(0.05)
                    overlapped = best_time(read_check, repeat)
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    ro = buf.view()
    ro.setflags(write=False)
    check(ro, sums)  # compiled / loaded outside the timing
    passes = max(1, nbytes // chunk)
    t_check = best_time(lambda: [check(ro, sums) for _ in range(passes)], repeat)
    return {"read_cold_gbs": nbytes / cold / 1e9, "read_cached_gbs": nbytes / cached / 1e9,
            "read_overlapped_gbs": nbytes / overlapped / 1e9 if overlapped else None,
            "read_cached_large_gbs": nbytes / large / 1e9,
            "checksum_gbs": passes * chunk / t_check / 1e9, "cold_dropped": dropped}


# ---- memory -----------------------------------------------------------------------------------------------------

def measure_memory(threads: int, nbytes: int, repeat: int) -> float:
    """DRAM read bandwidth (GB/s) with `threads` threads each summing its share (numpy releases the GIL)."""
    a = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))
        t = best_time(lambda: list(pool.map(np.sum, parts)), repeat)
    return a.nbytes / t / 1e9


# ---- kernels ----------------------------------------------------------------------------------------------------

def plan_shapes(folder: Path) -> list[tuple[int, int]]:
    """The Linear weight shapes of the first plan in `folder` (most bytes first), or `DEFAULT_SHAPES`."""
    plans = sorted(folder.glob(f"*{PLAN_SUFFIX}"))
    if not plans:
        return DEFAULT_SHAPES
    plan = load_plan(plans[0])
    linear_w = {op.inputs[1] for op in plan.schedule if op.op == "Linear" and len(op.inputs) > 1}
    sizes: dict[tuple[int, int], int] = {}
    for ref in linear_w:
        w = plan.weights.get(ref.lstrip("@"))
        if w is not None and len(w.shape) == 2 and w.shape[1] % F.QK == 0:
            shape = (int(w.shape[0]), int(w.shape[1]))
            sizes[shape] = sizes.get(shape, 0) + shape[0] * shape[1]
    ranked = sorted(sizes, key=lambda s: -sizes[s])[:MAX_SHAPES]
    return ranked or DEFAULT_SHAPES


def _weights(fmt: str, shape: tuple[int, int], copies: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`copies` read-only views of one quantized random weight, each in its own memory."""
    f = F.get(fmt)
    stored = f.quantize(rng.standard_normal(shape, dtype=np.float32) * 0.05)
    raw = np.ascontiguousarray(stored).view(np.uint8).reshape(-1)
    out = []
    for _ in range(copies):
        v = f.view(raw.copy(), shape)
        v.setflags(write=False)
        out.append(v)
    return out


def cache_bytes() -> int:
    """The largest CPU cache (sysfs), or 1 MiB when it does not say."""
    sizes = [0]
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            text = (idx / "size").read_text().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes) or 1 << 20


def measure_linear(fmt: str, shapes: list[tuple[int, int]], cycle_bytes: int, cache: int, repeat: int,
                   rng: np.random.Generator) -> tuple[float, float, float]:
    """(decode GB/s of weight bytes from DRAM, from the cache, prefill GFLOP/s) of the Linear kernels of `fmt` over
    `shapes`. From DRAM: copies of each weight cycled, `cycle_bytes` of them; from the cache: what a streamed group
    finds right after its read, as many copies as fill half of `cache`, cycled again and again."""
    from .ops.linear import MAT, PANEL, SLOTS, VEC

    vec, mat = VEC[fmt].load(), MAT[fmt].load()
    f = F.get(fmt)
    dec_bytes = dec_s = hot_bytes = hot_s = pre_flops = pre_s = 0.0
    empty = np.zeros(0, np.float32)
    empty.setflags(write=False)
    for m, k in shapes:
        nbytes = f.nbytes((m, k))
        ws = _weights(fmt, (m, k), max(2, cycle_bytes // nbytes), rng)
        x = rng.standard_normal(k, dtype=np.float32)
        x.setflags(write=False)
        out = np.zeros(m, np.float32)
        vec(x, ws[0], empty, out, 0)
        dec_s += best_time(partial(_loop, vec, [(x, w, empty, out, 0) for w in ws]), repeat)
        dec_bytes += nbytes * len(ws)
        hot = ws[:cache // 2 // nbytes]
        if hot:
            _loop(vec, [(x, w, empty, out, 0) for w in hot])
            passes = max(1, len(ws) // len(hot))
            hot_s += best_time(partial(_loop, vec, [(x, w, empty, out, 0) for w in hot] * passes), repeat)
            hot_bytes += nbytes * len(hot) * passes
        xs = rng.standard_normal((PREFILL_TOKENS, k), dtype=np.float32)
        xs.setflags(write=False)
        outs = np.zeros((PREFILL_TOKENS, m), np.float32)
        scratch = np.zeros((SLOTS, PANEL, k), np.float32)
        mat(xs, ws[0], empty, outs, 0, scratch)
        calls = max(1, min(len(ws), 8))
        pre_s += best_time(partial(_loop, mat, [(xs, w, empty, outs, 0, scratch) for w in ws[:calls]]), repeat)
        pre_flops += 2.0 * PREFILL_TOKENS * m * k * calls
    dram = dec_bytes / dec_s / 1e9
    return dram, hot_bytes / hot_s / 1e9 if hot_s else dram, pre_flops / pre_s / 1e9


def measure_attention(contexts: tuple[int, int], repeat: int, rng: np.random.Generator) -> float:
    """Nanoseconds per (query head x cached position) of one decode token's `causal_attention` (the difference
    between two cache lengths, so the call's fixed cost is left out)."""
    from .ops.attention import causal_attention, rope_inv_freq

    fn = causal_attention.load()
    H, Hkv, hd = ATTENTION
    t_max = max(contexts) + 1
    kc = rng.standard_normal((Hkv, t_max, hd), dtype=np.float32)
    vc = rng.standard_normal((Hkv, t_max, hd), dtype=np.float32)
    inv = rope_inv_freq(hd, 10000.0)
    scratch = np.zeros((H, t_max), np.float32)
    out = np.zeros((1, H * hd), np.float32)
    per = []
    for length in contexts:
        q = rng.standard_normal((1, H * hd), dtype=np.float32)
        k = rng.standard_normal((1, Hkv * hd), dtype=np.float32)
        v = rng.standard_normal((1, Hkv * hd), dtype=np.float32)
        v.setflags(write=False)
        pos = np.array([length], np.int64)
        pos.setflags(write=False)
        fn(q, k, v, kc, vc, pos, inv, H, Hkv, hd, hd ** -0.5, scratch, out)
        calls = 20
        args = (q, k, v, kc, vc, pos, inv, H, Hkv, hd, hd ** -0.5, scratch, out)
        t = best_time(partial(_loop, fn, [args] * calls), repeat)
        per.append(t / calls)
    lo, hi = min(contexts), max(contexts)
    return max(0.0, (per[contexts.index(hi)] - per[contexts.index(lo)]) / (H * (hi - lo)) * 1e9)


def measure_overhead(repeat: int) -> float:
    """Microseconds of one parallel kernel call on a tiny input (the per-op cost a step pays in any case)."""
    from .ops.linear import VEC

    fn = VEC["f32"].load()
    w = np.ones((16, 32), np.float32)
    x = np.ones(32, np.float32)
    bias = np.zeros(0, np.float32)
    for a in (w, x, bias):
        a.setflags(write=False)
    out = np.zeros(16, np.float32)
    fn(x, w, bias, out, 0)
    calls = 2000
    return best_time(partial(_loop, fn, [(x, w, bias, out, 0)] * calls), repeat) / calls * 1e6


# ---- the profile ------------------------------------------------------------------------------------------------

def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def calibrate(folder: Path, threads: int, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement, as the profile's keys and values."""
    from .engine import available_cores, set_threads

    threads = set_threads(threads or available_cores())
    rng = np.random.default_rng(0)
    repeat = 3 if quick else 7
    many = 3 if quick else 15  #: repeats of the short kernel timings: their fastest is what a quiet machine gives
    mb = 2**20
    avail = _available_memory()
    big = int(max(16 * mb, min(512 * mb, avail // 8))) if not quick else 16 * mb
    log(f"storage of {folder} ({big // mb} MB, cold and page-cached)")
    chunk = 16 * mb if not quick else 4 * mb
    cores = available_cores()
    compute = min(threads, cores)
    beside = compute - 1 if compute >= cores > 1 else compute  # a two-slot plan's kernels (engine.default_threads)
    st = measure_storage(folder, big, chunk, repeat, beside)
    log("memory bandwidth")
    mem = measure_memory(threads, big, repeat)
    shapes = plan_shapes(folder)
    if quick:
        shapes = sorted(shapes, key=lambda s: s[0] * s[1])[:2]
    cache = cache_bytes()
    cycle = max(4 * cache, 128 * mb) if not quick else 2 * cache
    decode, decode_hot, prefill = {}, {}, {}
    for fmt in FORMATS:
        log(f"Linear kernels, {fmt}, shapes {', '.join(f'{m}x{k}' for m, k in shapes)}")
        decode[fmt], decode_hot[fmt], prefill[fmt] = measure_linear(fmt, shapes, cycle, cache, many, rng)
    layer = plan_layer(folder)
    log(f"the decode loop on {len(layer)}-Linear blocks, resident and streamed through a {chunk // mb} MB slot")
    groups = measure_groups(folder, layer, chunk, cache, cycle, repeat, rng)
    slowdown = 1.0
    if threads > 1:  # two-slot plans leave a core to the reader when threads >= cores (engine.default_threads)
        log(f"Linear kernels, f32, at {threads - 1} threads (beside a prefetching reader)")
        set_threads(threads - 1)
        fewer = measure_linear("f32", shapes, cycle, cache, many, rng)
        set_threads(threads)
        slowdown = max(1.0, (decode["f32"] / fewer[0] + decode_hot["f32"] / fewer[1]) / 2)
    log("attention")
    att = measure_attention((64, 512) if quick else (128, 1024), many, rng)
    log("per-op overhead")
    over = measure_overhead(many)
    return {
        "profile_version": PROFILE_VERSION, "threads": threads,
        "read_bandwidth_gbs": st["read_cached_gbs"], "mem_bandwidth_gbs": mem, "compute_gflops": prefill["f32"],
        "read_cold_gbs": st["read_cold_gbs"], "read_cached_gbs": st["read_cached_gbs"],
        "read_cached_large_gbs": st["read_cached_large_gbs"], "read_overlapped_gbs": st["read_overlapped_gbs"],
        "checksum_gbs": st["checksum_gbs"], "page_cache_bytes": avail,
        "decode_gbs": groups["decode_gbs"], "decode_cached_gbs": decode_hot,
        "decode_streamed_gbs": groups["decode_streamed_gbs"], "stream_read_gbs": groups["stream_read_gbs"],
        "stream_read_swept_gbs": groups["stream_read_swept_gbs"], "cache_bytes": cache, "prefill_gflops": prefill,
        "attention_ns": att, "op_overhead_us": over, "cores": cores, "reader_slowdown": slowdown,
        "_cold_dropped": st["cold_dropped"], "_shapes": shapes, "_chunk_mb": chunk // mb,
    }


def _num(v: float) -> str:
    return f"{v:.6g}"


def to_yaml(p: dict[str, Any], folder: Path) -> str:
    """The profile as YAML (flat keys, two nested maps), with a comment per key."""
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    cold_note = "" if p["_cold_dropped"] else " (the page cache could not be dropped: this is not a cold read)"
    lines = [
        f"# edge-rt target profile: measured by `edge-rt-exec calibrate` on {socket.gethostname()} "
        f"({platform.machine()}, {os.cpu_count()} cores) at {when}",
        f"# storage measured in {folder}; Linear shapes {', '.join(f'{m}x{k}' for m, k in p['_shapes'])}",
        "# use: edge-rt-compile target=NAME target.profile=THIS_FILE (these values override the target's)",
        f"profile_version: {p['profile_version']}",
        f"threads: {p['threads']}  # every rate below was measured at this many threads",
        f"read_bandwidth_gbs: {_num(p['read_bandwidth_gbs'])}  # streamed reads (page-cached)",
        f"read_cold_gbs: {_num(p['read_cold_gbs'])}  # pread after POSIX_FADV_DONTNEED{cold_note}",
        f"read_cached_gbs: {_num(p['read_cached_gbs'])}  # pread from the page cache into a {p['_chunk_mb']} MB slot",
        f"read_cached_large_gbs: {_num(p['read_cached_large_gbs'])}  # the same into a slot larger than the CPU "
        "caches",
        f"checksum_gbs: {_num(p['checksum_gbs'])}  # the streamer's checksum of a group read",
        f"read_overlapped_gbs: {_num(p['read_overlapped_gbs'])}  # a prefetching reader's pread + checksum from the "
        "page cache while the kernels run",
        f"page_cache_bytes: {p['page_cache_bytes']}  # memory available: a weights file up to this size is read "
        "from the page cache",
        f"mem_bandwidth_gbs: {_num(p['mem_bandwidth_gbs'])}",
        f"compute_gflops: {_num(p['compute_gflops'])}  # f32 prefill",
        "decode_gbs:  # Linear, one token: weight bytes per second from DRAM over the plan's blocks, by format",
        *[f"  {f}: {_num(v)}" for f, v in p["decode_gbs"].items()],
        "decode_cached_gbs:  # the same with the weights in the CPU cache, one shape cycled",
        *[f"  {f}: {_num(v)}" for f, v in p["decode_cached_gbs"].items()],
        "decode_streamed_gbs:  # a streamed group's Linears right after its read and checksum into the slot",
        *[f"  {f}: {_num(v)}" for f, v in p["decode_streamed_gbs"].items()],
        f"stream_read_gbs: {_num(p['stream_read_gbs'])}  # a group's pread + checksum into the slot, after the "
        "previous streamed group's compute",
        f"stream_read_swept_gbs: {_num(p['stream_read_swept_gbs'])}  # the same after resident groups' compute "
        "swept the caches",
        f"cache_bytes: {p['cache_bytes']}  # the largest CPU cache: a streamed group up to this size stays in it",
        f"prefill_gflops:  # Linear at {PREFILL_TOKENS} tokens, by weight format",
        *[f"  {f}: {_num(v)}" for f, v in p["prefill_gflops"].items()],
        f"attention_ns: {_num(p['attention_ns'])}  # causal attention, per query head and cached position",
        f"op_overhead_us: {_num(p['op_overhead_us'])}  # one kernel call, whatever it does",
        f"cores: {p['cores']}  # cores this process could use",
        f"reader_slowdown: {_num(p['reader_slowdown'])}  # decode compute at threads - 1 against threads: a "
        "two-slot plan's kernels leave a core to the reader when threads >= cores",
    ]
    return "\n".join(lines) + "\n"


def _folder(arg: str | None) -> Path:
    """The folder to measure: the one given (a plan file: its folder), else `artifacts/<model>` if there is
    exactly one, else the current folder."""
    if arg is None:
        found = sorted({p.parent for p in Path("artifacts").glob(f"*/*{PLAN_SUFFIX}")}) \
            if Path("artifacts").is_dir() else []
        return found[0] if len(found) == 1 else Path(".")
    p = Path(arg)
    if p.is_file() and p.name.endswith(PLAN_SUFFIX):
        return p.parent
    if not p.exists():
        raise UserError(f"{p}: no such folder; pass the artifact folder (or a folder on the storage it lives on)")
    if not p.is_dir():
        raise UserError(f"{p}: not a folder or a *{PLAN_SUFFIX}; pass the artifact folder to measure")
    return p


def run_calibrate(args: Any) -> int:
    import sys

    from .plan import atomic_write

    folder = _folder(args.folder)
    out = Path(args.out) if args.out else folder / "target-profile.yaml"
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name the profile file to write, e.g. --out {out}/profile.yaml")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it or pick another path")
    for where, what in ((out.parent, f"--out {out}: folder {out.parent}"), (folder, f"{folder}")):
        if not os.access(where, os.W_OK | os.X_OK):
            raise UserError(f"{what} is not writable (calibrate writes a temporary file into FOLDER and the profile "
                            "to --out); pick writable paths")
    threads = args.threads if isinstance(args.threads, int) else None
    p = calibrate(folder, threads or 0, args.quick, lambda s: print(f"calibrate: {s}", file=sys.stderr))
    try:
        atomic_write(out, to_yaml(p, folder))
    except OSError as e:
        raise UserError(f"--out {out}: cannot write the profile ({e.strerror or e}); pick a writable path") from None
    print(f"profile: {out}")
    print(f"  threads {p['threads']}; read {p['read_cold_gbs']:.2f} GB/s cold, {p['read_cached_gbs']:.2f} GB/s "
          f"cached; checksum {p['checksum_gbs']:.1f} GB/s; memory {p['mem_bandwidth_gbs']:.1f} GB/s")
    print("  decode GB/s " + ", ".join(f"{f} {v:.1f}" for f, v in p["decode_gbs"].items()))
    print("  decode from a just-read slot GB/s " + ", ".join(f"{f} {v:.1f}"
                                                         for f, v in p["decode_streamed_gbs"].items()))
    print(f"  a group's read + checksum {p['stream_read_gbs']:.2f} GB/s after a streamed group, "
          f"{p['stream_read_swept_gbs']:.2f} GB/s after resident compute")
    print("  prefill GFLOP/s " + ", ".join(f"{f} {v:.1f}" for f, v in p["prefill_gflops"].items()))
    print(f"  attention {p['attention_ns']:.2f} ns per head and position; {p['op_overhead_us']:.1f} us per op")
    return 0
