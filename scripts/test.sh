#!/usr/bin/env bash
# Every test of the workspace, against real mounts, a real PostgreSQL,
# real processes and network namespaces. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test
export RUST_BACKTRACE=1
cargo build --workspace --all-targets -q
cargo test --workspace -q -- --test-threads=2
