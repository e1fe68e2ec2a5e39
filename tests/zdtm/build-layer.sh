#!/usr/bin/env bash
# Builds CRIU's zdtm suite as an overlay layer over the guests' trixie rootfs, so it runs
# against exactly the criu (4.1.1) and libraries the guests and native hosts run.
#   tests/zdtm/build-layer.sh ROOTFS LAYER
# LAYER/upper becomes an overlay lower layer (tests/zdtm/zdtm.sh stacks it over ROOTFS);
# LAYER.READY marks it complete. The steps inside the chroot are layer-steps.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/../../ci/lib.sh"
[ $# = 2 ] || die "usage: build-layer.sh ROOTFS LAYER"
rootfs=$1 layer=$2
[ "$(id -u)" = 0 ] || die "building the zdtm layer needs root (overlay mount, chroot)"
[ -x "$rootfs/usr/sbin/criu" ] || die "$rootfs has no criu: not the guests' rootfs"

rm -rf "$layer" "$layer.READY"
mkdir -p "$layer/upper" "$layer/work" "$layer/root"
# A private mount namespace: the overlay and binds vanish with the process, even on failure.
timeout 1800 unshare --mount --propagation private bash -euo pipefail -c '
  rootfs=$1 layer=$2 steps=$3
  root=$layer/root
  mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$layer/upper,workdir=$layer/work" "$root"
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"
  mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
  mount -t tmpfs tmpfs "$root/tmp"
  cp "$steps" "$root/tmp/layer-steps.sh"
  chroot "$root" /bin/bash /tmp/layer-steps.sh
' _ "$rootfs" "$layer" "$here/layer-steps.sh"
rm -rf "$layer/work" "$layer/root"
touch "$layer.READY"
log "zdtm layer ready: $layer ($(du -sh "$layer/upper" | cut -f1))"
