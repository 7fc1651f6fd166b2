#!/usr/bin/env bash
# The appliance's stack for the test suite: Debian 13 built from the image's own package list plus what the tests use,
# Node 24 from the npm package the image ships, and a node_modules whose uWS is the production build. Test files run
# inside it in private mount and PID namespaces on the host kernel, with their own /run, D-Bus, virtlogd and libvirtd
# (libvirt 11, QEMU 10); the host's daemons are never touched. docs/appliance.md, "The suite on the shipping stack".
#   test-stack.sh build            build what is missing or stale (.build/test-stack/), print nothing else
#   test-stack.sh run [FILES]      build, then run `node dist/test/run.js FILES` inside (all test files without FILES)
#   test-stack.sh shell [COMMAND]  build, then a shell (or COMMAND) inside, with the daemons running
# The caller builds the tree (dist/, native/build) and the test guest first; test/run.ts does both when
# CLOUDLET_TEST_STACK=trixie. Needs root (unshare, mounts) and mmdebstrap.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
STACK="$REPO/.build/test-stack"
NODE_DIR="$REPO/.build/node"
SUITE=trixie
MIRRORS=("deb http://deb.debian.org/debian $SUITE main" "deb http://deb.debian.org/debian-security $SUITE-security main")
# What the tests and benchmarks use beyond the image: build.sh's PACKAGES without the compilers and Debian's Node (the
# native shim and dist/ are built on the host and shared), with the guest builder's kernel and tools (tests build
# customized guests of their own: its cloud kernel has ext4 built in, which the generic one has as a module).
TEST_PACKAGES=(avahi-utils mosquitto socat tini curl chromium linux-image-cloud-amd64 busybox-static cpio xdelta3 xz-utils)
APPLIANCE_UWS='uWebSockets.js@npm:@btc-vision/uwebsockets.js@20.57.0'

say() { printf '%s\n' "test-stack: $*" >&2; }
die() { say "$*"; exit 1; }

packages() { { grep -v '^#' "$REPO/rootfs/appliance/packages.txt"; printf '%s\n' "${TEST_PACKAGES[@]}"; } | sort -u | paste -sd, -; }

# The root is rebuilt only when its package list, its mirrors or this function change (most of the build's time).
bootstrap() {
  local root="$STACK/root" stamp
  stamp=$( { packages; printf '%s\n' "${MIRRORS[@]}"; declare -f bootstrap; } | sha256sum | cut -c1-16)
  [ "$(cat "$STACK/root.stamp" 2>/dev/null)" = "$stamp" ] && return
  command -v mmdebstrap >/dev/null || die "mmdebstrap not found: apt-get install mmdebstrap"
  say "bootstrapping Debian $SUITE for the tests (a few minutes)"
  rm -rf "$root.tmp"
  mkdir -p "$STACK"
  # No service starts in the root (mmdebstrap's policy-rc.d; no systemd runs there): a run starts what it needs.
  mmdebstrap --mode=root --variant=apt --include="$(packages)" "$SUITE" "$root.tmp" "${MIRRORS[@]}"
  rm -rf "$root" "$STACK/root.stamp"
  mv "$root.tmp" "$root"
  echo "$stamp" > "$STACK/root.stamp"
}

# The tree's own node_modules (tap and the rest of the dev tools) with the uWS build the appliance ships in place of
# the development one, as rootfs/stage.sh installs it. Rebuilt when the manifests or the uWS build change.
node_modules() {
  local dir="$STACK/node-modules" stamp
  stamp=$(cat "$REPO/package.json" "$REPO/package-lock.json" <(echo "$APPLIANCE_UWS") | sha256sum | cut -c1-16)
  [ "$(cat "$dir.stamp" 2>/dev/null)" = "$stamp" ] && return
  say "installing the test stack's node_modules (uWS: ${APPLIANCE_UWS#*@npm:})"
  rm -rf "$dir" "$dir.tmp" "$dir.stamp"
  mkdir -p "$dir.tmp"
  cp "$REPO/package.json" "$REPO/package-lock.json" "$dir.tmp/"
  (cd "$dir.tmp" && npm ci --no-audit --no-fund --loglevel=error \
    && npm install --no-save --no-audit --no-fund --loglevel=error "$APPLIANCE_UWS")
  mv "$dir.tmp" "$dir"
  echo "$stamp" > "$dir.stamp"
}

