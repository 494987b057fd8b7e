#!/bin/bash
# Installs the Debian 12 packages moat needs to build, test and run, if any
# is missing. Rust (cargo) must already be there.
set -euo pipefail
PACKAGES=(
  # guest kernel build (kernel-config/build.sh)
  linux-source-6.12 build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils
  # runtime and tests: containerd + runc to compare, images, taps and netns
  containerd runc busybox-static erofs-utils e2fsprogs iproute2 util-linux python3
  # the CRI tests: pod networks, and protoc for the CRI client's build (k8s-cri)
  containernetworking-plugins protobuf-compiler
  # the isolation benchmark: its image script, and the runtimes it compares
  jq crun runsc
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
command -v cargo >/dev/null || { echo "deps: cargo is missing: install Rust (rustup) first" >&2; exit 1; }
# The isolation benchmark's probe is a static musl binary.
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl >&2 ||
    echo "deps: WARNING: cannot add the x86_64-unknown-linux-musl target; the isolation benchmark test will be skipped" >&2
fi
