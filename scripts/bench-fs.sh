#!/usr/bin/env bash
# Benchmarks ferry-fs against the raw directory and bindfs in one run and
# prints markdown tables for docs/benchmarks.md on stdout (progress goes to
# stderr). Parts, chosen with FERRY_BENCH_PARTS (default micro,fsmark):
#
# - micro: crates/ferry/benches/fs_bench.rs (release build): small files
#   one by one, sequential I/O, untar.
# - small: the small-file part of micro (create + 4 KiB write + close, a
#   first stat, unlink; one process, one directory) from python, with the
#   daemon's CPU time per operation, each round right after the last one's
#   deletes.
# - fsmark: fs_mark (Debian package fsmark), the metadata benchmark users
#   know: FERRY_FSMARK_PROCS processes creating 4 KiB files round robin over
#   FERRY_FSMARK_DIRS shared directories, then `rm -rf` of the tree; files/s
#   and the daemon's CPU time per file.
# - profile: bindfs and ferry only; where one create (create + 4 KiB write +
#   close, one process, one directory, as fs_bench.rs does it), stat and
#   unlink go: FUSE requests by opcode and their round trip (the kernel's
#   fuse tracepoints), the daemon's and the client's CPU time and context
#   switches (perf stat), the daemon's system calls per create (strace -c),
#   and for ferry its CPU per create split by request and by part (perf
#   record with call graphs).
#
# Targets: raw (the directory itself), bindfs, ferry, and ferry-uring: ferry
# with -o io_uring (FUSE over io_uring; the script sets the fuse module's
# enable_uring to Y for the run and puts it back at exit, and refuses to go
# on if the mount does not say it serves through the rings).
#
# Usage: scripts/bench-fs.sh [> tables.md]
# Env: FERRY_BENCH_PARTS (micro,fsmark), FERRY_BENCH_TARGETS (raw,bindfs,ferry),
#   FERRY_BENCH_REPS (5); micro (see fs_bench.rs): FERRY_BENCH_FILES (5000),
#   FERRY_BENCH_SEQ_MIB (1024), FERRY_BENCH_TARBALL; fsmark: FERRY_FSMARK_PROCS
#   (4), FERRY_FSMARK_FILES (2500 per process), FERRY_FSMARK_DIRS (32),
#   FERRY_FSMARK_PER_DIR (100); profile: FERRY_PROFILE_FILES (5000),
#   FERRY_PROFILE_STRACE_FILES (1000), FERRY_PROFILE_QUICK (set: only the
#   perf stat table, no tracepoints, strace or perf record), FERRY_PROFILE_KEEP (a path to keep the
#   perf data at); FERRY_BIN (the ferry to measure in fsmark and profile;
#   default: target/release/ferry, built here); FERRY_BENCH_FERRY_OPTIONS
#   (more -o options for ferry there, e.g. threads=2).
# Scratch directories go under TMPDIR (default /tmp), which should be where
# the raw file system allocates at its normal speed: on a root file system
# without a journal, a directory area after heavy create/delete churn can
# take 30 times longer per create (measured: 650 µs in /tmp, 20 µs in a
# fresh /srv directory, same disk), which then swamps every target's figure.
# Needs root (FUSE mounts, drop_caches, perf); installs bindfs and fsmark
# (and perf and strace for the profile) with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
parts=${FERRY_BENCH_PARTS:-micro,fsmark}
targets=${FERRY_BENCH_TARGETS:-raw,bindfs,ferry}
reps=${FERRY_BENCH_REPS:-5}
options=allow_other,default_permissions

has() { [[ ,$1, == *,$2,* ]]; }
say() { echo "bench-fs: $*" >&2; }

# Installs the Debian packages providing the given commands (command:package).
need() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

if has "$targets" bindfs; then need bindfs:bindfs fusermount3:fuse3; fi
if has "$parts" fsmark || has "$parts" profile; then need fs_mark:fsmark; fi
if has "$parts" profile; then need perf:linux-perf strace:strace; fi

enable_uring=/sys/module/fuse/parameters/enable_uring
uring_was=""

