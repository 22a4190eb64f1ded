#!/usr/bin/env bash
# The whole aarch64 CI step, for .ci/run to call:
#
#   ci/aarch64/step.sh [WORK_DIR]
#
#   1. setup    ci/aarch64/setup.sh (cached: seconds when nothing changed)
#   2. smoke    ci/aarch64/run.sh python ci/aarch64/smoke.py (numpy, numba parallel + cache, tokenizers)
#   3. compile  on x86-64: small synthetic GPT-2 plans (float32 streamed; q4_1 with a float16 KV cache, q4_0,
#               q8_0, f16, q4_0 with int8 activations resident) and a MiniLM plan (edge_rt_compiler)
#   4. compare  compare.py run (synthetic: same 16 greedy tokens) and compare.py embed (MiniLM: max abs
#               diff <= 1e-5), host against aarch64 emulation
#
# WORK_DIR (default: a new temporary folder) receives the plans, logs and the JSON reports. Every part's
# elapsed time is printed at the end and appended to <cache>/timings.log. numba's caches persist between
# runs (host: the executor's per-user folder; aarch64: <cache>/numba-cache), so a second run is fast.
# EDGE_RT_AARCH64_STEP_SKIP: words among "smoke synthetic quantized minilm" to leave out (e.g. where the MiniLM
# package is not installed). Exit status: 0 all passed, 1 a comparison or the smoke test failed, 2 setup
# or plan compilation failed.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
aarch64_paths
HOST_PY=$(host_python) || { echo "step.sh: no host Python (set EDGE_RT_HOST_PYTHON)" >&2; exit 2; }
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/edge-rt-aarch64-step.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SKIP=" ${EDGE_RT_AARCH64_STEP_SKIP:-} "

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[aarch64-step %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
TIMES=()
FAILED=()
timed() {  # timed NAME CMD... : run CMD, record its time, return its status
    local name=$1 t0 rc=0 s
    shift
    t0=$(now)
    log "$name: start"
    "$@" || rc=$?
    s=$(secs "$t0" "$(now)")
    TIMES+=("$name=${s}s")
    log "$name: $( ((rc == 0)) && echo ok || echo "FAILED (exit $rc)") in $s s"
    return "$rc"
}
finish() {
    local total line
    total=$(secs "$T_ALL" "$(now)")
    line="$(date -u +%Y-%m-%dT%H:%M:%SZ) step total=${total}s ${TIMES[*]}${FAILED[*]:+ failed: ${FAILED[*]}}"
    mkdir -p "$CACHE_DIR" && echo "$line" >> "$CACHE_DIR/timings.log"
    log "done in $total s: ${TIMES[*]}"
    log "outputs in $WORK"
}
T_ALL=$(now)
log "host Python $HOST_PY; work folder $WORK"

timed setup "$AARCH64_DIR/setup.sh" || { FAILED+=(setup); finish; exit 2; }

if [[ $SKIP != *" smoke "* ]]; then
    # shellcheck disable=SC2016  # $1..$3 are expanded by the inner bash
    # --reuse-cache: the persistent numba cache, so from the second CI run on neither process compiles.
    if ! timed smoke bash -c '"$1" python "$2" --reuse-cache > "$3"' _ "$AARCH64_DIR/run.sh" \
            "$AARCH64_DIR/smoke.py" "$WORK/smoke.json"; then
        FAILED+=(smoke)
    fi
    cat "$WORK/smoke.json" 2>/dev/null || true
fi

compile_plan() {  # compile_plan NAME HYDRA-OVERRIDES... : writes $WORK/plans/NAME/.../*.plan.json
    local name=$1
    shift
    rm -rf "$WORK/plans/$name"
    (cd "$WORK" && PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        "$HOST_PY" -m edge_rt_compiler.app "$@" out_dir="$WORK/plans/$name" hydra.run.dir="$WORK/hydra/$name") \
        > "$WORK/compile-$name.log" 2>&1 || { cat "$WORK/compile-$name.log"; return 1; }
}
plan_of() {  # the one plan compile_plan wrote for NAME
    local plans
    mapfile -t plans < <(find "$WORK/plans/$1" -name '*.plan.json')
    if (( ${#plans[@]} != 1 )); then
        echo "step.sh: expected one plan under $WORK/plans/$1, found ${#plans[@]}" >&2
        return 1
    fi
    echo "${plans[0]}"
}

if [[ $SKIP != *" synthetic "* ]]; then
    if timed compile-synthetic compile_plan synthetic model=synthetic_gpt2 budget=16M strategy=sequential \
            && plan=$(plan_of synthetic); then
        timed run-synthetic "$HOST_PY" "$AARCH64_DIR/compare.py" run "$plan" --prompt "Once upon a time" \
            --max-tokens 16 --report "$WORK/compare-run-synthetic.json" || FAILED+=(run-synthetic)
    else
        FAILED+=(compile-synthetic); finish; exit 2
    fi
fi

if [[ $SKIP != *" quantized "* ]]; then
    # every weight format's kernels (decode matvec, prefill tiles, quantized embedding rows) and the float16 KV
    # cache: the same greedy tokens on aarch64 as on x86-64
    # (q4_0-aq8: q4_0 weights with the opt-in int8 activations, act_quant=q8_0: its plain-IR kernels on aarch64)
    for q in q4_1 q4_0 q8_0 f16 q4_0-aq8; do
        extra=()
        [[ $q == q4_1 ]] && extra=(kv_dtype=f16)
        [[ $q == q4_0-aq8 ]] && extra=(act_quant=q8_0)
        if timed "compile-synthetic-$q" compile_plan "synthetic-$q" model=synthetic_gpt2 budget=64M \
                strategy=greedy_grouping "quant=${q%-aq8}" "${extra[@]}" && plan=$(plan_of "synthetic-$q"); then
            timed "run-synthetic-$q" "$HOST_PY" "$AARCH64_DIR/compare.py" run "$plan" --prompt "Once upon a time" \
                --max-tokens 16 --report "$WORK/compare-run-synthetic-$q.json" || FAILED+=("run-synthetic-$q")
        else
            FAILED+=("compile-synthetic-$q"); finish; exit 2
        fi
    done
fi

if [[ $SKIP != *" minilm "* ]]; then
    cat > "$WORK/sentences.txt" <<'EOF'
The cat sat on the mat.
A Raspberry Pi 4 has four Cortex-A72 cores and a few gigabytes of memory.
Plans are compiled ahead of time on a workstation and executed on the device.
Embeddings must not depend on the instruction set that computed them.
hello
EOF
    if timed compile-minilm compile_plan minilm model=minilm_l6 && plan=$(plan_of minilm); then
        timed embed-minilm "$HOST_PY" "$AARCH64_DIR/compare.py" embed "$plan" --sentences "$WORK/sentences.txt" \
            --atol 1e-5 --report "$WORK/compare-embed-minilm.json" || FAILED+=(embed-minilm)
    else
        FAILED+=(compile-minilm); finish; exit 2
    fi
fi

finish
if (( ${#FAILED[@]} )); then
    log "FAILED: ${FAILED[*]}"
    exit 1
fi
