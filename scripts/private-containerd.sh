#!/bin/bash
# Starts or stops a containerd of its own (root, state, socket under DIR),
# away from any system containerd, with the moat runtime registered.
#   scripts/private-containerd.sh start DIR   prints the socket path
#   scripts/private-containerd.sh stop DIR
set -euo pipefail
cmd=$1
dir=$(realpath -m "$2")
sock=$dir/containerd.sock
case "$cmd" in
start)
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  level = "info"
TOML
  containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 &
  echo $! >"$dir/containerd.pid"
  for _ in $(seq 100); do
    ctr -a "$sock" version >/dev/null 2>&1 && { echo "$sock"; exit 0; }
    sleep 0.1
  done
  echo "containerd did not start; log:" >&2
  cat "$dir/containerd.log" >&2
  exit 1
  ;;
stop)
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/containerd.pid"
  fi
  # Unmount what containerd left (snapshots, shm) before removing its root.
  grep -o " $dir/[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$dir"
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
