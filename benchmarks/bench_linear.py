"""Linear kernels on SmolLM2-135M's shapes, every weight format, next to llama.cpp on the same model.

For each format: one decode token's worth of linears (30 layers x q, k, v, o, gate, up, down, then the tied
LM head on the last row; every layer its own weight arrays, so the working set is the model's: 94 MB for Q4_1,
513 MB for F32) and one 76-token prefill's (the same linears at n = 76, the LM head on the last row only, as a
decoder runs it). Calls go through the Linear op's `bind` exactly as the engine makes them. Reported: medians of
`--repeats` (interleaved: decode, prefill, decode, ...), weight GB/s and GFLOP/s; then llama.cpp's whole-token
time on the same format, measured right after in the same invocation, and the ratio
`llama.cpp per-token ms / edge-rt linears ms` (>= 1.11 leaves llama.cpp's ~10% budget for the other ops).

The weights are written to a file and mapped read-only, as the engine maps its weights file (page-cache pages,
4 KiB: `--memory anon` keeps them in numpy's memory instead, which may get transparent huge pages and stream
faster). `--rounds N` repeats the whole comparison and prints the median ratios (the machine is shared).

`Q4_0-aq8_0` is Q4_0 with the layers' activations quantized to int8 (`act_quant=q8_0`, opt-in; the Q8_0 LM head
too), against llama.cpp's Q4_0. As in the packaged GGUF, Q4_0 / Q4_1 models keep the embedding / LM head in Q8_0
(llama.cpp's requantized files do the same). The weights are random (quantized from N(0, 0.02)): time does not
depend on the values.

Run: `python benchmarks/bench_linear.py [--formats F32 Q8_0 Q4_0 Q4_1] [--repeats 15] [--threads 2]
[--rounds 1] [--no-llamacpp] [--memory mmap|anon]` from the project root (llama.cpp via
../shared/bench/llamacpp.sh, see there).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_rt_exec import formats as F  # noqa: E402
from edge_rt_exec import ops  # noqa: E402
from edge_rt_exec.ops.registry import Site, with_defaults  # noqa: E402

HIDDEN, INTER, KV, LAYERS, VOCAB, PROMPT_TOKENS = 576, 1536, 192, 30, 49152, 76
#: (name, out, in) of one layer's linears, in execution order
LAYER = [("q", HIDDEN, HIDDEN), ("k", KV, HIDDEN), ("v", KV, HIDDEN), ("o", HIDDEN, HIDDEN),
         ("gate", INTER, HIDDEN), ("up", INTER, HIDDEN), ("down", HIDDEN, INTER)]
#: format name in llama.cpp -> (edge-rt format of the layers, of the LM head)
FORMATS = {"F32": ("f32", "f32"), "F16": ("f16", "f16"), "Q8_0": ("q8_0", "q8_0"), "Q4_0": ("q4_0", "q8_0"),
           "Q4_1": ("q4_1", "q8_0"), "Q4_0-aq8_0": ("q4_0", "q8_0")}
#: the variants that run the layers with int8 activations (`act_quant=q8_0`); llama.cpp runs the base format
ACT_QUANT = {"Q4_0-aq8_0": "Q4_0"}
LLAMA_PROMPT = ("The Raspberry Pi is a small single-board computer. Explain step by step how a transformer language "
                "model turns a prompt into new text, one token at a time, and why memory bandwidth matters when it "
                "runs on such a device. Then compare it with a laptop, describe what changes when the weights are "
                "quantized to four bits, and say which parts of the computation are limited by")  # 76 tokens


def quantized(fmt: str, m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    f = F.get(fmt)
    w = (rng.standard_normal((m, k)) * 0.02).astype(np.float32)
    v = f.view(f.quantize(w).reshape(-1).view(np.uint8), (m, k))
    v.setflags(write=False)
    return v


def bind(w: np.ndarray, fmt: str, m: int, k: int, n: int, x: np.ndarray, out: np.ndarray,
         last_row: bool = False, act_quant: str = "none") -> object:
    d = ops.get("Linear")
    attrs = with_defaults(d, {"out_features": m, "last_row": int(last_row), "act_quant": act_quant})
    shapes = [x.shape, (m, k), None]
    scratch = [np.zeros(c, np.float32) for c in d.scratch(shapes, attrs)] if d.scratch else []
    site = Site("Linear", [x, w, None], [out], attrs, [None, fmt, None], shapes, {}, scratch)
    return d.bind(site)


def mapped(arrays: list[np.ndarray], folder: str) -> list[np.ndarray]:
    """The arrays written one after the other into a file and mapped back read-only, as the engine maps the
    weights file (page-cache pages: 4 KiB, so no transparent huge pages as numpy's own allocations get)."""
    path = os.path.join(folder, "weights.bin")
    offsets = []
    with open(path, "wb") as f:
        for a in arrays:
            pad = -f.tell() % 64
            f.write(b"\0" * pad)
            offsets.append(f.tell())
            f.write(a.tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    os.unlink(path)  # the mapping keeps the pages
    buf = np.frombuffer(mm, np.uint8)
    return [buf[o:o + a.nbytes].view(a.dtype).reshape(a.shape) for o, a in zip(offsets, arrays)]


class Model:
    """One format's SmolLM2-shaped linears, bound for decode (n = 1) and prefill (n = 76)."""

    def __init__(self, name: str, rng: np.random.Generator, memory: str) -> None:
        self.name = name
        lfmt, hfmt = FORMATS[name]
        proto = {(m, k): quantized(lfmt, m, k, rng) for _, m, k in LAYER}
        layers = [np.copy(proto[(m, k)]) for _ in range(LAYERS) for _, m, k in LAYER]
        head = quantized(hfmt, VOCAB, HIDDEN, rng)
        if memory == "mmap":
            with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
                *layers, head = mapped(layers + [head], tmp)
        for w in layers + [head]:
            w.setflags(write=False)
        self.layers = [layers[i:i + len(LAYER)] for i in range(0, len(layers), len(LAYER))]
        self.head = head
        self.nbytes = sum(w.nbytes for ws in self.layers for w in ws) + self.head.nbytes
        self.macs_layers = LAYERS * sum(m * k for _, m, k in LAYER)
        self.calls = {}
        for n in (1, PROMPT_TOKENS):
            xs = {k: np.random.default_rng(1).standard_normal((n, k)).astype(np.float32) for k in (HIDDEN, INTER)}
            outs = {m: np.zeros((n, m), np.float32) for m in (HIDDEN, KV, INTER)}
            aq = "q8_0" if name in ACT_QUANT else "none"
            calls = [bind(w, lfmt, m, k, n, xs[k], outs[m], act_quant=aq)
                     for ws in self.layers for w, (_, m, k) in zip(ws, LAYER)]
            logits = np.zeros((1, VOCAB), np.float32)
            calls.append(bind(self.head, hfmt, VOCAB, HIDDEN, n, xs[HIDDEN], logits, last_row=True, act_quant=aq))
            self.calls[n] = calls

    def run(self, n: int) -> float:
        calls = self.calls[n]
        t = time.perf_counter()
        for c in calls:
            c()
        return time.perf_counter() - t


def llamacpp(name: str, threads: int) -> dict:
    cmd = ["bash", str(ROOT.parent / "shared" / "bench" / "llamacpp.sh"), "run", "--threads", str(threads),
           "--prompt", LLAMA_PROMPT, name]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        return json.loads(line[-1]) if line else {"error": (p.stderr or p.stdout)[-300:]}
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="*", default=["F32", "Q8_0", "Q4_0", "Q4_1"], choices=list(FORMATS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison; the median ratio is printed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--memory", choices=["mmap", "anon"], default="mmap",
                    help="weights in a mapped file (as the engine holds them; default) or in numpy's memory")
    a = ap.parse_args()
    import numba

    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"numba {numba.__version__}, {a.threads} threads, medians of {a.repeats}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, weights: {a.memory}", flush=True)
    models = {name: Model(name, rng, a.memory) for name in a.formats}
    ratios: dict[str, list[tuple[float, float]]] = {name: [] for name in a.formats}
    for rnd in range(a.rounds):
        for name, model in models.items():
            res = measure(model, a.repeats)
            res["round"] = rnd
            if not a.no_llamacpp:
                ll = llamacpp(ACT_QUANT.get(name, name), a.threads)
                if "decode_tok_s" in ll:
                    tok_ms = 1e3 / ll["decode_tok_s"]
                    res.update(llama_token_ms=round(tok_ms, 2), llama_prefill_ms=ll["prefill_ms"],
                               decode_ratio=round(tok_ms / res["decode_ms"], 2),
                               prefill_ratio=round(ll["prefill_ms"] / res["prefill_ms"], 2))
                    ratios[name].append((res["decode_ratio"], res["prefill_ratio"]))
                else:
                    res["llama_error"] = ll.get("error")
            print(json.dumps(res), flush=True)
    if a.rounds > 1 and not a.no_llamacpp:
        for name, rs in ratios.items():
            if rs:
                print(json.dumps({"format": name, "rounds": len(rs),
                                  "median_decode_ratio": statistics.median(r[0] for r in rs),
                                  "median_prefill_ratio": statistics.median(r[1] for r in rs)}), flush=True)


def measure(model: Model, repeats: int) -> dict:
    """Decode and prefill medians of `repeats` interleaved runs (after one warm-up of each)."""
    for n in (1, PROMPT_TOKENS):  # warm up: page in, start the pool
        model.run(n)
    dec, pre = [], []
    for _ in range(repeats):
        dec.append(model.run(1))
        pre.append(model.run(PROMPT_TOKENS))
    d, p = statistics.median(dec), statistics.median(pre)
    macs_dec = model.macs_layers + VOCAB * HIDDEN
    macs_pre = model.macs_layers * PROMPT_TOKENS + VOCAB * HIDDEN
    return {"format": model.name, "decode_ms": round(d * 1e3, 2), "decode_best_ms": round(min(dec) * 1e3, 2),
            "decode_GBs": round(model.nbytes / d / 1e9, 1), "decode_GFLOPs": round(2 * macs_dec / d / 1e9, 1),
            "prefill_ms": round(p * 1e3, 1), "prefill_best_ms": round(min(pre) * 1e3, 1),
            "prefill_GFLOPs": round(2 * macs_pre / p / 1e9, 1), "weights_MB": round(model.nbytes / 2**20, 1),
            "calls_per_token": len(model.calls[1])}

if __name__ == "__main__":
    main()
