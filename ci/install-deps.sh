#!/usr/bin/env bash
# Installs what snaptier needs on a Debian 12 (bookworm) host. Idempotent: a second run only
# checks versions. The mirror is derived from the machine's own apt sources, never written here.
#   ci/install-deps.sh            everything: the build, the unit tests and the testbed (root)
#   ci/install-deps.sh --build    what `make test` needs only: the build and the unit tests.
#                                 Checks without root; installs what is missing when root.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=ci/lib.sh
. "$here/lib.sh"

only_build=0
[ "${1:-}" = --build ] && only_build=1

# Packages for the host: build the agent and run its unit tests (and the functions they run)...
build_pkgs=(
  build-essential cmake ninja-build pkg-config git
  libboost-dev libboost-system-dev nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
  libexpected-dev libtomlplusplus-dev libgtest-dev libgmock-dev libbenchmark-dev libibverbs-dev
  libdaxctl-dev libcxl-dev
  python3 python3-pytest python3-matplotlib python3-numpy python3-pil python3-pyaes
)
# ... and run the testbed (libxml2-utils: xmllint, which virt-xml-validate runs; openssh-server:
# the loopback "second machine" of multi-machine topologies, testbed/ssh/loopback.sh).
testbed_pkgs=(
  e2fsprogs busybox-static cpio xz-utils zstd gzip
  vde2 socat openssh-client openssh-server coreutils procps util-linux libxml2-utils
)

missing_of() {
  local p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || printf '%s\n' "$p"; done
}

if [ $only_build = 1 ]; then
  mapfile -t missing < <(missing_of "${build_pkgs[@]}")
  [ ${#missing[@]} = 0 ] && exit 0
  [ "$(id -u)" = 0 ] || die "missing build dependencies: ${missing[*]} (as root: make deps, or apt-get install ${missing[*]})"
  log "installing build dependencies: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -q >/dev/null || die "apt-get update failed"
  timeout 1200 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install failed for: ${missing[*]}"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "install-deps must run as root (apt-get, mmdebstrap --mode=root)"
host_pkgs=("${build_pkgs[@]}" "${testbed_pkgs[@]}")
# From bookworm-backports: QEMU >= 10 (volatile CXL type-3 memory), mmdebstrap >= 1.4, and
# libvirt 11 for backend = "libvirt" (bookworm's 9.0 predates QEMU 10). libvirt-daemon-common
# pulls systemd 254 from backports too; nothing here needs systemd to run (testbed/libvirt/daemon.sh).
libvirt_pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
backport_pkgs=(qemu-system-x86 qemu-utils mmdebstrap "${libvirt_pkgs[@]}")

mirror=$(debian_mirror)
[ -n "$mirror" ] || die "could not derive a Debian mirror from /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"

bp_list=/etc/apt/sources.list.d/snaptier-backports.sources
want=$(printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror")
stamp=/var/lib/snaptier-apt-updated
if [ ! -f "$bp_list" ] || [ "$(cat "$bp_list")" != "$want" ]; then
  log "adding bookworm-backports from $mirror"
  printf '%s\n' "$want" > "$bp_list"
  rm -f "$stamp"
fi

mapfile -t missing < <(missing_of "${host_pkgs[@]}")
need_bp=0
qemu_major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p' || true)
[ "${qemu_major:-0}" -ge 10 ] || need_bp=1
command -v mmdebstrap >/dev/null || need_bp=1
libvirt_major=$(libvirtd --version 2>/dev/null | sed -n 's/.* \([0-9]*\)\.[0-9.]*$/\1/p' || true)
[ "${libvirt_major:-0}" -ge 11 ] || need_bp=1
[ -z "$(missing_of "${libvirt_pkgs[@]}")" ] || need_bp=1

if [ ${#missing[@]} -gt 0 ] || [ $need_bp = 1 ]; then
  if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +360 2>/dev/null)" ]; then
    log "apt-get update"
    timeout 600 apt-get update -q >/dev/null || die "apt-get update failed"
    touch "$stamp"
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    # No package starts its service (openssh-server would listen on every address): the testbed
    # starts what it needs itself, on loopback. A policy of the machine's own is left alone.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\n# snaptier install-deps: no service starts during its install\nexit 101\n' > "$policy"
      chmod 755 "$policy"
      own_policy=1
    fi
    rc=0
    timeout 1200 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    [ $own_policy = 0 ] || rm -f "$policy"
    [ $rc = 0 ] || die "apt-get install failed for: ${missing[*]}"
  fi
  if [ $need_bp = 1 ]; then
    log "installing from bookworm-backports: ${backport_pkgs[*]}"
    timeout 1200 apt-get install -y -q --no-install-recommends -t bookworm-backports "${backport_pkgs[@]}" >/dev/null \
      || die "could not install ${backport_pkgs[*]} from bookworm-backports"
  fi
fi

qemu_version=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9.]*\).*/\1/p')
[ "${qemu_version%%.*}" -ge 10 ] || die "QEMU $qemu_version is too old: the testbed needs >= 10 for volatile CXL memory (bookworm-backports)"
qemu-system-x86_64 -device help 2>/dev/null | grep -q cxl-type3 || die "this QEMU has no cxl-type3 device"
mmdebstrap --version >/dev/null || die "mmdebstrap is not usable"
libvirt_version=$(libvirtd --version | awk '{print $NF}')
[ "${libvirt_version%%.*}" -ge 11 ] || die "libvirt $libvirt_version is too old for QEMU $qemu_version (bookworm-backports has 11)"
log "host ready: QEMU $qemu_version, libvirt $libvirt_version, $(mmdebstrap --version), cmake $(cmake --version | head -1 | awk '{print $3}')"
