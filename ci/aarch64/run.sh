#!/usr/bin/env bash
# Run a command with the arm64 Python of the sysroot that setup.sh built, under qemu-user emulation.
#
#   ci/aarch64/run.sh [--] python  ARGS...   the arm64 python3.11 (also: python3, python3.11)
#   ci/aarch64/run.sh [--] edge-rt-exec ARGS...   same as: python -m edge_rt_exec ARGS...
#   ci/aarch64/run.sh [--] PATH-TO-AARCH64-ELF ARGS...   any other arm64 program
#
# The console script `edge-rt-exec` cannot be run directly: its #! line names the host's x86-64 Python.
# The environment is the one a Raspberry Pi 4 would see (see common.sh for why each variable is set):
#   QEMU_CPU=cortex-a72, NUMBA_CPU_NAME=cortex-a72, OPENBLAS_CORETYPE=CORTEXA72,
#   NUMBA_CACHE_DIR=<per-user cache>/numba-cache (or $EDGE_RT_AARCH64_NUMBA_CACHE_DIR),
#   PYTHONPATH=<repo root>:<sysroot wheels>.
# Cache folder: $EDGE_RT_AARCH64_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/edge-rt-aarch64).
# Set EDGE_RT_AARCH64_DEBUG=1 to print the command line before it runs.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
aarch64_paths

[[ ${1:-} == -- ]] && shift
if (( $# == 0 )); then
    echo "usage: ci/aarch64/run.sh [--] python ARGS... | edge-rt-exec ARGS... | AARCH64-PROGRAM ARGS..." >&2
    exit 2
fi

if [[ ! -e $READY_STAMP ]]; then
    echo "run.sh: no finished arm64 sysroot in $SYSROOT; run ci/aarch64/setup.sh first" \
         "(or point EDGE_RT_AARCH64_CACHE at the cache folder it used)" >&2
    exit 2
fi
if ! QEMU=$(find_qemu); then
    echo "run.sh: qemu-aarch64-static not found; run ci/aarch64/setup.sh (it installs qemu-user-static)" >&2
    exit 2
fi

case $1 in
    python|python3|python3.11) shift; set -- "$GUEST_PYTHON" "$@" ;;
    edge-rt-exec)              shift; set -- "$GUEST_PYTHON" -m edge_rt_exec "$@" ;;
    */*)                       ;;  # a path: qemu refuses it unless it is an aarch64 ELF
    *)
        if [[ -x $SYSROOT/usr/bin/$1 ]]; then
            prog=$1; shift; set -- "$SYSROOT/usr/bin/$prog" "$@"
        else
            echo "run.sh: '$1' is neither python, edge-rt-exec nor a program in the arm64 sysroot" >&2
            exit 2
        fi ;;
esac

mkdir -p "$NUMBA_CACHE"

# Clear everything of the host's that would leak x86-64 code or settings into the guest:
#  PYTHONHOME/PYTHONPATH/user site (x86-64 extension modules), LD_* (x86-64 libraries),
#  NUMBA_CPU_FEATURES / NUMBA_OPT... set for the host CPU.
cmd=(env
    -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONEXECUTABLE -u PYTHONSAFEPATH -u VIRTUAL_ENV
    -u LD_LIBRARY_PATH -u LD_PRELOAD -u NUMBA_CPU_FEATURES -u NUMBA_DISABLE_JIT
    "QEMU_CPU=$EDGE_RT_AARCH64_CPU"
    "NUMBA_CPU_NAME=$EDGE_RT_AARCH64_CPU"
    "OPENBLAS_CORETYPE=$EDGE_RT_AARCH64_OPENBLAS_CORETYPE"
    "NUMBA_CACHE_DIR=$NUMBA_CACHE"
    "PYTHONPATH=$REPO_ROOT:$SITE_DIR"
    "PYTHONNOUSERSITE=1"
    # For programs that start another emulated process (smoke.py does): run.sh is how to do it, since
    # sys.executable is an aarch64 ELF that the host kernel cannot exec without binfmt_misc.
    "EDGE_RT_AARCH64_RUN=$AARCH64_DIR/run.sh"
    "EDGE_RT_AARCH64_CACHE=$CACHE_DIR"
    "EDGE_RT_AARCH64_SYSROOT=$SYSROOT"
    "$QEMU" -L "$SYSROOT" "$@")

if [[ ${EDGE_RT_AARCH64_DEBUG:-0} == 1 ]]; then
    printf 'run.sh:' >&2; printf ' %q' "${cmd[@]}" >&2; printf '\n' >&2
fi
exec "${cmd[@]}"
