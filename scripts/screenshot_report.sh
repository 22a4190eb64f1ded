#!/usr/bin/env bash
# Screenshot an edge-rt HTML report page with headless Chromium (Debian: apt-get install -y chromium).
#
#   scripts/screenshot_report.sh PAGE.html [OUT.png] [WIDTH,HEIGHT]   # default OUT report.png, 1400,1700
#   scripts/screenshot_report.sh --demo [OUT.png]                     # the README's picture (docs/report.png):
#       SmolLM2-135M at budget=160M, speculative_prefetch, compiled with report=true into a temporary folder
#
# The page is self-contained (inline SVG, no network), so --no-sandbox headless rendering needs nothing else.
# A screenshot that comes out nearly empty (a blank page compresses to a few KB) is an error.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
die() { echo "screenshot_report.sh: $*" >&2; exit 2; }

browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || die "no chromium found; install it (Debian: apt-get install -y chromium)"

if [ "${1:-}" = "--demo" ]; then
  out="${2:-$here/docs/report.png}"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m edge_rt_compiler.app budget=160M strategy=speculative_prefetch report=true "out_dir=$tmp" >"$tmp/log" 2>&1 \
    || { cat "$tmp/log" >&2; die "the demo compile failed"; }
  page="$(sed -n 's/^report: //p' "$tmp/log" | head -1)"
  size=1400,1700
else
  [ $# -ge 1 ] || die "usage: $0 PAGE.html [OUT.png] [WIDTH,HEIGHT] | --demo [OUT.png]"
  page="$1"; out="${2:-report.png}"; size="${3:-1400,1700}"
fi
[ -f "$page" ] || die "$page: no such page; write one with edge-rt-report PLAN or edge-rt-compile ... report=true"
out="$(realpath -m "$out")"
profile="$(mktemp -d)"  # a new empty profile: nothing from an earlier run, no first-run or sync work
# no GPU, no sandbox (root in CI), and no network at all: the page needs none, and on a closed network Chromium's
# background fetches (QUIC, component updates, sync) would only wait
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars --window-size="$size" \
  --screenshot="$out" "file://$(realpath "$page")" >/dev/null 2>&1 || { rm -rf "$profile"; die "chromium failed on $page"; }
rm -rf "$profile"
bytes="$(stat -c %s "$out" 2>/dev/null || echo 0)"
[ "$bytes" -gt 20000 ] || die "$out has only $bytes bytes: the page rendered (nearly) blank"
echo "screenshot: $out ($bytes bytes, $size)"
