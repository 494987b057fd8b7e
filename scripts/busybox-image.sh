#!/bin/bash
# Builds a single-layer OCI image archive of Debian's busybox-static,
# named docker.io/library/busybox:latest, without any registry:
#   scripts/busybox-image.sh OUT.tar [NAME [CMD-JSON]]
# then: ctr images import OUT.tar
# CMD-JSON is the image's Cmd (default ["sh"]); the CRI tests' pause image
# is this one with ["sleep","2147483647"] (killed with SIGKILL at pod stop).
set -euo pipefail
out=$(realpath -m "$1")
name=${2:-docker.io/library/busybox:latest}
cmd_json=${3:-'["sh"]'}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,root} "$work/image/blobs/sha256"
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
chmod 1777 "$root/tmp"

blob() { # file -> digest, moved into the blob store
  local d; d=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$work/image/blobs/sha256/$d"; echo "$d"
}
# Reproducible layer: fixed owner and mtime, sorted entries.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
  -C "$root" -cf "$work/layer.tar" .
layer_size=$(stat -c %s "$work/layer.tar")
layer=$(blob "$work/layer.tar")
cat >"$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":$cmd_json},"rootfs":{"type":"layers","diff_ids":["sha256:$layer"]}}
JSON
config_size=$(stat -c %s "$work/config.json")
config=$(blob "$work/config.json")
cat >"$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:$layer","size":$layer_size}]}
JSON
manifest_size=$(stat -c %s "$work/manifest.json")
manifest=$(blob "$work/manifest.json")
cat >"$work/image/index.json" <<JSON
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$manifest_size,"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"latest"}}]}
JSON
echo '{"imageLayoutVersion":"1.0.0"}' >"$work/image/oci-layout"
tar --sort=name --owner=0 --group=0 --mtime='2026-01-01 00:00Z' -C "$work/image" -cf "$out" .
echo "$out"
