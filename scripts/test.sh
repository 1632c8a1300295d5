#!/usr/bin/env bash
# Every test of the workspace, against real mounts, a real PostgreSQL, real
# processes and network namespaces, then suites nobody here wrote (pjdfstest,
# fsx) against a real ferry mount. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
export RUST_BACKTRACE=1
cargo build --workspace --all-targets --release -q
cargo test --workspace --release -q -- --test-threads=2
FERRY_BIN=$PWD/target/release/ferry scripts/outside-suites.sh
