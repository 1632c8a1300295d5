#!/usr/bin/env bash
# Many hosts, one namespace (issue 9): change visibility on another host,
# convergence of a 10,000-file tree, a fresh host reading a real tree at
# 50 ms RTT next to sshfs and rclone mount (sftp), and restore time and
# peak RSS at 100,000 and 1,000,000 files, in one run
# (crates/ferry/benches/multi_bench.rs, release build). The link is a
# network namespace + the ferry-netem delay proxy (no sch_netem here).
# Prints markdown tables for docs/benchmarks.md on stdout (progress on
# stderr).
#
# Usage: scripts/bench-multi.sh [> tables.md]
# Env (see multi_bench.rs): FERRY_MULTI_PARTS
#   (visibility,convergence,fresh-read,restore), FERRY_MULTI_BACKENDS
#   (dir,pg,pg-wan), FERRY_MULTI_ONE_WAY_MS (25), FERRY_MULTI_CHANGES (1000),
#   FERRY_MULTI_VIS_SYNC (0: A ships in the background; 1: ferry sync after each change),
#   FERRY_MULTI_TREE_FILES (10000), FERRY_MULTI_CONV_READ_EARLY (1), FERRY_MULTI_COPIES (2),
#   FERRY_MULTI_BIG_FILES (20), FERRY_MULTI_BUDGET_S (300),
#   FERRY_MULTI_READ_TARGETS (ferry-none,ferry-default,ferry-all,sshfs-8,sshfs,rclone),
#   FERRY_MULTI_RESTORE_FILES (100000,1000000), FERRY_MULTI_RESTORE_BACKENDS
#   (dir,pg), FERRY_MULTI_RESTORE_BUDGET_S (900).
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
    echo "bench-multi: installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
scripts/pg-test-server.sh install >&2
cargo bench --quiet -p ferry --bench multi_bench
