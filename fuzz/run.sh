#!/bin/bash
# Runs every fuzz target (or those named) for SECS seconds each, one job at
# a time, then merges what it found into fuzz/corpus/<target>/ (minimized).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#   fuzz/run.sh [TARGET...]      SECS=180 by default
# Crashes and timeouts land in fuzz/artifacts/<target>/; the executions of
# each run are printed as `<target>: N executions`.
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
    -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" 2>"$work.log" || echo "$t: stopped early (see artifacts/$t/)"
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work.log")
  echo "$t: ${runs:-?} executions"
  merged=$(mktemp -d)
  "$bin/$t" -merge=1 "$merged" "corpus/$t" "$work" -max_len=4096 -timeout=5 2>/dev/null
  rm -rf "corpus/$t" "$work" "$work.log"
  mv "$merged" "corpus/$t"
done
