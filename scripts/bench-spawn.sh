#!/bin/sh
# Builds and runs the spawn benchmark: /bin/true spawned N times from
# parents of 0, 100 MB, 1 GB and 8 GB touched RSS, by fork+exec, std,
# posix_spawn, ferry-spawn (plain, all options, server), Go os/exec and
# Python subprocess, side by side. Writes target/bench/spawn.md, a section of docs/benchmarks.md.
#
#   scripts/bench-spawn.sh [N] [MB,MB,...]     (defaults: 1000 0,100,1000,8000)
#
# Needs golang-go for the Go reference (apt-get install -y golang-go);
# without it that row is left out.
set -eu
cd "$(dirname "$0")/.."
N=${1:-1000}
SIZES=${2:-0,100,1000,8000}
mkdir -p target/bench
OUT=target/bench/spawn.md  # the section for docs/benchmarks.md
BUILD=target/bench-spawn
mkdir -p "$BUILD" docs

cargo build --release -p ferry-spawn --example spawn_bench
set --
if command -v go >/dev/null; then
    (cd scripts/bench-spawn && GOCACHE=/tmp/go-cache GO111MODULE=off go build -o "../../$BUILD/go_spawn" go_spawn.go)
    set -- --go "$BUILD/go_spawn"
fi
CMD="target/release/examples/spawn_bench $N $SIZES $* --python scripts/bench-spawn/py_spawn.py"
echo "running: $CMD" >&2
TABLE=$($CMD)
echo "$TABLE"

{
    echo "# Spawn benchmark"
    echo
    echo "Produced by \`scripts/bench-spawn.sh $N $SIZES\`, which ran \`$CMD\`."
    echo
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r), $(date -u +%Y-%m-%d)."
    echo "Toolchains: $(rustc --version)$(command -v go >/dev/null && echo ", $(go version | cut -d' ' -f3)"), $(python3 --version)."
    echo "The parent's RSS is anonymous memory touched with MADV_POPULATE_WRITE on 4 KiB pages (MADV_NOHUGEPAGE), as a malloc heap would be; Go and Python touch the same amount in their own heaps."
    echo "Other engineers were compiling on the same 2 cores, so methods run interleaved, one spawn each per round."
    echo "Spawn + wait of a dynamically linked /bin/true is mostly exec, ld.so and exit, so no spawner can go much below posix_spawn here;"
    echo "the goals are ferry-spawn (all options) ≤ 1.05× posix_spawn and flat across RSS, and the fork+exec ÷ ferry-spawn row (70× at 1 GB in docs/ANCHORS' figures)."
    echo "fork+exec at 1 GB varies between runs on this machine (20–39 ms seen), which moves that ratio (30–59×)."
    echo
    echo "$TABLE"
} > "$OUT"
echo "wrote $OUT" >&2
