"""`edge-rt-exec`: run compiled plans on the device.

  edge-rt-exec run PLAN -p TEXT | -f FILE | -p - [--chat] [-n N] [--temperature T] [--stop S] [--json] [--trace F]
  edge-rt-exec chat PLAN [--system TEXT]                       (interactive, multi-turn)
  edge-rt-exec serve PLAN [PLAN ...] [--host 127.0.0.1] [--port 8080]   (OpenAI-compatible HTTP API)
  edge-rt-exec embed PLAN --file sentences.txt --out emb.npy
  edge-rt-exec infer PLAN --inputs in.npz --out out.npz       (plans compiled from an ONNX graph)
  edge-rt-exec bench PLAN [PLAN ...] [--prompt TEXT] [--json]
  edge-rt-exec inspect PLAN [--verify] [--json]
  edge-rt-exec status [--json]
  edge-rt-exec calibrate [FOLDER] [--out FILE] [-t N] [--quick]   (a target profile for edge-rt-compile)

PLAN is a *.plan.json file or an artifact folder holding exactly one plan.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from .errors import UserError

PROG = "edge-rt-exec"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other user error
        raise UserError(f"{message}; see `{self.prog} --help`")


def _warm_runtime(plan) -> None:  # noqa: ANN001
    """Load the kernels this plan calls (numba's cache) and start the thread pool, so the runtime baseline
    measured next includes them and the plan's own memory is measured apart."""
    from .engine import start_threads, warm_plan
    from .ops import _jit

    _jit.LEAN_IMPORTS = True  # this process is the executor's own: numba skips scipy/cffi (see _jit.numba_module)
    warm_plan(plan, notice=lambda m: print(m, file=sys.stderr, flush=True))
    start_threads()


def _load_into(box: list[Any], fn: Any, *args: Any) -> None:
    try:
        box.append(fn(*args))
    except BaseException as e:  # re-raised on the caller's thread (a UserError stays a one-line error)
        box.append(e)


def _session(args: argparse.Namespace):
    from .generate import Session, load_tokenizer
    from .memory import peak_rss
    from .plan import load_plan

    t0 = time.perf_counter()
    plan = load_plan(args.plan)
    # The tokenizer is parsed (once) on a second thread while numba loads the kernels: tokenizers parses in Rust
    # without holding the GIL, so on two or more cores it costs no start-up time. Both finish before the baseline.
    tok: list[Any] = []
    loader = None
    if "tokenizer" in plan.files:
        loader = threading.Thread(target=_load_into, args=(tok, load_tokenizer, plan), name="edge-rt-tokenizer")
        loader.start()
    try:
        _warm_runtime(plan)
    finally:
        if loader is not None:
            loader.join()
    if tok and isinstance(tok[0], BaseException):
        raise tok[0]
    baseline = peak_rss()
    s = Session(plan, threads=args.threads, validate=getattr(args, "validate", False),
                tokenizer=tok[0] if tok else None,
                profile=getattr(args, "profile", False), adapt_threads=not getattr(args, "fixed_threads", False))
    return s, baseline, time.perf_counter() - t0


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt of `-p TEXT`, `-p -` (standard input) or `-f FILE`, as UTF-8 text."""
    if args.file is not None:
        from .plan import read_regular

        data = read_regular(Path(args.file), 64 << 20, "prompt file")
        where = args.file
    elif args.prompt == "-":
        data, where = sys.stdin.buffer.read(64 << 20), "standard input"
    else:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("--prompt is not valid UTF-8 text; pass UTF-8 (or use -f FILE)") from None
        return args.prompt
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: the prompt is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def sampling_args(args: argparse.Namespace):  # noqa: ANN201
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                          seed=args.seed).check()


def cmd_run(args: argparse.Namespace) -> int:
    from .generate import memory_report

    trace_path = writable_file(args.trace, "trace") if args.trace is not None else None
    prompt = read_prompt(args)
    params = sampling_args(args)
    s, baseline, load_s = _session(args)
    tracer = None
    if trace_path is not None:
        from .trace import Tracer

        tracer = Tracer().attach(s.engine)
    if args.max_temp is not None:
        s.hold_temperature(args.max_temp, notify=lambda m: print(m, file=sys.stderr, flush=True))
    finished = False  # the trace is written at the end, or on Ctrl-C with what was recorded so far
    try:
        ids = s.encode_prompt(prompt, chat=args.chat, system=args.system)
        stream = None if (args.json or args.no_stream) else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        t0 = time.perf_counter()
        r = s.generate(ids, max_tokens=args.max_tokens, params=params, on_text=stream, stop=args.stop,
                       ignore_eos=args.ignore_eos)
        from .memory import process_start_time

        first_token_s = r.first_token_time - process_start_time()  # process start (the kernel's record) to it
        mem = memory_report(baseline)
        p = s.plan
        result = {"tokens": r.tokens, "text": r.text, "prompt_tokens": r.prompt_tokens,
                  "prefill_ms": round(r.prefill_ms, 2), "decode_tok_s": round(r.decode_tok_s, 2),
                  "decode_ms": round(r.decode_ms, 2), "stop_reason": r.stop_reason, **mem,
                  "budget_mb": round(p.budget / 2**20, 1), "within_budget": mem["plan_rss_mb"] * 2**20 <= p.budget,
                  "strategy": p.strategy, "weights_mode": p.weights_mode, "groups": len(p.groups),
                  "quant": p.quant, "weight_formats": sorted(p.weight_formats()),
                  "planned_peak_mb": round(p.predicted["peak_bytes"] / 2**20, 1),
                  "read_s": round(r.read_s, 4), "check_s": round(r.check_s, 4), "wait_s": round(r.wait_s, 4),
                  "compute_s": round(r.compute_s, 4),
                  "load_s": round(load_s, 3), "first_token_s": round(first_token_s, 3),
                  "threads": s.adapter.max_threads if s.adapter is not None else s.engine.threads,
                  "elapsed_s": round(time.perf_counter() - t0, 3)}
        if s.adapter is not None:
            result["adapt_threads"] = s.adapter.report()
        if s.governor is not None:
            result["thermal"] = s.governor.report()
        if args.validate:
            result["validate_max_abs_err"] = s.engine.worst
        if args.profile:
            result["profile_s"] = {k: round(v, 5) for k, v in sorted(s.engine.timings.per_op.items(),
                                                                      key=lambda kv: -kv[1])}
        if args.json:
            print(json.dumps(result))
        else:
            if args.no_stream:
                print(r.text)
            else:
                print()
            print(f"[{r.prompt_tokens} prompt tokens, prefill {r.prefill_ms:.0f} ms, {len(r.tokens)} tokens at "
                  f"{r.decode_tok_s:.1f} tok/s ({r.stop_reason}); peak RSS {mem['peak_rss_mb']:.0f} MB = baseline "
                  f"{mem['baseline_rss_mb']:.0f} MB + {mem['plan_rss_mb']:.0f} MB (budget "
                  f"{p.budget / 2**20:.0f} MB)]", file=sys.stderr)
            if args.validate:
                print("[validate: max |numba - numpy| per op: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in sorted(s.engine.worst.items())) + "]", file=sys.stderr)
            if args.profile:
                total = sum(s.engine.timings.per_op.values()) or 1.0
                print("[profile: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in sorted(
                    s.engine.timings.per_op.items(), key=lambda kv: -kv[1])) + "]", file=sys.stderr)
        finished = True
    except KeyboardInterrupt:
        finished = True
        raise
    finally:
        s.close()  # joins the reader thread: the trace's lists are complete
        if tracer is not None and trace_path is not None and finished:
            n = tracer.write(trace_path)
            print(f"[trace: {n} events in {trace_path}; open it in https://ui.perfetto.dev or Chrome DevTools' "
                  "Performance panel]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import chat_loop

    params = sampling_args(args)
    s, _, _ = _session(args)
    if args.max_temp is not None:
        s.hold_temperature(args.max_temp, notify=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        return chat_loop(s, params, args.max_tokens, args.system, args.stop, sys.stdin, sys.stdout, sys.stderr)
    finally:
        s.close()


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serve needs the serve extra: pip install 'edge-rt[serve]' (starlette and uvicorn)") \
            from None
    from .generate import Session, load_tokenizer
    from .memory import peak_rss
    from .plan import load_plan
    from .server import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: give a port number in 0..65535")
    plans = [load_plan(p) for p in args.plans]
    for plan in plans:
        _warm_runtime(plan)
    toks = [load_tokenizer(p) if "tokenizer" in p.files else None for p in plans]
    baseline = peak_rss()
    sessions = [Session(p, threads=args.threads, tokenizer=t, adapt_threads=not args.fixed_threads)
                for p, t in zip(plans, toks)]
    if args.max_temp is not None:
        for s in sessions:
            s.hold_temperature(args.max_temp, notify=lambda m: print(m, file=sys.stderr, flush=True))
    budget = sum(p.budget for p in plans)
    print(f"edge-rt-exec: runtime baseline {baseline / 2**20:.0f} MB; the plans may add up to "
          f"{budget / 2**20:.0f} MB", file=sys.stderr)
    try:
        serve(sessions, args.host, args.port, args.queue, lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        for s in sessions:
            s.close()
    return 0


def writable_file(path: str, what: str) -> Path:
    """An output path that can be written: not a folder, in a folder that exists (checked before any work)."""
    import os

    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: --{what} names a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{parent}: folder of --{what} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{parent}: folder of --{what} is not writable")
    return p


def _sentences(path: str):  # noqa: ANN202
    """Non-empty lines of a UTF-8 file, read as a stream (any size)."""
    n = 0
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            for n, line in enumerate(f, 1):  # noqa: B007 (n names the line of a decoding error)
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: line {n + 1} is not UTF-8 text ({e.reason}); convert the file to UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read sentences ({e.strerror or e})") from None


def cmd_embed(args: argparse.Namespace) -> int:
    """Sentences in, a float32 [n, d] .npy out, both streamed: memory stays within the plan's budget for any
    number of lines. The output appears only when complete (atomic write)."""
    import numpy as np

    from .generate import memory_report
    from .plan import atomic_file

    out = writable_file(args.out, "out")
    import stat as _stat

    try:
        st = Path(args.file).stat()
    except OSError as e:
        raise UserError(f"{args.file}: cannot read sentences ({e.strerror or e})") from None
    if not _stat.S_ISREG(st.st_mode):
        raise UserError(f"{args.file}: not a regular file; give a UTF-8 text file, one sentence per line")
    n = sum(1 for _ in _sentences(args.file))  # a first pass counts (the .npy header states the shape)
    if not n:
        raise UserError(f"{args.file}: no sentences (one per line expected)")
    s, baseline, _ = _session(args)
    try:
        d = s.embedding_dim
        t0 = time.perf_counter()
        written = 0
        with atomic_file(out) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n, d)})
            for part in s.embed_iter(_sentences(args.file)):
                f.write(np.ascontiguousarray(part, "<f4").tobytes())
                written += len(part)
            if written != n:
                raise UserError(f"{args.file}: changed while it was read ({n} sentences, then {written})")
        dt = time.perf_counter() - t0
        from .memory import process_start_time

        ready_s = time.time() - process_start_time()  # process start to the .npy complete (start-up included)
    finally:
        s.close()
    mem = memory_report(baseline)
    info = {"sentences": n, "dim": d, "out": str(out), "ms": round(dt * 1e3, 2),
            "ms_per_sentence": round(dt * 1e3 / n, 3), "output_ready_s": round(ready_s, 3), **mem}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {n} x {d} float32 embeddings to {out} ({info['ms_per_sentence']:.2f} ms/sentence; peak RSS "
              f"{mem['peak_rss_mb']:.0f} MB = baseline {mem['baseline_rss_mb']:.0f} MB + {mem['plan_rss_mb']:.0f} MB)")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Feed named graph inputs from an .npz, write every graph output by name to an .npz."""
    import io
    import zipfile

    import numpy as np

    from .engine import Engine
    from .generate import memory_report
    from .memory import peak_rss
    from .plan import atomic_write, load_plan

    plan = load_plan(args.plan)
    out_path = writable_file(args.out, "out")
    try:
        with np.load(args.inputs, allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{args.inputs}: cannot read the inputs ({e.__class__.__name__}: {e}); give an .npz written "
                        "by numpy.savez with one array per graph input, named like the input") from None
    _warm_runtime(plan)
    baseline = peak_rss()
    eng = Engine(plan, threads=args.threads)
    try:
        t0 = time.perf_counter()
        eng.run(feeds)
        out = {o["name"]: eng.output(o["name"]).copy() for o in plan.graph["outputs"]}
        dt = time.perf_counter() - t0
    finally:
        eng.close()
    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write(out_path, buf.getvalue())
    mem = memory_report(baseline)
    info = {"out": str(args.out), "ms": round(dt * 1e3, 2), **mem,
            "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in out.items()}}
    if args.json:
        print(json.dumps(info))
    else:
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in out.items())
        print(f"wrote {len(out)} output(s) to {args.out}: {shapes} ({dt * 1e3:.1f} ms; peak RSS "
              f"{mem['peak_rss_mb']:.0f} MB = baseline {mem['baseline_rss_mb']:.0f} MB + {mem['plan_rss_mb']:.0f} MB)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .plan import load_plan
    from .plan_info import describe

    plan = load_plan(args.plan)
    info = describe(plan, verify=args.verify)
    if args.json:
        print(json.dumps(info["data"]))
    else:
        print(info["text"])
    return 0 if info["data"].get("weights_ok", True) else 2


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect_status
    from .status_report import format_status, recommend

    st = collect_status()
    size = None
    if args.plan:
        from .plan import load_plan

        size = load_plan(args.plan).files.get("weights_size")
    rec = recommend(st, size)
    if args.json:
        print(json.dumps({"status": st, "recommendation": rec}))
    else:
        print(format_status(st, rec))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import run_calibrate

    return run_calibrate(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def _threads(value: str) -> int:
    """`--threads N` or `--threads auto`: the cores idle over a short sample, so a busy board does not make the
    kernels wait at every parallel region for a thread the OS has descheduled."""
    if value == "auto":
        import psutil

        busy = psutil.cpu_percent(interval=0.2, percpu=True)
        return max(1, sum(1 for b in busy if b < 50.0))
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads {value!r}: give a positive number or 'auto'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads {n}: must be at least 1")
    return n


def _int_at_least(lo: int):  # noqa: ANN202
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"{n} must be at least {lo}")
        return n
    return parse


def _float_in(lo: float, hi: float | None, open_low: bool = False):  # noqa: ANN202
    def parse(v: str) -> float:
        import math

        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not a number") from None
        if not math.isfinite(x) or x < lo or (open_low and x == lo) or (hi is not None and x > hi):
            rng = f"{'(' if open_low else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
            raise argparse.ArgumentTypeError(f"{v} must be a finite number in {rng}")
        return x
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Run edge-rt plans on the device (numba kernels, streamed weights).",
                 epilog="PLAN: a *.plan.json written by edge-rt-compile, or its artifact folder if it holds one plan.")
    ap.add_argument("--version", action="version", version=f"{PROG} {__import__('edge_rt_exec').__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("plan", help="plan file or artifact folder")
        threads(p)

    def threads(p: argparse.ArgumentParser) -> None:
        p.add_argument("-t", "--threads", type=_threads, default=None,
                       help="numba threads: a number, or 'auto' for the cores idle right now (default: the plan's "
                       "target preset, at most the cores this process may use)")

    def fixed(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fixed-threads", action="store_true",
                       help="keep the thread count fixed; by default decoding times its tokens and runs fewer "
                       "threads (down to 1) while another process slows them, and more again when it goes away")

    def sampling(p: argparse.ArgumentParser, max_tokens: int) -> None:
        g = p.add_argument_group("sampling (llama.cpp's names and defaults where they exist)")
        g.add_argument("-n", "--max-tokens", type=_int_at_least(1), default=max_tokens,
                       help=f"tokens to generate (default {max_tokens})")
        g.add_argument("--temperature", "--temp", type=_float_in(0.0, None), default=0.0,
                       help="0 = greedy (default)")
        g.add_argument("--top-k", type=_int_at_least(0), default=0, help="keep the k most likely tokens (0 = off)")
        g.add_argument("--top-p", type=_float_in(0.0, 1.0, open_low=True), default=1.0,
                       help="nucleus sampling threshold in (0, 1] (1 = off)")
        g.add_argument("--min-p", type=_float_in(0.0, 1.0), default=0.0,
                       help="drop tokens less likely than min-p x the most likely one (0 = off)")
        g.add_argument("--repeat-penalty", type=_float_in(0.0, None, open_low=True), default=1.0,
                       help="penalise the last --repeat-last-n tokens (1 = off; llama.cpp uses 1.1)")
        g.add_argument("--repeat-last-n", type=_int_at_least(0), default=64, help="window of the repeat penalty")
        g.add_argument("-s", "--seed", type=_int_at_least(0), default=0, help="sampling seed (default 0)")
        g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when this text appears (repeatable; not included in the output)")
        g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
        p.add_argument("--max-temp", type=_float_in(20.0, 120.0), default=None, metavar="C",
                       help="hold the SoC below C degrees: fewer threads, then paced tokens, near it")

    r = sub.add_parser("run", help="generate text with a decoder plan")
    common(r)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text (special tokens in it are honoured); '-' reads stdin")
    src.add_argument("-f", "--file", help="read the prompt from this UTF-8 file")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--system", default=None, help="with --chat: the system prompt (default: the template's)")
    sampling(r, 64)
    fixed(r)
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--no-stream", action="store_true", help="print the text at the end")
    r.add_argument("--validate", action="store_true", help="also run every op's numpy twin and report the "
                   "largest difference (slow)")
    r.add_argument("--profile", action="store_true", help="time every op and print the time per op type")
    r.add_argument("--trace", default=None, metavar="FILE",
                   help="write a Chrome trace (Trace Event Format JSON, for ui.perfetto.dev or Chrome DevTools' "
                   "Performance panel): "
                   "compute per group (and per op with --profile), the reader's group reads, prefill and tokens")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("chat", help="an interactive multi-turn chat with a decoder plan (/reset, /exit)")
    common(c)
    c.add_argument("--system", default=None, help="the system prompt (default: the template's)")
    sampling(c, 256)
    fixed(c)
    c.set_defaults(fn=cmd_chat)

    v = sub.add_parser("serve", help="an OpenAI-compatible HTTP API over one or more plans (the serve extra)")
    v.add_argument("plans", nargs="+", help="plan files or artifact folders")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    v.add_argument("--queue", type=_int_at_least(0), default=8,
                   help="requests that may wait per plan while one runs; more get 503 (default 8)")
    v.add_argument("--max-temp", type=_float_in(20.0, 120.0), default=None, metavar="C",
                   help="hold the SoC below C degrees (see run --help)")
    threads(v)
    fixed(v)
    v.set_defaults(fn=cmd_serve)

    e = sub.add_parser("embed", help="sentence embeddings with an encoder plan")
    common(e)
    e.add_argument("--file", required=True, help="UTF-8 text, one sentence per line")
    e.add_argument("--out", required=True, help="output .npy (float32 [n, dim], L2-normalised)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_embed)

    f = sub.add_parser("infer", help="run a plan compiled from an ONNX graph on named inputs")
    common(f)
    f.add_argument("--inputs", required=True, help=".npz with one array per graph input, named like the input")
    f.add_argument("--out", required=True, help="output .npz: every graph output, by name")
    f.add_argument("--json", action="store_true")
    f.set_defaults(fn=cmd_infer)

    b = sub.add_parser("bench", help="run each plan on the same prompt (one process each) and compare")
    b.add_argument("plans", nargs="+", help="plan files, artifact folders or sweep folders (every plan below)")
    b.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. Once upon a time,",
                   help="prompt for decoder plans")
    b.add_argument("-n", "--max-tokens", type=_int_at_least(1), default=32)
    b.add_argument("--repeat", type=_int_at_least(1), default=3, help="runs per plan; medians are reported")
    b.add_argument("-t", "--threads", type=_threads, default=None, help="as for run (default: each plan's target)")
    fixed(b)
    b.add_argument("-o", "--output", choices=["text", "md", "csv", "jsonl"], default="text",
                   help="table format (default text)")
    b.add_argument("--json", action="store_true", help="one JSON object: every row and the summary")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("inspect", help="show a plan's groups, arena layout and predicted cost")
    i.add_argument("plan")
    i.add_argument("--verify", action="store_true", help="also hash the weights file against the plan")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("status", help="CPU, memory, thermal and throttling; a recommended strategy and budget")
    s.add_argument("--plan", default=None, help="a plan, to size the recommendation for its model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    k = sub.add_parser("calibrate", help="measure storage, memory and kernel speeds; write a target profile YAML "
                       "(edge-rt-compile target=NAME target.profile=FILE)",
                       description="Measure the storage FOLDER is on (cold and page-cached reads), memory bandwidth "
                       "and the Linear / attention kernels of every weight format at the threads the executor will "
                       "use (-t; default: the cores this process may use), and write a target profile for "
                       "`edge-rt-compile target=NAME target.profile=FILE`.")
    k.add_argument("folder", nargs="?", default=None, help="the artifact folder (or one on the same storage) to "
                   "measure (default: the only artifacts/<model> folder, else .)")
    k.add_argument("--out", default=None, help="profile to write (default FOLDER/target-profile.yaml)")
    threads(k)
    k.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds; for tests)")
    k.set_defaults(fn=cmd_calibrate)
    return ap


def main(argv: list[str] | None = None) -> None:
    """The command line (`argv` None: this process's own arguments; a list: called from Python, e.g. tests)."""
    if argv is None:
        import atexit
        import gc

        # At exit, skip the interpreter's last garbage collections over numba's object graph: they took 0.7-1 s
        # of a 3 s `run` on a loaded 2-core machine and 0.1 s with this. Everything edge-rt writes is closed
        # (atomically renamed) before main returns; only cyclic garbage is left to the OS, as at any exit.
        atexit.register(gc.freeze)
    try:
        args = build_parser().parse_args(argv)
        code = args.fn(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(code)


