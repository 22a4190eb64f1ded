"""`edge-rt-report`: HTML pages of plans and sweeps, rendered with jinja2 from `templates/`.

Pages are self-contained (inline CSS and SVG; no scripts, no network resources), so they open from a copied
folder or a CI artifact. One page per plan (`<plan stem>.html`: the arena as a lifetime x offset picture, the
weights file's byte ranges per group, the budget, the predicted cost) and one `summary.html` per sweep or folder
(the table of plans with links to their pages, predicted tokens/s against budget per strategy). Results of
`edge-rt-exec bench --json` (`--bench FILE`) add measured against predicted to each page and measured tokens/s to
the chart. Plans are read with the executor's bounded, verified reader (`edge_rt_exec.plan.load_plan`).

Examples:
  edge-rt-report artifacts/synthetic-gpt2                     # a page beside each plan, summary.html in the folder
  edge-rt-report artifacts/.sweeps/2026-01-01_12-00-00 --bench bench.json --out site/
  edge-rt-compile model=synthetic_gpt2 budget=16M report=true   # the page written with the plan
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from edge_rt_exec.bench import find_plans
from edge_rt_exec.errors import UserError
from edge_rt_exec.plan import PLAN_SUFFIX, Plan, atomic_write, load_plan, parse_json, read_regular

from . import report_svg as svg
from .sizes import fmt_bytes

PROG = "edge-rt-report"
TEMPLATES = Path(__file__).resolve().parent / "templates"
SUMMARY = "summary.html"
#: Largest bench result file read (a row is ~1 KB).
MAX_BENCH_BYTES = 64 << 20
#: Bench row fields used here, and their types (`edge_rt_exec/bench.py` `_row`).
_BENCH_NUMBERS = ("budget_mb", "planned_peak_mb", "plan_rss_mb", "baseline_rss_mb", "peak_rss_mb", "prefill_ms",
                  "decode_tok_s", "predicted_ms_per_token", "measured_ms_per_token", "prediction_error", "read_s",
                  "wait_s", "compute_s", "first_token_s", "ms_per_sentence")


def page_path(plan_path: Path, out: Path | None = None) -> Path:
    """Where a plan's page goes: beside the plan, or in `out/<artifact folder>/`."""
    name = plan_path.name.removesuffix(PLAN_SUFFIX) + ".html"
    return out / plan_path.parent.name / name if out is not None else plan_path.with_name(name)


def _env() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["bytes"] = lambda n: fmt_bytes(int(n)) if n is not None else "-"
    env.filters["num"] = _num
    return env


def _num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def _href(target: Path, start: Path) -> str:
    """A relative link from a page in folder `start` to `target` (never an absolute or network URL)."""
    return quote(Path(os.path.relpath(target.absolute(), start.absolute())).as_posix())


# ---- one plan ------------------------------------------------------------------------------------------------

#: Plan fields the report reads that the executor's plan check leaves open (it runs without them), and their types.
_FIELDS: dict[tuple[str, ...], Any] = {
    ("model", "name"): str, ("model", "family"): str, ("model", "kind"): str,
    ("predicted", "decode_ms_per_token"): (int, float), ("predicted", "prefill_ms"): (int, float),
    ("predicted", "prefill_tokens"): int, ("predicted", "read_bytes_per_token"): int, ("predicted", "peak_bytes"): int,
    ("arena", "activations", "lower_bound"): int, ("arena", "activations", "algorithm"): str}


def check_fields(plan: Plan) -> None:
    """One `UserError` line for a plan (hand-edited, or from another version) missing a field the page shows."""
    for path, typ in _FIELDS.items():
        v: Any = getattr(plan, path[0])
        for k in path[1:]:
            v = v.get(k) if isinstance(v, dict) else None
        if not isinstance(v, typ) or isinstance(v, bool) or (not isinstance(v, str) and v < 0):
            raise UserError(f"{plan.path or 'plan'}: {'.'.join(path)} = {v!r} is missing or not a "
                            f"{'text' if typ is str else 'number >= 0'}; the plan is corrupt or from another "
                            "edge-rt version, recompile it")