build() {
  bootstrap
  bash "$REPO/rootfs/stage.sh" node "$NODE_DIR"
  node_modules
}

# Runs as PID 1 of a new PID namespace, in a new private mount namespace (see enter): mounts the root's view, makes
# it the namespace's root (pivot_root: libvirt's per-domain mount namespaces need / to be a mount point, which a
# chroot's is not), then runs tini, which reaps what the daemons orphan and whose exit ends every process of the
# namespace (QEMU included), so nothing the run started outlives it.
inside() {
  local root="$STACK/root" state=$1; shift
  mount --bind "$root" "$root"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount --rbind /dev "$root/dev"
  mount --rbind /tmp "$root/tmp"
  mount -t tmpfs -o mode=0755 tmpfs "$root/run"
  mkdir -p "$root/run/lock" "$root/run/dbus" "$root/run/libvirt"
  # The work tree at its own path (dist/ and the tests know absolute paths), with the stack's node_modules over the
  # tree's (over its target when it is a symlink); the host's is left as it is.
  mkdir -p "$root$REPO"
  mount --bind "$REPO" "$root$REPO"
  local modules
  modules=$(readlink -f "$REPO/node_modules")
  [ -d "$root$modules" ] || mkdir -p "$root$modules"
  mount --bind "$STACK/node-modules/node_modules" "$root$modules"
  # libvirt's state is the run's own: every run starts with no domains, and the cached root stays as built.
  local d
  for d in etc/libvirt var/lib/libvirt var/cache/libvirt var/log/libvirt; do
    mkdir -p "$state/$d"
    [ "$d" != etc/libvirt ] || cp -a "$root/etc/libvirt/." "$state/$d/"
    mount --bind "$state/$d" "$root/$d"
  done
  # Two libvirtds on one kernel (the host's and this one) would share cgroup paths (notes: the private-libvirtd recipe).
  printf '\ncgroup_controllers = [ ]\n' >> "$state/etc/libvirt/qemu.conf"
  mkdir -p "$root/.host"
  cd "$root"
  pivot_root . .host
  umount -l /.host
  exec /usr/bin/tini -- /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" \
    PATH="$NODE_DIR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    CLOUDLET_TEST_STACK=trixie CLOUDLET_TEST_STACK_INSIDE=1 ${CLOUDLET_TEST_GUEST:+CLOUDLET_TEST_GUEST="$CLOUDLET_TEST_GUEST"} \
    bash -c "$(declare -f daemons); daemons && cd '$REPO' && exec \"\$@\"" daemons "$@"
}

# In the root: the daemons a test run finds on a box (systemd's place is taken by tini and these lines).
daemons() {
  dbus-daemon --system --fork
  virtlogd -d
  libvirtd -d
  local i
  for i in $(seq 300); do virsh -q -c qemu:///system uri >/dev/null 2>&1 && return; sleep 0.1; done
  echo "test-stack: libvirtd did not answer within 30 s" >&2
  return 1
}

enter() {
  [ "$(id -u)" -eq 0 ] || die "run as root (unshare, mounts)"
  [ -f "$REPO/dist/test/run.js" ] || die "build the tree first (dist/test/run.js is missing)"
  build
  local state status=0
  state=$(mktemp -d /tmp/test-stack.XXXXXX)
  unshare --pid --fork --mount --propagation private -- bash -c "$(declare -f inside daemons); STACK='$STACK' REPO='$REPO' NODE_DIR='$NODE_DIR' inside \"\$@\"" inside "$state" "$@" || status=$?
  rm -rf "$state"
  return $status
}

case "${1:-}" in
  build) build ;;
  run) shift; enter node dist/test/run.js "$@" ;;
  shell) shift; enter "${@:-bash}" ;;
  *) echo "usage: test-stack.sh build | run [FILES] | shell [COMMAND]" >&2; exit 2 ;;
esac
