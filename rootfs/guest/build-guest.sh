#!/bin/bash
# build-guest.sh OUTDIR [--www DIR] [--service-id ID]
#
# Builds the demo/test Service VM as a complete cached-service directory (vmlinuz, initrd.img, disk.qcow2,
# manifest.json) from installed Debian packages only: linux-image-cloud-amd64, busybox-static, kmod, cpio,
# gzip, e2fsprogs, qemu-utils. Nothing is downloaded and no daemon is needed.
#
# Everything is built in a sibling temp dir and renamed into OUTDIR at the end, so OUTDIR is either the old
# complete guest or the new complete guest. The outputs are reproducible (fixed timestamps, UUIDs, owners), so a
# rebuild of the same content leaves OUTDIR untouched.
set -euo pipefail

readonly HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The kernel has ext4, devtmpfs, the 8250 console and inet built in; the IDE CD-ROM and ISO9660 read a config drive.
readonly MODULES=(virtio_pci virtio_net virtio_blk ata_piix sr_mod isofs)
readonly DEFAULT_INDEX='hello from the cloudlet demo service'
# Every timestamp in the initramfs and the ext4 image, for reproducible bytes (mke2fs ignores a fake time of 0).
readonly SOURCE_EPOCH=946684800

exec 3>&2 # the caller's stderr: tools' stderr goes to a log once the build starts
die() { echo "build-guest: $*" >&3; exit 1; }
usage() { echo "usage: build-guest.sh OUTDIR [--www DIR] [--service-id ID]${1:+ ($1)}" >&3; exit 2; }

outdir=''
www_dir=''
service_id='org.cloudlet.demo.http'
while [ $# -gt 0 ]; do
  case "$1" in
    --www) [ $# -ge 2 ] || usage '--www needs a directory'; www_dir=$2; shift 2 ;;
    --service-id) [ $# -ge 2 ] || usage '--service-id needs a value'; service_id=$2; shift 2 ;;
    -*) usage "unknown option $1" ;;
    *) [ -z "$outdir" ] || usage "unexpected argument $1"; outdir=$1; shift ;;
  esac
done
[ -n "$outdir" ] || usage 'OUTDIR is missing'
# Reverse-DNS style ids only, which also keeps the id safe to embed in JSON unescaped.
[[ "$service_id" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ ]] || die "invalid service id '$service_id' (letters, digits, '.', '_', '-')"
[ -z "$www_dir" ] || [ -d "$www_dir" ] || die "--www $www_dir is not a directory"
outdir=${outdir%/}
[ ! -e "$outdir" ] || [ -d "$outdir" ] || die "$outdir exists and is not a directory"

require() { # require COMMAND DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 || die "$1 not found: install the Debian package $2"
}
require busybox busybox-static
require modprobe kmod
require cpio cpio
require gzip gzip
require mke2fs e2fsprogs
require debugfs e2fsprogs
require qemu-img qemu-utils
busybox=$(command -v busybox)
# A dynamically linked busybox (package 'busybox') cannot run as /init without its libraries.
! ldd "$busybox" >/dev/null 2>&1 || die "$busybox is dynamically linked: install the Debian package busybox-static"

kernel=$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$kernel" ] || kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$kernel" ] || die "no kernel in /boot: install the Debian package linux-image-cloud-amd64"
kernel_release=${kernel#/boot/vmlinuz-}
[ -d "/lib/modules/$kernel_release" ] || die "no modules for kernel $kernel_release in /lib/modules (package linux-image-$kernel_release)"

mkdir -p "$(dirname "$outdir")"
work=$(mktemp -d "$(dirname "$outdir")/.$(basename "$outdir").build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# From here on, tools' stderr goes to a log and any failure is reported as one line with the tool's last words.
exec 2>"$work/log"
trap 'echo "build-guest: failed at line $LINENO: $(tail -n1 "$work/log")" >&3; exit 1' ERR
out=$work/out
mkdir -p "$out" "$work/initramfs" "$work/disk"

# --- initrd.img: busybox + the virtio modules (with their dependencies, in load order) + /init --------------
root=$work/initramfs
mkdir -p "$root"/{bin,proc,sys,dev,tmp,mnt,www,lib/modules,probe/cgi-bin}
cp "$busybox" "$root/bin/busybox"
cp "$HERE/init" "$root/init"
cp "$HERE/probe-connect" "$root/probe/cgi-bin/connect"
chmod 755 "$root/init" "$root/probe/cgi-bin/connect"
for module in "${MODULES[@]}"; do
  modprobe -S "$kernel_release" --show-depends "$module" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++' > "$work/module-paths"
: > "$root/lib/modules/load-order"
while read -r path; do
  name=$(basename "$path")
  case "$name" in # busybox insmod only loads plain .ko files
    *.ko.zst) zstd -dqc "$path" > "$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *.ko.xz) xz -dc "$path" > "$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *) cp "$path" "$root/lib/modules/$name" ;;
  esac
  echo "$name" >> "$root/lib/modules/load-order"
