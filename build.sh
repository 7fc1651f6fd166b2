#!/usr/bin/env bash
# Cloudlet agent build entry point. Sub-commands:
#   run            install what is missing, build, build the demo Service VM, run the agent on its embedded defaults
#   test [FILES]   install what is missing, build, start the daemons the tests need, run the whole suite (or FILES);
#                  CLOUDLET_TEST_STACK=trixie runs them on the appliance's stack (docs/appliance.md)
#   lint           install what is missing, check the house rules: tsc, eslint, prettier, dependency-cruiser (the
#                  import rules in .dependency-cruiser.cjs), no source file over 500 lines; one line per check
#   bench NAME|all [--quick]   run bench/NAME, or every benchmark in turn (each ends with one line of JSON);
#                  --quick: small sizes, one iteration (what CI runs, test/benchmarks.exclusive.test.ts)
#   build          compile the native shim and the TypeScript
#   deps           install missing Debian and npm packages
#   guest DIR      build the demo/test Service VM directory into DIR
#   libvirtd stop|start   stop or start the system libvirtd the daemons way (the libvirtd-restart test; VMs keep running)
#   image          build the appliance's bootable disk image into .build/appliance/ (docs/appliance.md)
#   image-test     boot that image under QEMU (TCG, user-mode network) and check the agent serves
#   bundle         build a signed agent bundle for cloudlet-update into .build/
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
BUILD="$ROOT/.build"

# Debian packages the agent and its tests need (libvirt-dev only for the native shim's headers).
PACKAGES=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86 qemu-utils
  linux-image-cloud-amd64 busybox-static cpio kmod e2fsprogs dbus avahi-daemon avahi-utils bubblewrap passt nftables gcc make
  iproute2 procps zstd genisoimage systemd socat tini chromium curl nodejs npm openssl
  xdelta3 xz-utils # xdelta3 and xz: only the VM Synthesis benchmark's Elijah-style baseline
  wrk util-linux # wrk: bench http's load generator; util-linux: its taskset, which pins wrk and the servers apart
  mosquitto) # only the fleet broker's tests and benchmark (the agent is a client of a fleet's broker, never runs one)
# Only for image and image-test (WITH_IMAGE_TOOLS=1).
IMAGE_PACKAGES=(mmdebstrap syslinux syslinux-common mtools dosfstools fdisk)

say() { printf '%s\n' "build.sh: $*" >&2; }
die() { say "$*"; exit 1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "run as root (needed: $*)"; fi; }

deps() {
  local missing=() p
  for p in "${PACKAGES[@]}" ${WITH_IMAGE_TOOLS:+"${IMAGE_PACKAGES[@]}"}; do
    # nodejs/npm from Debian only when no Node is installed at all (a newer one may come from elsewhere).
    if [[ $p == nodejs || $p == npm ]] && command -v node >/dev/null && command -v npm >/dev/null; then continue; fi
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    # Debian starts mosquitto's own service on install, on 1883: the agent's MQTT port. The tests start their own.
    if [[ " ${missing[*]} " == *" mosquitto "* ]] && [ -d /run/systemd/system ]; then as_root systemctl disable --now mosquitto || true; fi
  fi
  # A stamp written after a successful install: node_modules is refreshed only when the manifests changed since.
  local stamp=node_modules/.installed
  if [ ! -f "$stamp" ] || [ package.json -nt "$stamp" ] || [ package-lock.json -nt "$stamp" ]; then
    npm ci --no-audit --no-fund
    touch "$stamp"
  fi
}

build() {
  bash native/build.sh
  rm -rf dist # a module moved or removed must not linger there (the runner would still run a removed test)
  npx tsc -p tsconfig.json
}

# Without systemd as PID 1 (containers, CI sandboxes) nobody starts the daemons for us.
daemons() {
  if [ "$(ps -o comm= -p 1 2>/dev/null)" = systemd ]; then
    as_root systemctl start dbus virtlogd libvirtd
    return
  fi
  if [ ! -S /run/dbus/system_bus_socket ]; then as_root mkdir -p /run/dbus; as_root dbus-daemon --system --fork; fi
  pgrep -x virtlogd >/dev/null || as_root virtlogd -d
  if ! pgrep -x libvirtd >/dev/null; then
    # libvirtd daemonizes QEMU, which is then reaped by the nearest subreaper; until a killed QEMU is reaped, libvirtd
    # does not report its domain stopped. tini -s reaps at once, as systemd does on an appliance.
    as_root setsid tini -s -- libvirtd </dev/null >/dev/null 2>&1 &
    # Until it answers: a libvirtd that was killed leaves its socket file behind.
    for _ in $(seq 100); do virsh -q -c qemu:///system uri >/dev/null 2>&1 && break; sleep 0.1; done
  fi
}

guest() {
  bash rootfs/guest/build-guest.sh "$@"
}

# No source file over this many lines: split it rather than grow it.
MAX_LINES=500

long_files() {
  local long
  long=$(find agent native test bench -name '*.ts' -not -path '*/node_modules/*' -exec wc -l {} + | awk -v max=$MAX_LINES '$2 != "total" && $1 > max')
  [ -z "$long" ] || { printf '%s\n' "$long"; echo "(more than $MAX_LINES lines)"; return 1; }
}

