#!/usr/bin/env bash
# Per-process context (issue 10), measured in one run
# (crates/ferry/benches/context_bench.rs, release build): fsync and close
# latency under `ferry run --durability local` vs `--durability remote`,
# with PostgreSQL at 0 ms and 50 ms RTT (a network namespace + the
# ferry-netem delay proxy; no sch_netem here), and the cost of looking the
# caller's context up on every request, on the small-file create loop of
# scripts/bench-fs.sh (empty vs populated process table).
# Prints markdown tables for docs/benchmarks.md on stdout (progress on
# stderr).
#
# Usage: scripts/bench-context.sh [> tables.md]
# Env (see context_bench.rs): FERRY_CONTEXT_PARTS (fsync,lookup),
#   FERRY_CONTEXT_RTTS_MS (0,50), FERRY_CONTEXT_FSYNCS (200),
#   FERRY_CONTEXT_WAN_FSYNCS (50), FERRY_CONTEXT_FILES (5000),
#   FERRY_CONTEXT_REPS (7), FERRY_CONTEXT_OTHERS (4).
# Needs root (FUSE mounts, network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "bench-context: installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
scripts/pg-test-server.sh install >&2
cargo bench --quiet -p ferry --bench context_bench
