#!/usr/bin/env bash
# Build (or reuse) the aarch64 user-mode emulation environment used by ci/aarch64/run.sh.
#
#   ci/aarch64/setup.sh [--refresh] [CACHE_DIR]
#
# CACHE_DIR defaults to $EDGE_RT_AARCH64_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/edge-rt-aarch64.
# Idempotent: every phase keeps a stamp of its inputs and is skipped when they have not changed, so a
# second run does no network access and takes seconds. --refresh re-resolves the Debian packages and the
# wheels (picking up security updates / new releases); anything whose resolved contents did not change is
# still reused.
#
# Phases (each one's elapsed time is logged, and the summary is appended to CACHE_DIR/timings.log):
#   host-tools  apt-get install qemu-user-static (host, amd64) when qemu-aarch64-static is missing
#   debs        resolve + download Debian bookworm arm64 .debs with a private apt configuration
#               (own sources, state, lists and archive folders under CACHE_DIR/apt; the host's dpkg
#               database and architecture list are never touched, no arm64 package is installed)
#   sysroot     dpkg-deb -x each .deb into CACHE_DIR/sysroot (merged-/usr layout), ldconfig -r
#   wheels      pip download aarch64 wheels of the executor's dependencies, same versions as the host
#               Python's where it has them, else the latest
#   site        pip install --target SYSROOT/opt/edge-rt/site-packages (by the host pip)
#   bytecode    compileall the sysroot's stdlib and site-packages with the arm64 python itself
#               (Debian's packages ship no .pyc: without this every emulated start recompiles them)
#   verify      import numpy, numba, psutil, tokenizers under emulation
set -euo pipefail

