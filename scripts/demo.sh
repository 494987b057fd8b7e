#!/bin/bash
# moat's first command, on a fresh Debian 12 machine (as root, Rust installed):
# installs the packages moat needs (scripts/deps.sh), builds and installs
# moat (scripts/install.sh), starts a containerd of its own
# (scripts/private-containerd.sh), imports a locally built busybox image
# (scripts/busybox-image.sh), runs one container in a microVM through it,
# prints what the container printed, and always stops that containerd.
#   scripts/demo.sh
# Env: MOAT_DEMO_DIR  where the private containerd lives (default /tmp/moat-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${MOAT_DEMO_DIR:-/tmp/moat-demo}
image=docker.io/library/busybox:latest

log() { printf '[demo] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run me as root (containerd, KVM and mounts need it)" >&2
  exit 1
fi
[ -c /dev/kvm ] || { echo "demo: /dev/kvm is missing: moat needs KVM" >&2; exit 1; }

scripts/deps.sh
scripts/install.sh

log "starting a private containerd in $dir"
scripts/private-containerd.sh stop "$dir" 2>/dev/null || true
cleanup() {
  local rc=$?
  log "stopping the private containerd"
  # It also kills and deletes a container an interrupted run left.
  scripts/private-containerd.sh stop "$dir" || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
sock=$(scripts/private-containerd.sh start "$dir")

log "building and importing $image (busybox-static, no registry needed)"
scripts/busybox-image.sh "$dir/busybox.tar" "$image" >/dev/null
ctr -a "$sock" images import "$dir/busybox.tar" >&2

log "ctr run --rm --runtime io.containerd.moat.v1 $image moat-demo (boots a microVM; on a PVM host this takes a minute)"
start=$(date +%s)
out=$(ctr -a "$sock" run --rm --runtime io.containerd.moat.v1 "$image" moat-demo \
  sh -c 'echo hello from a moat microVM; uname -r')
log "done in $(($(date +%s) - start)) s; the container printed:"
printf '%s\n' "$out"
