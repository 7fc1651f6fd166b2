#!/bin/bash
# Builds native/build/libcloudlet_virt.so from cloudlet_virt.c and native/build/cloudlet-logcap (the sandboxes' log
# cap) from cloudlet_logcap.c, each only when its source is newer than what was built.
# Needs gcc and libvirt's headers (Debian: apt-get install gcc libvirt-dev). The library is not linked against
# libvirt; it dlopen()s libvirt.so.0 at runtime (package libvirt0).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/cloudlet_virt.c"
out="$here/build/libcloudlet_virt.so"
cc="${CC:-gcc}"

logcap_src="$here/cloudlet_logcap.c"
logcap="$here/build/cloudlet-logcap"
built() { [[ -f "$1" && "$1" -nt "$2" && "$1" -nt "${BASH_SOURCE[0]}" ]]; }
if built "$out" "$src" && built "$logcap" "$logcap_src"; then
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
if ! built "$out" "$src"; then
  "$cc" -O2 -g -Wall -Wextra -shared -fPIC -o "$out.tmp" "$src" -ldl -pthread
  mv -f "$out.tmp" "$out"
  echo "native/build.sh: built $out"
fi
if ! built "$logcap" "$logcap_src"; then
  "$cc" -O2 -g -Wall -Wextra -o "$logcap.tmp" "$logcap_src"
  mv -f "$logcap.tmp" "$logcap"
  echo "native/build.sh: built $logcap"
fi