done < "$work/module-paths"
find "$root" -exec touch -h -d "@$SOURCE_EPOCH" {} +
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible -R 0:0 --quiet) \
  | gzip -n -9 > "$out/initrd.img"

# --- vmlinuz ---------------------------------------------------------------------------------------------------
cp "$kernel" "$out/vmlinuz"

# --- disk.qcow2: ext4 holding www/ (no loop mount: mke2fs -d copies the staged tree) ---------------------------
stage=$work/disk/stage
mkdir -p "$stage/www"
if [ -n "$www_dir" ]; then
  cp -R "$www_dir/." "$stage/www/"
else
  echo "$DEFAULT_INDEX" > "$stage/www/index.html"
fi
content_kib=$(du -sk "$stage" | cut -f1)
size_mib=$((16 + 2 * (content_kib / 1024 + 1))) # room for ext4 metadata and journal; 16 MiB for the default page
# A UUID derived from the service id instead of a random one, so that identical inputs give identical bytes.
uuid=$(printf '%s' "$service_id" | md5sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
E2FSPROGS_FAKE_TIME=$SOURCE_EPOCH mke2fs -q -t ext4 -m 0 -L www -U "$uuid" \
  -E "root_owner=0:0,hash_seed=$uuid" -d "$stage" "$work/disk/disk.raw" "${size_mib}M" >&2
# mke2fs -d copies each file's real ctime (and the atime its own directory walk just set): pin every inode's times.
(cd "$stage" && find . -mindepth 1) | grep -q '"' && die "--www file names must not contain double quotes"
{ printf '%s\n' / /lost+found; (cd "$stage" && find . -mindepth 1 -printf '/%P\n'); } | while IFS= read -r path; do
  for field in atime ctime mtime crtime; do echo "set_inode_field \"$path\" $field @$SOURCE_EPOCH"; done
done > "$work/disk/pin-times"
E2FSPROGS_FAKE_TIME=$SOURCE_EPOCH debugfs -w -f "$work/disk/pin-times" "$work/disk/disk.raw" >/dev/null
qemu-img convert -q -f raw -O qcow2 "$work/disk/disk.raw" "$out/disk.qcow2"

# --- manifest.json (the shape the agent's catalog validates) -------------------------------------------------------
cat > "$out/manifest.json" <<JSON
{
  "format": 1,
  "service_id": "$service_id",
  "version": "1",
  "description": "Demo HTTP service (busybox httpd in a tiny VM)",
  "tags": ["demo", "http"],
  "port": 8080,
  "memory_mib": 128,
  "vcpus": 1,
  "shareable": true,
  "readiness": { "type": "http", "path": "/", "timeout_ms": 60000 },
  "disk": "disk.qcow2",
  "state": null,
  "boot": { "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "console=ttyS0 quiet ipv6.disable=1 init_on_free=1 no_timer_check" }
}
JSON

# --- publish: leave an identical OUTDIR alone, else swap the new one in with renames ------------------------------
summary="vmlinuz $(stat -c %s "$out/vmlinuz") B ($kernel_release), initrd.img $(stat -c %s "$out/initrd.img") B, disk.qcow2 $(stat -c %s "$out/disk.qcow2") B (ext4 ${size_mib} MiB), manifest.json"
if [ -d "$outdir" ] && diff -rq "$out" "$outdir" >/dev/null 2>&1; then
  echo "unchanged $outdir: $summary"
  exit 0
fi
[ ! -d "$outdir" ] || mv -T "$outdir" "$work/previous"
mv -T "$out" "$outdir"
echo "built $outdir: $summary"