# Lets FUSE serve through io_uring for this run (ferry-uring); put back at exit.
rings_on() {
    [[ -w $enable_uring ]] || { say "ferry-uring: no $enable_uring (Linux 6.14+ needed)"; exit 2; }
    [[ -n $uring_was ]] || uring_was=$(cat "$enable_uring")
    echo Y >"$enable_uring"
}
restore_rings() { if [[ -n $uring_was ]]; then echo "$uring_was" >"$enable_uring"; fi; }
trap restore_rings EXIT

if has "$parts" micro; then
    if has "$targets" ferry-uring; then rings_on; fi
    FERRY_BENCH_TARGETS=$targets cargo bench --quiet -p ferry --bench fs_bench
fi
has "$parts" fsmark || has "$parts" profile || has "$parts" small || exit 0

# ----- mounts for the shell parts ---------------------------------------------

if [[ -z ${FERRY_BIN:-} ]]; then
    say "building ferry (release)"
    cargo build --quiet --release -p ferry >&2
    FERRY_BIN=${CARGO_TARGET_DIR:-target}/release/ferry
fi
scratch=$(mktemp -d "${TMPDIR:-/tmp}/ferry-bench-XXXXXX")
chmod 755 "$scratch"
declare -A path=() daemon=()

# Unmounts and stops everything this script started, then removes the scratch
# directory; runs on every exit, failed or not.
cleanup() {
    local t
    for t in "${!daemon[@]}"; do
        timeout 10 umount "${path[$t]}" 2>/dev/null || umount -l "${path[$t]}" 2>/dev/null || true
        kill "${daemon[$t]}" 2>/dev/null || true
        timeout 10 tail --pid="${daemon[$t]}" -f /dev/null 2>/dev/null || kill -9 "${daemon[$t]}" 2>/dev/null || true
    done
    # Only now: the rings need the parameter as long as they live.
    restore_rings
    if grep -q " $scratch/" /proc/self/mounts; then
        say "still mounted under $scratch; leaving it"
    else
        rm -rf "$scratch"
    fi
}
trap cleanup EXIT

# Mounts target $1 (raw: a plain directory) and sets path[$1] and daemon[$1].
mount_target() {
    local t=$1 dir=$scratch/$1 i
    mkdir -p "$dir/src" "$dir/mnt"
    chmod 755 "$dir" "$dir/src" "$dir/mnt"
    case $t in
    raw)
        path[$t]=$dir/src
        return
        ;;
    bindfs) bindfs -f -o "$options" "$dir/src" "$dir/mnt" 2>"$dir/log" & ;;
    ferry | ferry-uring)
        local extra=""
        if [[ $t == ferry-uring ]]; then
            extra=,io_uring
            rings_on
        fi
        "$FERRY_BIN" mount --store "$dir/src" -o "$options$extra${FERRY_BENCH_FERRY_OPTIONS:+,$FERRY_BENCH_FERRY_OPTIONS}" \
            --foreground "$dir/mnt" 2>"$dir/log" &
        ;;
    *)
        say "unknown target $t"
        exit 2
        ;;
    esac
    daemon[$t]=$!
    path[$t]=$dir/mnt
    for ((i = 0; i < 1000; i++)); do
        if mountpoint -q "$dir/mnt"; then
            [[ $t == ferry-uring ]] || return 0
            # The daemon logs its transport just after the mount appears.
            for ((i = 0; i < 100; i++)); do
                grep -q "transport io_uring" "$dir/log" && return
                sleep 0.01
            done
            say "ferry-uring mounted without the rings; its log:"
            cat "$dir/log" >&2
            exit 1
        fi
        kill -0 "${daemon[$t]}" 2>/dev/null || break
        sleep 0.01
    done
    say "$t did not mount within 10 s; its log:"
    cat "$dir/log" >&2
    exit 1
}

IFS=, read -ra target_list <<<"$targets"
for t in "${target_list[@]}"; do mount_target "$t"; done

