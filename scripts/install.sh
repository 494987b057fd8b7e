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
# moat configuration: where this install put moat's files. Every other
# key (vcpus, memory_mib, boot_timeout_secs, upper, ...) is optional; the
# shim's defaults and their meaning are in shim/src/config.rs (Config).
kernel = "$LIB/vmlinux"
initramfs = "$LIB/initramfs.cpio"
vmm = "$PREFIX/bin/moat-vmm"
layer_cache_dir = "$LIB/layers"
# On disk: the guest fills the uppers (never under state_dir, a tmpfs).
upper_dir = "$LIB/uppers"
TOML
  log "wrote $CONF"
else
  log "kept the existing $CONF"
fi
log "installed: $PREFIX/bin/containerd-shim-moat-v1, $PREFIX/bin/moat-vmm, $LIB/vmlinux, $LIB/initramfs.cpio"
log "try: ctr run --rm --runtime io.containerd.moat.v1 docker.io/library/busybox:latest demo echo hi"