def plan_row(plan: Plan) -> dict[str, Any]:
    """The facts of a plan the summary table and the page header show."""
    check_fields(plan)
    a, pr = plan.arena, plan.predicted
    ms = float(pr["decode_ms_per_token"])
    return {
        "model": plan.model["name"], "strategy": plan.strategy, "requested": plan.requested_strategy,
        "budget": plan.budget, "mode": plan.weights_mode, "groups": len(plan.groups), "quant": plan.quant,
        "peak": pr["peak_bytes"], "arena": a["size"],
        "act_ratio": a["activations"]["size"] / a["activations"]["lower_bound"] if a["activations"]["lower_bound"]
        else 1.0,
        "decode_ms": ms, "tok_s": 1e3 / ms if ms > 0 else None, "prefill_ms": float(pr["prefill_ms"]),
        "prefill_tokens": pr["prefill_tokens"], "read_per_token": pr["read_bytes_per_token"],
        "max_context": plan.max_context,
        "name": plan.path.name.removesuffix(PLAN_SUFFIX) if plan.path else "plan",
    }


def group_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per group: its units, ops, weights and the byte range it occupies in the weights file (for a
    streamed group the range read into its slot; for a resident one the span of the weights it maps)."""
    rows = []
    for g in plan.groups:
        names = {w for op in plan.schedule[g.op_start:g.op_end] for _, w in op.weight_inputs()}
        ws = [plan.weights[n] for n in sorted(names) if n in plan.weights]
        if g.slot is not None:  # what one read covers (a tiled LM head reads a row range of a shared table)
            lo, hi = g.byte_start, g.byte_end
            how = f"streamed into slot {g.slot}" if len(plan.arena["slots"]) == 1 else \
                "streamed (prefetched into the free slot)"
            nbytes = hi - lo
        elif ws:
            lo, hi, how = min(w.offset for w in ws), max(w.offset + w.nbytes for w in ws), "resident (mapped)"
            nbytes = sum(w.nbytes for w in ws)
        else:
            lo, hi, how, nbytes = 0, 0, "no weights", 0
        rows.append({"index": g.index, "units": ", ".join(g.units), "ops": f"{g.op_start}-{g.op_end - 1}",
                     "n_weights": len(ws), "weight_bytes": nbytes, "start": lo, "end": hi,
                     "how": how, "flops": g.flops_per_token, "checksum": g.checksum or ""})
    return rows


def render_plan(plan: Plan, bench: dict[str, Any] | None = None, summary_href: str | None = None) -> str:
    """The HTML page of one plan (with measured figures when a bench row is given)."""
    a = plan.arena
    acts = a["activations"]
    zoom = None
    if acts["size"] and acts["size"] < a["size"] * 0.6:  # the activations are a thin band at full scale
        zoom = svg.arena_picture(plan, acts["offset"], acts["offset"] + acts["size"], height=360)
    regions = [{"name": f"slot {i}", "offset": s["offset"], "nbytes": s["nbytes"]} for i, s in enumerate(a["slots"])]
    regions += [{"name": "state (KV cache, constants)", "offset": a["state"]["offset"], "nbytes": a["state"]["size"]},
                {"name": f"activations ({acts['algorithm']}; lower bound {fmt_bytes(acts['lower_bound'])})",
                 "offset": acts["offset"], "nbytes": acts["size"]}]
    row = plan_row(plan)  # first: checks the fields the drawings read
    return _env().get_template("plan.html.j2").render(
        plan=plan, row=row, groups=group_rows(plan), regions=regions, bench=_bench_view(plan, bench),
        arena=svg.arena_picture(plan, 0, max(a["size"], 1)), zoom=zoom, weights=svg.weights_picture(plan),
        budget=svg.budget_picture(plan), summary_href=summary_href,
        notes=[str(n) for n in plan.predicted.get("notes") or [] if isinstance(plan.predicted.get("notes"), list)])


def _bench_view(plan: Plan, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Measured against predicted, for the page: [(what, predicted, measured, unit)] and bar widths."""
    if b is None:
        return None
    r = plan_row(plan)
    rows = []
    if b.get("measured_ms_per_token") is not None:
        rows.append(("decode ms/token", r["decode_ms"], b["measured_ms_per_token"]))
        rows.append(("decode tokens/s", r["tok_s"], b.get("decode_tok_s")))
    if b.get("prefill_ms") is not None:
        rows.append((f"prefill ms (predicted for {r['prefill_tokens']} tokens, measured on the bench prompt)",
                     r["prefill_ms"], b["prefill_ms"]))
    if b.get("ms_per_sentence") is not None:
        rows.append(("ms per sentence", None, b["ms_per_sentence"]))
    rows.append(("memory above the runtime baseline, MB", r["peak"] / 2**20, b.get("plan_rss_mb")))
    out = [{"what": w, "predicted": p, "measured": m,
            "error": (p - m) / m if p is not None and m else None} for w, p, m in rows]
    top = max([x for x in (r["decode_ms"], b.get("measured_ms_per_token")) if x], default=1.0)
    bars = [{"label": lab, "value": v, "w": round(v / top * 560, 2), "fill": f}
            for lab, v, f in (("predicted", r["decode_ms"], "#bab0ac"),
                              ("measured", b.get("measured_ms_per_token"), "#4e79a7")) if v]
    rss = b.get("plan_rss_mb")
    return {"rows": out, "bars": bars if len(bars) == 2 else [], "plan": b.get("plan", ""),
            "within_budget": None if rss is None else rss <= plan.budget / 2**20,
            "times": {k: b.get(k) for k in ("read_s", "wait_s", "compute_s", "first_token_s")}}


