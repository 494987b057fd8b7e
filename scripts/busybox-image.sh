#!/bin/bash
# Builds a single-layer OCI image archive of Debian's busybox-static,
# named docker.io/library/busybox:latest, without any registry:
#   scripts/busybox-image.sh OUT.tar [NAME [CMD-JSON [EXTRA-LAYERS]]]
# then: ctr images import OUT.tar
# CMD-JSON is the image's Cmd (default ["sh"]); the CRI tests' pause image
# is this one with ["sleep","2147483647"] (killed with SIGKILL at pod stop).
# EXTRA-LAYERS (default 0) adds that many small layers on top: layer i
# adds /layers/i; layer 3 adds /opaque/old, layer 5 whites out
# /layers/2, and layer 6 makes /opaque opaque (only /opaque/new left), so
# that the merged view of many layers can be checked from inside
# (`ls /layers /opaque`).
set -euo pipefail
out=$(realpath -m "$1")
name=${2:-docker.io/library/busybox:latest}
cmd_json=${3:-'["sh"]'}
extra_layers=${4:-0}
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
# Reproducible layers: fixed owner and mtime, sorted entries.
layer_tar() { # dir -> digest of its tar in the blob store; size in $work/sizes
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
    -C "$1" -cf "$work/layer.tar" .
  stat -c %s "$work/layer.tar" >>"$work/sizes"
  blob "$work/layer.tar"
}
layers=("$(layer_tar "$root")")
for i in $(seq 1 "$extra_layers"); do
  d=$work/extra-$i
  mkdir -p "$d/layers"
  echo "$i" >"$d/layers/$i"
  case $i in
  3) mkdir -p "$d/opaque" && echo old >"$d/opaque/old" ;;
  5) : >"$d/layers/.wh.2" ;;
  6) mkdir -p "$d/opaque" && : >"$d/opaque/.wh..wh..opq" && echo new >"$d/opaque/new" ;;
  esac
  layers+=("$(layer_tar "$d")")
done
mapfile -t sizes <"$work/sizes"
diff_ids=$(printf '"sha256:%s",' "${layers[@]}")
descriptors=$(for n in "${!layers[@]}"; do
  printf '{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s},' \
    "${layers[$n]}" "${sizes[$n]}"
done)
cat >"$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":$cmd_json},"rootfs":{"type":"layers","diff_ids":[${diff_ids%,}]}}
JSON
config_size=$(stat -c %s "$work/config.json")
config=$(blob "$work/config.json")
cat >"$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$config_size},"layers":[${descriptors%,}]}
JSON
manifest_size=$(stat -c %s "$work/manifest.json")
manifest=$(blob "$work/manifest.json")
cat >"$work/image/index.json" <<JSON
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$manifest_size,"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"latest"}}]}
JSON
echo '{"imageLayoutVersion":"1.0.0"}' >"$work/image/oci-layout"
tar --sort=name --owner=0 --group=0 --mtime='2026-01-01 00:00Z' -C "$work/image" -cf "$out" .
echo "$out"
