#!/bin/bash
# Runs all of moat's tests on this machine: unit tests, moat-vmm device
# tests with freestanding test guests, the agent's tests on the host, the
# Linux guest boot tests (real /dev/kvm), and the shim's tests through a
# private containerd. Builds (and caches) the guest kernel first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
MOAT_KERNEL=$(kernel-config/build.sh)
MOAT_INITRAMFS=$(guest-agent/build-initramfs.sh)
export MOAT_KERNEL MOAT_INITRAMFS
echo "test: kernel $MOAT_KERNEL, initramfs $MOAT_INITRAMFS" >&2
cargo build --workspace --all-targets
# VM boots are CPU-bound in this host's emulator: two at a time on 2 cores.
# --no-fail-fast: one failing test binary must not hide the others' results.
cargo test --workspace --no-fail-fast -- --test-threads=2
