#!/usr/bin/env bash
# Stage 3 of CI: the native testbed (hosts as namespaces on this machine, real CPU and DRAM
# speed). Up, health, the agent scenario and the restore matrix of every function with every
# policy, then the promises a user relies on: a second `up` is refused, `down` leaves no host,
# namespace or CXL file behind. The matrix (results.json, matrix.csv, matrix.png) is kept in
# $SNAPTIER_ARTIFACTS/native-matrix (default build/ci-artifacts).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. ci/lib.sh
topology=testbed/topologies/native.toml
tb="testbed/tb -t $topology"
artifacts=${SNAPTIER_ARTIFACTS:-build/ci-artifacts}
cleanup() { $tb down > /dev/null 2>&1 || true; }
trap cleanup EXIT

t0=$SECONDS
make native
log "make native: $((SECONDS - t0)) s"

if $tb up > /tmp/snaptier-native-second-up.log 2>&1; then die "a second 'up' of a running native topology succeeded"; fi
grep -q "already up" /tmp/snaptier-native-second-up.log || die "second native 'up' did not say the topology is already up"

t1=$SECONDS
rm -rf "$artifacts/native-matrix"
$tb matrix --out "$artifacts/native-matrix"
log "native matrix: $((SECONDS - t1)) s; results in $artifacts/native-matrix"

# Concurrent restores: bursts of one snapshot on both hosts at once, each instance checked.
t1=$SECONDS
rm -rf "$artifacts/native-burst"
$tb burst --function matmul --policies criu-eager,reap,tiered --instances 1,4,8 --hosts host0,host1 \
    --out "$artifacts/native-burst"
$tb chaos --only kill-burst-instance
log "native bursts: $((SECONDS - t1)) s; results in $artifacts/native-burst"

# Page installation from each tier inside a host, beside the tier's own reads (a smoke run: the
# numbers are kept, not judged).
t1=$SECONDS
$tb bench restore --size-mib 8 --rounds 1
cp run/native/bench-restore.json run/native/bench-restore.csv "$artifacts/" 2>/dev/null || true
log "native restore bench: $((SECONDS - t1)) s"

$tb down
left=$(pgrep -f "process=snaptier-native-" || true)
[ -z "$left" ] || die "native host processes left after down: $left"
ns=$(ip netns list | grep -c "^snaptier-native-" || true)
[ "$ns" = 0 ] || die "network namespaces left after down: $(ip netns list | grep '^snaptier-native-')"
ls /dev/shm/snaptier-native-* > /dev/null 2>&1 && die "CXL files left after down: $(ls /dev/shm/snaptier-native-*)"
! mountpoint -q /run/snaptier-native/native 2>/dev/null || die "the CXL tmpfs is left mounted after down: /run/snaptier-native/native"
[ ! -e /run/snaptier-native/native ] || die "the CXL tmpfs directory is left after down: /run/snaptier-native/native"
trap - EXIT
log "native stage: $((SECONDS - t0)) s; nothing left behind"
