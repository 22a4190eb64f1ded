"""Run the executor on the host (x86-64) and under aarch64 emulation, and require the same results.

    python ci/aarch64/compare.py run   PLAN --prompt TEXT [--max-tokens 16]
    python ci/aarch64/compare.py embed PLAN --sentences FILE [--atol 1e-5]

`run`   runs ``python -m edge_rt_exec run PLAN --prompt TEXT --max-tokens N --temperature 0 --json`` on both
        sides and requires the ``tokens`` lists of the printed JSON objects to be identical.
`embed` runs ``python -m edge_rt_exec embed PLAN --file FILE --out OUT.npy`` on both sides and requires the
        same shape and max |host - aarch64| <= --atol (default 1e-5), with no NaN or inf.

The host side is this interpreter (``sys.executable -m edge_rt_exec``) with the repository root first on
PYTHONPATH; the aarch64 side is ``ci/aarch64/run.sh python -m edge_rt_exec`` (run ci/aarch64/setup.sh
first). Both prefixes can be replaced (--host-cmd, --aarch64-cmd), e.g. by a fake executor in tests.
The two sides run one after the other, so that neither one's timing includes the other's load.

Prints the elapsed time of each side, then one verdict line. Exit status: 0 same results; 1 results
differ (the line says where); 2 a side failed, timed out or printed something unreadable, or bad usage.
--report FILE also writes the verdict, the timings and the compared values as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
RUN_SH = os.path.join(HERE, "run.sh")

EXIT_OK, EXIT_MISMATCH, EXIT_FAILED = 0, 1, 2


class CompareFailure(Exception):
    """A side could not produce a result to compare (exit status 2)."""


class Mismatch(Exception):
    """Both sides produced results and they differ (exit status 1)."""


@dataclass
class SideResult:
    """What one side's run produced."""

    name: str  # "host" or "aarch64"
    argv: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    stdout: str = field(default="", repr=False)
    stderr: str = field(default="", repr=False)


def default_host_cmd() -> list[str]:
    return [sys.executable, "-m", "edge_rt_exec"]


def default_aarch64_cmd() -> list[str]:
    return [RUN_SH, "python", "-m", "edge_rt_exec"]


