"""`edge-rt-compile`: the Hydra app. `@hydra.main` is a thin wrapper around `compile_from_cfg`.

Examples:
  edge-rt-compile                                   # SmolLM2-135M for a Raspberry Pi 4 (512M, greedy_grouping)
  edge-rt-compile model=synthetic_gpt2 budget=16M strategy=sequential
  edge-rt-compile model=local model.path=/models/foo.gguf target=constrained_2gb
  edge-rt-compile -m budget=256M,512M,1G strategy=sequential,greedy_grouping,speculative_prefetch
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import atomic_write

from . import launchers
from .config import CompileConf, ModelConf, TargetConf, apply_profile, check_config, register
from .partition import STRATEGIES
from .passes.quantize import KV_DTYPES, QUANTS
from .pipeline import CompileRequest, CompileResult, ModelRequest, compile_model
from .sizes import fmt_bytes, parse_bytes

#: The Hydra config groups: `conf/` of the project, reached through the package's `conf` symlink in a checkout and
#: shipped as package data in a wheel, so the compiler works installed.
CONF_DIR = Path(__file__).resolve().parent / "conf"
ROW_FILE = "edge_rt_row.json"
_sweep_failed = False

register()
launchers.register()  # conf/hydra/launcher/*.yaml: the resolver they use, a Hydra warning silenced


def request_from_cfg(cfg: DictConfig) -> CompileRequest:
    """A `CompileRequest` from a composed config (unknown keys and bad values are one-line errors)."""
    check_config(cfg)
    t = cfg.target
    strategy = cfg.strategy.name if cfg.get("strategy") else t.strategy
    budget = parse_bytes(cfg.budget if cfg.budget is not None else t.budget, "budget")
    m = cfg.model
    model = ModelRequest(name=m.name, source=m.source, package=m.package, file=m.file,
                         path=OmegaConf.select(m, "path", throw_on_missing=False) if m.source == "local" else m.path,
                         max_context=m.max_context, synthetic=dict(m.synthetic or {}))
    if model.source == "local" and (model.path in (None, "???") or OmegaConf.is_missing(m, "path")):
        raise UserError("model=local needs model.path=PATH (an HF folder, a .gguf or an .onnx file)")
    target = {str(k): v for k, v in OmegaConf.to_container(t, resolve=True).items()}  # type: ignore[union-attr]
    target = apply_profile(target)  # target.profile=FILE (edge-rt-exec calibrate) overrides the guesses
    return CompileRequest(model=model, strategy=strategy, budget=budget, target=target,
                          max_context=cfg.max_context, max_batch_tokens=cfg.max_batch_tokens,
                          out_dir=Path(cfg.out_dir),
                          onnx_dims={str(k): int(v) for k, v in (cfg.get("onnx_dims") or {}).items()} or None,
                          quant=str(cfg.quant), kv_dtype=str(cfg.kv_dtype), act_quant=str(cfg.act_quant))


def summary_row(res: CompileResult) -> dict[str, Any]:
    """One sweep-table row for a compile result."""
    p = res.plan
    a = p.arena["activations"]
    return {
        "model": p.model["name"], "strategy": p.requested_strategy, "chosen": p.strategy,
        "weights_file": p.files["weights"],
        "budget": fmt_bytes(p.budget), "mode": p.weights_mode, "groups": len(p.groups),
        "planned_peak": fmt_bytes(p.predicted["peak_bytes"]),
        "arena_vs_lower_bound": round(a["size"] / a["lower_bound"], 3) if a["lower_bound"] else 1.0,
        "decode_ms": p.predicted["decode_ms_per_token"], "prefill_ms": p.predicted["prefill_ms"],
        "plan": str(res.plan_path),
        "weights_written": not res.weights_reused,  # a sweep writes each weights file once (tests/test_launchers.py)
    }


def compile_from_cfg(cfg: DictConfig) -> CompileResult:
    """The whole compile for one composed config (tests call this with `hydra.compose`)."""
    res = compile_model(request_from_cfg(cfg))
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return res


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """One compile per Hydra job (a sweep job records a summary row)."""
    mode = HydraConfig.get().mode
    multirun = mode is not None and mode.name == "MULTIRUN"
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        res = compile_from_cfg(cfg)
        page = _write_page(res.plan_path) if cfg.get("report") else None
    except UserError as e:
        print(f"edge-rt-compile: error: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        _write_row(out, {"error": str(e), "strategy": _choice(cfg), "budget": str(cfg.budget)})
        return
    row = summary_row(res)
    p = res.plan
    print(f"plan: {res.plan_path}")
    print(f"  {p.model['name']}: {p.strategy} ({p.weights_mode}), budget {row['budget']}, {row['groups']} groups, "
          f"planned peak {row['planned_peak']}, arena/lower bound {row['arena_vs_lower_bound']}, predicted "
          f"{row['decode_ms']:.1f} ms/token; weights {'reused' if res.weights_reused else 'written'} "
          f"({res.seconds:.1f} s)")
    for note in res.notes:
        print(f"  {note}")
    if page is not None:
        row["report"] = str(page)
        print(f"report: {page}")
    if multirun:
        _write_row(out, row)


def _write_page(plan_path: Path) -> Path:
    """`report=true`: the plan's HTML page beside it (edge_rt_compiler.report; jinja2 imported only then)."""
    from .report import write_plan_page

    return write_plan_page(plan_path)


