#!/bin/sh
# Builds the guest initramfs: the static moat-agent as /init plus
# /dev/console, as an uncompressed, reproducible newc cpio at
# target/moat/initramfs.cpio, and prints that path. With --agent it builds
# the agent only and prints the binary's path.
set -eu
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
# The explicit --target keeps these flags off host builds (build scripts,
# proc macros).
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    nice cargo build --quiet --profile guest --target "$target" -p moat-agent --bin moat-agent
agent="target/$target/guest/moat-agent"
# A dynamic /init would not start: there is no loader in the initramfs.
if command -v file >/dev/null && ! file "$agent" | grep -Eq "statically linked|static-pie linked"; then
    echo "build-initramfs: $agent is not statically linked" >&2
    exit 1
fi
# Test code must not ship: the scenarios are a dev-dependency only (any of
# their code in the agent would name their crate in its symbols), and the
# crash points (MOAT_CRASH_AT) exist in debug builds only.
if grep -qE 'moat_agent_scenarios|MOAT_CRASH_AT' "$agent"; then
    echo "build-initramfs: $agent contains test code (scenarios or crash points)" >&2
    exit 1
fi
if [ "${1:-}" = --agent ]; then
    echo "$PWD/$agent"
    exit 0
fi
out=target/moat/initramfs.cpio
nice cargo run --quiet -p moat-agent --bin moat-mkinitramfs -- "$agent" "$out"
echo "$PWD/$out"