def write_plan_page(plan_path: Path, bench_rows: list[dict[str, Any]] | None = None, out: Path | None = None,
                    summary: Path | None = None) -> Path:
    """Read a plan (bounded and verified) and write its page atomically; returns the page's path."""
    plan = load_plan(plan_path)
    page = page_path(plan.path or Path(plan_path), out)
    href = _href(summary, page.parent) if summary is not None else None
    _write(page, render_plan(plan, match_bench(plan, bench_rows or []), href))
    return page


def _write(path: Path, text: str) -> None:
    """Atomically (a failure leaves no partial page); a full or read-only disk is one `UserError` line."""
    try:
        atomic_write(path, text)
    except OSError as e:
        raise UserError(f"{path}: cannot write the report ({e.strerror or e}); free space or pass a writable "
                        "folder (edge-rt-report --out DIR)") from None


# ---- bench results -------------------------------------------------------------------------------------------

def load_bench(path: Path) -> list[dict[str, Any]]:
    """The rows of `edge-rt-exec bench --json` output (an object with "rows"; a bare list of rows is taken too),
    each checked: a plan path, and numbers where numbers belong (NaN and missing become None)."""
    raw = parse_json(read_regular(path, MAX_BENCH_BYTES, "bench results"), str(path), "bench results")
    rows = raw.get("rows") if isinstance(raw, dict) else raw
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: no bench rows (expected the JSON object `edge-rt-exec bench --json` prints, with "
                        "a non-empty \"rows\" list); rerun the bench with --json > FILE")
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("plan"), str) or not r["plan"]:
            raise UserError(f"{path}: bench row {i} has no \"plan\" path; pass the output of `edge-rt-exec bench "
                            "--json`")
        row = dict(r)
        for k in _BENCH_NUMBERS:
            v = r.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UserError(f"{path}: bench row {i} ({r['plan']}): {k} = {v!r} is not a number; pass the "
                                "output of `edge-rt-exec bench --json`")
            row[k] = float(v) if v is not None and math.isfinite(v) else None
        row["strategy"] = str(r.get("strategy", "?"))
        out.append(row)
    return out


def _key(path: str | Path) -> tuple[str, ...]:
    """Bench rows name plans relative to the bench's working folder: match on the artifact folder and file name."""
    return Path(path).parts[-2:]


