#!/bin/sh
# Maps 1 MiB into a running process with gdb, ferry injection and the ferry
# agent, side by side in one run, and writes target/bench/remote.md, a section of docs/benchmarks.md.
# Needs gdb (apt-get install gdb) and root or ptrace rights over own children.
# Usage: scripts/bench-remote.sh [--runs N] [--gdb-runs N]
set -eu
cd "$(dirname "$0")/.."
cargo build --release -q -p ferry -p ferry-remote --examples
mkdir -p target/bench
out=target/bench/remote.md  # the section for docs/benchmarks.md
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
    cat <<'NOTES'

## Reading the table

- "End to end" is the library path a program uses for one mapping: preflight
  (procfs), finding a `syscall` instruction (maps + vDSO read), attach, stop,
  mmap, restore, detach. "Prepared" reuses a `Target`, so it is only
  attach + stop + mmap + restore + detach.
- The `ferry map` row is a new process per mapping, as gdb is; most of it is
  process startup on this loaded machine (the `ferry --version` row), not
  injection.
- "Target stopped" runs from `PTRACE_INTERRUPT` to `PTRACE_DETACH`.
- gdb 13.1 cannot complete the call on this kernel: it prints "Couldn't write
  extended state status: Bad address" (its `PTRACE_SETREGSET NT_X86_XSTATE`
  is refused) and the target may die afterwards, so each gdb run gets a fresh
  target. Its time is attach + symbol loading + the failed call + detach, a
  lower bound for a working gdb call; it matches the 0.30 s in ANCHORS.md.
- Runs on the same machine minutes apart varied by about 2x for the
  injection rows (prepared 18.7 µs when other builds kept both vCPUs busy,
  about 40 µs when idle): waking a thread on an idle vCPU of this VM costs
  tens of µs. The agent avoids that by serving each connection on its
  client's CPU (before that change its round trip was 4.5 µs or 40-50 µs
  depending on placement, and one run missed the 50 µs goal).
NOTES
} > "$out"
echo "wrote $out"
