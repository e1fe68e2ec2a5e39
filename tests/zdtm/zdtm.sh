#!/usr/bin/env bash
# CRIU's own zdtm suite in lazy-pages mode, with CRIU's lazy-pages daemon and with the agent's
# (snaptier-lazy-pages, --prefetch none and all), h and ns flavors, on this machine's kernel in
# the guests' trixie root (criu 4.1.1). Prints a table test x daemon and fails when the agent's
# daemon fails a test that CRIU's passes in the same flavor. docs/zdtm.md.
#
#   tests/zdtm/zdtm.sh [--daemons criu,snaptier-none,snaptier-all] [--flavors h,ns]
#                      [--tests REGEX] [--parallel N] [--out DIR]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
. "$repo/ci/lib.sh"

daemons=criu,snaptier-none,snaptier-all flavors=h,ns only="" parallel=2 out=$repo/build/zdtm
run_timeout_s=1200
usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --daemons) daemons=$2; shift 2 ;;
    --flavors) flavors=$2; shift 2 ;;
    --tests) only=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "zdtm.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || die "zdtm needs root (namespaces, overlay, CRIU)"
[[ $parallel =~ ^[1-9][0-9]*$ ]] || die "--parallel wants a positive number, not '$parallel'"
for d in ${daemons//,/ }; do
  case $d in criu|snaptier-none|snaptier-all) ;; *) die "unknown daemon '$d' (criu, snaptier-none, snaptier-all)" ;; esac
done
for f in ${flavors//,/ }; do
  case $f in h|ns) ;; *) die "unknown flavor '$f' (h, ns)" ;; esac
done
daemon_bin=$repo/build/guest/tier-agent/snaptier-lazy-pages
[ -x "$daemon_bin" ] || die "$daemon_bin is missing: run 'make guest-agent' (or 'make zdtm')"

# ---- the root: the guests' rootfs plus the zdtm layer (cached by content)
rootfs=$(guest_rootfs)
rootfs_key=${rootfs##*/rootfs-}
cache=$(dirname "$rootfs")
layer_key=$( (printf '%s\n' "$rootfs_key"; cat "$here/build-layer.sh" "$here/layer-steps.sh") | sha256sum | cut -c1-16)
layer=$cache/zdtm-$layer_key
if [ ! -f "$layer.READY" ]; then
  log "building the zdtm layer (first run only: apt-get source criu, build the suite; ~2 min)"
  find "$cache" -maxdepth 1 -name 'zdtm-*' ! -name "zdtm-$layer_key*" -exec rm -rf {} +
  bash "$here/build-layer.sh" "$rootfs" "$layer"
fi

# ---- the list
tests=$(awk '$1 ~ /^zdtm\// { print $1 }' "$here/tests.txt")
[ -n "$only" ] && tests=$(grep -E -- "$only" <<< "$tests" || true)
[ -n "$tests" ] || die "no test of tests/zdtm/tests.txt matches '$only'"
rm -rf "$out" && mkdir -p "$out"
cp "$here/tests.txt" "$out/tests.txt"

# ---- one run per flavor x daemon, each in namespaces of its own
run_one() {
  local flavor=$1 d=$2 daemon prefetch=none dir scratch rc=0 t0=$SECONDS
  daemon=${d%%-*}
  [ "$d" = "${d#*-}" ] || prefetch=${d#*-}
  dir=$out/$flavor-$d
  scratch=$(mktemp -d /tmp/snaptier-zdtm.XXXXXX)
  mkdir -p "$dir"
  printf 'daemon=%q\nprefetch=%q\nflavor=%q\nparallel=%q\ntimeout_s=%q\n' \
    "$daemon" "$prefetch" "$flavor" "$parallel" "$run_timeout_s" > "$dir/params"
  printf '%s\n' "$tests" > "$dir/tests.list"
  log "zdtm $flavor flavor, $d daemon: $(wc -l <<< "$tests") tests"
  SNAPTIER_ENTER_INIT=/opt/snaptier/tests/zdtm/inside \
    timeout --kill-after=10 $((run_timeout_s + 60)) \
    unshare --mount --uts --ipc --net --pid --fork --kill-child -- \
    "$repo/native/enter" "process=snaptier-zdtm-$flavor-$d" zdtm "$layer/upper:$rootfs" "$scratch" "$dir/params" \
    "ro:$repo:/opt/snaptier" "rw:$dir:/zdtm-out" > "$dir/enter.log" 2>&1 || rc=$?
  rmdir "$scratch" 2>/dev/null || true
  [ -f "$dir/exit" ] || { log "  the run did not finish (exit $rc): $(tail -3 "$dir/enter.log" "$dir/zdtm.log" 2>/dev/null | tr '\n' ' ')"; }
  log "  done in $((SECONDS - t0)) s: $(cat "$dir"/report/*.tap 2>/dev/null | grep -c '^not ok' || true) failed"
}
for flavor in ${flavors//,/ }; do
  for d in ${daemons//,/ }; do run_one "$flavor" "$d"; done
done

/usr/bin/python3 "$here/report.py" "$out"
