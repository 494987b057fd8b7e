#!/bin/bash
# Runs every fuzz target (or those named) for SECS seconds each, one job at
# a time, then merges what it found into fuzz/corpus/<target>/ (minimized).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#   fuzz/run.sh [TARGET...]      SECS=180 by default
# One fork job, which goes on after a crash or a timeout: those land in
# fuzz/artifacts/<target>/. Each run's last status line is printed, e.g.
#   #52113: cov: 812 ft: 1950 corp: 120 exec/s 868 oom/timeout/crash: 0/0/0 time: 60s
set -euo pipefail
cd "$(dirname "$0")"
secs=${SECS:-180}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build
bin=target/x86_64-unknown-linux-gnu/release
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  mkdir -p "artifacts/$t"
  # New inputs go to the first directory; the kept corpus seeds the run.
  "$bin/$t" "$work" "corpus/$t" -max_total_time="$secs" -max_len=4096 \
    -timeout=5 -rss_limit_mb=2048 -fork=1 -ignore_crashes=1 -ignore_timeouts=1 \
    -ignore_ooms=1 -artifact_prefix="artifacts/$t/" 2>"$work.log" || true
  echo "$t: $(grep -a '^#[0-9]*:' "$work.log" | tail -1)"
  merged=$(mktemp -d)
  # Edges only (no hit counts), so the kept corpus stays small.
  "$bin/$t" -merge=1 -use_counters=0 "$merged" "corpus/$t" "$work" -max_len=4096 -timeout=5 2>/dev/null
  mv "$work.log" "artifacts/$t/fuzz.log"
  rm -rf "corpus/$t" "$work"
  mv "$merged" "corpus/$t"
done
