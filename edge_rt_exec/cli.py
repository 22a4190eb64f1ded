"""`edge-rt-exec`: run compiled plans on the device.

  edge-rt-exec run PLAN --prompt TEXT [--chat] [--max-tokens N] [--temperature T] [--json]
  edge-rt-exec embed PLAN --file sentences.txt --out emb.npy
  edge-rt-exec infer PLAN --inputs in.npz --out out.npz       (plans compiled from an ONNX graph)
  edge-rt-exec bench PLAN [PLAN ...] [--prompt TEXT] [--json]
  edge-rt-exec inspect PLAN [--verify] [--json]
  edge-rt-exec status [--json]

PLAN is a *.plan.json file or an artifact folder holding exactly one plan.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NoReturn

from .errors import UserError

PROG = "edge-rt-exec"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other user error
        raise UserError(f"{message}; see `{self.prog} --help`")


def _warm_runtime(plan) -> None:  # noqa: ANN001
    """Load the kernels this plan calls (numba's cache) and start the thread pool, so the runtime baseline
    measured next includes them and the plan's own memory is measured apart."""
    from .engine import start_threads, warm_plan

    warm_plan(plan)
    start_threads()


def _session(args: argparse.Namespace):
    from .generate import Session, load_tokenizer
    from .memory import peak_rss
    from .plan import load_plan

    t0 = time.perf_counter()
    plan = load_plan(args.plan)
    _warm_runtime(plan)
    tok = load_tokenizer(plan) if "tokenizer" in plan.files else None  # loaded once, before the baseline
    baseline = peak_rss()
    s = Session(plan, threads=args.threads, validate=getattr(args, "validate", False), tokenizer=tok)
    return s, baseline, time.perf_counter() - t0


def cmd_run(args: argparse.Namespace) -> int:
    from .generate import memory_report

    s, baseline, load_s = _session(args)
    try:
        ids = s.encode_prompt(args.prompt, chat=args.chat)
        stream = None if (args.json or args.no_stream) else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        t0 = time.perf_counter()
        r = s.generate(ids, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, on_text=stream)
        import psutil

        # process start (as the kernel recorded it) to the first generated token
        first_token_s = r.first_token_time - psutil.Process().create_time()
        mem = memory_report(baseline)
        p = s.plan
        result = {"tokens": r.tokens, "text": r.text, "prompt_tokens": r.prompt_tokens,
                  "prefill_ms": round(r.prefill_ms, 2), "decode_tok_s": round(r.decode_tok_s, 2),
                  "decode_ms": round(r.decode_ms, 2), "stop_reason": r.stop_reason, **mem,
                  "budget_mb": round(p.budget / 2**20, 1), "within_budget": mem["plan_rss_mb"] * 2**20 <= p.budget,
                  "strategy": p.strategy, "weights_mode": p.weights_mode, "groups": len(p.groups),
                  "planned_peak_mb": round(p.predicted["peak_bytes"] / 2**20, 1),
                  "read_s": round(r.read_s, 4), "wait_s": round(r.wait_s, 4), "compute_s": round(r.compute_s, 4),
                  "load_s": round(load_s, 3), "first_token_s": round(first_token_s, 3),
                  "threads": s.engine.threads, "elapsed_s": round(time.perf_counter() - t0, 3)}
        if args.validate:
            result["validate_max_abs_err"] = s.engine.worst
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
                from .engine import describe_worst

                print(f"[validate: max |numba - numpy| per op: {describe_worst(s.engine.worst)}]", file=sys.stderr)
    finally:
        s.close()
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .generate import memory_report
    from .plan import atomic_write

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{args.file}: cannot read sentences ({e.__class__.__name__}); give a UTF-8 text file, "
                        "one sentence per line") from None
    sentences = [ln for ln in text.splitlines() if ln.strip()]
    if not sentences:
        raise UserError(f"{args.file}: no sentences (one per line expected)")
    s, baseline, _ = _session(args)
    try:
        t0 = time.perf_counter()
        emb = s.embed(sentences)
        dt = time.perf_counter() - t0
    finally:
        s.close()
    import io

    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    atomic_write(Path(args.out), buf.getvalue())
    mem = memory_report(baseline)
    info = {"sentences": len(sentences), "dim": int(emb.shape[1]), "out": str(args.out), "ms": round(dt * 1e3, 2),
            "ms_per_sentence": round(dt * 1e3 / len(sentences), 3), **mem}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {args.out} "
              f"({info['ms_per_sentence']:.2f} ms/sentence; peak RSS {mem['peak_rss_mb']:.0f} MB = baseline "
              f"{mem['baseline_rss_mb']:.0f} MB + {mem['plan_rss_mb']:.0f} MB)")
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
    atomic_write(Path(args.out), buf.getvalue())
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


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Run edge-rt plans on the device (numba kernels, streamed weights).",
                 epilog="PLAN: a *.plan.json written by edge-rt-compile, or its artifact folder if it holds one plan.")
    ap.add_argument("--version", action="version", version=f"{PROG} {__import__('edge_rt_exec').__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("plan", help="plan file or artifact folder")
        p.add_argument("--threads", type=_threads, default=None,
                       help="numba threads: a number, or 'auto' for the cores idle right now (default: the plan's "
                       "target preset, at most the cores this process may use)")

    r = sub.add_parser("run", help="generate text with a decoder plan")
    common(r)
    r.add_argument("--prompt", required=True, help="prompt text (special tokens in it are honoured)")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    r.add_argument("--seed", type=int, default=0, help="sampling seed")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--no-stream", action="store_true", help="print the text at the end")
    r.add_argument("--validate", action="store_true", help="also run every op's numpy twin and report the "
                   "largest difference (slow)")
    r.set_defaults(fn=cmd_run)

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
    b.add_argument("plans", nargs="+", help="plan files or artifact folders")
    b.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. Once upon a time,",
                   help="prompt for decoder plans")
    b.add_argument("--max-tokens", type=int, default=32)
    b.add_argument("--repeat", type=int, default=3, help="runs per plan; medians are reported")
    b.add_argument("--threads", type=_threads, default=None, help="as for run (default: each plan's target)")
    b.add_argument("--json", action="store_true")
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
    return ap


def main(argv: list[str] | None = None) -> None:
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


