#!/usr/bin/env bash
# Stage 6 of CI: the emulated pipeline. `make testbed` on a clean machine, then the promises a
# user relies on: a second `up` is refused without side effects, a second `make testbed`
# reuses the image and the running topology, and `make down` leaves no QEMU behind.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. ci/lib.sh
tb=testbed/tb
tag=process=snaptier-default-
cleanup() { $tb down > /dev/null 2>&1 || true; }
trap cleanup EXIT

t0=$SECONDS
make testbed
log "make testbed (first): $((SECONDS - t0)) s"

qemus=$(pgrep -c -f "$tag" || true)
[ "$qemus" = 3 ] || die "expected 3 QEMU processes after make testbed, found $qemus"
if $tb up > /tmp/snaptier-second-up.log 2>&1; then die "a second 'up' of a running topology succeeded"; fi
grep -q "already up" /tmp/snaptier-second-up.log || die "second 'up' did not say the topology is already up"
[ "$(pgrep -c -f "$tag" || true)" = 3 ] || die "a refused second 'up' changed the QEMU processes"
log "second up refused cleanly: $(tail -1 /tmp/snaptier-second-up.log)"

t1=$SECONDS
make testbed 2>&1 | tee /tmp/snaptier-second-testbed.log
grep -q "guest image is cached" /tmp/snaptier-second-testbed.log || die "the second make testbed rebuilt the guest image"
grep -q "reusing it" /tmp/snaptier-second-testbed.log || die "the second make testbed did not reuse the running topology"
log "make testbed (second, reused): $((SECONDS - t1)) s"

make down
left=$(pgrep -f "$tag" || true)
[ -z "$left" ] || die "QEMU processes left after make down: $left"
trap - EXIT
log "emulated stage: $((SECONDS - t0)) s; no QEMU left"
