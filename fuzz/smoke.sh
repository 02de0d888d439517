#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30) on the nightly toolchain;
# exits non-zero on the first crash. Installs cargo-fuzz first if missing.
set -euo pipefail
seconds="${1:-30}"
cd "$(dirname "$0")"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo +nightly install cargo-fuzz --locked
fi
mkdir -p artifacts
for target in $(cargo +nightly fuzz list); do
  log="artifacts/$target.log"
  echo "fuzz: $target for ${seconds}s"
  if ! cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz: $target FAILED (log and crashing input in fuzz/artifacts/$target*)"
    exit 1
  fi
  grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs)' "$log" | tail -n 1 || true
done
echo "fuzz: all targets ran ${seconds}s without a crash"
