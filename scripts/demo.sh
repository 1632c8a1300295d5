#!/usr/bin/env bash
# ferry's main job on the embedded default: mount a volume, use it, unmount,
# remount, and check that everything is still there and the change log
# matches the store.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh run
cargo build --release -q -p ferry
ferry=$PWD/target/release/ferry
work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
mnt=$work/mnt store=$work/store
mkdir -p "$mnt"
cleanup() { "$ferry" umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

echo "== ferry mount --store $store $mnt"
"$ferry" mount --store "$store" "$mnt"
mkdir -p "$mnt/src"
# A real source tree: the biggest crate in cargo's cache, or ferry's own.
crate=$(find ~/.cargo/registry/cache -name '*.crate' -printf '%s %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
if [ -n "$crate" ]; then tar -C "$mnt/src" -xzf "$crate"; else cp -r crates "$mnt/src/"; fi
echo "hello from ferry" > "$mnt/hello.txt"
ln "$mnt/hello.txt" "$mnt/hello-link.txt"
setfattr -n user.note -v demo "$mnt/hello.txt" 2>/dev/null || true
sync "$mnt/hello.txt"
find "$mnt" | head -20
stat -c '%n: %s bytes, %h links, mode %a' "$mnt/hello.txt"
sum_before=$(cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)

echo "== ferry umount, remount"
"$ferry" umount "$mnt"
"$ferry" fsck --store "$store"
"$ferry" mount --store "$store" "$mnt"
sum_after=$(cd "$mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)
[ "$sum_before" = "$sum_after" ] && echo "== all $(find "$mnt" -type f | wc -l) files identical after remount"
cat "$mnt/hello.txt"
df -h "$mnt" | tail -1
