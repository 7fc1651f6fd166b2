#!/usr/bin/env bash
# Builds the appliance's bootable disk image from Debian packages, without mounting anything:
#   1. the base: mmdebstrap of Debian 13 with rootfs/appliance/packages.txt (kept in OUT/base, rebuilt only when the
#      package list changes, since it is most of the time);
#   2. the root: a copy of the base plus Node, the agent's factory release, the units and the appliance's settings
#      (rootfs/appliance/customize.sh);
#   3. the disk: an MBR disk with a FAT boot partition (syslinux, the kernel and initramfs) and an ext4 root filled
#      with mke2fs -d.
# Usage: build-image.sh RELEASE_DIR NODE_DIR UPDATE_KEY OUT_DIR  (build.sh image prepares the first three)
set -euo pipefail
RELEASE=$1 NODE=$2 UPDATE_KEY=$3 OUT=$4
HERE=$(cd "$(dirname "$0")" && pwd)
SUITE=trixie
MIRRORS=("deb http://deb.debian.org/debian $SUITE main" "deb http://deb.debian.org/debian-security $SUITE-security main")
BOOT_MIB=256
# Room left free on the root for the agent's data (service disks and memory states) and field updates.
ROOT_FREE_MIB=3072

say() { printf '%s\n' "build-image: $*" >&2; }

mkdir -p "$OUT"
packages=$(grep -v '^#' "$HERE/appliance/packages.txt" | paste -sd, -)
stamp=$(printf '%s\n' "$packages" "${MIRRORS[@]}" | sha256sum | cut -c1-16)
if [ "$(cat "$OUT/base.stamp" 2>/dev/null)" != "$stamp" ]; then
  say "bootstrapping Debian $SUITE (a few minutes)"
  rm -rf "$OUT/base" "$OUT/base.stamp"
  mmdebstrap --mode=root --variant=apt --include="$packages" \
    "$SUITE" "$OUT/base" "${MIRRORS[@]}"
  echo "$stamp" > "$OUT/base.stamp"
fi

say "assembling the root"
root="$OUT/root"
rm -rf "$root"
cp -a "$OUT/base" "$root"
bash "$HERE/appliance/customize.sh" "$root" "$RELEASE" "$NODE" "$UPDATE_KEY"

say "writing the disk"
kernel=$(ls "$root"/boot/vmlinuz-* | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | tail -1)
boot="$OUT/boot.fat"
rm -f "$boot"
mkfs.fat -C -n CLOUDLETBT "$boot" $((BOOT_MIB * 1024)) >/dev/null
mcopy -i "$boot" "$kernel" ::vmlinuz
mcopy -i "$boot" "$initrd" ::initrd.img
mcopy -i "$boot" "$HERE/appliance/syslinux.cfg" ::syslinux.cfg
syslinux --install "$boot"

root_mib=$(( $(du -sm "$root" | cut -f1) + ROOT_FREE_MIB ))
boot_start=2048 boot_sectors=$((BOOT_MIB * 2048))
root_start=$((boot_start + boot_sectors)) root_sectors=$((root_mib * 2048))
image="$OUT/cloudlet-appliance.img"
rm -f "$image"
truncate -s $(( (root_start + root_sectors) * 512 )) "$image"
sfdisk --quiet "$image" <<EOF
label: dos
start=$boot_start, size=$boot_sectors, type=c, bootable
start=$root_start, size=$root_sectors, type=83
EOF
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$image" bs=440 count=1 conv=notrunc status=none
dd if="$boot" of="$image" bs=1M seek=1 conv=notrunc,sparse status=none
mkfs.ext4 -q -F -L cloudlet-root -d "$root" -E offset=$((root_start * 512)) "$image" "$((root_mib))M"
rm -f "$boot"
rm -rf "$root"
say "wrote $image ($(du -h --apparent-size "$image" | cut -f1), $(du -h "$image" | cut -f1) used)"
