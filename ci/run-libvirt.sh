#!/usr/bin/env bash
# Stage 5 of CI: the libvirt backend. `make libvirt` (the libvirt daemon where none runs, the
# default hosts as libvirt domains, health, the agent scenario), then the promises a user relies
# on: a second `up` is refused, a domain of our name that someone else defined is refused with
# its name and left alone, and `down` leaves no domain and no QEMU of the topology behind. Then
# `make two-machines` (the same hosts on two machines, the second reached over ssh on loopback:
# health with CXL on machine one and RDMA to the memory node on machine two), and its `down`
# leaving no domain, QEMU, cable or run directory on either.
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
log "libvirt topology: $((SECONDS - t0)) s; no domain and no QEMU left"

# Two machines: machine two is this one again over ssh on loopback (testbed/ssh/loopback.sh),
# so everything the launcher does there goes through ssh and the other machine's directory.
t1=$SECONDS
two="testbed/tb -t testbed/topologies/two-machines.toml"
two_uri=qemu+ssh://root@127.0.0.1/system
remote_run=/var/lib/snaptier-testbed/run/two-machines
trap 'cleanup; $two down > /dev/null 2>&1 || true' EXIT
make two-machines
$two status --json > "$work/two-status.json"
python3 - "$work/two-status.json" <<'PY'
import json, sys
st = json.load(open(sys.argv[1]))
where = {h["name"]: h["machine"] for h in st["hosts"]}
assert where == {"host0": "one", "host1": "one", "mem0": "two"}, where
assert all(h["ready"] for h in st["hosts"]), st
PY
timeout 60 virsh -q -c "$two_uri" dominfo snaptier-two-machines-mem0 > /dev/null \
  || die "the memory node is not a domain at machine two's uri ($two_uri)"
[ -S "$remote_run/mem0.console" ] || die "machine two's run directory has no console of mem0 ($remote_run)"
$two down
[ -z "$(domains snaptier-two-machines-)" ] || die "domains left after down: $(domains snaptier-two-machines-)"
left=$(pgrep -f "process=snaptier-two-machines-|snaptier-cable-" || true)
[ -z "$left" ] || die "QEMU or cable processes left after down: $left"
[ ! -e "$remote_run" ] || die "machine two's run directory is left after down: $remote_run"
trap - EXIT
rm -rf "$work"
log "two machines: $((SECONDS - t1)) s (health across machines, nothing left after down); libvirt stage: $((SECONDS - t0)) s"
