#!/bin/bash
# The isolation benchmark's image: scripts/busybox-image.sh's image plus a
# second layer holding the static probe as /bin/moat-probe.
#   bench/probe-image.sh PROBE OUT.tar [NAME]
set -euo pipefail
probe=$(realpath "$1")
out=$(realpath -m "$2")
name=${3:-localhost/moat-bench-probe:latest}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bash "$repo/scripts/busybox-image.sh" "$work/base.tar" "$name" >/dev/null
mkdir "$work/img" "$work/layer" "$work/layer/bin"
tar -C "$work/img" -xf "$work/base.tar"
blobs=$work/img/blobs/sha256
if command -v file >/dev/null && ! file "$probe" | grep -Eq "statically linked|static-pie linked"; then
  echo "probe-image: $probe is not statically linked" >&2
  exit 1
fi
install -m 0755 "$probe" "$work/layer/bin/moat-probe"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
  -C "$work/layer" -cf "$work/layer.tar" .
blob() { # file -> digest, moved into the blob store
  local d; d=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$blobs/$d"; echo "$d"
}
size() { stat -c %s "$1"; }
layer_size=$(size "$work/layer.tar")
layer=$(blob "$work/layer.tar")
manifest=$(jq -r '.manifests[0].digest' "$work/img/index.json" | cut -d: -f2)
config=$(jq -r '.config.digest' "$blobs/$manifest" | cut -d: -f2)
jq -c --arg d "sha256:$layer" '.rootfs.diff_ids += [$d]' "$blobs/$config" >"$work/config.json"
config_size=$(size "$work/config.json")
config=$(blob "$work/config.json")
jq -c --arg c "sha256:$config" --argjson cs "$config_size" --arg l "sha256:$layer" --argjson ls "$layer_size" \
  '.config.digest = $c | .config.size = $cs
   | .layers += [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": $l, "size": $ls}]' \
  "$blobs/$manifest" >"$work/manifest.json"
manifest_size=$(size "$work/manifest.json")
manifest=$(blob "$work/manifest.json")
jq -c --arg m "sha256:$manifest" --argjson ms "$manifest_size" \
  '.manifests[0].digest = $m | .manifests[0].size = $ms' "$work/img/index.json" >"$work/index.json"
mv "$work/index.json" "$work/img/index.json"
tar --sort=name --owner=0 --group=0 --mtime='2026-01-01 00:00Z' -C "$work/img" -cf "$out" .
echo "$out"