def match_bench(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The bench row of this plan, if any (the last one, when a plan was benched twice)."""
    found = [r for r in rows if plan.path is not None and _key(r["plan"]) == _key(plan.path)]
    return found[-1] if found else None


# ---- a sweep or folder of plans ------------------------------------------------------------------------------

def _chart(entries: list[dict[str, Any]], bench_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s against budget, one line per model and strategy: predicted (dashed) for every plan, measured
    (solid) for the benched ones."""
    models = {e["row"]["model"] for e in entries if e.get("row")}
    series: dict[tuple[str, str, bool], list[tuple[float, float, str]]] = {}
    for e in entries:
        r = e.get("row")
        if r and r["tok_s"]:
            series.setdefault((r["model"], r["strategy"], True), []).append(
                (r["budget"], r["tok_s"], f"{r['name']}: predicted {r['tok_s']:.1f} tok/s"))
        b = e.get("bench")
        if r and b and (b.get("decode_tok_s") or 0) > 0:
            series.setdefault((r["model"], r["strategy"], False), []).append(
                (r["budget"], b["decode_tok_s"], f"{r['name']}: measured {b['decode_tok_s']:.1f} tok/s"))
    known = {(e["row"]["model"], e["row"]["strategy"]) for e in entries if e.get("row")}
    for b in bench_rows:  # benched plans this summary does not list: still on the chart
        if (b.get("decode_tok_s") or 0) > 0 and (b.get("budget_mb") or 0) > 0 and \
                (b.get("model"), b["strategy"]) not in known:
            series.setdefault((str(b.get("model", "?")), b["strategy"], False), []).append(
                (b["budget_mb"] * 2**20, b["decode_tok_s"], f"{b['plan']}: measured {b['decode_tok_s']:.1f} tok/s"))
            models.add(str(b.get("model", "?")))
    out = []
    for i, ((model, strategy, predicted), pts) in enumerate(sorted(series.items())):
        label = (f"{model} " if len(models) > 1 else "") + strategy + (" (predicted)" if predicted else " (measured)")
        color = svg.STRATEGY_COLORS.get(strategy, svg.GROUP_COLORS[i % len(svg.GROUP_COLORS)])
        out.append({"label": label, "color": color, "dashed": predicted, "points": pts})
    return svg.line_chart(out)


def render_summary(entries: list[dict[str, Any]], bench_rows: list[dict[str, Any]], title: str) -> str:
    """`entries`: [{"row": plan_row or None, "href": link to the page or plan, "bench": row or None,
    "error": text or None, "label": what failed}]."""
    return _env().get_template("summary.html.j2").render(
        title=title, entries=entries, chart=_chart(entries, bench_rows), benched=any(e.get("bench") for e in entries),
        empty=dict.fromkeys(_BENCH_NUMBERS), models=len({e["row"]["model"] for e in entries if e.get("row")}))


def write_report(plan_paths: list[Path], summary: Path, bench_rows: list[dict[str, Any]] | None = None,
                 out: Path | None = None, errors: list[dict[str, Any]] | None = None,
                 pages: bool = True, title: str = "edge-rt plans") -> list[Path]:
    """Pages of `plan_paths` (when `pages`; in `out`, or beside the plans) and `summary` linking them (to the plan
    file when it has no page); `errors` are failed compiles of a sweep ({"label", "error"}). Every plan is read and
    every page rendered before the first file is written: bad input writes nothing. Returns the files written."""
    bench_rows = bench_rows or []
    docs: list[tuple[Path, str]] = []
    entries: list[dict[str, Any]] = []
    for plan in [load_plan(p) for p in plan_paths]:
        pp = plan.path or Path(plan.model["name"])
        page = page_path(pp, out)
        bench = match_bench(plan, bench_rows)
        if pages:
            docs.append((page, render_plan(plan, bench, _href(summary, page.parent))))
        # link the page when it is this plan's (written now, or since the plan was), else the plan itself
        fresh = pages or (page.exists() and pp.exists() and page.stat().st_mtime >= pp.stat().st_mtime)
        entries.append({"row": plan_row(plan), "href": _href(page if fresh else pp, summary.parent),
                        "bench": bench, "error": None})
    entries += [{"row": None, "href": None, "bench": None, "error": str(e["error"]), "label": e["label"]}
                for e in errors or []]
    docs.append((summary, render_summary(entries, bench_rows, title)))
    for path, text in docs:
        _write(path, text)
    return [path for path, _ in docs]


def _error_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"label": f"strategy={r.get('strategy', '?')} budget={r.get('budget', '?')}", "error": str(r["error"])}
            for r in rows if "error" in r]


