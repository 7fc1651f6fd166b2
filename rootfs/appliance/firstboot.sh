#!/bin/sh
# First boot: the cloudlet id (an app-specific id derived from the machine id, so the machine id itself is never
# published) and a host name made from it, which Avahi announces as <name>.local.
set -eu
id=$(systemd-id128 machine-id --app-specific=5b1d0a6f0c2e4e8f9a3c7d2b41e6f8a0)
name="cloudlet-$(printf '%s' "$id" | cut -c1-8)"
mkdir -p /etc/cloudlet
echo "$name" > /etc/hostname
hostname "$name"
sed -i "s/^127\.0\.1\.1\s.*/127.0.1.1\t$name/" /etc/hosts
# Written last: its presence marks the first boot as done (the unit's condition).
echo "$id" > /etc/cloudlet/cloudlet-id