def _host_env() -> dict[str, str]:
    """The host side imports the working tree, as run.sh makes the aarch64 side do."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def run_side(name: str, prefix: list[str], args: list[str], timeout: float, env: dict[str, str] | None) -> SideResult:
    """Run prefix + args, timing it; raise CompareFailure unless it exits 0."""
    res = SideResult(name=name, argv=prefix + args)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(res.argv, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        res.seconds = time.perf_counter() - t0
        res.stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CompareFailure(f"{name} side timed out after {timeout:g} s: {shlex.join(res.argv)}") from None
    except OSError as e:
        raise CompareFailure(f"{name} side could not start ({e}): {shlex.join(res.argv)}") from None
    res.seconds = time.perf_counter() - t0
    res.returncode, res.stdout, res.stderr = proc.returncode, proc.stdout, proc.stderr
    print(f"{name}: {res.seconds:.2f} s (exit {res.returncode})", flush=True)
    if proc.returncode != 0:
        _echo_stderr(res)
        last = (proc.stderr.strip().splitlines() or ["no output on stderr"])[-1].strip()
        raise CompareFailure(f"{name} side exited {proc.returncode} after {res.seconds:.1f} s: {last}")
    return res


def _echo_stderr(res: SideResult, lines: int = 30) -> None:
    tail = res.stderr.rstrip().splitlines()[-lines:]
    if tail:
        sys.stderr.write(f"--- last {len(tail)} lines of the {res.name} side's stderr ---\n")
        sys.stderr.write("\n".join(tail) + "\n")


def parse_tokens(res: SideResult) -> list[int]:
    """The ``tokens`` list of the JSON object the executor printed (the whole stdout, else its last
    line that parses as a JSON object: a stray log line must not break the comparison)."""
    text = res.stdout.strip()
    candidates = [text] + [ln.strip() for ln in reversed(text.splitlines()) if ln.strip().startswith("{")]
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except ValueError:
            continue
        if isinstance(obj, dict):
            tokens = obj.get("tokens")
            if isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                return tokens
            raise CompareFailure(f"{res.name} side printed JSON whose 'tokens' is not a list of integers: "
                                 f"{str(tokens)[:120]}")
    _echo_stderr(res)
    first = text.splitlines()[0][:120] if text else "(nothing)"
    raise CompareFailure(f"{res.name} side printed no JSON object with 'tokens' on stdout; it printed: {first}")


def compare_tokens(host: list[int], arm: list[int]) -> str:
    """Return a summary if identical, else raise Mismatch naming the first difference."""
    for i, (h, a) in enumerate(zip(host, arm)):
        if h != a:
            raise Mismatch(f"tokens differ at position {i}: host {h}, aarch64 {a} "
                           f"(host {host[max(0, i - 2):i + 3]}, aarch64 {arm[max(0, i - 2):i + 3]} "
                           f"from position {max(0, i - 2)})")
    if len(host) != len(arm):
        raise Mismatch(f"host produced {len(host)} tokens, aarch64 {len(arm)}; "
                       f"the first {min(len(host), len(arm))} agree")
    if not host:
        raise CompareFailure("both sides produced 0 tokens: nothing was compared")
    return f"{len(host)} tokens identical"


def compare_embeddings(host_path: str, arm_path: str, atol: float) -> tuple[str, dict]:
    """Return a summary if shapes match and max |diff| <= atol, else raise Mismatch."""
    try:
        import numpy as np
    except ImportError:
        raise CompareFailure("numpy is needed on the host to compare embeddings") from None
    arrays = {}
    for name, path in (("host", host_path), ("aarch64", arm_path)):
        if not os.path.exists(path):
            raise CompareFailure(f"{name} side exited 0 but wrote no {path}")
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same failure
            raise CompareFailure(f"{name} side wrote an unreadable {path}: {e}") from None
    h, a = arrays["host"], arrays["aarch64"]
    details = {"shape_host": list(h.shape), "shape_aarch64": list(a.shape),
               "dtype_host": str(h.dtype), "dtype_aarch64": str(a.dtype)}
    if h.shape != a.shape:
        raise Mismatch(f"embedding shapes differ: host {h.shape}, aarch64 {a.shape}")
    if h.size == 0:
        raise CompareFailure(f"both sides wrote empty embeddings {h.shape}: nothing was compared")
    for name, arr in arrays.items():
        if not np.issubdtype(arr.dtype, np.floating):
            raise CompareFailure(f"{name} side wrote {arr.dtype} embeddings; expected floating point")
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise Mismatch(f"{name} embeddings have {int(bad.sum())} non-finite values, first at {list(idx)}")
    diff = np.abs(h.astype(np.float64) - a.astype(np.float64))
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    max_diff = float(diff[worst])
    details.update(max_abs_diff=max_diff, worst_index=list(worst), atol=atol)
    if not max_diff <= atol:
        raise Mismatch(f"max |host - aarch64| = {max_diff:.3g} at {list(worst)} > {atol:g} "
                       f"(host {float(h[worst]):.8g}, aarch64 {float(a[worst]):.8g}; shape {h.shape})")
    return f"embeddings {h.shape} agree: max |host - aarch64| = {max_diff:.3g} <= {atol:g}", details


def _write_report(path: str, report: dict) -> None:
    """Atomically: a temporary file in the same folder, fsync, replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".compare-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("plan", help="the compiled plan (made on x86-64)")
    common.add_argument("--host-cmd", type=shlex.split, default=None,
                        help="command prefix for the host side (default: this python -m edge_rt_exec)")
    common.add_argument("--aarch64-cmd", type=shlex.split, default=None,
                        help="command prefix for the aarch64 side (default: ci/aarch64/run.sh python -m "
                             "edge_rt_exec)")
    common.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per side (default 3600)")
    common.add_argument("--report", help="also write the verdict and timings as JSON to this file")
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", parents=[common], help="compare greedy tokens")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-tokens", type=int, default=16)
    e = sub.add_parser("embed", parents=[common], help="compare sentence embeddings")
    e.add_argument("--sentences", "--file", dest="sentences", required=True,
                   help="text file, one sentence per line")
    e.add_argument("--atol", type=float, default=1e-5, help="largest allowed |host - aarch64| (default 1e-5)")
    e.add_argument("--keep", metavar="DIR", help="write the two .npy files here and keep them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    host_cmd = args.host_cmd or default_host_cmd()
    arm_cmd = args.aarch64_cmd or default_aarch64_cmd()
    plan = os.path.abspath(args.plan)
    report: dict = {"mode": args.mode, "plan": plan}
    sides: list[SideResult] = []

    def side(name: str, prefix: list[str], cli_args: list[str]) -> SideResult:
        res = run_side(name, prefix, cli_args, args.timeout, _host_env() if name == "host" else None)
        sides.append(res)
        return res

    try:
        if not os.path.exists(plan):
            raise CompareFailure(f"no plan at {plan}")
        if args.mode == "run":
            cli = ["run", plan, "--prompt", args.prompt, "--max-tokens", str(args.max_tokens),
                   "--temperature", "0", "--json"]
            host_tokens = parse_tokens(side("host", host_cmd, cli))
            arm_tokens = parse_tokens(side("aarch64", arm_cmd, cli))
            report.update(prompt=args.prompt, tokens_host=host_tokens, tokens_aarch64=arm_tokens)
            summary = compare_tokens(host_tokens, arm_tokens)
        else:
            sentences = os.path.abspath(args.sentences)
            if not os.path.exists(sentences):
                raise CompareFailure(f"no sentences file at {sentences}")
            # The files are written by the emulated process: their folder must be a host path that the
            # sysroot does not shadow (qemu -L looks inside the sysroot first). A fresh temporary folder,
            # or the --keep folder, is never inside it.
            with tempfile.TemporaryDirectory(prefix="edge-rt-compare-") as tmp:
                out_dir = os.path.abspath(args.keep) if args.keep else tmp
                os.makedirs(out_dir, exist_ok=True)
                outs = {n: os.path.join(out_dir, f"embeddings-{n}.npy") for n in ("host", "aarch64")}
                for n in outs:
                    if os.path.exists(outs[n]):
                        os.remove(outs[n])  # never compare a stale file from an earlier run
                for name, prefix in (("host", host_cmd), ("aarch64", arm_cmd)):
                    side(name, prefix, ["embed", plan, "--file", sentences, "--out", outs[name]])
                summary, details = compare_embeddings(outs["host"], outs["aarch64"], args.atol)
                report.update(details)
    except Mismatch as e:
        verdict, code = f"MISMATCH {args.mode}: {e}", EXIT_MISMATCH
    except CompareFailure as e:
        verdict, code = f"FAIL {args.mode}: {e}", EXIT_FAILED
    else:
        verdict, code = f"OK {args.mode}: {summary}", EXIT_OK

    timings = ", ".join(f"{s.name} {s.seconds:.1f} s" for s in sides)
    line = verdict + (f" ({timings})" if timings else "")
    print(line, file=sys.stdout if code == EXIT_OK else sys.stderr, flush=True)
    if args.report:
        report.update(ok=code == EXIT_OK, exit_status=code, verdict=verdict,
                      sides={s.name: {k: v for k, v in asdict(s).items() if k not in ("stdout", "stderr")}
                             for s in sides})
        _write_report(args.report, report)
    return code


if __name__ == "__main__":
    sys.exit(main())
