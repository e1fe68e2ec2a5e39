#!/usr/bin/env bash
# Builds the Debian trixie guest image: kernel, a small fast initrd, and an ext4 root image.
#
#   guests/build-image.sh [--force]      prints the image directory on stdout
#
# Two cache levels, so that editing an init unit does not download Debian again:
#   rootfs/   mmdebstrap of guests/packages.txt          (key: packages.txt + this script)
#   image/    rootfs + guests/overlay + initrd + root.img (key: rootfs key + overlay + initrd)
# Both live under $SNAPTIER_CACHE (default /var/cache/snaptier). The rootfs doubles as the
# build chroot in which the tier agent is compiled against trixie (see guests/build-agent.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$here/../ci/lib.sh"

force=0
[ "${1:-}" = --force ] && force=1
[ "$(id -u)" = 0 ] || die "building the guest image needs root (mmdebstrap --mode=root)"
command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: run 'make deps'"

cache=${SNAPTIER_CACHE:-/var/cache/snaptier}
suite=${SNAPTIER_GUEST_SUITE:-trixie}
mkdir -p "$cache"

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
rootfs_key=$(printf '%s\n' "$suite" | cat - "$here/packages.txt" "$here/build-image.sh" | sha256sum | cut -c1-16)
overlay_key=$( (cd "$here" && find overlay initrd -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)
image_key=$(printf '%s-%s' "$rootfs_key" "$overlay_key")
rootfs=$cache/rootfs-$rootfs_key
image=$cache/image-$image_key

if [ $force = 0 ] && [ -f "$image/READY" ]; then
  log "guest image is cached: $image"
  printf '%s\n' "$image"
  exit 0
fi

# ---- level 1: the package rootfs
if [ $force = 1 ] || [ ! -f "$rootfs.READY" ]; then
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || die "cannot derive a Debian mirror from this machine's apt sources"
  pkgs=$(grep -v '^\s*#' "$here/packages.txt" | grep -v '^\s*$' | paste -sd, -)
  log "building the $suite rootfs from $mirror (first build only; a few minutes)"
  rm -rf "$rootfs" "$rootfs.READY"
  t0=$SECONDS
  # Progress: mmdebstrap prints its phases; keep them, drop apt's per-package noise.
  timeout 1800 mmdebstrap --variant=apt --mode=root \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --include="$pkgs" \
    --customize-hook='chroot "$1" passwd -d root' \
    --customize-hook='echo snaptier-guest > "$1/etc/hostname"' \
    --customize-hook='printf "/dev/vda / ext4 rw,relatime 0 1\n" > "$1/etc/fstab"' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*; chroot "$1" ssh-keygen -A' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
    "$suite" "$rootfs" "$mirror" 2>&1 | grep --line-buffered -E '^I: |^E: |^W: ' >&2 \
    || { [ "${PIPESTATUS[0]}" = 0 ] || die "mmdebstrap failed (exit ${PIPESTATUS[0]}); is the mirror reachable?"; }
  touch "$rootfs.READY"
  log "rootfs ready in $((SECONDS - t0)) s: $(du -sh "$rootfs" | cut -f1)"
  # Old rootfs/image generations are dropped so the cache does not grow without bound.
  find "$cache" -maxdepth 1 -name 'rootfs-*' ! -name "rootfs-$rootfs_key*" -exec rm -rf {} +
fi

# ---- level 2: overlay, initrd, ext4 image
log "assembling the guest image (overlay + initrd + ext4)"
t0=$SECONDS
rm -rf "$image" && mkdir -p "$image"
stage=$(mktemp -d "$cache/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
# The image is the rootfs plus the overlay. Copy with reflinks/hardlinks avoided: the rootfs
# is also a build chroot and must not be modified by the overlay.
cp -a "$rootfs/." "$stage/"
rm -rf "$stage/build" "$stage/src"
cp -a "$here/overlay/." "$stage/"
chmod 755 "$stage/usr/lib/snaptier/init" "$stage/usr/lib/snaptier/run-units" "$stage"/usr/lib/snaptier/init.d/*
kver=$(ls "$stage/usr/lib/modules" | sort -V | tail -1)
cp -L "$stage/boot/vmlinuz-$kver" "$image/vmlinuz"
"$here/initrd/build-initrd.sh" "$stage" "$kver" "$image/initrd.img"
size_mb=$(( $(du -sm "$stage" | cut -f1) * 13 / 10 + 512 ))
mkfs.ext4 -q -F -L snaptier-root -d "$stage" "$image/root.img" "${size_mb}M"
printf 'suite=%s\nkernel=%s\nrootfs_key=%s\nimage_key=%s\n' "$suite" "$kver" "$rootfs_key" "$image_key" > "$image/info"
touch "$image/READY"
find "$cache" -maxdepth 1 -name 'image-*' ! -name "image-$image_key" -exec rm -rf {} +
log "guest image ready in $((SECONDS - t0)) s: $image (kernel $kver, root.img ${size_mb} MiB)"
printf '%s\n' "$image"