median() { sort -g | awk '{v[NR] = $1} END {if (NR) print v[int(NR / 2) + 1]}'; }
# The median of the samples of target $1 in "target value" lines on stdin.
values() { awk -v t="$1" '$1 == t {print $2}' | median; }
# CPU time (user + system) of target $1's daemon so far, in microseconds;
# empty for raw.
daemon_cpu() {
    [[ -n ${daemon[$1]:-} ]] || return 0
    awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) * 1e6 / hz}' "/proc/${daemon[$1]}/stat"
}
# "target µs-per-file" from CPU readings $2 and $3 over $4 files (nothing
# when there is no daemon).
per_file() {
    [[ -n $2 ]] || return 0
    awk -v t="$1" -v a="$2" -v b="$3" -v n="$4" 'BEGIN{print t, (b - a) / n}'
}
now_ns() { date +%s%N; }
# The files/s figure of fs_mark's result line (Count Size Files/sec ...).
fsmark_rate() { awk '$1 ~ /^[0-9]+$/ && NF >= 5 {r = $4} END {print r}'; }
machine() {
    echo "Machine: $(nproc) cores, kernel $(uname -r), $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2{print $2}') on" \
        "$(df "${TMPDIR:-/tmp}" | awk 'NR==2{print $1}') ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')," \
        "scratch under ${TMPDIR:-/tmp}, load average $(cut -d' ' -f1-3 /proc/loadavg)). $(date -u '+%Y-%m-%d %H:%M') UTC." \
        "fs_mark $(dpkg-query -W -f '${Version}' fsmark 2>/dev/null || echo '?'), bindfs $(dpkg-query -W -f '${Version}' bindfs 2>/dev/null || echo '?')."
}

# The columns of the tables: with a ferry-uring target, its own column and
# its ratios to bindfs and to classic ferry.
uring_cols() { has "$targets" ferry-uring; }
table_head() {
    if uring_cols; then
        echo "| workload | unit | raw | bindfs | ferry | ferry io_uring | ferry/raw | ferry/bindfs | io_uring/bindfs | io_uring/ferry |"
        echo "|---|---|---|---|---|---|---|---|---|---|"
    else
        echo "| workload | unit | raw | bindfs | ferry | ferry/raw | ferry/bindfs |"
        echo "|---|---|---|---|---|---|---|"
    fi
}

