"""The HTML report: a 4-plan sweep's summary.html and plan pages (arena drawn to scale, groups, predicted cost,
self-contained), merged bench results, `report=true`, and bad input to `edge-rt-report`."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edge_rt_exec.bench import _row
from edge_rt_exec.plan import PLAN_SUFFIX, load_plan

MiB = 1 << 20


def run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


class Elements(HTMLParser):
    """Every start tag as (tag, attrs), with the innermost open <svg>'s attributes attached to its children."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple[str, dict, dict | None]] = []
        self.svg: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.svg = a
        self.items.append((tag, a, self.svg))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.svg = None


def elements(html: str) -> list[tuple[str, dict, dict | None]]:
    p = Elements()
    p.feed(html)
    return p.items


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`edge-rt-compile -m budget=12M,64M strategy=sequential,greedy_grouping report=true`: 4 plans, their pages
    and the sweep's summary.html."""
    tmp = tmp_path_factory.mktemp("report")
    r = run("edge_rt_compiler.app", ["-m", "model=synthetic_gpt2", "budget=12M,64M",
                                     "strategy=sequential,greedy_grouping", "report=true", "out_dir=art"], tmp)
    assert r.returncode == 0, r.stderr
    plans = [Path(ln.split("plan: ", 1)[1]) for ln in r.stdout.splitlines() if ln.startswith("plan: ")]
    reports = [Path(ln.split("report: ", 1)[1]) for ln in r.stdout.splitlines() if ln.startswith("report: ")]
    assert len(plans) == 4 and len(reports) == 5, r.stdout
    return {"tmp": tmp, "plans": [tmp / p for p in plans], "reports": [tmp / p for p in reports],
            "sweep": next((tmp / "art" / ".sweeps").iterdir())}


def page_of(plan: Path) -> Path:
    return plan.with_name(plan.name.removesuffix(PLAN_SUFFIX) + ".html")


def test_sweep_writes_summary_html_beside_summary_md_linking_every_page(sweep):
    folder = sweep["sweep"]
    assert (folder / "summary.md").exists() and (folder / "summary.html") in sweep["reports"]
    html = (folder / "summary.html").read_text()
    links = [a["href"] for tag, a, _ in elements(html) if tag == "a"]
    assert sorted((folder / h).resolve() for h in links) == sorted(page_of(p).resolve() for p in sweep["plans"])
    for p in sweep["plans"]:
        assert page_of(p) in sweep["reports"] and page_of(p).is_file()
        assert p.name.removesuffix(PLAN_SUFFIX) in html
    assert html.count('class="series"') == 2  # predicted tokens/s against budget: one line per strategy


def test_arena_rectangles_are_the_plans_buffers_to_scale(sweep):
    checked = 0
    for p in sweep["plans"]:
        plan = load_plan(p)
        items = elements(page_of(p).read_text())
        svgs = [a for tag, a, _ in items if tag == "svg" and a.get("class") == "arena"]
        assert svgs, "no arena picture"
        n_ops = len(plan.schedule)
        acts = plan.arena["activations"]
        for pic in svgs:
            base, end = int(pic["data-base"]), int(pic["data-end"])
            top, left = float(pic["data-top"]), float(pic["data-left"])
            plot_w, plot_h = float(pic["data-plot-w"]), float(pic["data-plot-h"])
            assert (base, end) in ((0, plan.arena["size"]), (acts["offset"], acts["offset"] + acts["size"]))
            scale = plot_h / (end - base)
            assert float(pic["data-scale"]) == pytest.approx(scale) and int(pic["data-n-ops"]) == n_ops
            rects = {a["data-name"]: a for tag, a, s in items if tag == "rect" and s is pic and "data-name" in a}
            want = {b.name for b in plan.buffers.values() if b.nbytes and b.offset < end and b.offset + b.nbytes > base}
            assert set(rects) == want
            for name in want:
                b, r = plan.buffers[name], rects[name]
                first, last = (0, n_ops - 1) if b.first < 0 else (b.first, b.last)
                assert (int(r["data-offset"]), int(r["data-nbytes"]), r["data-kind"]) == (b.offset, b.nbytes, b.kind)
                assert float(r["y"]) == pytest.approx(top + (b.offset - base) * scale, abs=0.002)
                assert float(r["height"]) == pytest.approx(b.nbytes * scale, abs=0.002)
                assert float(r["x"]) == pytest.approx(left + first * plot_w / n_ops, abs=0.002)
                assert float(r["width"]) == pytest.approx((last - first + 1) * plot_w / n_ops, abs=0.002)
                checked += 1
        kinds = {a["data-kind"] for tag, a, s in items if tag == "rect" and s is svgs[0] and "data-kind" in a}
        assert {"state", "activation"} <= kinds and ("slot" in kinds) == (plan.weights_mode == "streamed")
    assert checked > 200


