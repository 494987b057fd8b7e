#!/bin/bash
# Builds moat's microVM guest kernel (an uncompressed vmlinux with a PVH
# entry note) from Debian's linux-source-6.12, our config fragment and our
# two patches, and caches it outside the checkout.
#
# The cache key is a hash of every input (this script, the fragment, the
# patches, the source tarball's package version and the compiler version),
# so a second run with unchanged inputs returns at once.
#
# Usage: kernel-config/build.sh            prints the path of the cached vmlinux
# Env:   MOAT_KERNEL_CACHE  cache root (default /var/cache/moat/kernel)
#        JOBS               parallel make jobs (default: nproc)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${MOAT_KERNEL_CACHE:-/var/cache/moat/kernel}
JOBS=${JOBS:-$(nproc)}
TARBALL=/usr/src/linux-source-6.12.tar.xz

log() { printf '[kernel %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

need=()
for p in linux-source-6.12 build-essential bc flex bison libelf-dev libssl-dev cpio xz-utils; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if ((${#need[@]})); then
  log "installing ${need[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >&2
fi

key=$( {
  cat "$0" "$HERE/microvm.fragment" "$HERE"/patches/*.patch
  dpkg-query -W -f='${Version}\n' linux-source-6.12
  gcc --version | head -1
} | sha256sum | cut -c1-16)
OUT=$CACHE/$key
if [ -s "$OUT/vmlinux" ]; then
  log "cache hit: $OUT"
  echo "$OUT/vmlinux"
  exit 0
fi

WORK=$(mktemp -d /var/tmp/moat-kernel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
log "cache miss ($key); building in $WORK"
tar -xf "$TARBALL" -C "$WORK"
SRC=$WORK/linux-source-6.12
BLD=$WORK/build
for p in "$HERE"/patches/*.patch; do
  log "applying $(basename "$p")"
  patch -d "$SRC" -p1 --no-backup-if-mismatch -s <"$p"
done

# Reproducible: fixed timestamp, user and host.
export KBUILD_BUILD_TIMESTAMP='Thu Jan  1 00:00:00 UTC 2026' KBUILD_BUILD_USER=moat KBUILD_BUILD_HOST=moat KBUILD_BUILD_VERSION=1
mk() { make -s -C "$SRC" O="$BLD" ARCH=x86_64 "$@"; }
mkdir -p "$BLD"
mk tinyconfig >/dev/null
"$SRC/scripts/kconfig/merge_config.sh" -m -O "$BLD" "$BLD/.config" "$HERE/microvm.fragment" >/dev/null
mk olddefconfig >&2

# Kconfig silently drops options whose dependencies are unmet: fail instead.
bad=0
while IFS='=' read -r k v; do
  case "$k" in CONFIG_*) ;; *) continue ;; esac
  have=$(grep -E "^$k=" "$BLD/.config" | cut -d= -f2- || true)
  [ -n "$have" ] || have=n
  if [ "$have" != "$v" ]; then
    log "config mismatch: $k wanted $v got $have"
    bad=1
  fi
done <"$HERE/microvm.fragment"
[ $bad = 0 ] || { log "fragment not fully applied"; exit 1; }

log "building vmlinux with $JOBS jobs"
mk -j"$JOBS" vmlinux >&2
mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/.tmp.XXXXXX")
cp "$BLD/vmlinux" "$BLD/.config" "$BLD/System.map" "$tmp/"
# Publish atomically so a crash mid-copy never leaves a half kernel behind.
mv -T "$tmp" "$OUT" 2>/dev/null || rm -rf "$tmp"
log "done: $OUT/vmlinux"
echo "$OUT/vmlinux"
