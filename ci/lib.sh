# Shared shell helpers for ci/, testbed/ and guests/ scripts. Source it; do not run it.
# shellcheck shell=bash

log() { printf '[snaptier %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'snaptier: error: %s\n' "$*" >&2; exit 1; }

# The Debian mirror this machine already uses (first URI of a deb822 or one-line source that
# serves the main archive). Derived at run time so no host name is ever written into the repo.
debian_mirror() {
  local uri=""
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '
      /^URIs:/ { u=$2 }
      /^Suites:/ { for (i=2;i<=NF;i++) if ($i !~ /security/) ok=1 }
      /^$/ { if (u && ok) { print u; exit } u=""; ok=0 }
      END { if (u && ok) print u }' "$f" | head -1)
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $0 !~ /security/ { for (i=2;i<=NF;i++) if ($i ~ /^(https?|file):/) { print $i; exit } }' /etc/apt/sources.list)
  fi
  printf '%s\n' "${uri%/}"
}

# The guests' trixie rootfs (built or found cached by guests/build-image.sh), on stdout. It is
# the agent's build chroot and the root of native hosts and of the zdtm runs.
guest_rootfs() {
  local repo image key rootfs
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  image=$("$repo/guests/build-image.sh" | tail -n 1) || return 1  # its last line is the image directory
  key=$(sed -n 's/^rootfs_key=//p' "$image/info")
  rootfs=${SNAPTIER_CACHE:-/var/cache/snaptier}/rootfs-$key
  [ -f "$rootfs.READY" ] || die "guest rootfs $rootfs is missing; run guests/build-image.sh --force"
  printf '%s\n' "$rootfs"
}

# Runs "$@" until it succeeds or SECONDS_LIMIT (first arg) passes. Never waits forever.
retry_for() {
  local limit=$1; shift
  local deadline=$((SECONDS + limit))
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}

# The pid in PIDFILE (first arg) if that process is alive and its command line carries MARKER
# (second arg): a daemon a script started, never a recycled pid. Exit 1 otherwise.
daemon_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2" && echo "$pid"
}