def test_pages_list_groups_with_their_byte_ranges_and_predicted_cost(sweep):
    for p in sweep["plans"]:
        plan = load_plan(p)
        html = page_of(p).read_text()
        rows = [a for tag, a, _ in elements(html) if tag == "tr" and "data-group" in a]
        assert [int(a["data-group"]) for a in rows] == [g.index for g in plan.groups]
        for g in plan.groups:
            if g.slot is not None:
                assert f"[{g.byte_start}, {g.byte_end})" in html
        weights = [a for tag, a, _ in elements(html) if tag == "rect" and a.get("class") == "weight"]
        assert {a["data-name"] for a in weights} == set(plan.weights)
        assert f"{plan.predicted['decode_ms_per_token']:,.2f} ms/token" in html
        assert f"{plan.predicted['prefill_ms']:,.1f} ms for {plan.predicted['prefill_tokens']} tokens" in html
    streamed = [load_plan(p) for p in sweep["plans"] if load_plan(p).weights_mode == "streamed"]
    assert len(streamed) >= 2 and any(len(p.groups) > 1 for p in streamed)


def test_pages_are_self_contained(sweep):
    for f in sweep["reports"]:
        html = f.read_text()
        for needle in ("http", "src=", "<script", "<link", "@import", "url(", "//"):
            assert needle not in html, (f, needle)
        for tag, a, _ in elements(html):
            if tag == "a":
                assert ":" not in a["href"] and not a["href"].startswith("/")
                assert (f.parent / a["href"]).resolve().is_file()


def bench_file(plans: list[Path], cwd: Path, tmp: Path) -> tuple[Path, dict]:
    """Bench results as `edge-rt-exec bench --json` writes them: its own row builder over run records, each plan
    with its own measured speed (so a row merged into the wrong page shows)."""
    rows, speed = [], {}
    for i, p in enumerate(plans):
        tok_s = 40.0 + 7 * i
        run = {"peak_rss_mb": 300.0, "baseline_rss_mb": 290.0, "plan_rss_mb": 9.5 + i, "decode_tok_s": tok_s,
               "prefill_ms": 50.0 + i, "read_s": 0.01, "wait_s": 0.002, "compute_s": 0.3, "first_token_s": 0.4,
               "tokens": [1, 2, 3]}
        rows.append(_row(load_plan(p), str(p.relative_to(cwd)), [run]))
        speed[p.name] = tok_s
    f = tmp / "bench.json"
    f.write_text(json.dumps({"rows": rows, "summary": {"lines": []}}))
    return f, speed


