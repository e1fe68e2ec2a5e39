#!/usr/bin/env bash
# Builds the tier agent (and its in-place kernel module) for the guests: compiled inside the guest's own trixie rootfs (a
# chroot), so it links against exactly the libraries the guests run. Output: build/guest/,
# which the guests see at /opt/snaptier/build/guest through the read-only project share. The
# chroot mounts the checkout at that same path, so paths compiled into tests hold in the guests.
#   guests/build-agent.sh [extra cmake --build args]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
. "$repo/ci/lib.sh"
[ "$(id -u)" = 0 ] || die "building in the guest chroot needs root"
rootfs=$(guest_rootfs)
mkdir -p "$repo/build/guest"
log "building the tier agent in the guests' rootfs ($rootfs) as a chroot"
# A private mount namespace: the bind mounts vanish with the process, even if the build fails.
timeout 1800 unshare --mount --propagation private bash -euo pipefail -c '
  rootfs=$1 repo=$2; shift 2
  mkdir -p "$rootfs/opt/snaptier"
  mount --bind "$repo" "$rootfs/opt/snaptier"
  mount -t proc proc "$rootfs/proc"
  mount --bind /dev "$rootfs/dev"
  chroot "$rootfs" /bin/bash -euo pipefail -c "
    cd /opt/snaptier
    cmake -S . -B build/guest -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSNAPTIER_BUILD_BENCH=ON > /dev/null
    cmake --build build/guest -j2 $*
    # The in-place module, against the headers of the kernel the guests boot (the newest one
    # in this rootfs, as build-image.sh picks it). Kbuild writes beside its sources: a copy.
    kver=\$(ls /usr/lib/modules | sort -V | tail -1)
    rm -rf build/guest/kmod && mkdir -p build/guest/kmod
    cp tier-agent/kmod/snaptier_cow/* build/guest/kmod/
    make -s -C /usr/src/linux-headers-\$kver M=/opt/snaptier/build/guest/kmod modules
  "
' _ "$rootfs" "$repo" "$@"
log "guest build ready: $repo/build/guest"
