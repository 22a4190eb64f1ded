# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# Shared settings for ci/aarch64/{setup,run}.sh. Sourced, never executed.
#
# Every path and knob lives here so that setup.sh (which builds the emulation environment) and run.sh
# (which uses it) can never disagree about where things are.

AARCH64_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$AARCH64_DIR/../.." && pwd)

# Cache folder: first argument of setup.sh, else $EDGE_RT_AARCH64_CACHE, else the per-user XDG cache.
EDGE_RT_AARCH64_CACHE=${EDGE_RT_AARCH64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge-rt-aarch64}

# The emulated CPU. A Raspberry Pi 4 is a Cortex-A72 (ARMv8.0-A + CRC, no dotprod/fp16/SVE).
#  - QEMU_CPU makes qemu advertise exactly that core's HWCAPs. qemu-user's default is "max", which
#    advertises SVE, dotprod, fp16... and numpy's runtime dispatch then picks kernels the Pi cannot run.
#  - NUMBA_CPU_NAME: LLVM reads /proc/cpuinfo to name the host CPU; under qemu-user that file is the
#    x86 host's, so LLVM would say "generic". Naming the CPU gives the Pi's code generation.
#  - OPENBLAS_CORETYPE: OpenBLAS (inside numpy's wheel) identifies the core from MIDR_EL1, which qemu-user
#    does not expose, and would fall back to generic "armv8" kernels; on a real A72 it picks the
#    Cortex-A72 entry (mapped onto its cortexa57 kernels), so force the same choice.
EDGE_RT_AARCH64_CPU=${EDGE_RT_AARCH64_CPU:-cortex-a72}
EDGE_RT_AARCH64_OPENBLAS_CORETYPE=${EDGE_RT_AARCH64_OPENBLAS_CORETYPE:-CORTEXA72}

# Debian release and mirrors the sysroot is made from (the Pi runs Debian bookworm).
EDGE_RT_AARCH64_SUITE=${EDGE_RT_AARCH64_SUITE:-bookworm}
EDGE_RT_AARCH64_MIRROR=${EDGE_RT_AARCH64_MIRROR:-http://deb.debian.org/debian}
EDGE_RT_AARCH64_SECURITY_MIRROR=${EDGE_RT_AARCH64_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# Debian packages unpacked into the sysroot (apt adds their dependencies): the interpreter, libgomp1 for
# numba's OpenMP threading layer, libstdc++6 (as on any Pi), libc-bin for ldconfig.
EDGE_RT_AARCH64_DEBS=${EDGE_RT_AARCH64_DEBS:-python3.11 libgomp1 libstdc++6 libc-bin}

# The executor's dependencies (pyproject.toml [project] dependencies), as aarch64 wheels.
EDGE_RT_AARCH64_WHEELS=${EDGE_RT_AARCH64_WHEELS:-numpy numba llvmlite psutil tokenizers}

aarch64_paths() {
    CACHE_DIR=$EDGE_RT_AARCH64_CACHE
    SYSROOT=$CACHE_DIR/sysroot
    GUEST_PYTHON=$SYSROOT/usr/bin/python3.11
    # Wheels are installed here; run.sh puts it on PYTHONPATH (after the repository root).
    SITE_DIR=$SYSROOT/opt/edge-rt/site-packages
    READY_STAMP=$SYSROOT/.edge-rt-ready
    # numba's on-disk cache for the emulated runs: per user, next to (not inside) the sysroot, so that a
    # rebuilt sysroot keeps it; numba keys entries by CPU name and features, so it is never stale.
    NUMBA_CACHE=${EDGE_RT_AARCH64_NUMBA_CACHE_DIR:-$CACHE_DIR/numba-cache}
}

find_qemu() {
    local q
    for q in "${EDGE_RT_AARCH64_QEMU:-}" qemu-aarch64-static qemu-aarch64; do
        [[ -n $q ]] && command -v "$q" >/dev/null 2>&1 && { command -v "$q"; return 0; }
    done
    return 1
}

# The host (x86-64) Python: the one whose package versions the aarch64 wheels follow, and the one that runs
# the compiler and the host side of compare.py. $EDGE_RT_HOST_PYTHON, else the active venv, else
# the repo's .venv, else python3.
host_python() {
    local c
    if [[ -n ${EDGE_RT_HOST_PYTHON:-} ]]; then  # named explicitly: it must exist
        command -v "$EDGE_RT_HOST_PYTHON" || { echo "EDGE_RT_HOST_PYTHON=$EDGE_RT_HOST_PYTHON not found" >&2; return 1; }
        return 0
    fi
    for c in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$REPO_ROOT/.venv/bin/python" python3; do
        [[ -n $c ]] && command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return 0; }
    done
    return 1
}
