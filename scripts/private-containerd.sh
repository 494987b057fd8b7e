#!/bin/bash
# The one private containerd of moat's tests, demo and bench: a containerd
# of its own (root, state, sockets and log under DIR), away from any
# system containerd, with the moat runtime registered.
#   scripts/private-containerd.sh start DIR [LEVEL]   prints the socket path
#   scripts/private-containerd.sh stop DIR
#   scripts/private-containerd.sh restart DIR [LEVEL]
# start: containerd inherits this environment (PATH finds the shim,
# MOAT_CONFIG names the shim's config) and logs at LEVEL (default info;
# debug also passes -debug to the shims) to DIR/containerd.log.
# With MOAT_CRI=1, start also serves Kubernetes' CRI on the same socket:
# handlers runc and moat; pod networks from Debian's CNI plugins (bridge
# MOAT_CRI_BRIDGE on MOAT_CRI_SUBNET, host-local, portmap; stop removes
# the bridge); the pause image MOAT_CRI_PAUSE (built locally: no registry).
# stop: kills and deletes every task, stops containerd, kills the moat
# shims and VMs still serving it, unmounts what it left under DIR and
# removes DIR (kept, for its logs, if MOAT_TEST_KEEP
# is set).
# restart: stops containerd alone (SIGTERM; its shims, VMs and tasks run
# on), then starts it again as start does; the log goes on.
set -euo pipefail
cmd=$1
dir=$(realpath -m "$2")
level=${3:-info}
sock=$dir/containerd.sock
# ctr on a wedged containerd must not hang the caller.
ctr_() { timeout -s KILL 60 ctr -a "$sock" "$@"; }

# The CRI plugin's part of the config (MOAT_CRI=1), or its disabling.
cri_config() {
  if [ -z "${MOAT_CRI:-}" ]; then
    echo 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
    return
  fi
  local bridge=${MOAT_CRI_BRIDGE:-moatcri0}
  mkdir -p "$dir/cni"
  echo "$bridge" >"$dir/cni-bridge"
  cat >"$dir/cni/10-moat-cri.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "moat-cri", "plugins": [
  {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$dir/cni-ipam",
            "ranges": [[{"subnet": "${MOAT_CRI_SUBNET:-10.214.0.0/24}"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
JSON
  # restrict_oom_score_adj: without CAP_SYS_RESOURCE (as in CI's
  # containers) runc cannot lower a pod's oom_score_adj.
  cat <<TOML
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${MOAT_CRI_PAUSE:-registry.k8s.io/pause:3.6}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.moat]
      runtime_type = "io.containerd.moat.v1"
TOML
}

start() {
  mkdir -p "$dir"
  cat >"$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
$(cri_config)
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  level = "$level"
TOML
  containerd --config "$dir/config.toml" </dev/null >>"$dir/containerd.log" 2>&1 &
  echo $! >"$dir/containerd.pid"
  for _ in $(seq 200); do
    ctr_ version >/dev/null 2>&1 && { echo "$sock"; return 0; }
    sleep 0.1
  done
  echo "containerd did not start; log:" >&2
  cat "$dir/containerd.log" >&2
  return 1
}

# Tasks a caller left (an interrupted demo, a failed test): their shims
# and VMs go with them.
remove_tasks() {
  local ns t
  for ns in $(ctr_ namespaces ls -q 2>/dev/null); do
    for t in $(ctr_ -n "$ns" tasks ls -q 2>/dev/null); do
      ctr_ -n "$ns" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
      ctr_ -n "$ns" tasks delete -f "$t" >/dev/null 2>&1 || true
    done
  done
}

# Shims and VMs that outlived their tasks: a shim's command line names the
# socket, and a test's moat config (MOAT_CONFIG) lies under DIR.
kill_leftovers() {
  local p exe
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case "$exe" in *containerd-shim-moat*|*moat-vmm*) ;; *) continue ;; esac
    if cat "$p/cmdline" "$p/environ" 2>/dev/null | tr '\0' '\n' | grep -qF "$dir/"; then
      kill -9 "${p#/proc/}" 2>/dev/null || true
    fi
  done
}

# containerd alone: SIGTERM, then SIGKILL after 10 s.
stop_containerd() {
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/containerd.pid"
  fi
}

stop() {
  if [ -S "$sock" ]; then
    remove_tasks
  fi
  stop_containerd
  kill_leftovers
  if [ -f "$dir/cni-bridge" ]; then
    ip link del "$(cat "$dir/cni-bridge")" 2>/dev/null || true
  fi
  # Unmount what containerd left (snapshots, shm) before removing its root.
  grep -o " $dir/[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  if [ -z "${MOAT_TEST_KEEP:-}" ]; then
    rm -rf "$dir"
  fi
}

case "$cmd" in
start) start ;;
stop) stop ;;
restart) stop_containerd && start ;;
*) echo "usage: $0 start DIR [LEVEL] | stop DIR | restart DIR [LEVEL]" >&2; exit 2 ;;
esac
