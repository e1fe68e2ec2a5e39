#!/usr/bin/env bash
# A second "machine" on this one for multi-machine topologies: an sshd on 127.0.0.1:22 that lets
# root in with a key of its own, so qemu+ssh://root@127.0.0.1/system and the launcher's ssh to
# that machine work as they would to another host. The tests use it (CI stage 5); a real second
# machine needs none of it, only the user's own ssh access as root.
#   testbed/ssh/loopback.sh start    idempotent: does nothing if root@127.0.0.1 already answers
#   testbed/ssh/loopback.sh status   exit 0 iff 'ssh root@127.0.0.1 true' works without a password
#   testbed/ssh/loopback.sh stop     stops only an sshd this script started, removes its files
# Everything lives in /run/snaptier-sshd (host key, client key, known_hosts, config, pidfile)
# except one client drop-in, /etc/ssh/ssh_config.d/snaptier-loopback.conf, which points ssh at
# that key and known_hosts for root@127.0.0.1 only; `stop` removes it. sshd listens on loopback
# only and accepts keys only.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=ci/lib.sh
. "$here/../../ci/lib.sh"

run=/run/snaptier-sshd
pidfile=$run/sshd.pid
dropin=/etc/ssh/ssh_config.d/snaptier-loopback.conf
port=22

answers() { timeout 20 ssh -o BatchMode=yes -o ConnectTimeout=5 -o LogLevel=ERROR -p "$port" root@127.0.0.1 true < /dev/null > /dev/null 2>&1; }

ours() { daemon_pid "$pidfile" "$run/sshd_config"; }  # an sshd this script started

case "${1:-}" in
  status)
    answers ;;
  start)
    if answers; then exit 0; fi
    [ "$(id -u)" = 0 ] || die "only root can start the loopback sshd"
    sshd=$(command -v sshd || echo /usr/sbin/sshd)
    [ -x "$sshd" ] || die "sshd is missing: install openssh-server ('make deps')"
    if pid=$(ours); then die "sshd $pid (started by $0) runs but root@127.0.0.1 does not answer; see $run/sshd.log, or '$0 stop'"; fi
    if command -v ss > /dev/null && ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
      die "port $port is taken by an sshd not started by $0: let root@127.0.0.1 in with a key there (the testbed's second machine), or stop it"
    fi
    mkdir -p "$run" /run/sshd
    chmod 700 "$run"
    [ -f "$run/host_key" ] || ssh-keygen -q -t ed25519 -N '' -C snaptier-loopback-host -f "$run/host_key"
    [ -f "$run/client_key" ] || ssh-keygen -q -t ed25519 -N '' -C snaptier-loopback-client -f "$run/client_key"
    cp "$run/client_key.pub" "$run/authorized_keys"
    printf '127.0.0.1 %s\n' "$(cut -d' ' -f1,2 "$run/host_key.pub")" > "$run/known_hosts"
    cat > "$run/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $port
HostKey $run/host_key
PidFile $pidfile
AuthorizedKeysFile $run/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowUsers root
StrictModes no
# libvirt's ssh transport and the launcher run many short sessions at once.
MaxStartups 100:30:200
MaxSessions 50
Subsystem sftp internal-sftp
CONF
    mkdir -p "$(dirname "$dropin")"
    cat > "$dropin" <<CONF
# Written by testbed/ssh/loopback.sh (removed by its 'stop'): root@127.0.0.1, the testbed's loopback machine.
Match host 127.0.0.1 user root
  IdentityFile $run/client_key
  UserKnownHostsFile $run/known_hosts
CONF
    "$sshd" -t -f "$run/sshd_config" || die "sshd refuses $run/sshd_config"
    log "starting sshd on 127.0.0.1:$port (keys only, root; files in $run)"
    "$sshd" -f "$run/sshd_config" -E "$run/sshd.log"
    retry_for 20 answers || die "sshd started but 'ssh root@127.0.0.1 true' fails; see $run/sshd.log"
    log "root@127.0.0.1 answers over ssh" ;;
  stop)
    if pid=$(ours); then
      kill -TERM "$pid"
      for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
      log "sshd $pid stopped"
    else
      log "no sshd started by $0 is running"
    fi
    rm -f "$dropin"
    rm -rf "$run" ;;
  *)
    die "usage: $0 start | status | stop" ;;
esac