# The house rules, checked (docs/architecture.md). Each check prints one line; a failing one prints its findings first.
lint() {
  local failed=() output
  check() {
    local name=$1; shift
    if output=$("$@" 2>&1); then say "lint: $name ok"; else printf '%s\n' "$output" >&2; say "lint: $name FAILED"; failed+=("$name"); fi
  }
  check tsc npx tsc --noEmit -p tsconfig.json
  check eslint npx eslint --max-warnings 0 agent native test bench
  check prettier npx prettier --list-different .
  check dependency-cruiser npx depcruise agent/src native --config .dependency-cruiser.cjs --output-type err
  check "file length" long_files
  ((${#failed[@]} == 0)) || die "lint: ${#failed[@]} check(s) failed: ${failed[*]}"
}

# Stopping libvirtd leaves its QEMU processes running; a started libvirtd reattaches to them.
libvirtd_ctl() {
  local systemd=; [ "$(ps -o comm= -p 1 2>/dev/null)" = systemd ] && systemd=1
  case "${1:-}" in
    stop)
      if [ -n "$systemd" ]; then as_root systemctl stop libvirtd libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket; return; fi
      local pid; pid=$(pgrep -x libvirtd) || return 0
      as_root kill -TERM $pid
      for _ in $(seq 100); do pgrep -x libvirtd >/dev/null || return 0; sleep 0.1; done
      as_root kill -KILL $pid 2>/dev/null || true
      while pgrep -x libvirtd >/dev/null; do sleep 0.1; done
      ;;
    start) daemons ;;
    *) die "usage: ./build.sh libvirtd stop|start" ;;
  esac
}

# The update signing key pair: CLOUDLET_UPDATE_KEYS names a directory with update.key and update.pub.pem; else a
# development pair is made in .build/keys (an image built with it trusts only bundles signed by it).
update_keys() {
  UPDATE_KEYS="${CLOUDLET_UPDATE_KEYS:-$BUILD/keys}"
  [ -f "$UPDATE_KEYS/update.key" ] || node dist/agent/src/update/bundle-tool.js keygen "$UPDATE_KEYS" update
}

image() {
  update_keys
  bash rootfs/stage.sh release "$BUILD/appliance/release"
  bash rootfs/stage.sh node "$BUILD/node"
  bash rootfs/build-image.sh "$BUILD/appliance/release" "$BUILD/node" "$UPDATE_KEYS/update.pub.pem" "$BUILD/appliance"
}

bundle() {
  update_keys
  bash rootfs/stage.sh release "$BUILD/bundle-release"
  node dist/agent/src/update/bundle-tool.js create "$BUILD/bundle-release" "$UPDATE_KEYS/update.key" \
    "$BUILD/cloudlet-agent-$(node -p 'require("./package.json").version').bundle"
}

case "${1:-}" in
  deps) deps ;;
  build) deps; build ;;
  guest) shift; guest "$@" ;;
  libvirtd) libvirtd_ctl "${2:-}" ;;
  run)
    deps; build; daemons
    seed="$BUILD/seed"
    [ -f "$seed/org.cloudlet.demo.http/manifest.json" ] || { mkdir -p "$seed"; guest "$seed/org.cloudlet.demo.http"; }
    export CLOUDLET_SEED_DIR="${CLOUDLET_SEED_DIR:-$seed}"
    exec node dist/agent/src/main.js
    ;;
  test)
    # CLOUDLET_TEST_STACK=trixie: on the appliance's stack (rootfs/test-stack.sh, built with mmdebstrap).
    [ "${CLOUDLET_TEST_STACK:-host}" = host ] || WITH_IMAGE_TOOLS=1
    deps; build; daemons
    exec node dist/test/run.js "${@:2}"
    ;;
  lint) deps; lint ;;
  bench)
    benches=$(ls bench | sed -n 's/\.ts$//p')
    [ -n "${2:-}" ] || die "usage: ./build.sh bench NAME|all [--quick] (NAME one of: $(echo $benches))"
    [ "$2" = all ] || [ -f "bench/$2.ts" ] || die "no benchmark named $2"
    [ -z "${3:-}" ] || [ "$3" = --quick ] || die "unknown option $3 (only --quick)"
    deps; build; daemons
    [ "$2" = all ] || exec node "dist/bench/$2.js" "${@:3}"
    failed=""
    for name in $benches; do node "dist/bench/$name.js" "${@:3}" || failed="$failed $name"; done
    [ -z "$failed" ] || die "benchmarks failed:$failed"
    ;;
  image) WITH_IMAGE_TOOLS=1 deps; build; image ;;
  image-test)
    WITH_IMAGE_TOOLS=1 deps; build
    [ -f "$BUILD/appliance/cloudlet-appliance.img" ] || image
    exec node dist/test/image-boot.js "$BUILD/appliance/cloudlet-appliance.img"
    ;;
  bundle) deps; build; bundle ;;
  *) die "usage: ./build.sh run | test | lint | bench NAME|all [--quick] | build | deps | guest DIR | image | image-test | bundle" ;;
esac
