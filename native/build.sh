#!/bin/bash
# Builds native/build/libcloudlet_virt.so from cloudlet_virt.c, only when the source is newer than the library.
# Needs gcc and libvirt's headers (Debian: apt-get install gcc libvirt-dev). The library is not linked against
# libvirt; it dlopen()s libvirt.so.0 at runtime (package libvirt0).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/cloudlet_virt.c"
out="$here/build/libcloudlet_virt.so"
cc="${CC:-gcc}"

if [[ -f "$out" && "$out" -nt "$src" && "$out" -nt "${BASH_SOURCE[0]}" ]]; then
  exit 0
fi

if ! command -v "$cc" >/dev/null 2>&1; then
  echo "native/build.sh: C compiler '$cc' not found (Debian: apt-get install gcc)" >&2
  exit 1
fi
if ! echo '#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>' | "$cc" -fsyntax-only -x c - >/dev/null 2>&1; then
  echo "native/build.sh: libvirt headers <libvirt/libvirt.h> not found (Debian: apt-get install libvirt-dev)" >&2
  exit 1
fi

mkdir -p "$here/build"
# Build to a temporary name and rename, so a running process never maps a half-written library.
"$cc" -O2 -g -Wall -Wextra -shared -fPIC -o "$out.tmp" "$src" -ldl -pthread
mv -f "$out.tmp" "$out"
echo "native/build.sh: built $out"