# Prints one markdown row: name, unit, then the medians per target and the
# ferry/raw, ferry/bindfs (and io_uring) ratios ("—" where a target did not
# run).
row() {
    local name=$1 unit=$2 file=$3 t v cells=() ratios=() pair
    local shown=(raw bindfs ferry) pairs=(ferry:raw ferry:bindfs)
    declare -A m=()
    if uring_cols; then
        shown+=(ferry-uring)
        pairs+=(ferry-uring:bindfs ferry-uring:ferry)
    fi
    for t in "${shown[@]}"; do
        v=$(values "$t" <"$file")
        m[$t]=${v:-}
        cells+=("$(num "$v")")
    done
    for pair in "${pairs[@]}"; do
        local a=${m[${pair%%:*}]} b=${m[${pair#*:}]}
        if [[ -n $a && -n $b ]]; then
            ratios+=("$(awk -v a="$a" -v b="$b" 'BEGIN{if (b > 0) printf "%.2f×", a / b; else print "—"}')")
        else
            ratios+=("—")
        fi
    done
    local line="| $name | $unit |"
    for v in "${cells[@]}" "${ratios[@]}"; do line+=" $v |"; done
    echo "$line"
}

# A figure for a table: 3 significant digits or so, "—" when empty.
num() { awk -v v="$1" 'BEGIN{if (v == "") print "—"; else if (v >= 100) printf "%.0f\n", v; else if (v >= 10) printf "%.1f\n", v; else printf "%.2f\n", v}'; }

# ----- fsmark -------------------------------------------------------------------

fsmark_part() {
    local procs=${FERRY_FSMARK_PROCS:-4} files=${FERRY_FSMARK_FILES:-2500}
    local dirs=${FERRY_FSMARK_DIRS:-32} per_dir=${FERRY_FSMARK_PER_DIR:-100}
    local total=$((procs * files)) rep t d out cpu0 t0 t1 rate
    local res=$scratch/fsmark
    for ((rep = 1; rep <= reps; rep++)); do
        for t in "${target_list[@]}"; do
            say "fsmark rep $rep/$reps: $t"
            d=${path[$t]}/fsmark-$rep
            mkdir "$d"
            cpu0=$(daemon_cpu "$t")
            # fs_mark takes paths shorter than 40 bytes only: run it in place.
            out=$(cd "${path[$t]}" && fs_mark -d "fsmark-$rep" -l "$scratch/fs_mark.log" -S 0 -s 4096 \
                -n "$files" -t "$procs" -D "$dirs" -N "$per_dir" -L 1)
            rate=$(fsmark_rate <<<"$out")
            [[ -n $rate ]] || { say "fs_mark printed no result:"; echo "$out" >&2; exit 1; }
            echo "$t $rate" >>"$res.create"
            per_file "$t" "$cpu0" "$(daemon_cpu "$t")" "$total" >>"$res.cpu"
            cpu0=$(daemon_cpu "$t")
            t0=$(now_ns)
            rm -rf "$d"
            t1=$(now_ns)
            echo "$t $(awk -v n="$total" -v a="$t0" -v b="$t1" 'BEGIN{print n * 1e9 / (b - a)}')" >>"$res.rm"
            per_file "$t" "$cpu0" "$(daemon_cpu "$t")" "$total" >>"$res.rmcpu"
        done
    done
    echo "## fs_mark: many files in many directories, several processes"
    echo
    machine
    echo "Medians of $reps runs, targets interleaved. All mounts: \`-o $options\`; ferry: \`$FERRY_BIN\`."
    echo
    table_head
    row "fs_mark: $procs processes × $files files of 4 KiB (create + write + close), $dirs shared directories round robin, $per_dir files each in turn" "files/s (higher is better)" "$res.create"
    row "daemon CPU per file, during fs_mark" "µs (lower is better)" "$res.cpu"
    row "\`rm -rf\` of those $total files (one process)" "files/s (higher is better)" "$res.rm"
    row "daemon CPU per file, during \`rm -rf\`" "µs (lower is better)" "$res.rmcpu"
    echo
    echo "fs_mark: \`fs_mark -d DIR -S 0 -s 4096 -n $files -t $procs -D $dirs -N $per_dir -L 1\` (no fsync; files/s as fs_mark reports it)."
    echo "Command: \`FERRY_BENCH_PARTS=fsmark FERRY_BENCH_TARGETS=$targets FERRY_BENCH_REPS=$reps FERRY_FSMARK_PROCS=$procs FERRY_FSMARK_FILES=$files FERRY_FSMARK_DIRS=$dirs FERRY_FSMARK_PER_DIR=$per_dir scripts/bench-fs.sh\`"
    echo
}

# ----- small --------------------------------------------------------------------

# fs_bench.rs's small-file workload (ops.py, below) per target, targets
# interleaved in each repetition: ops/s per phase, and the daemon's CPU per
# create and per unlink.
small_part() {
    local n=${FERRY_BENCH_FILES:-5000} res=$scratch/small rep t d phase t0 t1 cpu0
    write_ops_py
    for ((rep = 1; rep <= reps; rep++)); do
        for t in "${target_list[@]}"; do
            say "small rep $rep/$reps: $t"
            d=${path[$t]}/small-$rep
            mkdir "$d"
            for phase in create stat unlink; do
                cpu0=$(daemon_cpu "$t")
                t0=$(now_ns)
                python3 "$scratch/ops.py" "$phase" "$d" "$n"
                t1=$(now_ns)
                echo "$t $(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN{print n * 1e9 / (b - a)}')" >>"$res.$phase"
                per_file "$t" "$cpu0" "$(daemon_cpu "$t")" "$n" >>"$res.$phase.cpu"
            done
            rmdir "$d"
        done
    done
    echo "## Small files one by one: create, first stat, unlink"
    echo
    machine
    echo "One process (python3, as fs_bench.rs: open O_CREAT|O_TRUNC + one 4 KiB write + close; stat; unlink), $n files in one directory, medians of $reps runs, targets interleaved; each round creates right after the last round's unlinks, when ext4 without a journal allocates inodes slowly (raw and bindfs pay it, ferry reuses its data files: see docs/benchmarks.md). All mounts: \`-o $options\`${FERRY_BENCH_FERRY_OPTIONS:+, ferry also \`$FERRY_BENCH_FERRY_OPTIONS\`}; ferry io_uring adds \`io_uring\`; ferry: \`$FERRY_BIN\`."
    echo
    table_head
    row "create + 4 KiB write + close" "ops/s (higher is better)" "$res.create"
    row "stat (first pass after writing)" "ops/s (higher is better)" "$res.stat"
    row "unlink" "ops/s (higher is better)" "$res.unlink"
    row "daemon CPU per create" "µs (lower is better)" "$res.create.cpu"
    row "daemon CPU per unlink" "µs (lower is better)" "$res.unlink.cpu"
    echo
    echo "Command: \`FERRY_BENCH_PARTS=small FERRY_BENCH_TARGETS=$targets FERRY_BENCH_REPS=$reps FERRY_BENCH_FILES=$n${FERRY_BENCH_FERRY_OPTIONS:+ FERRY_BENCH_FERRY_OPTIONS=$FERRY_BENCH_FERRY_OPTIONS} scripts/bench-fs.sh\`"
    echo
}

# ----- profile ------------------------------------------------------------------

# The profile's workload, as fs_bench.rs does it: `ops.py PHASE DIR N` runs
# one phase over DIR/f00000…: create (open O_CREAT|O_TRUNC, one 4 KiB
# write, close), stat (by name), unlink.
write_ops_py() {
    cat >"$scratch/ops.py" <<'EOF'
import os, sys
phase, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = [os.path.join(d, "f%05d" % i) for i in range(n)]
block = b"\x5a" * 4096
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
for p in names:
    if phase == "create":
        fd = os.open(p, flags, 0o666)
        os.write(fd, block)
        os.close(fd)
    elif phase == "stat":
        assert os.stat(p).st_size == 4096
    elif phase == "unlink":
        os.unlink(p)
EOF
}

# Splits the ferry daemon's perf samples (`perf script` with call chains on
# stdin) by the FUSE request they served and by the part of it they were
# in: each sample goes to the first part (in order) one of its frames
# matches. $1: creates; $2: daemon CPU µs per create (to scale the shares).
write_categorize_py() {
    cat >"$scratch/categorize.py" <<'EOF'
import re, sys
from collections import Counter
PARTS = [
    ("waiting for a request: read(/dev/fuse), sleep and wake-up", r"fuser::channel::Channel::receive"),
    ("sending the reply: writev(/dev/fuse)", r"fuser::ll::ioslice_concat|__GI___writev|^writev$"),
    ("passthrough: BACKING_OPEN / BACKING_CLOSE ioctls", r"fuse_dev_ioctl|fuse_backing_open|fuse_backing_close|open_backing"),
    ("SQLite commit: WAL frames (pwrite)", r"^pagerWalFrames$|sqlite3WalFrames"),
    ("SQLite commit: the rest (WAL index, locks)", r"^sqlite3VdbeHalt$|sqlite3BtreeCommit|sqlite3PagerCommit"),
    ("SQLite: BEGIN / COMMIT parsed each time (execute_batch)", r"rusqlite::Connection::execute_batch"),
    ("data file: rename of a spare into data/", r"^rename$|std::sys::fs::rename|__x64_sys_rename"),
    ("data file: open + truncate + utimensat (DataFiles::create)", r"ferry_fs::data::DataFiles::create|utimensat"),
    ("data file: open for the handle (Vfs::open)", r"ferry_fs::vfs::Vfs::open"),
    ("data file: statx for the attributes (Vfs::attr)", r"ferry_fs::vfs::Vfs::attr|try_statx"),
    ("SQLite statements (step, bind, cached prepare)", r"sqlite3|rusqlite::"),
    ("malloc / free", r"malloc|^free$|_int_free|cfree|realloc"),
]
OP = re.compile(r"<ferry_fs::fuse::FerryFs as fuser::Filesystem>::(\w+)")
rx = [(name, re.compile(p)) for name, p in PARTS]
def samples(lines):
    stack = []
    for line in lines:
        if line.startswith(("\t", " ")) and line.strip():
            f = line.strip().split(None, 1)
            stack.append(f[1] if len(f) > 1 else "?")
        elif not line.strip():
            if stack:
                yield stack
            stack = []
    if stack:
        yield stack
n, cpu = float(sys.argv[1]), float(sys.argv[2])
parts, ops, total = Counter(), Counter(), 0
for st in samples(sys.stdin):
    total += 1
    part = next((name for name, r in rx if any(r.search(f) for f in st)), "the rest (ferry, fuser, kernel)")
    op = next((m.group(1).upper() for f in reversed(st) for m in [OP.search(f)] if m), "(no request: other threads)")
    if part.startswith(("waiting", "sending")):
        op = "(transport)"
    parts[part] += 1
    ops[op] += 1
if not total:
    sys.exit("no samples")
print(f"By request ({total} samples):\n\n| request | share of daemon CPU | µs per create |\n|---|---|---|")
for k, c in ops.most_common():
    print(f"| {k} | {100 * c / total:.1f}% | {cpu * c / total:.1f} |")
print(f"\nBy part:\n\n| part | share of daemon CPU | µs per create |\n|---|---|---|")
for k, c in parts.most_common():
    print(f"| {k} | {100 * c / total:.1f}% | {cpu * c / total:.1f} |")
EOF
}

# The kernel's device number of the FUSE connection mounted at $1, as the
# fuse tracepoints print it (MKDEV: major << 20 | minor).
fuse_conn() { stat -c '%Hd %Ld' "$1" | awk '{print $1 * 1048576 + $2}'; }

# Reads `perf script` output of the fuse tracepoints on stdin; prints, for
# connection $1, per opcode: "C OPCODE requests-per-op" ($2 ops), and per
# answered request: "R OPCODE round-trip-µs" (send to end).
fuse_ops() {
    awk -v conn="$1" -v n="$2" '
        {
            for (i = 1; i <= NF; i++) {
                if ($i == "connection") c = $(i + 1)
                if ($i == "req") u = $(i + 1)
            }
            if (c != conn) next
            t = $0; sub(/:? *fuse:.*/, "", t); k = split(t, f, " "); ts = f[k] + 0
            if ($0 ~ /fuse_request_send/) {
                op = $0; sub(/.*\(FUSE_/, "", op); sub(/\).*/, "", op)
                opof[u] = op; start[u] = ts; count[op]++
            } else if (u in start) {
                printf "R %s %.1f\n", opof[u], (ts - start[u]) * 1e6
                delete start[u]
            }
        }
        END { for (op in count) printf "C %s %.2f\n", op, count[op] / n }'
}

# Appends "TARGET PHASE OPCODE requests-per-op median-round-trip" lines for
# the fuse_ops output in file $3.
op_table() {
    local op count
    awk '$1 == "C" {print $2, $3}' "$3" | while read -r op count; do
        echo "$1 $2 $op $count $(num "$(awk -v o="$op" '$1 == "R" && $2 == o {print $3}' "$3" | median)")"
    done
}

profile_part() {
    local n=${FERRY_PROFILE_FILES:-5000} ns=${FERRY_PROFILE_STRACE_FILES:-1000}
    local res=$scratch/profile t rep d pid conn phase
    local phases=(create stat stat2 unlink)
    mkdir -p "$res"
    write_ops_py
    write_categorize_py
    for t in "${target_list[@]}"; do
        [[ $t == raw ]] && continue
        pid=${daemon[$t]}
        conn=$(fuse_conn "${path[$t]}")
        for ((rep = 1; rep <= reps; rep++)); do
            say "profile $t rep $rep/$reps: perf stat"
            d=${path[$t]}/stat-$rep
            mkdir "$d"
            for phase in "${phases[@]}"; do
                local t0 t1
                t0=$(now_ns)
                perf stat -x, -e task-clock,context-switches,cpu-migrations -p "$pid" -o "$res/d" -- \
                    perf stat -x, -e task-clock,context-switches -o "$res/c" -- \
                    python3 "$scratch/ops.py" "${phase%2}" "$d" "$n"
                t1=$(now_ns)
                awk -F, -v n="$n" -v k="$t $phase" '$3 == "task-clock" {print k, "daemon_cpu", $1 * 1000 / n}
                    $3 == "context-switches" {print k, "daemon_cs", $1 / n}' "$res/d" >>"$res/stats"
                awk -F, -v n="$n" -v k="$t $phase" '$3 == "task-clock" {print k, "client_cpu", $1 * 1000 / n}
                    $3 == "context-switches" {print k, "client_cs", $1 / n}' "$res/c" >>"$res/stats"
                echo "$t $phase wall $(awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN{print (b - a) / 1000 / n}')" >>"$res/stats"
            done
            rmdir "$d"
        done
        [[ -n ${FERRY_PROFILE_QUICK:-} ]] && continue
        say "profile $t: fuse tracepoints"
        d=${path[$t]}/trace
        mkdir "$d"
        for phase in "${phases[@]}"; do
            perf record -q -e fuse:fuse_request_send -e fuse:fuse_request_end -a -o "$res/trace" -- \
                python3 "$scratch/ops.py" "${phase%2}" "$d" "$n" 2>/dev/null
            perf script -i "$res/trace" 2>/dev/null | fuse_ops "$conn" "$n" >"$res/trace.ops"
            op_table "$t" "$phase" "$res/trace.ops" >>"$res/ops"
        done
        rmdir "$d"
        say "profile $t: strace -c"
        d=${path[$t]}/strace
        mkdir "$d"
        strace -c -f -q -p "$pid" -o "$res/$t.strace" &
        local sp=$!
        sleep 1
        python3 "$scratch/ops.py" create "$d" "$ns"
        kill -INT "$sp"
        wait "$sp" || true
        python3 "$scratch/ops.py" unlink "$d" "$ns"
        rmdir "$d"
        if [[ $t == ferry ]]; then
            say "profile $t: perf record"
            d=${path[$t]}/record
            mkdir "$d"
            perf record -q -F 2999 --call-graph dwarf,32768 -p "$pid" -o "$res/ferry.perf" -- \
                python3 "$scratch/ops.py" create "$d" "$n" 2>/dev/null
            python3 "$scratch/ops.py" unlink "$d" "$n"
            rmdir "$d"
        fi
    done

    local key name
    echo "## Profile of one create, stat and unlink"
    echo
    machine
    echo "One process, $n files of 4 KiB in one directory, by name, as fs_bench.rs does it (create = open O_CREAT|O_TRUNC + one 4 KiB write + close; stat; unlink); stat 2 is a second stat pass. Medians of $reps runs. ferry: \`$FERRY_BIN\`, \`-o $options${FERRY_BENCH_FERRY_OPTIONS:+,$FERRY_BENCH_FERRY_OPTIONS}\`; bindfs: \`-o $options\`. CPU times are user + system, from \`perf stat -e task-clock\` (the daemon with \`-p PID\`; the client's includes its time in the kernel's FUSE code)."
    echo
    echo "| per operation | create: bindfs | create: ferry | stat: bindfs | stat: ferry | stat 2: bindfs | stat 2: ferry | unlink: bindfs | unlink: ferry |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for key in wall:"wall time, µs" daemon_cpu:"daemon CPU, µs" daemon_cs:"daemon context switches" \
        client_cpu:"client CPU, µs" client_cs:"client context switches"; do
        local cells=()
        for phase in "${phases[@]}"; do
            for t in bindfs ferry; do
                cells+=("$(num "$(awk -v t="$t" -v p="$phase" -v k="${key%%:*}" '$1 == t && $2 == p && $3 == k {print $4}' "$res/stats" | median)")")
            done
        done
        printf '| %s |' "${key#*:}"
        printf ' %s |' "${cells[@]}"
        echo
    done
    if [[ -n ${FERRY_PROFILE_QUICK:-} ]]; then
        echo
        echo "Command: \`FERRY_BENCH_PARTS=profile FERRY_PROFILE_QUICK=1 FERRY_BENCH_TARGETS=$targets FERRY_BENCH_REPS=$reps FERRY_PROFILE_FILES=$n${FERRY_BENCH_FERRY_OPTIONS:+ FERRY_BENCH_FERRY_OPTIONS=$FERRY_BENCH_FERRY_OPTIONS} scripts/bench-fs.sh\`"
        echo
        return
    fi
    echo
    echo "FUSE requests per operation, by opcode (the kernel's \`fuse:fuse_request_send\` / \`fuse_request_end\` tracepoints, one run), and the median round trip from send to end, µs:"
    echo
    echo "| operation | opcode | bindfs: requests | bindfs: round trip | ferry: requests | ferry: round trip |"
    echo "|---|---|---|---|---|---|"
    for phase in "${phases[@]}"; do
        local op
        for op in $(awk -v p="$phase" '$2 == p && $4 >= 0.01 {print $3}' "$res/ops" | sort -u); do
            local cells=()
            for t in bindfs ferry; do
                cells+=("$(awk -v t="$t" -v p="$phase" -v o="$op" '$1 == t && $2 == p && $3 == o {print $4 " | " $5}' "$res/ops")")
                [[ -n ${cells[-1]} ]] || cells[-1]="— | —"
            done
            echo "| $phase | $op | ${cells[0]} | ${cells[1]} |"
        done
    done
    echo
    echo "Daemon system calls per create (\`strace -c -f -p PID\` over $ns creates; strace slows the daemon, so only the counts mean anything):"
    echo
    echo "| syscall | bindfs | ferry |"
    echo "|---|---|---|"
    local sys
    # strace -c columns: % time, seconds, usecs/call, calls, [errors,] syscall.
    for sys in $(awk '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" {print $NF}' "$res"/*.strace 2>/dev/null | sort -u); do
        local cells=()
        for t in bindfs ferry; do
            cells+=("$(awk -v s="$sys" -v n="$ns" '$1 ~ /^[0-9.]+$/ && $NF == s {printf "%.2f", $4 / n}' "$res/$t.strace" 2>/dev/null)")
        done
        echo "| $sys | ${cells[0]:-—} | ${cells[1]:-—} |"
    done | sort -t'|' -k4 -gr
    if [[ -f $res/ferry.perf ]]; then
        local cpu
        cpu=$(awk '$1 == "ferry" && $2 == "create" && $3 == "daemon_cpu" {print $4}' "$res/stats" | median)
        echo
        echo "Where the ferry daemon's CPU goes in a create (\`perf record -F 2999 --call-graph dwarf -p PID\` over $n creates, samples split by request and by part; µs scaled to the median daemon CPU per create above):"
        echo
        perf script -i "$res/ferry.perf" -F comm,tid,ip,sym --no-inline 2>/dev/null | python3 "$scratch/categorize.py" "$n" "$cpu"
        echo
        echo "Hot spots by self time (\`perf report --no-children --sort dso,sym\`, over 0.7%):"
        echo
        echo '```'
        perf report -i "$res/ferry.perf" --no-children --sort dso,sym --stdio -g none --percent-limit 0.7 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -30
        echo '```'
        if [[ -n ${FERRY_PROFILE_KEEP:-} ]]; then
            cp "$res/ferry.perf" "$FERRY_PROFILE_KEEP"
            echo
            echo "(perf data kept in \`$FERRY_PROFILE_KEEP\`)"
        fi
    fi
    echo
    echo "Command: \`FERRY_BENCH_PARTS=profile FERRY_BENCH_TARGETS=$targets FERRY_BENCH_REPS=$reps FERRY_PROFILE_FILES=$n FERRY_PROFILE_STRACE_FILES=$ns${FERRY_BENCH_FERRY_OPTIONS:+ FERRY_BENCH_FERRY_OPTIONS=$FERRY_BENCH_FERRY_OPTIONS} scripts/bench-fs.sh\`"
    echo
}

if has "$parts" small; then small_part; fi
if has "$parts" fsmark; then fsmark_part; fi
if has "$parts" profile; then profile_part; fi
