#!/usr/bin/env bash
# Makes a tiny busybox initramfs that loads virtio-blk + ext4, mounts /dev/vda and switches to
# the real root. Debian's initramfs-tools works too but boots about twice as slowly under TCG.
#   build-initrd.sh ROOTFS KERNEL_VERSION OUTPUT
set -euo pipefail
rootfs=$1 kver=$2 out=$3
busybox=/bin/busybox
[ -x "$busybox" ] && file_is_static=$(ldd "$busybox" 2>&1 | grep -c 'not a dynamic') || true
[ "${file_is_static:-0}" -ge 1 ] || { echo "build-initrd: a static busybox is needed (package busybox-static)" >&2; exit 1; }
moddir=$rootfs/usr/lib/modules/$kver
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,newroot,lib}
cp "$busybox" "$work/bin/busybox"
# Dependency order matters: insmod does not resolve dependencies.
mods="lib/crc16 fs/mbcache fs/jbd2/jbd2 crypto/crc32c_generic lib/libcrc32c fs/ext4/ext4 drivers/block/virtio_blk"
loaded=""
for m in $mods; do
  src=$(ls "$moddir/kernel/$m".ko* 2>/dev/null | head -1) || true
  [ -n "$src" ] || continue                # built into this kernel
  name=$(basename "$m")
  case $src in
    *.xz) xz -dc "$src" > "$work/lib/$name.ko" ;;
    *.zst) zstd -qdc "$src" > "$work/lib/$name.ko" ;;
    *) cp "$src" "$work/lib/$name.ko" ;;
  esac
  loaded="$loaded $name"
done
cat > "$work/init" <<EOS
#!/bin/busybox sh
B=/bin/busybox
\$B mount -t proc proc /proc
\$B mount -t devtmpfs dev /dev
for m in $loaded; do \$B insmod /lib/\$m.ko 2>/dev/null; done
init=/sbin/init
for a in \$(\$B cat /proc/cmdline); do case \$a in init=*) init=\${a#init=};; esac; done
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 200 ]; do \$B usleep 50000; i=\$((i+1)); done
\$B mount -t ext4 -o rw /dev/vda /newroot || { echo "snaptier-initrd: cannot mount /dev/vda"; \$B poweroff -f; }
\$B umount /proc
\$B mount --move /dev /newroot/dev
exec \$B switch_root /newroot "\$init"
EOS
chmod 755 "$work/init"
(cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
