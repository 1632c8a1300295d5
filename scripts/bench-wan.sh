#!/usr/bin/env bash
# A real tree over a slow link: ferry (PostgreSQL 50 ms RTT away) vs ferry
# with no backend, a plain directory, sshfs and rclone mount (sftp), in one
# run (crates/ferry/benches/wan_bench.rs, release build). The link is a
# network namespace + the ferry-netem delay proxy (no sch_netem here).
# Prints a markdown table for the WAN section of docs/benchmarks.md on stdout (progress on
# stderr).
#
# Usage: scripts/bench-wan.sh [> table.md]
# Env (see wan_bench.rs): FERRY_WAN_COPIES (5), FERRY_WAN_ONE_WAY_MS (25),
#   FERRY_WAN_BUDGET_S (300), FERRY_WAN_TARGETS (dir,ferry-local,ferry-wan,sshfs,rclone).
# Needs root (namespaces, FUSE mounts, sshd).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v ip >/dev/null || need+=(iproute2)
[[ -x /usr/sbin/sshd ]] || need+=(openssh-server)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v sshfs >/dev/null || need+=(sshfs)
command -v rclone >/dev/null || need+=(rclone)
command -v fusermount3 >/dev/null || need+=(fuse3)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "bench-wan: installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
scripts/pg-test-server.sh install >&2
cargo bench --quiet -p ferry --bench wan_bench