def test_bench_results_are_merged_into_pages_and_the_chart(sweep, tmp_path):
    f, speed = bench_file(sweep["plans"], sweep["tmp"], tmp_path)
    out = tmp_path / "site"
    r = run("edge_rt_compiler.report", [str(sweep["sweep"]), "--bench", str(f), "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    written = [Path(ln.split("report: ", 1)[1]) for ln in r.stdout.splitlines()]
    assert len(written) == 5 and written[-1] == out / "summary.html"
    for p in sweep["plans"]:
        page = out / p.parent.name / page_of(p).name
        html = page.read_text()
        assert "Measured against predicted" in html and f"{1e3 / speed[p.name]:,.2f}" in html, page
        plan = load_plan(p)
        assert f"{plan.predicted['decode_ms_per_token']:,.2f}" in html
    summary = (out / "summary.html").read_text()
    items = elements(summary)
    series = {a["data-label"]: a for tag, a, _ in items if tag == "path" and a.get("class") == "series"}
    assert set(series) == {f"{s} ({k})" for s in ("sequential", "greedy_grouping") for k in ("predicted", "measured")}
    assert not series["sequential (measured)"].get("stroke-dasharray")
    assert series["sequential (predicted)"].get("stroke-dasharray")
    for p in sweep["plans"]:
        assert f"measured {speed[p.name]:.1f} tok/s" in summary
    dots = [a for tag, a, _ in items if tag == "circle"]
    measured = sorted((float(a["data-value"]), float(a["cy"])) for a in dots if "measured" in a["data-series"])
    assert len(dots) == 8 and [v for v, _ in measured] == sorted(speed.values())
    assert all(y1 > y2 for (_, y1), (_, y2) in zip(measured, measured[1:]))  # more tokens/s is drawn higher
    for page in written:
        assert "http" not in page.read_text()


def test_compile_report_true_writes_the_page_and_a_failed_compile_nothing(tmp_path):
    r = run("edge_rt_compiler.app", ["model=synthetic_gpt2", "budget=16M", "strategy=sequential", "report=true",
                                     f"out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 0, r.stderr
    plan = Path(next(ln for ln in r.stdout.splitlines() if ln.startswith("plan: ")).split("plan: ", 1)[1])
    page = Path(next(ln for ln in r.stdout.splitlines() if ln.startswith("report: ")).split("report: ", 1)[1])
    assert page == page_of(plan) and 'class="arena"' in page.read_text()
    before = sorted(tmp_path.rglob("*"))
    r = run("edge_rt_compiler.app", ["model=synthetic_gpt2", "budget=1M", "strategy=sequential", "report=true",
                                     f"out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 2 and "needs at least" in r.stderr and "report:" not in r.stdout
    assert sorted(tmp_path.rglob("*")) == before
    r = run("edge_rt_compiler.app", ["model=synthetic_gpt2", "report=maybe", f"out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "report" in r.stderr, r.stderr


def test_sweep_summary_lists_failed_jobs_and_links_plans_without_pages(tmp_path):
    r = run("edge_rt_compiler.app", ["-m", "model=synthetic_gpt2", "budget=1M,12M", "strategy=sequential",
                                     f"out_dir={tmp_path}"], tmp_path)
    assert "report: " in r.stdout and "budget 1M is too small" in r.stderr, r.stdout + r.stderr
    summary = next(tmp_path.glob(".sweeps/*/summary.html"))
    html = summary.read_text()
    assert "strategy=sequential budget=1M: error: budget 1M is too small" in html
    links = [a["href"] for tag, a, _ in elements(html) if tag == "a"]
    assert len(links) == 1 and links[0].endswith(PLAN_SUFFIX) and (summary.parent / links[0]).is_file()
    assert not list(tmp_path.rglob("*-12M-*.html"))  # no report=true: no plan pages


@pytest.mark.parametrize("case,needle", [
    ("missing", "plan not found"),
    ("empty_folder", "no *.plan.json"),
    ("not_a_plan", "not an edge-rt plan"),
    ("plan_without_prediction", "predicted.decode_ms_per_token = None is missing or not a number"),
    ("second_plan_bad", "not an edge-rt plan"),  # the first plan's page is not written either
    ("bench_not_json", "not valid JSON"),
    ("bench_no_rows", "no bench rows"),
    ("bench_row_no_plan", "bench row 0 has no \"plan\""),
    ("bench_row_bad_number", "decode_tok_s = 'fast' is not a number"),
    ("out_is_file", "a file, not a folder"),
    ("unknown_flag", "unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_one_line_and_exit_2(sweep, tmp_path, case, needle):
    plan = str(sweep["plans"][0])
    bench = tmp_path / "bench.json"
    args = [plan, "--out", str(tmp_path / "out")]
    if case == "missing":
        args[0] = str(tmp_path / "nope.plan.json")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif case in ("not_a_plan", "second_plan_bad"):
        bad = tmp_path / "x.plan.json"
        bad.write_text('{"hello": 1}')
        args = ([plan, str(bad)] if case == "second_plan_bad" else [str(bad)]) + args[1:]
    elif case == "plan_without_prediction":
        raw = json.loads(Path(plan).read_text())
        del raw["predicted"]["decode_ms_per_token"]
        (tmp_path / "y.plan.json").write_text(json.dumps(raw))
        args[0] = str(tmp_path / "y.plan.json")
    elif case.startswith("bench"):
        bench.write_text({"bench_not_json": "{rows: [", "bench_no_rows": '{"rows": []}',
                          "bench_row_no_plan": '{"rows": [{"strategy": "sequential"}]}',
                          "bench_row_bad_number": '{"rows": [{"plan": "a/b.plan.json", "decode_tok_s": "fast"}]}',
                          }[case])
        args += ["--bench", str(bench)]
    elif case == "out_is_file":
        (tmp_path / "out").write_text("x")
    else:
        args.append("--frobnicate")
    r = run("edge_rt_compiler.report", args, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("edge-rt-report: error: "), r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr and not r.stdout
    out = tmp_path / "out"
    assert not out.is_dir() or not any(out.rglob("*.html"))


# ---- the page as a browser draws it --------------------------------------------------------------------------

#: where the arena picture and each of its buffers are on the rendered page, in CSS pixels
ARENA_BOXES_JS = """(() => {
  const svg = document.querySelector('svg.arena'), box = svg.getBoundingClientRect();
  return {svg: [box.x, box.y, box.width, box.height], page: [document.documentElement.scrollWidth,
          document.documentElement.scrollHeight],
          bufs: [...svg.querySelectorAll('rect.buf')].map(r => {
            const b = r.getBoundingClientRect();
            return {name: r.dataset.name, fill: r.getAttribute('fill'), box: [b.x, b.y, b.width, b.height]}; })};
})()"""


def _drawn(fill: str) -> tuple[int, int, int]:
    """A buffer's fill as it lands on screen: 0.9 opaque (the template's fill-opacity) over the plot's #fafafa."""
    return tuple(round(0.9 * int(fill[i:i + 2], 16) + 0.1 * 0xfa) for i in (1, 3, 5))


def _near(colours: set[tuple[int, int, int]], tol: int = 3) -> set[bytes]:
    """Every RGB value within `tol` per channel of one of `colours` (anti-aliasing and blending round)."""
    steps = range(-tol, tol + 1)
    return {bytes(min(max(v, 0), 255) for v in (r + a, g + b, c + d))
            for r, g, c in colours for a in steps for b in steps for d in steps}


def test_chromium_draws_the_arena_picture(tmp_path, target):
    """Headless Chromium renders a streamed plan's page: most of the first arena picture is in the buffer colours
    (as blended on screen), and the pixel at the centre of each buffer big enough to hold one is that buffer's
    colour, so the picture is drawn where the page's own markup lays it out; the page as a whole is not blank."""
    from edge_rt_compiler.report import write_plan_page
    from edge_rt_compiler.report_svg import KIND_COLORS

    from .chromium import Chromium, decode_png
    from .conftest import compile_synth

    page = write_plan_page(compile_synth(tmp_path, "speculative_prefetch", 16 * MiB, target).plan_path)
    browser = Chromium()
    try:
        tab = browser.open(page.resolve().as_uri())
        width, height = browser.evaluate(tab, ARENA_BOXES_JS)["page"]
        browser.resize(tab, width, height)  # the whole page in the viewport: page and screen coordinates agree
        geo = browser.evaluate(tab, ARENA_BOXES_JS)
        x0, y0, w, h = (round(v) for v in geo["svg"])
        arena = decode_png(browser.screenshot(tab, x0, y0, w, h))
        whole = decode_png(browser.screenshot(tab, 0, 0, width, height, scale=0.25))
    finally:
        browser.close()
    pw, ph, rows = arena
    assert (pw, ph) == (w, h)
    palette = _near({_drawn(c) for f in KIND_COLORS.values() for c in ((f,) if isinstance(f, str) else f)})
    coloured = sum(row[i:i + 3] in palette for row in rows for i in range(0, 3 * pw, 3))
    assert coloured > 0.3 * pw * ph, f"only {coloured} of {pw * ph} arena pixels have a buffer colour"
    checked = 0
    for b in geo["bufs"]:
        bx, by, bw, bh = b["box"]
        if bw >= 6 and bh >= 6:
            x, y = int(bx + bw / 2) - x0, int(by + bh / 2) - y0
            assert rows[y][3 * x:3 * x + 3] in _near({_drawn(b["fill"])}), (b["name"], x, y, b["fill"])
            checked += 1
    assert checked >= 10, geo["bufs"]
    _, _, small = whole
    ink = sum(min(r[i:i + 3]) < 200 for r in small for i in range(0, len(r), 3))
    assert ink > 0.05 * sum(len(r) // 3 for r in small), "the page rendered (nearly) blank"
