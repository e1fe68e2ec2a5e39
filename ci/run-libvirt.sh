#!/usr/bin/env bash
# Stage 5 of CI: the libvirt backend. `make libvirt` (the libvirt daemon where none runs, the
# default hosts as libvirt domains, health, the agent scenario), then the promises a user relies
# on: a second `up` is refused, a domain of our name that someone else defined is refused with
# its name and left alone, and `down` leaves no domain and no QEMU of the topology behind.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. ci/lib.sh
topology=testbed/topologies/libvirt.toml
tb="testbed/tb -t $topology"
uri=qemu:///system
work=$(mktemp -d /tmp/snaptier-ci-libvirt.XXXXXX)
cleanup() {
  $tb down > /dev/null 2>&1 || true
  virsh -q -c "$uri" undefine snaptier-ci-clash-host0 > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

t0=$SECONDS
make libvirt
log "make libvirt: $((SECONDS - t0)) s"

domains() { timeout 60 virsh -q -c "$uri" list --all --name | grep "^$1" || true; }
[ "$(domains snaptier-libvirt- | wc -l)" = 3 ] || die "expected 3 libvirt domains, found: $(domains snaptier-libvirt-)"
if $tb up > "$work/second-up.log" 2>&1; then die "a second 'up' of a running libvirt topology succeeded"; fi
grep -q "already up" "$work/second-up.log" || die "the second libvirt 'up' did not say the topology is already up"

# A domain of a topology's name that this testbed did not define: refused by name, untouched.
cat > "$work/clash.toml" <<'TOML'
name = "ci-clash"
backend = "libvirt"
[[host]]
name = "host0"
role = "compute"
TOML
cat > "$work/foreign.xml" <<'XML'
<domain type='qemu'><name>snaptier-ci-clash-host0</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>
XML
timeout 60 virsh -q -c "$uri" define "$work/foreign.xml" > /dev/null
if testbed/tb -t "$work/clash.toml" up > "$work/clash.log" 2>&1; then die "'up' over a foreign domain of the same name succeeded"; fi
grep -q "snaptier-ci-clash-host0 already exists" "$work/clash.log" || die "the clash was not named: $(tail -2 "$work/clash.log")"
[ "$(domains snaptier-ci-clash-)" = snaptier-ci-clash-host0 ] || die "the refused 'up' changed the foreign domain"
timeout 60 virsh -q -c "$uri" undefine snaptier-ci-clash-host0 > /dev/null
log "clash refused: $(grep -m1 'already exists' "$work/clash.log")"

$tb down
[ -z "$(domains snaptier-libvirt-)" ] || die "libvirt domains left after down: $(domains snaptier-libvirt-)"
left=$(pgrep -f "process=snaptier-libvirt-" || true)
[ -z "$left" ] || die "QEMU processes left after down: $left"
trap - EXIT
rm -rf "$work"
log "libvirt stage: $((SECONDS - t0)) s; no domain and no QEMU left"
