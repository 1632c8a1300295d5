#!/usr/bin/env bash
# Benchmarks ferry-fs against the raw directory and bindfs in one run
# (crates/ferry/benches/fs_bench.rs, release build) and prints a markdown
# table for docs/benchmarks.md on stdout (progress goes to stderr).
#
# Usage: scripts/bench-fs.sh [> table.md]
# Env (see fs_bench.rs): FERRY_BENCH_TARGETS (raw,bindfs,ferry), FERRY_BENCH_REPS (5),
#   FERRY_BENCH_FILES (5000), FERRY_BENCH_SEQ_MIB (1024), FERRY_BENCH_TARBALL.
# Needs root (FUSE mounts, drop_caches).
set -euo pipefail
cd "$(dirname "$0")/.."
targets=${FERRY_BENCH_TARGETS:-raw,bindfs,ferry}
if [[ ,$targets, == *,bindfs,* ]] && ! command -v bindfs >/dev/null; then
    echo "bench-fs: installing bindfs" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bindfs fuse3 >&2
fi
FERRY_BENCH_TARGETS=$targets cargo bench --quiet -p ferry --bench fs_bench