def _choice(cfg: DictConfig) -> str:
    return cfg.strategy.name if cfg.get("strategy") else cfg.target.strategy


def _write_row(folder: Path, row: dict[str, Any]) -> None:
    atomic_write(folder / ROW_FILE, json.dumps(row))  # a half-written row would break the sweep's table


COLUMNS = [("strategy", "strategy"), ("chosen", "chosen"), ("budget", "budget"), ("mode", "weights"),
           ("groups", "groups"), ("planned_peak", "planned peak"), ("arena_vs_lower_bound", "act/lower"),
           ("decode_ms", "pred ms/tok"), ("prefill_ms", "pred prefill ms")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The sweep summary as an aligned text table."""
    header = [h for _, h in COLUMNS]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r.get("strategy", "?"), "-", r.get("budget", "?"), "error: " + r["error"][:60]] +
                        [""] * (len(COLUMNS) - 4))
        else:
            body.append([f"{r[k]:.1f}" if isinstance(r[k], float) and k.endswith("_ms") else str(r[k])
                         for k, _ in COLUMNS])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def sweep_size(overrides: list[str]) -> int | None:
    """How many jobs a multirun of these command-line overrides launches (the basic sweeper's product of every
    sweep's choices), or None when it cannot be told (a sweeper plugin's own syntax)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        n = 1
        for o in OverridesParser.create().parse_overrides(overrides):
            if o.is_sweep_override():
                n *= sum(1 for _ in o.sweep_string_iterator())
        return n
    except Exception:  # noqa: BLE001 -- only the progress line depends on it
        return None


_SWEEP_ENV = "EDGE_RT_SWEEP_PROGRESS"  # "<total> <start time>", inherited by a launcher's worker processes


class SweepSummary(Callback):
    """A multirun's progress (a line as each job starts: its number, the total, elapsed time and an estimate of
    the rest) and, at its end, one table across the sweep, also written as summary.md / summary.json / summary.html
    (the HTML table links each plan's page when its job wrote one, `report=true`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        total = sweep_size(list(config.hydra.overrides.task))
        os.environ[_SWEEP_ENV] = f"{total or 0} {time.time()}"

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        state = os.environ.get(_SWEEP_ENV, "").split()
        if len(state) != 2 or config.hydra.mode is None or config.hydra.mode.name != "MULTIRUN":
            return
        total, t0 = int(state[0]), float(state[1])
        k = int(config.hydra.job.num)
        elapsed = time.time() - t0
        eta = f", about {elapsed / k * (total - k):.0f} s left" if k and total else ""
        of = f"/{total}" if total else ""
        print(f"sweep [{k + 1}{of}] {' '.join(config.hydra.overrides.task)} ({elapsed:.0f} s elapsed{eta})",
              flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_failed
        sweep = Path(config.hydra.sweep.dir)
        rows = []
        for f in sorted(sweep.glob(f"*/{ROW_FILE}"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit()
                        else 0):
            rows.append(json.loads(f.read_text()))
        if not rows:
            return
        table = format_table(rows)
        print(f"\nsweep summary ({len(rows)} plans, {sweep}):\n{table}")
        atomic_write(sweep / "summary.md", table + "\n")
        atomic_write(sweep / "summary.json", json.dumps(rows, indent=1))
        from .report import sweep_report

        try:
            print(f"report: {sweep_report(sweep, rows)}")
        except UserError as e:  # a plan removed or rewritten since its job: the text summary stands
            print(f"edge-rt-compile: error: summary.html not written: {e}", file=sys.stderr)
        _sweep_failed = any("error" in r for r in rows)


def _precheck(argv: list[str]) -> None:
    """Catch bad overrides before Hydra turns them into multi-line errors with exit code 1."""
    groups = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in ("model", "strategy", "target")}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key in groups:
            for v in value.split(","):
                if v not in groups[key]:
                    raise UserError(f"{key}={v} is not a known {key}; choose one of {', '.join(groups[key])}")
        elif key == "budget":
            for v in value.split(","):
                if v != "null":
                    parse_bytes(v, "budget")
        elif key in ("quant", "kv_dtype"):
            known = QUANTS if key == "quant" else tuple(KV_DTYPES)
            for v in value.split(","):
                if v not in known:
                    raise UserError(f"{key}={v} is not known; choose one of {', '.join(known)}")
        elif key in ("max_context", "max_batch_tokens"):
            for v in value.split(","):
                if v != "null" and (not v.strip().isdigit() or int(v) <= 0):
                    raise UserError(f"{key}={v} must be a positive whole number of tokens, e.g. {key}=2048")
    assert set(groups["strategy"]) == set(STRATEGIES), "conf/strategy/*.yaml and STRATEGIES differ"
    launchers.check_launcher(argv)  # an unknown launcher, or one whose plugin is not installed
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    if any("," in a for a in overrides) or any(a.split("=")[0].lstrip("+~").startswith("hydra") for a in overrides):
        return  # sweeps and Hydra's own settings: composed (and checked) by Hydra per job
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as e:  # Hydra/OmegaConf report bad overrides as several exception types
        raise UserError(override_error(e)) from None
    check_config(cfg)  # unknown keys (`+foo=1`) and values out of range (`target.threads=-4`)


def override_error(e: BaseException) -> str:
    """One line for an override Hydra could not compose: OmegaConf's reason (the exception's cause: "Value 'abc' of
    type 'str' could not be converted to Integer") and, for a key that is not at the top level, where it lives."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = (lines[0] if lines else e.__class__.__name__).rstrip(".")
    cause = str(e.__cause__).splitlines()[0].strip() if e.__cause__ is not None and str(e.__cause__) else ""
    hint = cause or next((ln for ln in lines[1:] if ln.lower().startswith(("key", "value"))), "")
    key = detail.split("'")[1] if detail.startswith("Could not override '") and detail.count("'") >= 2 else None
    if key is not None:
        homes = [f"{sec}.{key}" for sec, schema in (("target", TargetConf), ("model", ModelConf))
                 if key in {f.name for f in dataclasses.fields(schema)}]
        homes = homes or difflib.get_close_matches(key, [f.name for f in dataclasses.fields(CompileConf)], 1)
        hint = f"did you mean {' or '.join(homes)}?" if homes else "no such setting"
    return f"bad override: {detail}" + (f" ({hint})" if hint else "") + "; see `edge-rt-compile --help` and conf/"


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `finally` and `except BaseException` cleanup
    (atomic_file's temporary files) runs; a BaseException, so no `except Exception` on the way swallows it."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _check_out_dirs(argv: list[str]) -> None:
    """Hydra creates `out_dir` (its run dir) before the compile starts and reports a failure as a traceback:
    an `out_dir` that is a file, or on a read-only filesystem, is caught here as one line instead."""
    values = [v for a in argv if a.split("=", 1)[0].lstrip("+") == "out_dir" for v in a.split("=", 1)[1].split(",")]
    for v in values or [str(OmegaConf.load(CONF_DIR / "config.yaml").out_dir)]:
        if "${" in v:
            continue  # an interpolation: Hydra resolves it
        p = Path(v).expanduser().absolute()
        q = p
        while not q.exists() and q != q.parent:
            q = q.parent
        if not q.is_dir():
            raise UserError(f"out_dir={v}: {q} is a file, not a folder; set out_dir= to a folder (or move the "
                            "file away)")
        if not os.access(q, os.W_OK | os.X_OK):
            ro = os.statvfs(q).f_flag & os.ST_RDONLY
            raise UserError(f"out_dir={v}: {q} is " + ("on a read-only filesystem" if ro else "not writable") +
                            "; set out_dir= to a writable folder")


def main() -> None:
    """The `edge-rt-compile` entry point: bad overrides are one line and exit 2; Ctrl-C (SIGINT) and SIGTERM are
    one line and exit 130 / 143, after the cleanups (no temporary file is left, existing artifacts untouched)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        _precheck(sys.argv[1:])
        if not any(a.startswith("-") and a not in ("-m", "--multirun") for a in sys.argv[1:]):
            _check_out_dirs(sys.argv[1:])  # not for --help, --cfg and the like, which write nothing
    except UserError as e:
        print(f"edge-rt-compile: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        hydra_main()
    except BrokenPipeError:  # `edge-rt-compile --help | head`
        sys.exit(0)
    except (KeyboardInterrupt, Terminated) as e:
        name, code = ("SIGINT", 130) if isinstance(e, KeyboardInterrupt) else ("SIGTERM", 143)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not turn this into a traceback
        print(f"edge-rt-compile: interrupted by {name}; no partial file was left and existing artifacts are "
              "untouched; run the command again to finish", file=sys.stderr)
        sys.exit(code)
    # The sweep callback is `edge_rt_compiler.app.SweepSummary`: under `python -m edge_rt_compiler.app` that module
    # is a second copy of this one (this one is `__main__`), so its flag is read there too.
    if _sweep_failed or getattr(sys.modules.get("edge_rt_compiler.app"), "_sweep_failed", False):
        sys.exit(2)


if __name__ == "__main__":
    main()
