#!/bin/sh
# Builds the guest initramfs: the static moat-agent as /init plus
# /dev/console, as an uncompressed, reproducible newc cpio at
# target/moat/initramfs.cpio, and prints that path.
set -eu
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
# The explicit --target keeps these flags off host builds (build scripts,
# proc macros).
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    nice cargo build --quiet --release --target "$target" -p moat-agent --bin moat-agent
agent="target/$target/release/moat-agent"
# A dynamic /init would not start: there is no loader in the initramfs.
if command -v file >/dev/null && ! file "$agent" | grep -Eq "statically linked|static-pie linked"; then
    echo "build-initramfs: $agent is not statically linked" >&2
    exit 1
fi
out=target/moat/initramfs.cpio
nice cargo run --quiet -p moat-agent --bin moat-mkinitramfs -- "$agent" "$out"
echo "$PWD/$out"