LAYOUT_VERSION=1  # bump when a change here must invalidate existing caches

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
REFRESH=${EDGE_RT_AARCH64_REFRESH:-0}
while (( $# )); do
    case $1 in
        --refresh) REFRESH=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "setup.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) break ;;
    esac
done
if (( $# > 1 )); then usage >&2; exit 2; fi
if (( $# == 1 )); then
    mkdir -p "$1"
    EDGE_RT_AARCH64_CACHE=$(cd "$1" && pwd)
fi

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
aarch64_paths
mkdir -p "$CACHE_DIR"
LOG=$CACHE_DIR/setup.log
exec > >(tee -a "$LOG") 2>&1

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
hash_of() { sha256sum | cut -c1-16; }

PHASES=()
T_ALL=$(now)
phase_begin() { PHASE=$1; T_PHASE=$(now); log "phase $PHASE: start"; }
phase_end() {  # $1: ran|cached
    local s; s=$(secs "$T_PHASE" "$(now)")
    PHASES+=("$PHASE=${s}s($1)")
    log "phase $PHASE: $1 in ${s} s"
}

# One setup at a time per cache folder (two CI jobs on one machine share it).
exec 9>"$CACHE_DIR/.lock"
if ! flock -n 9; then
    log "another setup.sh holds $CACHE_DIR/.lock; waiting (at most 30 min)"
    flock -w 1800 9 || die "timed out waiting for $CACHE_DIR/.lock"
fi
log "cache folder: $CACHE_DIR (refresh=$REFRESH)"

SUDO=()
if (( EUID != 0 )); then SUDO=(sudo); fi

# --------------------------------------------------------------------------------------------------- host
phase_begin host-tools
need=()
find_qemu >/dev/null || need+=(qemu-user-static)
command -v dpkg-deb >/dev/null || need+=(dpkg)
[[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] || need+=(debian-archive-keyring)
if (( ${#need[@]} )); then
    log "installing on the host: ${need[*]}"
    "${SUDO[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
    phase_end ran
else
    phase_end cached
fi
QEMU=$(find_qemu) || die "qemu-aarch64-static still missing after installing qemu-user-static"
log "qemu: $("$QEMU" --version | head -n1)"

# ---------------------------------------------------------------------------------------------- arm64 debs
APTDIR=$CACHE_DIR/apt
SELECTED=$APTDIR/selected-debs.txt
apt_opts=(
    -o APT::Architecture=arm64 -o APT::Architectures=arm64
    -o Dir::State="$APTDIR/state" -o Dir::State::status="$APTDIR/state/status"
    -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR/cache"
    -o Dir::Cache::archives="$APTDIR/archives"
    -o Dir::Etc::SourceList="$APTDIR/sources.list" -o Dir::Etc::SourceParts="$APTDIR/sources.list.d"
    -o Dir::Etc::Preferences="$APTDIR/preferences" -o Dir::Etc::PreferencesParts="$APTDIR/preferences.d"
    -o APT::Sandbox::User=root -o APT::Install-Recommends=false -o APT::Get::Assume-Yes=true
    -q
)
debs_key=$(printf '%s\n' "$LAYOUT_VERSION" "$EDGE_RT_AARCH64_SUITE" "$EDGE_RT_AARCH64_MIRROR" \
    "$EDGE_RT_AARCH64_SECURITY_MIRROR" "$EDGE_RT_AARCH64_DEBS" | hash_of)

debs_present() {
    [[ -s $SELECTED ]] || return 1
    local f
    while read -r f; do [[ -s $APTDIR/archives/$f ]] || return 1; done < "$SELECTED"
}

phase_begin debs
if [[ $REFRESH != 1 && "$(cat "$APTDIR/debs.stamp" 2>/dev/null)" == "$debs_key" ]] && debs_present; then
    phase_end cached
else
    mkdir -p "$APTDIR"/{state,lists/partial,cache,archives/partial,sources.list.d,preferences.d}
    : > "$APTDIR/state/status"  # an empty dpkg database: apt resolves the full dependency closure
    kr=/usr/share/keyrings/debian-archive-keyring.gpg
    s=$EDGE_RT_AARCH64_SUITE
    cat > "$APTDIR/sources.list" <<EOF
deb [arch=arm64 signed-by=$kr] $EDGE_RT_AARCH64_MIRROR $s main
deb [arch=arm64 signed-by=$kr] $EDGE_RT_AARCH64_MIRROR $s-updates main
deb [arch=arm64 signed-by=$kr] $EDGE_RT_AARCH64_SECURITY_MIRROR $s-security main
EOF
    log "apt-get update (arm64, private lists in $APTDIR)"
    apt-get "${apt_opts[@]}" update
    # shellcheck disable=SC2086  # the package list is a word list on purpose
    apt-get "${apt_opts[@]}" install --download-only $EDGE_RT_AARCH64_DEBS
    # The exact set to unpack: what apt would install into an empty system, as .deb file names.
    # shellcheck disable=SC2086
    apt-get "${apt_opts[@]}" --simulate install $EDGE_RT_AARCH64_DEBS \
        | awk '$1 == "Inst" {  # Inst NAME (VERSION ORIGIN [ARCH]) [optional broken-deps list]
              v = $3; sub(/^\(/, "", v); gsub(/:/, "%3a", v)
              if (!match($0, /\[[a-z0-9]+\]\)/)) { print "unparsable: " $0 > "/dev/stderr"; exit 1 }
              print $2 "_" v "_" substr($0, RSTART + 1, RLENGTH - 3) ".deb" }' | sort > "$SELECTED.new"
    [[ -s $SELECTED.new ]] || die "apt resolved no packages for: $EDGE_RT_AARCH64_DEBS"
    mv "$SELECTED.new" "$SELECTED"
    debs_present || die "apt did not download every package listed in $SELECTED"
    # Drop .debs superseded by a --refresh, so the archive folder does not grow without bound.
    for f in "$APTDIR"/archives/*.deb; do
        grep -qxF -- "${f##*/}" "$SELECTED" || rm -f -- "$f"
    done
    echo "$debs_key" > "$APTDIR/debs.stamp"
    log "$(wc -l < "$SELECTED") packages, $(cd "$APTDIR/archives" && xargs du -ch < "$SELECTED" | tail -n1 | cut -f1)"
    phase_end ran
fi

# -------------------------------------------------------------------------------------------------- sysroot
sysroot_key=$( (echo "$LAYOUT_VERSION"; cat "$SELECTED") | hash_of)
phase_begin sysroot
if [[ "$(cat "$SYSROOT/.edge-rt-sysroot.stamp" 2>/dev/null)" == "$sysroot_key" ]]; then
    phase_end cached
else
    NEW=$CACHE_DIR/sysroot.new
    rm -rf "$NEW"
    # Merged /usr, as on bookworm: /lib -> usr/lib, so the ELF interpreter /lib/ld-linux-aarch64.so.1 and
    # the libraries of packages that still ship files in /lib end up in one tree.
    mkdir -p "$NEW"/usr/{bin,sbin,lib}
    ln -s usr/bin "$NEW/bin"; ln -s usr/sbin "$NEW/sbin"; ln -s usr/lib "$NEW/lib"
    while read -r f; do
        dpkg-deb --fsys-tarfile "$APTDIR/archives/$f" \
            | tar -x --keep-directory-symlink --no-same-owner -C "$NEW" \
            || die "could not unpack $f"
    done < "$SELECTED"
    [[ -x $NEW/usr/bin/python3.11 ]] || die "no usr/bin/python3.11 in the unpacked packages"
    # qemu -L resolves each absolute path the guest opens inside the sysroot first, then on the host.
    # So the sysroot must not contain /tmp, /home, /root, /work...: files the guest writes there (an
    # embedding .npy, say) must land on the host where the comparing side reads them.
    for d in tmp home root work proc dev sys run; do
        [[ ! -e $NEW/$d ]] || die "unexpected /$d in the sysroot: it would hide the host's"
    done
    # Its own ld.so.cache; without one the guest's loader reads the host's (whose x86-64 entries it skips,
    # then it searches the default folders: slower, but it works; so a failure is only a warning).
    # ldconfig -r chroots, which needs root.
    [[ -e $NEW/etc/ld.so.conf ]] || printf 'include /etc/ld.so.conf.d/*.conf\n' > "$NEW/etc/ld.so.conf"
    QEMU_CPU=$EDGE_RT_AARCH64_CPU "$QEMU" -L "$NEW" "$NEW/sbin/ldconfig" -r "$NEW" \
        || log "WARNING: ldconfig in the sysroot failed; the guest will use the default library folders"
    echo "$sysroot_key" > "$NEW/.edge-rt-sysroot.stamp"
    rm -rf "$SYSROOT"
    mv "$NEW" "$SYSROOT"
    log "sysroot: $(du -sh "$SYSROOT" | cut -f1)"
    phase_end ran
fi

# --------------------------------------------------------------------------------------------------- wheels
# The wheels follow the package versions of the host Python (see host_python in common.sh).
HOST_PY=$(host_python) || die "no host Python found (set EDGE_RT_HOST_PYTHON)"
# shellcheck disable=SC2086
read -r -a SPECS <<< "$("$HOST_PY" - $EDGE_RT_AARCH64_WHEELS <<'EOF'
import sys
from importlib import metadata
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        out.append(name)  # not installed on the host: the latest release
print(" ".join(out))
EOF
)"
log "host Python $HOST_PY; requirements: ${SPECS[*]}"
PLATFORMS=(--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
           --platform manylinux_2_28_aarch64)
PIP_TARGET_OPTS=("${PLATFORMS[@]}" --only-binary=:all: --python-version 3.11 --implementation cp)
WHEELS=$CACHE_DIR/wheels
wheels_key=$(printf '%s\n' "$LAYOUT_VERSION" "${SPECS[@]}" "${PIP_TARGET_OPTS[@]}" | hash_of)

phase_begin wheels
if [[ $REFRESH != 1 && "$(cat "$WHEELS/.stamp" 2>/dev/null)" == "$wheels_key" ]]; then
    phase_end cached
else
    rm -rf "$WHEELS.new"
    if ! "$HOST_PY" -m pip download -q --disable-pip-version-check -d "$WHEELS.new" \
            "${PIP_TARGET_OPTS[@]}" "${SPECS[@]}"; then
        unpinned=()
        for s in "${SPECS[@]}"; do unpinned+=("${s%%==*}"); done
        [[ "${unpinned[*]}" != "${SPECS[*]}" ]] || die "pip download of aarch64 wheels failed"
        log "WARNING: no aarch64 wheels for the host's exact versions; falling back to the latest releases"
        rm -rf "$WHEELS.new"
        "$HOST_PY" -m pip download -q --disable-pip-version-check -d "$WHEELS.new" \
            "${PIP_TARGET_OPTS[@]}" "${unpinned[@]}" || die "pip download of aarch64 wheels failed"
    fi
    echo "$wheels_key" > "$WHEELS.new/.stamp"
    rm -rf "$WHEELS"
    mv "$WHEELS.new" "$WHEELS"
    log "wheels: $(find "$WHEELS" -maxdepth 1 -name '*.whl' -printf '%f\n' | sort | tr '\n' ' ')($(du -sh "$WHEELS" | cut -f1))"
    phase_end ran
fi

# ------------------------------------------------------------------------------------- wheels into sysroot
site_key=$( (echo "$LAYOUT_VERSION"; find "$WHEELS" -maxdepth 1 -name '*.whl' -printf '%f %s\n' | sort) | hash_of)
SITE_STAMP=$SYSROOT/opt/edge-rt/.site.stamp
phase_begin site
if [[ "$(cat "$SITE_STAMP" 2>/dev/null)" == "$site_key" ]]; then
    phase_end cached
else
    rm -f "$READY_STAMP" "$SITE_STAMP"
    rm -rf "$SITE_DIR" "$SITE_DIR.new"
    mkdir -p "$(dirname "$SITE_DIR")"
    # --no-compile: the bytecode phase compiles with the arm64 interpreter itself.
    "$HOST_PY" -m pip install -q --disable-pip-version-check --no-deps --no-index --no-compile \
        --target "$SITE_DIR.new" "${PIP_TARGET_OPTS[@]}" "$WHEELS"/*.whl
    # Console scripts name the host's Python in their #! line: useless (and misleading) in the guest.
    rm -rf "$SITE_DIR.new/bin"
    mv "$SITE_DIR.new" "$SITE_DIR"
    echo "$site_key" > "$SITE_STAMP"
    log "site-packages: $(du -sh "$SITE_DIR" | cut -f1)"
    phase_end ran
fi

# ------------------------------------------------------------------------------------------------ bytecode
pyc_key=$(printf '%s\n' "$sysroot_key" "$site_key" | hash_of)
PYC_STAMP=$SYSROOT/opt/edge-rt/.pyc.stamp
phase_begin bytecode
if [[ "$(cat "$PYC_STAMP" 2>/dev/null)" == "$pyc_key" ]]; then
    phase_end cached
else
    # .pyc files depend only on the bytecode format, which the "magic number" names. When the host Python
    # writes the same format (any 3.11.x), it compiles natively in a few seconds; otherwise the arm64
    # interpreter does it under emulation (about 20 s here). Compile errors in files that are never
    # imported (e.g. Python-2 syntax in a package's test data) are not fatal.
    magic='import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())'
    guest_magic=$(QEMU_CPU=$EDGE_RT_AARCH64_CPU "$QEMU" -L "$SYSROOT" "$GUEST_PYTHON" -I -c "$magic")
    if [[ "$("$HOST_PY" -I -c "$magic")" == "$guest_magic" ]]; then
        compiler=("$HOST_PY" -I)
        log "compiling bytecode with the host Python (same magic number $guest_magic)"
    else
        compiler=(env QEMU_CPU="$EDGE_RT_AARCH64_CPU" "$QEMU" -L "$SYSROOT" "$GUEST_PYTHON" -I)
        log "compiling bytecode with the arm64 Python under emulation"
    fi
    # -j0: one worker per CPU (forked workers, so no aarch64 binary is exec'ed under emulation).
    "${compiler[@]}" -m compileall -q -j0 "$SYSROOT/usr/lib/python3.11" "$SITE_DIR" >/dev/null \
        || log "compileall reported errors (ignored)"
    echo "$pyc_key" > "$PYC_STAMP"
    phase_end ran
fi

# -------------------------------------------------------------------------------------------------- verify
touch "$READY_STAMP"
phase_begin verify
if ! EDGE_RT_AARCH64_CACHE=$CACHE_DIR "$AARCH64_DIR/run.sh" python -c '
import platform, numpy, numba, llvmlite, psutil, tokenizers
assert platform.machine() == "aarch64", platform.machine()
print("python", platform.python_version(), platform.machine(), "numpy", numpy.__version__,
      "numba", numba.__version__, "llvmlite", llvmlite.__version__, "psutil", psutil.__version__,
      "tokenizers", tokenizers.__version__)'; then
    rm -f "$READY_STAMP"
    die "the arm64 interpreter could not import the executor's dependencies"
fi
phase_end ran

total=$(secs "$T_ALL" "$(now)")
summary="$(date -u +%Y-%m-%dT%H:%M:%SZ) total=${total}s ${PHASES[*]}"
echo "$summary" >> "$CACHE_DIR/timings.log"
log "ready in $total s: ${PHASES[*]}"
if [[ $CACHE_DIR == "${XDG_CACHE_HOME:-$HOME/.cache}/edge-rt-aarch64" ]]; then
    log "use: ci/aarch64/run.sh python -c 'import platform; print(platform.machine())'"
else
    log "use: EDGE_RT_AARCH64_CACHE=$CACHE_DIR ci/aarch64/run.sh python ..."
fi