def sweep_report(sweep: Path, rows: list[dict[str, Any]]) -> Path:
    """`summary.html` of a finished sweep (rows of its summary.json): links to the pages its jobs wrote
    (`report=true`), else to the plans."""
    plans = [_sweep_plan(sweep, r["plan"]) for r in rows if "error" not in r]
    return write_report(plans, sweep / SUMMARY, errors=_error_rows(rows), pages=False,
                        title=f"sweep {sweep.name}")[-1]


def _sweep_rows(folder: Path) -> list[dict[str, Any]] | None:
    """The rows of a sweep folder's summary.json (None when the folder is not a sweep folder)."""
    f = folder / "summary.json"
    if not f.is_file():
        return None
    rows = parse_json(read_regular(f, MAX_BENCH_BYTES, "sweep summary"), str(f), "sweep summary")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and (isinstance(r.get("plan"), str) or "error" in r)
                                             for r in rows):
        raise UserError(f"{f}: not a sweep summary (a list of rows with \"plan\" or \"error\"); pass a sweep folder "
                        "written by edge-rt-compile -m, or plan files")
    return rows


def _sweep_plan(sweep: Path, name: str) -> Path:
    """A plan of a sweep's summary.json: named as the compile saw it (maybe relative to the folder it ran in);
    else found where sweeps put plans, `<out_dir>/<artifact folder>/` with the sweep in `<out_dir>/.sweeps/`."""
    p = Path(name)
    if p.is_absolute() or p.exists() or len(p.parts) < 2:
        return p
    return sweep.absolute().parent.parent / p.parts[-2] / p.parts[-1]


# ---- the command ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other user error
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="HTML pages of plans (arena, groups, predicted cost) and a summary.html "
                 "across them; self-contained (inline SVG, no network).",
                 epilog="examples:" + (__doc__ or "Examples:").split("Examples:")[1],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="plan files, artifact folders (every plan below) or sweep folders (the plans of their "
                         "summary.json)")
    ap.add_argument("--bench", type=Path, default=None, metavar="FILE",
                    help="output of `edge-rt-exec bench --json`: measured figures on each page and in the summary")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="write the pages to DIR/<artifact folder>/ and DIR/summary.html (default: each page "
                         "beside its plan, summary.html in the first folder given, or beside the first plan)")
    return ap


def run(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    bench = load_bench(args.bench) if args.bench is not None else []
    plans: list[Path] = []
    errors: list[dict[str, Any]] = []
    for p in map(Path, args.paths):
        rows = _sweep_rows(p) if p.is_dir() else None
        if rows is None:
            plans += find_plans([str(p)])
            continue
        plans += [_sweep_plan(p, r["plan"]) for r in rows if "error" not in r]
        errors += _error_rows(rows)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: a file, not a folder; pass a folder (it is created when missing)")
    first = Path(args.paths[0])
    home = args.out if args.out is not None else first if first.is_dir() else first.parent
    return write_report(plans, home / SUMMARY, bench, args.out, errors, title=f"edge-rt plans: {first}")


def main(argv: list[str] | None = None) -> None:
    """The `edge-rt-report` entry point: each file written is printed as `report: PATH`; bad input is one line on
    stderr and exit 2."""
    try:
        for f in run(argv):
            print(f"report: {f}")
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
