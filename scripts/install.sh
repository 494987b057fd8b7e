#!/bin/bash
# Builds and installs moat on this machine (as root):
#   - containerd-shim-moat-v1 and moat-vmm (release) into $PREFIX/bin (/usr/local/bin),
#   - the guest kernel (kernel-config/build.sh, cached) and the initramfs with
#     the static moat-agent (guest-agent/build-initramfs.sh) into /var/lib/moat/,
#   - a default /etc/moat/config.toml unless one exists.
# Then: ctr run --runtime io.containerd.moat.v1 ...
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
LIB=${MOAT_LIB:-/var/lib/moat}
CONF=${MOAT_CONF:-/etc/moat/config.toml}

log() { printf '[install] %s\n' "$*" >&2; }

scripts/deps.sh
log "building containerd-shim-moat-v1 and moat-vmm (release)"
nice cargo build --release -p containerd-shim-moat-v1 -p moat-vmm
log "building the guest kernel (cached after the first build)"
kernel=$(kernel-config/build.sh)
log "building the initramfs (static moat-agent)"
initramfs=$(guest-agent/build-initramfs.sh)

install -d "$PREFIX/bin" "$LIB" "$LIB/layers" "$(dirname "$CONF")"
release=${CARGO_TARGET_DIR:-target}/release
# install(1) replaces the file, so a running shim or VMM keeps its copy.
install -m 0755 "$release/containerd-shim-moat-v1" "$PREFIX/bin/"
install -m 0755 "$release/moat-vmm" "$PREFIX/bin/"
# Replace atomically: a running VM keeps its open copy.
install -m 0644 "$kernel" "$LIB/vmlinux.new" && mv -f "$LIB/vmlinux.new" "$LIB/vmlinux"
install -m 0644 "$initramfs" "$LIB/initramfs.cpio.new" && mv -f "$LIB/initramfs.cpio.new" "$LIB/initramfs.cpio"

if [ ! -e "$CONF" ]; then
  cat >"$CONF" <<TOML
# moat configuration; every key is optional (these are the defaults).
kernel = "$LIB/vmlinux"
initramfs = "$LIB/initramfs.cpio"
vmm = "$PREFIX/bin/moat-vmm"
vcpus = 1
memory_mib = 256
# The largest VM annotations (io.moat.*, CRI pod resources) may ask for.
max_vcpus = 16
max_memory_mib = 16384
# Guest boots take 20-130 s on PVM hosts (no nested virtualization), and
# each agent call that mounts a rootfs up to a few minutes there.
boot_timeout_secs = 300
agent_timeout_secs = 300
# kill, delete, pids, stats, pause, update: a hung agent fails them after it.
control_timeout_secs = 30
state_dir = "/run/moat"
layer_cache_dir = "$LIB/layers"
# "ext4" (sparse image per container) or "tmpfs" (in guest memory)
upper = "ext4"
upper_size_mib = 4096
# On disk: the guest fills the uppers (never under state_dir, a tmpfs).
upper_dir = "$LIB/uppers"
# Cap on one pod's uppers together (apparent sizes).
pod_upper_limit_mib = 16384
spare_block_slots = 8
# pids.max of containers whose spec sets no pids limit (0: none).
pids_limit = 1024
TOML
  log "wrote $CONF"
else
  log "kept the existing $CONF"
fi
log "installed: $PREFIX/bin/containerd-shim-moat-v1, $PREFIX/bin/moat-vmm, $LIB/vmlinux, $LIB/initramfs.cpio"
log "try: ctr run --rm --runtime io.containerd.moat.v1 docker.io/library/busybox:latest demo echo hi"
