#!/usr/bin/env bash
# ferry's main job on the embedded default: one volume on a `dir:` backend,
# mounted at two mountpoints with two stores, as two hosts would. A tree
# written on one appears on the other without a remount; a file created on
# both at once is a conflict, resolved the same way on both and listed by
# `ferry status`; then both unmount, their stores pass fsck, and a remount
# shows everything still there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh run
cargo build --release -q -p ferry
ferry=$PWD/target/release/ferry
work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
vol=$work/volume a=$work/host-a b=$work/host-b
mkdir -p "$a" "$b"
cleanup() {
    for m in "$a" "$b"; do
        "$ferry" umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# Waits (at most 30 s) until the command in "$@" succeeds.
wait_for() {
    for _ in $(seq 300); do "$@" && return 0; sleep 0.1; done
    echo "timed out waiting for: $*" >&2
    return 1
}

echo "== ferry init dir:$vol; mount it twice (host A, host B)"
"$ferry" init "dir:$vol" --name demo
"$ferry" mount --store "$work/store-a" --backend "dir:$vol" "$a"
"$ferry" mount --store "$work/store-b" --backend "dir:$vol" "$b"

echo "== host A: a real source tree and a note"
mkdir -p "$a/src"
# The biggest crate in cargo's cache, or ferry's own sources.
crate=$(find ~/.cargo/registry/cache -name '*.crate' -printf '%s %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
if [ -n "$crate" ]; then tar -C "$a/src" -xzf "$crate"; else cp -r crates "$a/src/"; fi
echo "hello from host A" > "$a/hello.txt"
start=$(date +%s.%N)
"$ferry" sync "$a"
wait_for test -f "$b/hello.txt"
echo "host B sees hello.txt $(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $start}") s after host A's sync began:"
cat "$b/hello.txt"
sums() { (cd "$1" && find src -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum); }
same_src() { [ "$(sums "$a")" = "$(sums "$b" 2>/dev/null)" ]; }
wait_for same_src && echo "== all $(find "$b/src" -type f | wc -l) files of src/ identical on host B"

echo "== a conflict: both hosts create notes.txt at once"
echo "written on host A" > "$a/notes.txt" &
echo "written on host B" > "$b/notes.txt" &
wait
"$ferry" sync "$a"
"$ferry" sync "$b"
has_copy() { compgen -G "$1/notes.txt.conflict-*" > /dev/null; }
wait_for has_copy "$a"
wait_for has_copy "$b"
for h in "$a" "$b"; do
    echo "-- $(basename "$h"):"
    for f in "$h"/notes.txt*; do echo "   $(basename "$f"): $(cat "$f")"; done
done
echo "== ferry status, on both hosts"
"$ferry" status "$a"
"$ferry" status "$b"

echo "== unmount both, fsck both stores, remount host B"
before=$(sums "$b")
"$ferry" umount "$a"
"$ferry" umount "$b"
"$ferry" fsck --store "$work/store-a"
"$ferry" fsck --store "$work/store-b"
"$ferry" mount --store "$work/store-b" --backend "dir:$vol" "$b"
[ "$(sums "$b")" = "$before" ] && echo "== host B: every file identical after the remount"
df -h "$b" | tail -1
