#!/usr/bin/env bash
# The libvirt daemon for backend = "libvirt" topologies on a machine where none runs.
#   testbed/libvirt/daemon.sh start    idempotent: does nothing if qemu:///system answers
#   testbed/libvirt/daemon.sh status   exit 0 iff qemu:///system answers
#   testbed/libvirt/daemon.sh stop     stops only a daemon this script started
# On a machine with systemd, libvirtd (or virtqemud) is the system's: `start` sees it answer
# and leaves it alone, and this directory's configuration is not used. Here (no systemd, no
# cgroups, no security modules) it starts libvirtd with libvirtd.conf and, through a bind mount
# in the daemon's own mount namespace, qemu.conf from this directory; /etc is never edited.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=ci/lib.sh
. "$here/../../ci/lib.sh"

uri=qemu:///system
run=/run/snaptier-libvirt
pidfile=$run/libvirtd.pid

answers() { timeout 10 virsh -q -c "$uri" version >/dev/null 2>&1; }

ours() { daemon_pid "$pidfile" "$here/libvirtd.conf"; }  # a libvirtd this script started

case "${1:-}" in
  status)
    answers ;;
  start)
    command -v virsh >/dev/null || die "virsh is missing: install libvirt with 'make deps' (libvirt-clients)"
    if answers; then
      exit 0
    fi
    command -v libvirtd >/dev/null || die "libvirtd is missing: install libvirt with 'make deps' (libvirt-daemon, libvirt-daemon-driver-qemu)"
    [ "$(id -u)" = 0 ] || die "$uri does not answer and only root can start a system libvirt daemon"
    if pid=$(ours); then
      die "libvirtd $pid (started by $0) is running but $uri does not answer within 10 s; see $run/libvirtd.log, or '$0 stop'"
    fi
    if pgrep -x libvirtd >/dev/null || pgrep -x virtqemud >/dev/null; then
      die "a libvirt daemon not started by $0 is running but $uri does not answer; fix or stop it first"
    fi
    mkdir -p "$run"
    rm -f "$pidfile"
    log "starting libvirtd ($uri) with $here/libvirtd.conf and $here/qemu.conf"
    # --propagation slave: mounts made later on the machine (a new /dev/shm file system, a
    # checkout on another disk) still reach the daemon and its QEMUs; ours never leave it.
    timeout 30 unshare --mount --propagation slave -- sh -c \
      'mount --bind "$1" /etc/libvirt/qemu.conf && exec libvirtd --daemon --config "$2" --pid-file "$3"' \
      sh "$here/qemu.conf" "$here/libvirtd.conf" "$pidfile" \
      || die "libvirtd did not start; see $run/libvirtd.log"
    retry_for 30 answers || die "libvirtd started but $uri does not answer after 30 s; see $run/libvirtd.log"
    log "libvirtd $(cat "$pidfile") answers on $uri" ;;
  stop)
    pid=$(ours) || { log "no libvirtd started by $0 is running"; exit 0; }
    kill -TERM "$pid"
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ ! -d "/proc/$pid" ] || { kill -KILL "$pid"; sleep 0.5; }
    rm -f "$pidfile"
    log "libvirtd $pid stopped (running domains keep running; 'tb down' them first)" ;;
  *)
    die "usage: $0 start | status | stop" ;;
esac
